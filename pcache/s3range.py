"""Fast ranged GETs from S3 for the block fetchers.

s3fs sends every request through one asyncio event loop thread, which caps a cold read at the speed
of that one thread. Block fetches need only "GET this byte range", so pcache presigns the object's
URL once (a local HMAC, no request) and sends plain HTTP/1.1 range requests from its fetch threads,
each with its own keep-alive connection; the socket reads release the GIL, so fetches really run in
parallel. Measured on SeaweedFS with 16 threads: about 2x s3fs's whole-object ``read()``.

Each GET carries ``If-Match`` with the ETag the reader pinned, so a block of a changed object is never
mixed into an older version: the origin answers 412 and the reader gets :class:`StaleObjectError`.
"""

from __future__ import annotations

import errno
import http.client
import os
import ssl
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from pcache.errors import StaleObjectError

_PRESIGN_SECONDS = 3600
# Per-request limits, clipped to the caller's deadline: a dead or blackholed origin (one that accepts
# and never answers) costs at most this much per try, never a whole socket default.
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0
# Statuses that say "this request is wrong", not "the origin is struggling": retrying cannot help.
_RETRYABLE_4XX = frozenset({408, 429})


class S3RangeReader:
    """Ranged GETs through presigned URLs of an s3fs filesystem.

    Args:
        fs: An ``s3fs.S3FileSystem`` (used only to presign; credentials never leave it).
        connect_timeout: Seconds to wait for a TCP (and TLS) connection.
        read_timeout: Seconds to wait for each socket read of a response.
    """

    def __init__(self, fs: Any, connect_timeout: float = CONNECT_TIMEOUT, read_timeout: float = READ_TIMEOUT) -> None:
        self.fs = fs
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._urls: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        # Same TLS trust as botocore: client_kwargs["verify"] (False, or a CA bundle path), else AWS_CA_BUNDLE.
        verify = (getattr(fs, "client_kwargs", None) or {}).get("verify", os.environ.get("AWS_CA_BUNDLE", True))
        if verify is False:
            self._ssl = ssl._create_unverified_context()
        else:
            self._ssl = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)

    def _presigned(self, path: str, refresh: bool = False) -> str:
        now = time.monotonic()
        with self._lock:
            hit = self._urls.get(path)
        if hit is not None and not refresh and now - hit[0] < _PRESIGN_SECONDS / 2:
            return hit[1]
        url = self.fs.url(path, expires=_PRESIGN_SECONDS)
        with self._lock:
            if len(self._urls) > 10_000:
                self._urls.clear()
            self._urls[path] = (now, url)
        return url

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        if self._local.__dict__.get("pid") != os.getpid():
            # A forked child must not share the parent's keep-alive sockets: drop them (without closing,
            # which would only close the child's copy anyway) and connect afresh.
            self._local.__dict__.update(pid=os.getpid(), conns={})
        conns: dict[tuple[str, str], http.client.HTTPConnection] = self._local.__dict__["conns"]
        conn = conns.get((scheme, netloc))
        if conn is None:
            if scheme == "https":
                conn = http.client.HTTPSConnection(netloc, timeout=self.connect_timeout, context=self._ssl)
            else:
                conn = http.client.HTTPConnection(netloc, timeout=self.connect_timeout)
            conns[(scheme, netloc)] = conn
        return conn

    def _drop(self, scheme: str, netloc: str) -> None:
        conn = self._local.__dict__.get("conns", {}).pop((scheme, netloc), None)
        if conn is not None:
            conn.close()

    def _limits(self, deadline: float | None) -> tuple[float, float]:
        """Connect and read timeouts for one request, clipped to the time left before ``deadline``."""
        if deadline is None:
            return self.connect_timeout, self.read_timeout
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed before the request was sent")
        return min(self.connect_timeout, left), min(self.read_timeout, left)

    def get_range(self, path: str, start: int, end: int, etag: str | None = None,
                  deadline: float | None = None) -> bytes:
        """Return bytes ``[start, end)`` of ``path``.

        Args:
            path: ``bucket/key``.
            start: First byte.
            end: One past the last byte.
            etag: Version to pin (sent as ``If-Match``).
            deadline: ``time.monotonic()`` time by which the request must end (connect and read
                timeouts are clipped to it).

        Raises:
            FileNotFoundError: 404. PermissionError: 403 that a fresh signature does not fix.
            StaleObjectError: the ETag no longer matches (412). OSError(EINVAL): any other 4xx but 408
            and 429 (a bad request; not retried). OSError: other failures (retryable).
        """
        body = self._get(path, start, end, etag, deadline, None)
        assert body is not None
        return body

    def get_range_into(self, path: str, start: int, end: int, out: memoryview, etag: str | None = None,
                       deadline: float | None = None) -> None:
        """Like :meth:`get_range`, but the body lands in ``out`` (``end - start`` bytes), with no allocation.

        The socket reads go straight into ``out``: a cold multi-block read receives each block into its
        place in the caller's buffer instead of into a fresh 4 MiB ``bytes`` (whose pages fault in
        anew per block) that is then copied. A short body raises ``ConnectionError`` (retryable);
        ``out`` may then hold part of it.
        """
        self._get(path, start, end, etag, deadline, out)

    def _get(self, path: str, start: int, end: int, etag: str | None, deadline: float | None,
             out: memoryview | None) -> bytes | None:
        url = f"s3://{path}"
        for attempt in range(2):
            parts = urlsplit(self._presigned(path, refresh=attempt > 0))
            conn = self._connection(parts.scheme, parts.netloc)
            headers = {"Range": f"bytes={start}-{end - 1}"}
            if etag:
                headers["If-Match"] = f'"{etag}"'
            connect_s, read_s = self._limits(deadline)
            try:
                if conn.sock is None:
                    conn.timeout = connect_s
                    conn.connect()
                conn.sock.settimeout(read_s)
                conn.request("GET", f"{parts.path}?{parts.query}", headers=headers)
                resp = conn.getresponse()
                if out is not None and resp.status == 206:
                    _read_exactly(resp, out)
                    return None
                body = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                self._drop(parts.scheme, parts.netloc)
                raise ConnectionError(f"GET {url} bytes {start}-{end - 1}: {exc!r}") from exc
            if resp.status in (200, 206):
                # A server may ignore Range and send the whole object (200): cut out what was asked.
                data = body[start:end] if resp.status == 200 else body
                if out is None:
                    return data
                if len(data) != len(out):
                    raise ConnectionError(f"GET {url} bytes {start}-{end - 1}: got {len(data)} bytes")
                out[:] = data
                return None
            if resp.status == 403 and attempt == 0:
                continue  # the signature may have expired: presign again once
            if resp.status == 404:
                raise FileNotFoundError(f"no such object: {url}")
            if resp.status == 403:
                raise PermissionError(f"access denied to {url}: {body[:300]!r}")
            if resp.status == 412:
                raise StaleObjectError(url, etag or "?")
            if resp.status == 416:
                raise ValueError(f"range {start}-{end - 1} not satisfiable for {url}")
            if 400 <= resp.status < 500 and resp.status not in _RETRYABLE_4XX:
                raise OSError(errno.EINVAL, f"GET {url} bytes {start}-{end - 1}: bad request, HTTP {resp.status} "
                                            f"{body[:200]!r}")
            raise OSError(f"GET {url} bytes {start}-{end - 1}: HTTP {resp.status} {body[:200]!r}")
        raise AssertionError("unreachable")


def _read_exactly(resp: http.client.HTTPResponse, out: memoryview) -> None:
    """Read a 206 body that must be exactly ``len(out)`` bytes into ``out``.

    Raises:
        http.client.IncompleteRead: the body is shorter or longer than ``out`` (the connection is then
        dropped by the caller, since it is out of step).
    """
    if resp.length is not None and resp.length != len(out):
        raise http.client.IncompleteRead(b"", len(out))
    pos = 0
    while pos < len(out):
        got = resp.readinto(out[pos:])
        if not got:
            raise http.client.IncompleteRead(b"", len(out) - pos)
        pos += got
    if resp.read(1):  # chunked or unframed bodies: nothing may follow (also completes the response)
        raise http.client.IncompleteRead(b"", 0)
