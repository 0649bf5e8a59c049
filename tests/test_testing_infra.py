"""Tests for the S3 test infrastructure itself (SeaweedServer, ChaosProxy, fixtures)."""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import botocore.config
import botocore.exceptions
import botocore.session
import pytest
import s3fs

from pcache.testing import ChaosProxy, SeaweedServer

MiB = 1 << 20


def make_fs(options: dict[str, Any]) -> s3fs.S3FileSystem:
    # skip_instance_cache: fsspec would otherwise hand back a cached instance (with a stale
    # connection pool) for identical options across tests.
    return s3fs.S3FileSystem(**options, skip_instance_cache=True)


def raw_status(url: str, method: str = "GET") -> tuple[int, bytes]:
    """Unsigned request; returns (status, body) for error statuses too."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_put_get_roundtrip(s3_options: dict[str, Any], bucket: str) -> None:
    fs = make_fs(s3_options)
    fs.pipe(f"{bucket}/dir/obj.bin", b"hello seaweed")
    assert fs.cat(f"{bucket}/dir/obj.bin") == b"hello seaweed"
    assert fs.cat_file(f"{bucket}/dir/obj.bin", start=6, end=13) == b"seaweed"
    assert fs.info(f"{bucket}/dir/obj.bin")["size"] == 13
    assert fs.ls(f"{bucket}/dir", detail=False) == [f"{bucket}/dir/obj.bin"]


def test_restart_keeps_data(s3_server: SeaweedServer, s3_options: dict[str, Any], bucket: str) -> None:
    data = os.urandom(3 * MiB)
    fs = make_fs(s3_options)
    fs.pipe(f"{bucket}/persist", data)
    endpoint = s3_server.endpoint_url
    s3_server.restart()
    assert s3_server.endpoint_url == endpoint  # same ports: clients and proxies keep working
    assert fs.cat(f"{bucket}/persist") == data  # old instance reconnects (botocore retries)
    fs.pipe(f"{bucket}/after", b"new")  # the file-id sequence must not overwrite old needles
    fs2 = make_fs(s3_options)
    assert fs2.cat(f"{bucket}/persist") == data
    assert fs2.cat(f"{bucket}/after") == b"new"


def test_unauthenticated_and_wrong_secret_rejected(
    s3_server: SeaweedServer, s3_options: dict[str, Any], bucket: str
) -> None:
    make_fs(s3_options).pipe(f"{bucket}/secret", b"x")
    status, body = raw_status(f"{s3_server.endpoint_url}/{bucket}/secret")
    assert status == 403 and b"AccessDenied" in body
    bad = dict(s3_options, secret="not-the-secret")
    with pytest.raises(PermissionError):
        make_fs(bad).cat(f"{bucket}/secret")
    with pytest.raises(PermissionError):
        make_fs({**s3_options, "key": None, "secret": None, "anon": True}).cat(f"{bucket}/secret")


def test_proxy_forwards_and_counts(
    s3_options: dict[str, Any],
    bucket: str,
    chaos_proxy: Callable[..., ChaosProxy],
    proxy_options: Callable[[ChaosProxy], dict[str, Any]],
) -> None:
    proxy = chaos_proxy(fail_ratio=0.0)
    fs = make_fs(proxy_options(proxy))
    small = os.urandom(100_000)
    fs.pipe(f"{bucket}/small", small)
    proxy.reset_counts()

    assert fs.cat_file(f"{bucket}/small", start=1000, end=2000) == small[1000:2000]
    assert proxy.count("GET", f"/{bucket}/small") == 1
    assert proxy.get_ranges(f"/{bucket}/small") == ["bytes=1000-1999"]

    # Multipart through the proxy: SeaweedFS (like S3) rejects non-final parts < 5 MiB.
    big = os.urandom(12 * MiB)
    with fs.open(f"{bucket}/big", "wb", block_size=5 * MiB) as f:
        for off in range(0, len(big), MiB):
            f.write(big[off : off + MiB])
    assert proxy.count("PUT", f"/{bucket}/big") == 3  # 5 + 5 + 2 MiB parts
    assert proxy.count("POST", f"/{bucket}/big") == 2  # initiate + complete
    assert make_fs(s3_options).info(f"{bucket}/big")["ETag"].endswith('-3"')
    assert fs.cat(f"{bucket}/big") == big

    counts = proxy.method_counts()
    assert counts["PUT"] == 3 and counts["POST"] == 2 and counts["GET"] >= 2
    assert proxy.count() == sum(counts.values()) and not any(r.injected for r in proxy.records())
    assert proxy.path_counts()[("GET", f"/{bucket}/small")] == 1
    proxy.reset_counts()
    assert proxy.count() == 0 and proxy.get_ranges() == []


def test_proxy_fail_ratio_one_returns_503(
    s3_server: SeaweedServer, bucket: str, chaos_proxy: Callable[..., ChaosProxy]
) -> None:
    proxy = chaos_proxy(fail_ratio=1.0)
    status, body = raw_status(f"{proxy.endpoint_url}/{bucket}/anything")
    assert status == 503 and b"<Code>SlowDown</Code>" in body
    client = botocore.session.Session().create_client(
        "s3",
        endpoint_url=proxy.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name="us-east-1",
        config=botocore.config.Config(retries={"total_max_attempts": 1}),  # no retries
    )
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        client.put_object(Bucket=bucket, Key="k", Body=os.urandom(2 * MiB))  # body is drained
    assert exc.value.response["Error"]["Code"] == "SlowDown"
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert proxy.count() == 2 and proxy.count(include_injected=False) == 0
    proxy.fail_ratio = 0.0  # adjustable at runtime
    client.put_object(Bucket=bucket, Key="k", Body=b"ok")
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"ok"


def test_proxy_small_fail_ratio_read_succeeds_with_retries(
    s3_options: dict[str, Any],
    bucket: str,
    chaos_proxy: Callable[..., ChaosProxy],
    proxy_options: Callable[[ChaosProxy], dict[str, Any]],
) -> None:
    data = os.urandom(4 * MiB)
    make_fs(s3_options).pipe(f"{bucket}/flaky", data)
    proxy = chaos_proxy(fail_ratio=0.1, seed=5)  # seed 5 fails the 7th and 17th requests
    fs = make_fs(proxy_options(proxy))
    assert fs.cat(f"{bucket}/flaky") == data
    with fs.open(f"{bucket}/flaky", "rb", block_size=256 * 1024, cache_type="none") as f:
        chunks = [f.read(256 * 1024) for _ in range(16)]
    assert b"".join(chunks) == data
    assert sum(r.injected for r in proxy.records()) >= 1


def test_proxy_is_deterministic_and_adds_latency(chaos_proxy: Callable[..., ChaosProxy]) -> None:
    a, b = chaos_proxy(fail_ratio=0.5, seed=7), chaos_proxy(fail_ratio=0.5, seed=7)
    seq_a = [raw_status(f"{a.endpoint_url}/test-bucket-x/k", "HEAD")[0] for _ in range(12)]
    seq_b = [raw_status(f"{b.endpoint_url}/test-bucket-x/k", "HEAD")[0] for _ in range(12)]
    assert seq_a == seq_b and 503 in seq_a and any(s != 503 for s in seq_a)
    a.fail_ratio, a.latency_s = 0.0, 0.3
    t0 = time.monotonic()
    raw_status(f"{a.endpoint_url}/test-bucket-x/k", "HEAD")
    assert time.monotonic() - t0 >= 0.3


def test_proxy_reports_outage_while_server_down(
    s3_server: SeaweedServer,
    s3_options: dict[str, Any],
    bucket: str,
    chaos_proxy: Callable[..., ChaosProxy],
) -> None:
    make_fs(s3_options).pipe(f"{bucket}/k", b"v")
    proxy = chaos_proxy()
    s3_server.stop()
    status, body = raw_status(f"{proxy.endpoint_url}/{bucket}/k")
    assert status == 503 and b"ServiceUnavailable" in body
    s3_server.start()
    fs = make_fs(s3_server.storage_options(proxy.endpoint_url))
    assert fs.cat(f"{bucket}/k") == b"v"


class _FramingUpstream(BaseHTTPRequestHandler):
    """Upstream answering with each HTTP/1.1 body framing; echoes Host and the request body."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_PUT(self) -> None:
        if self.headers.get("Transfer-Encoding") == "chunked":
            body = b""
            while size := int(self.rfile.readline(), 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("X-Host", self.headers["Host"])
        if self.path == "/chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body))
        elif self.path == "/short":  # dies mid-body: half of the announced length, then close
            self.send_header("Content-Length", str(2 * len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
        elif self.path == "/eof":
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)


@pytest.fixture
def framing_upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FramingUpstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_proxy_relays_all_body_framings_over_keepalive(framing_upstream: str) -> None:
    with ChaosProxy(framing_upstream) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", int(proxy.endpoint_url.rsplit(":", 1)[1]), timeout=10)
        for path in ("/length", "/chunked", "/eof", "/length", "/chunked"):
            body = path.encode() * 1000
            conn.request("PUT", path, body=body, headers={"Host": "signed-host:9000"})
            resp = conn.getresponse()
            assert (resp.status, resp.read(), resp.getheader("X-Host")) == (200, body, "signed-host:9000")
        # A chunked request body (streaming upload without Content-Length) is streamed upstream chunked.
        conn.request("PUT", "/length", body=iter([b"ab", b"cde"]), encode_chunked=True)
        assert conn.getresponse().read() == b"abcde"
        assert proxy.method_counts() == {"PUT": 6}


def test_proxy_splices_large_bodies_and_survives_cut_ones(framing_upstream: str) -> None:
    """Content-Length bodies are spliced socket to socket; a client or an upstream leaving mid-body only
    ends that connection."""
    with ChaosProxy(framing_upstream) as proxy:
        port = int(proxy.endpoint_url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        body = os.urandom(5 * MiB)  # several pipe-fulls
        for _ in range(2):  # keep-alive: the second body follows the first on both connections
            conn.request("PUT", "/length", body=body)
            assert conn.getresponse().read() == body
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:  # a client that leaves
            sock.sendall(b"PUT /length HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            assert sock.recv(100).startswith(b"HTTP/1.1 200")
        cut = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        cut.request("PUT", "/short", body=b"x" * MiB)
        with pytest.raises(http.client.IncompleteRead):
            cut.getresponse().read()
        conn.request("PUT", "/length", body=body)
        assert conn.getresponse().read() == body
        assert proxy.method_counts() == {"PUT": 5}


def test_proxy_works_with_descriptors_past_1024(framing_upstream: str) -> None:
    """A long test process holds many descriptors; select() refuses those >= 1024 (the proxy then closed
    keep-alive connections without a response, failing unrelated tests late in a full run)."""
    fillers = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        with ChaosProxy(framing_upstream) as proxy:
            conn = http.client.HTTPConnection("127.0.0.1", int(proxy.endpoint_url.rsplit(":", 1)[1]), timeout=10)
            for _ in range(3):  # the second and third reuse the pooled upstream connection
                conn.request("PUT", "/length", body=b"x" * 1000)
                assert conn.getresponse().read() == b"x" * 1000
    finally:
        for fd in fillers:
            os.close(fd)
