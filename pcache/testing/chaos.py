"""A fault-injecting, request-counting HTTP reverse proxy for S3 tests.

Clients are pointed at :attr:`ChaosProxy.endpoint_url` with the real credentials. Requests are
forwarded byte-for-byte (request target and ``Host`` header included) so SigV4 signatures, which
cover the Host header and the canonical path/query, stay valid upstream.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import select
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit
from xml.sax.saxutils import escape

from pcache.testing.holds import Fault, Hold
from pcache.testing.splice import SPLICE, Splicer

__all__ = ["ChaosProxy", "Fault", "Hold", "RequestRecord"]

_BUF_SIZE = 1 << 20
# Hop-by-hop headers (RFC 9110 7.6.1) describe one connection and must not be forwarded. ``Expect`` is
# answered by this proxy itself (http.server sends "100 Continue") and is never part of a SigV4 signature.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "expect"}
)


@dataclass(frozen=True)
class RequestRecord:
    """One request seen by the proxy.

    Attributes:
        method: HTTP method, e.g. ``GET``.
        path: URL-decoded path without query, e.g. ``/bucket/key`` (path-style addressing).
        query: Raw query string (``""`` if none).
        range: The request's ``Range`` header, or None.
        status: Status code returned to the client.
        injected: True if the proxy answered with an injected failure instead of forwarding.
    """

    method: str
    path: str
    query: str
    range: str | None
    status: int
    injected: bool


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, proxy: ChaosProxy) -> None:
        self.proxy = proxy
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients dropping connections (timeouts, resets, stop()) are routine in fault tests.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Tracked so stop() can unblock handler threads parked on idle keep-alive connections.
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)


class _ClientGone(Exception):
    """The downstream client closed its connection mid-request."""


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 gives keep-alive towards the client (and makes the base class answer Expect: 100-continue).
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 120  # idle keep-alive connections and stalled uploads
    server: _Server

    _upstream: http.client.HTTPConnection | None = None
    _splicer: Splicer | None = None

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests run many thousands of requests; stderr noise helps nobody

    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_OPTIONS = do_PATCH = do_GET

    def finish(self) -> None:
        self._drop_upstream()
        self._drop_splicer()
        super().finish()

    def _drop_splicer(self) -> None:
        if self._splicer is not None:
            self._splicer.close()
            self._splicer = None

    # ------------------------------------------------------------------ request body
    def _read_exact(self, n: int) -> Iterator[bytes]:
        while n > 0:
            data = self.rfile.read(min(n, _BUF_SIZE))
            if not data:
                raise _ClientGone
            n -= len(data)
            yield data

    def _body_chunks(self) -> Iterator[bytes]:
        """Yield the request body as it arrives (Content-Length or chunked framing)."""
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            yield from self._read_exact(int(self.headers.get("Content-Length") or 0))
            return
        # An empty line (client gone) becomes b"x" so int() raises ValueError, treated as bad framing.
        while (size := int(self.rfile.readline(65537).split(b";", 1)[0].strip() or b"x", 16)) > 0:
            yield from self._read_exact(size)
            self.rfile.readline(3)  # CRLF after the chunk data
        while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
            pass  # trailers

    # ------------------------------------------------------------------ main path
    def _proxy(self) -> None:
        proxy = self.server.proxy
        split = urlsplit(self.path)
        path, query = unquote(split.path), split.query
        rng = self.headers.get("Range")
        if (latency := proxy.latency_s) > 0:
            time.sleep(latency)
        proxy._park(self.command, path, query, "request")
        drawn = proxy._should_fail()  # drawn first and always: a seed's sequence must not depend on faults
        if proxy._faulted(self.command, path, query) or drawn:
            self._inject_failure(path, query, rng)
            return
        try:
            resp = self._forward()
        except (_ClientGone, ValueError):  # ValueError: malformed chunked framing from the client
            self._drop_upstream()
            self.close_connection = True
            return
        except (OSError, http.client.HTTPException) as e:
            # Upstream down (e.g. SeaweedServer.restart() in progress): answer like an S3 outage.
            self._drop_upstream()
            proxy._record(RequestRecord(self.command, path, query, rng, 503, False))
            self._send_error_xml(503, "ServiceUnavailable", f"upstream unavailable: {e!r}", path)
            self.close_connection = True
            return
        proxy._record(RequestRecord(self.command, path, query, rng, resp.status, False))
        proxy._park(self.command, path, query, "response")
        try:
            self._relay_response(resp)
        except OSError:
            # Client went away mid-body; the upstream connection (and the splice pipe) hold unread data,
            # so drop them all.
            self._drop_upstream()
            self._drop_splicer()
            self.close_connection = True

    def _inject_failure(self, path: str, query: str, rng: str | None) -> None:
        proxy = self.server.proxy
        try:
            for _ in self._body_chunks():  # drain, so the keep-alive connection stays in sync
                pass
        except (_ClientGone, OSError, ValueError):
            self.close_connection = True
        status = proxy.fail_status
        proxy._record(RequestRecord(self.command, path, query, rng, status, True))
        self._send_error_xml(status, proxy.fail_code, "Injected failure (ChaosProxy)", path)

    def _send_error_xml(self, status: int, code: str, message: str, resource: str) -> None:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
            f"<Resource>{escape(resource)}</Resource><RequestId>chaos-{id(self):x}</RequestId></Error>"
        ).encode()
        try:
            self.send_response_only(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:
            self.close_connection = True

    def _connection(self) -> http.client.HTTPConnection:
        conn = self._upstream
        # A pooled connection the server has meanwhile closed shows up as readable (EOF); replace it
        # before sending, since a request body that has been streamed cannot be replayed.
        if conn is not None and conn.sock is not None:
            # poll, not select: select() refuses descriptors >= 1024, which a long test process reaches
            # (it raised ValueError, and the client saw its connection closed without a response).
            poller = select.poll()
            poller.register(conn.sock, select.POLLIN)
            if poller.poll(0):
                conn.close()
        if conn is None:
            p = self.server.proxy
            conn = self._upstream = http.client.HTTPConnection(
                p._up_host, p._up_port, timeout=p.upstream_timeout_s
            )
        return conn

    def _drop_upstream(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None

    def _forward(self) -> http.client.HTTPResponse:
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        has_body = chunked or int(self.headers.get("Content-Length") or 0) > 0
        conn = self._connection()
        reused = conn.sock is not None
        try:
            return self._send_upstream(conn, chunked)
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
            # The server closed an idle pooled connection just as we reused it. Safe to retry
            # only when there is no request body that has already been consumed.
            if not reused or has_body:
                raise
            self._drop_upstream()
            return self._send_upstream(self._connection(), chunked)

    def _send_upstream(self, conn: http.client.HTTPConnection, chunked: bool) -> http.client.HTTPResponse:
        # skip_host: the client's Host header goes upstream verbatim, it is part of the signature.
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        conn_tokens = {t.strip().lower() for t in self.headers.get("Connection", "").split(",")}
        for name, value in self.headers.items():
            low = name.lower()
            if low not in _HOP_BY_HOP and low not in conn_tokens:
                conn.putheader(name, value)
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for data in self._body_chunks():
            conn.send(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
        if chunked:
            conn.send(b"0\r\n\r\n")
        return conn.getresponse()

    def _splice_body(self, resp: http.client.HTTPResponse, upstream: socket.socket) -> None:
        """Relay a Content-Length body with ``splice`` (see :mod:`pcache.testing.splice`)."""
        # http.client may already hold the first body bytes in its read buffer: send those from Python
        # (peek returns the buffer without reading more when it is not empty), splice the rest.
        head = resp.read(min(len(resp.fp.peek(1)), resp.length or 0))
        self.wfile.write(head)
        if self._splicer is None:
            self._splicer = Splicer()
        self._splicer.relay(upstream, self.connection, resp.length or 0)
        resp.length = 0
        resp.read()  # marks the response complete, so the connection can send the next request
        if resp.will_close:
            self._drop_upstream()

    def _relay_response(self, resp: http.client.HTTPResponse) -> None:
        no_body = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
        self.send_response_only(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        if no_body:
            self.end_headers()
            resp.read()
            return
        if resp.chunked:
            mode = "chunked"
            self.send_header("Transfer-Encoding", "chunked")
        elif resp.length is not None:
            mode = "length"
        else:
            # Body delimited by upstream closing the connection: do the same towards the client.
            mode = "eof"
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if mode == "length" and SPLICE and resp.length and self._upstream is not None \
                and self._upstream.sock is not None:
            self._splice_body(resp, self._upstream.sock)
            return
        view = memoryview(bytearray(_BUF_SIZE))
        while True:
            n = resp.readinto(view)
            if not n:
                break
            self.wfile.write(b"%x\r\n%b\r\n" % (n, bytes(view[:n])) if mode == "chunked" else view[:n])
        if mode == "chunked":
            self.wfile.write(b"0\r\n\r\n")
        if resp.will_close:
            self._drop_upstream()


class ChaosProxy:
    """Loopback reverse proxy that injects S3-style 503s and latency, and counts requests.

    Failure decisions come from ``random.Random(seed)``, so a given seed yields the same
    fail/pass sequence (in request-arrival order). ``fail_ratio`` and ``latency_s`` may be changed
    while running.

    Args:
        upstream_url: Base URL of the real S3 endpoint, e.g. ``SeaweedServer.endpoint_url``.
        fail_ratio: Fraction of requests (0.0-1.0) answered with an injected error instead of forwarded.
        latency_s: Delay added before handling each request.
        seed: Seed for the failure decisions. The default (42) fails the 2nd request for any
            ``fail_ratio >= 0.03`` and 7 of the first 30 at 0.1, so short tests with low ratios still
            see faults (seed 0 would pass its first 30 requests at 0.1).
        fail_status: HTTP status of injected failures.
        fail_code: S3 error code in the injected XML body (``SlowDown`` is retried by botocore).
        upstream_timeout_s: Socket timeout for upstream connections.
    """

    def __init__(
        self,
        upstream_url: str,
        *,
        fail_ratio: float = 0.0,
        latency_s: float = 0.0,
        seed: int = 42,
        fail_status: int = 503,
        fail_code: str = "SlowDown",
        upstream_timeout_s: float = 60.0,
    ) -> None:
        up = urlsplit(upstream_url)
        if up.scheme != "http" or not up.hostname:
            raise ValueError(f"ChaosProxy needs an http:// upstream URL, got {upstream_url!r}")
        self.upstream_url = upstream_url
        self._up_host = up.hostname
        self._up_port = up.port or 80
        self.fail_ratio = fail_ratio
        self.latency_s = latency_s
        self.fail_status = fail_status
        self.fail_code = fail_code
        self.upstream_timeout_s = upstream_timeout_s
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._holds: list[Hold] = []
        self._faults: list[Fault] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def endpoint_url(self) -> str:
        """URL clients should use instead of the upstream URL."""
        if self._server is None:
            raise RuntimeError("ChaosProxy is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> ChaosProxy:
        """Bind a free loopback port and serve in a background thread.

        Returns:
            ``self``, for chaining.
        """
        if self._server is not None:
            return self
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="chaos-proxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close all client connections (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        with self._lock:
            for hold in self._holds:
                hold.release()  # parked handler threads must not outlive the proxy
        server.shutdown()
        with server.sockets_lock:
            open_socks = list(server.open_sockets)
        for sock in open_socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> ChaosProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.endpoint_url if self._server is not None else "stopped"
        return f"ChaosProxy({where} -> {self.upstream_url}, fail_ratio={self.fail_ratio}, latency_s={self.latency_s})"

    # ------------------------------------------------------------------ fault injection
    def _should_fail(self) -> bool:
        with self._lock:
            # Always draw, so the decision sequence for a seed does not depend on fail_ratio changes.
            draw = self._rng.random()
        return draw < self.fail_ratio

    def hold(self, method: str | None = None, path: str | None = None, query: str | None = None, *,
             stage: str = "request", times: int = 1) -> Hold:
        """Park the next ``times`` requests matching ``method``, ``path`` and ``query`` until released.

        For example ``proxy.hold("POST", "/bucket/key", "uploads", stage="response")`` lets S3 create a
        multipart upload and keeps the client waiting for the id, so a test can kill the client while
        CreateMultipartUpload is in flight. :meth:`stop` releases every hold.

        Returns:
            The :class:`Hold`; ``hold.wait()`` blocks until a request is parked, ``hold.release()`` frees it.
        """
        hold = Hold(method, path, query, stage, times)
        with self._lock:
            self._holds.append(hold)
        return hold

    def fail(self, method: str | None = None, path: str | None = None, query: str | None = None, *,
             skip: int = 0, times: int | None = 1) -> Fault:
        """Answer chosen requests with the injected error (``fail_status``), whatever ``fail_ratio`` says.

        For example ``proxy.fail("GET", query="list-type", skip=2, times=None)`` lets two listings through
        and fails every later one until ``fault.cancel()``: a test can put a 503 on exactly the n-th
        listing an operation makes.

        Returns:
            The :class:`Fault`; its ``seen`` and ``failed`` count the matching requests.
        """
        fault = Fault(method, path, query, skip, times)
        with self._lock:
            self._faults.append(fault)
        return fault

    def _faulted(self, method: str, path: str, query: str) -> bool:
        with self._lock:
            # Every rule counts the request (no short-circuit), so each one's skip counts all matches.
            return any([f._take(method, path, query) for f in self._faults])

    def _park(self, method: str, path: str, query: str, stage: str) -> None:
        with self._lock:
            hold = next((h for h in self._holds if h._matches(method, path, query, stage)), None)
            if hold is not None:
                hold.held += 1
        if hold is not None:
            hold.arrived.set()
            hold._released.wait(600)  # bounded: a forgotten hold must not pin a thread for ever

    # ------------------------------------------------------------------ counters
    def _record(self, rec: RequestRecord) -> None:
        # Called before the response is sent, so a client that has its answer sees it counted.
        with self._lock:
            self._records.append(rec)

    def records(self) -> list[RequestRecord]:
        """Snapshot of all requests since the last :meth:`reset_counts`, in order of response."""
        with self._lock:
            return list(self._records)

    def reset_counts(self) -> None:
        """Forget all recorded requests."""
        with self._lock:
            self._records.clear()

    def count(
        self, method: str | None = None, path: str | None = None, *, include_injected: bool = True
    ) -> int:
        """Number of requests matching ``method`` and/or ``path`` (None matches anything; ``count()`` is the total).

        Args:
            method: e.g. ``"GET"``.
            path: URL-decoded path without query, e.g. ``"/test-bucket-1/key"``.
            include_injected: Also count requests answered with an injected failure.

        Returns:
            The number of matching requests.
        """
        return sum(
            1
            for r in self.records()
            if (method is None or r.method == method)
            and (path is None or r.path == path)
            and (include_injected or not r.injected)
        )

    def method_counts(self) -> Counter[str]:
        """Requests per method, e.g. ``Counter({"GET": 3, "PUT": 1})``."""
        return Counter(r.method for r in self.records())

    def path_counts(self) -> Counter[tuple[str, str]]:
        """Requests per ``(method, path)``."""
        return Counter((r.method, r.path) for r in self.records())

    def get_ranges(self, path: str | None = None, *, include_injected: bool = False) -> list[str | None]:
        """``Range`` headers of GETs (None for whole-object GETs) in order; ``set()`` it for distinct ranges.

        Args:
            path: Only GETs of this path; None for all.
            include_injected: Also include GETs that got an injected failure (and were presumably retried).

        Returns:
            The Range header values.
        """
        return [
            r.range
            for r in self.records()
            if r.method == "GET" and (path is None or r.path == path) and (include_injected or not r.injected)
        ]
