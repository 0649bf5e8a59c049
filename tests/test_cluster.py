"""Three pcache nodes as separate processes on loopback, against SeaweedFS behind the chaos proxy."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from urllib.parse import urlsplit

import pytest
import s3fs
import xxhash

from pcache import ConfigError
from pcache.cluster.auth import sign_request
from pcache.cluster.protocol import block_query
from pcache.testing import NodeProcess, write_token

MiB = 1024 * 1024
PY = sys.executable


@pytest.fixture
def token_file(tmp_path):
    return write_token(tmp_path / "token")


@pytest.fixture
def start_nodes(tmp_path, s3_server, token_file):
    nodes: list[NodeProcess] = []
    env = dict(os.environ, AWS_ACCESS_KEY_ID=s3_server.access_key, AWS_SECRET_ACCESS_KEY=s3_server.secret_key)

    def start(n: int, endpoint: str, *extra_args: str) -> list[str]:
        new = [NodeProcess(tmp_path / f"node{len(nodes) + i}", token_file, endpoint, env, extra_args)
               for i in range(n)]
        nodes.extend(new)
        return [node.start() for node in new]

    start.nodes = nodes  # type: ignore[attr-defined]
    yield start
    for node in nodes:
        if node.proc is not None and node.proc.poll() is None:
            assert node.stop() == 0, "node did not stop cleanly on SIGTERM"


READER = textwrap.dedent("""
    import hashlib, json, os, sys, time, fsspec
    cache_dir, url, options, peers, token, go = sys.argv[1:7]
    fs = fsspec.filesystem("pcache", target_protocol="s3", target_options=json.loads(options),
                           cache_dir=cache_dir, peers=tuple(peers.split(",")), token_file=token)
    fs.info(url)
    open(cache_dir + ".ready", "w").close()  # set up and HEAD done: the test may reset the counts
    while not os.path.exists(go):
        time.sleep(0.005)
    with fs.open(url) as f:
        data = b"".join(iter(lambda: f.read(5 * 1024 * 1024), b""))
    print(hashlib.sha256(data).hexdigest(), json.dumps(fs.peers.counters))
""")


def seed(s3_options, url: str, size: int) -> bytes:
    """Put ``size`` random bytes at ``url`` (directly, not through any proxy) and return them."""
    data = os.urandom(size)
    s3fs.S3FileSystem(skip_instance_cache=True, **s3_options).pipe_file(url, data)
    return data


def readers(tmp_path, n, url, s3_server, proxy, peers, token_file, go):
    """Start ``n`` reader processes that read ``url`` through the cluster once ``go`` exists."""
    options = json.dumps(s3_server.storage_options(endpoint_url=proxy.endpoint_url))
    return [subprocess.Popen([PY, "-c", READER, str(tmp_path / f"reader{i}"), url, options, ",".join(peers),
                              token_file, str(go)], stdout=subprocess.PIPE, text=True)
            for i in range(n)]


def wait_ready(tmp_path, procs) -> None:
    """Wait until every reader made its filesystem and its HEAD (instead of sleeping a fixed time)."""
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"reader{i}.ready").exists() for i in range(len(procs))):
        assert all(p.poll() is None for p in procs), "a reader exited before it was ready"
        assert time.monotonic() < deadline, "readers never became ready"
        time.sleep(0.05)


def collect(procs, data: bytes) -> list[dict]:
    """Wait for every reader; assert each one exited 0 with exactly ``data``; return their counters."""
    outputs = [p.communicate(timeout=300)[0].split(maxsplit=1) for p in procs]
    assert all(p.returncode == 0 for p in procs), "a reader failed"
    assert {digest for digest, _ in outputs} == {hashlib.sha256(data).hexdigest()}
    return [json.loads(counters) for _, counters in outputs]


def test_unsigned_or_wrongly_signed_requests_get_401(s3_server, start_nodes) -> None:
    (node,) = start_nodes(1, s3_server.endpoint_url)
    parts = urlsplit(node)
    query = block_query("test-bucket-x/k", "v", 10, 0)

    def status(path, headers):
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
        conn.request("GET", path, headers=headers)
        return conn.getresponse().status

    assert status(query, {}) == 401
    assert status(query, sign_request(b"not-the-shared-secret!!", "GET", query)) == 401
    assert status(query, sign_request(b"x" * 32, "GET", "/v1/other")) == 401
    assert status("/metrics", {}) == 401
    assert status("/healthz", {}) == 200


def test_three_nodes_four_readers_each_make_one_get_per_block(tmp_path, s3_server, s3_options, bucket,
                                                              chaos_proxy, start_nodes, token_file) -> None:
    proxy = chaos_proxy(latency_s=0.005)
    url = f"{bucket}/shared/big.bin"
    data = seed(s3_options, url, 64 * MiB)
    go = tmp_path / "go"
    procs = readers(tmp_path, 12, url, s3_server, proxy, start_nodes(3, proxy.endpoint_url), token_file, go)
    wait_ready(tmp_path, procs)
    proxy.reset_counts()
    go.touch()
    counters = collect(procs, data)
    assert sum(c["peer_hits"] for c in counters) == 12 * 16, counters  # every block came from a peer
    gets = proxy.get_ranges(f"/{url}")
    assert len(gets) == 16 and len(set(gets)) == 16, f"{len(gets)} origin GETs for 16 blocks"


def test_killing_a_node_mid_read_fails_no_read(tmp_path, s3_server, s3_options, bucket, chaos_proxy,
                                                start_nodes, token_file) -> None:
    proxy = chaos_proxy(latency_s=0.05)  # slow origin: the kill lands while blocks are in flight
    url = f"{bucket}/shared/kill.bin"
    data = seed(s3_options, url, 48 * MiB)
    go = tmp_path / "go"
    procs = readers(tmp_path, 3, url, s3_server, proxy, start_nodes(3, proxy.endpoint_url), token_file, go)
    wait_ready(tmp_path, procs)
    go.touch()
    time.sleep(0.3)
    start_nodes.nodes[1].kill()  # SIGKILL, mid-read
    collect(procs, data)  # every read completed with the right bytes


def test_bad_token_file_and_peer_url_are_rejected_at_startup(tmp_path) -> None:
    loose = tmp_path / "loose"
    loose.write_text("x" * 32)
    loose.chmod(0o644)
    for token in (str(tmp_path / "missing"), str(loose)):
        out = subprocess.run([PY, "-m", "pcache.cli", "serve", "--listen", "127.0.0.1:0", "--cache-dir",
                              str(tmp_path / "n"), "--token-file", token], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2 and token in out.stderr
    import fsspec

    with pytest.raises(ConfigError, match="peers"):
        fsspec.filesystem("pcache", target_protocol="file", cache_dir=str(tmp_path / "c"),
                          peers=("127.0.0.1:9000",), token_file=str(loose), skip_instance_cache=True)


def test_metrics_and_stat_node(tmp_path, s3_server, s3_options, bucket, start_nodes, token_file) -> None:
    (node,) = start_nodes(1, s3_server.endpoint_url)
    data = seed(s3_options, f"{bucket}/m.bin", 6 * MiB)
    import fsspec

    fs = fsspec.filesystem("pcache", target_protocol="s3", target_options=s3_options,
                           cache_dir=str(tmp_path / "reader"), peers=(node,), token_file=token_file,
                           skip_instance_cache=True)
    assert fs.cat_file(f"{bucket}/m.bin") == data
    out = subprocess.run([PY, "-m", "pcache.cli", "stat", "--node", node, "--token-file", token_file, "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert stats["pcache_served_bytes"] == len(data) and stats["pcache_misses"] == 2
    human = subprocess.run([PY, "-m", "pcache.cli", "stat", "--node", node, "--token-file", token_file],
                           capture_output=True, text=True, timeout=60).stdout
    assert "served to peers" in human and "6.0 MiB" in human


def test_peer_with_bad_checksums_is_a_counted_miss(tmp_path, s3_options, bucket, token_file) -> None:
    """A broken peer (answers garbage with a checksum that does not match) never reaches the reader."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import fsspec

    class Broken(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = b"garbage" * 1000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Pcache-Checksum", "0" * 16)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        data = seed(s3_options, f"{bucket}/b.bin", MiB)
        fs = fsspec.filesystem("pcache", target_protocol="s3", target_options=s3_options,
                               cache_dir=str(tmp_path / "r"), peers=(f"http://127.0.0.1:{server.server_port}",),
                               token_file=token_file, skip_instance_cache=True)
        assert fs.cat_file(f"{bucket}/b.bin") == data
        assert fs.peers.counters["peer_checksum_errors"] >= 1 and fs.peers.counters["peer_hits"] == 0
    finally:
        server.shutdown()


def test_cluster_warm_spreads_blocks_over_their_owners(tmp_path, s3_server, s3_options, bucket, chaos_proxy,
                                                       start_nodes, token_file) -> None:
    proxy = chaos_proxy()
    s3 = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options)
    for i in range(3):
        s3.pipe_file(f"{bucket}/ds/shard-{i}.bin", os.urandom(8 * MiB))
    peers = start_nodes(3, proxy.endpoint_url)
    env = dict(os.environ, AWS_ACCESS_KEY_ID=s3_server.access_key, AWS_SECRET_ACCESS_KEY=s3_server.secret_key)
    out = subprocess.run([PY, "-m", "pcache.cli", "warm", "--cache-dir", str(tmp_path / "warmer"), "--json",
                          "--endpoint-url", proxy.endpoint_url, "--peers", ",".join(peers),
                          "--token-file", token_file, f"s3://{bucket}/ds/"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"files": 3, "bytes": 24 * MiB}
    ranged = [(r.path, r.range) for r in proxy.records() if r.method == "GET" and r.range]  # not listings
    assert len(ranged) == 6 and len(set(ranged)) == 6, f"each 4 MiB block fetched once, by its owner: {ranged}"
    blocks = [sum(1 for p in (tmp_path / f"node{i}" / "blocks").rglob("*") if p.is_file()) for i in range(3)]
    assert sum(blocks) == 6 and max(blocks) < 6, blocks  # on the owners, not all on one node
    assert not any(p.is_file() for p in (tmp_path / "warmer").rglob("blocks/*/*")), "warm copied data here"
    proxy.reset_counts()
    fs = __import__("fsspec").filesystem("pcache", target_protocol="s3",
                                         target_options=s3_server.storage_options(endpoint_url=proxy.endpoint_url),
                                         cache_dir=str(tmp_path / "reader"), peers=tuple(peers),
                                         token_file=token_file, skip_instance_cache=True)
    fs.cat_file(f"{bucket}/ds/shard-1.bin")
    assert [r for r in proxy.get_ranges() if r is not None] == [], "a warmed prefix still went to the origin"


REPLICA_WRITER = textwrap.dedent("""
    import json, sys, time, fsspec
    cache_dir, url, options, peers, token, size = sys.argv[1:7]
    fs = fsspec.filesystem("pcache", target_protocol="s3", target_options=json.loads(options),
                           cache_dir=cache_dir, peers=tuple(peers.split(",")), token_file=token, replicas=1,
                           upload_part_size="5MiB", upload_concurrency=2)
    with fs.open(url, "wb") as f:
        f.write(bytes(range(256)) * (int(size) // 256))
    print(json.dumps(fs.writeback.journal.pending(fs.url(url))[0]["replica"]), flush=True)
    if sys.argv[7] == "flush":
        fs.flush(timeout=120)
        print("flushed", flush=True)
    time.sleep(60)
""")


def _metric(node: str, token_file: str, name: str) -> float:
    out = subprocess.run([PY, "-m", "pcache.cli", "stat", "--node", node, "--token-file", token_file, "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout).get(name, 0.0)


def test_replica_survives_kill9_of_writer_node_and_peer_flush_uploads_it(
        tmp_path, s3_server, s3_options, bucket, chaos_proxy, start_nodes, token_file) -> None:
    peers = start_nodes(3, s3_server.endpoint_url)
    proxy = chaos_proxy(latency_s=0.5)  # the writer's origin is slow: its upload cannot finish in time
    url, size = f"{bucket}/ckpt/step300/rank0.distcp", 12 * MiB
    writer_dir = tmp_path / "writer"
    writer = subprocess.Popen([PY, "-c", REPLICA_WRITER, str(writer_dir), url,
                               json.dumps(s3_server.storage_options(endpoint_url=proxy.endpoint_url)),
                               ",".join(peers), token_file, str(size), "no-flush"],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert writer.stdout is not None
    replica = json.loads(writer.stdout.readline())  # printed after close() returned
    os.killpg(writer.pid, signal.SIGKILL)  # the writer's node is lost: process, uploader and disk
    writer.wait()
    subprocess.run(["rm", "-rf", str(writer_dir)], check=True)
    s3 = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options)
    assert not s3.exists(url), "upload finished before the kill; the test proved nothing"
    holder = peers.index(replica["peer"])
    assert _metric(peers[holder], token_file, "pcache_standby_replicas") == 1
    env = dict(os.environ, AWS_ACCESS_KEY_ID=s3_server.access_key, AWS_SECRET_ACCESS_KEY=s3_server.secret_key)
    results = []
    for i in range(3):  # an operator runs flush on every surviving node; only the holder has work
        out = subprocess.run([PY, "-m", "pcache.cli", "flush", "--cache-dir", str(tmp_path / f"node{i}"),
                              "--endpoint-url", s3_server.endpoint_url, "--adopt-replicas", "--json"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        results.append(json.loads(out.stdout))
    assert [r["replicas_adopted"] for r in results] == [int(i == holder) for i in range(3)], results
    assert results[holder]["uploaded"] == 1
    s3.invalidate_cache()
    assert s3.cat_file(url) == bytes(range(256)) * (size // 256)
    assert s3.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []


def test_uploaded_write_drops_its_replica_and_never_replicates_to_its_own_node(
        tmp_path, s3_server, s3_options, bucket, start_nodes, token_file) -> None:
    peers = start_nodes(3, s3_server.endpoint_url)
    url, size = f"{bucket}/ckpt/step400/rank0.distcp", 2 * MiB
    # A writer sharing node0's cache_dir must skip node0 (409) for a URL that ranks node0 first: pick
    # such URLs on purpose, so the test never passes because the hashing happened to avoid node0.
    from pcache.cluster import Placement

    def ranked(k: int) -> list[str]:
        return list(Placement(tuple(peers)).ranked(xxhash.xxh3_128_digest(f"s3://{url}.{k}".encode())))

    def ranks_node0_first(k: int) -> bool:
        return ranked(k)[0] == peers[0]

    suffixes = [k for k in range(200) if ranks_node0_first(k)][:2] + [k for k in range(200) if not ranks_node0_first(k)][:2]
    assert len(suffixes) == 4
    writers = []
    for k in suffixes:
        w = subprocess.Popen([PY, "-c", REPLICA_WRITER, str(tmp_path / "node0"), f"{url}.{k}",
                              json.dumps(s3_options), ",".join(peers), token_file, str(size), "flush"],
                             stdout=subprocess.PIPE, text=True)
        assert w.stdout is not None
        replica = json.loads(w.stdout.readline())
        assert replica["peer"] != peers[0], "replicated onto the writer's own cache_dir"
        # the owner, or the next owner when the owner is node0 itself (409): checks the ranking used above
        assert replica["peer"] == [p for p in ranked(k) if p != peers[0]][0]
        assert w.stdout.readline().strip() == "flushed"
        w.kill()
        w.wait()
        writers.append(replica["peer"])
    s3 = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options)
    assert all(s3.cat_file(f"{url}.{k}") == bytes(range(256)) * (size // 256) for k in suffixes)
    for node in set(writers):  # the uploader told each holder to drop its standby copy
        assert _metric(node, token_file, "pcache_standby_replicas") == 0


def test_a_corrupt_block_on_the_owner_is_verified_dropped_and_refetched_once(
        tmp_path, s3_server, s3_options, bucket, chaos_proxy, start_nodes, token_file) -> None:
    """The owner sends disk blocks unverified (sendfile); the reader's end-to-end check catches a flip."""
    import fsspec

    proxy = chaos_proxy()
    (node,) = start_nodes(1, proxy.endpoint_url, "--memory-bytes", "0")  # blocks come from its disk
    data = seed(s3_options, f"{bucket}/flip.bin", 6 * MiB)

    def reader(name: str):
        return fsspec.filesystem("pcache", target_protocol="s3", target_options=s3_options,
                                 cache_dir=str(tmp_path / name), peers=(node,), token_file=token_file,
                                 skip_instance_cache=True)

    assert reader("r1").cat_file(f"{bucket}/flip.bin") == data
    deadline = time.monotonic() + 10
    while len(blocks := [p for p in (tmp_path / "node0" / "blocks").rglob("*") if p.is_file()]) < 2:
        assert time.monotonic() < deadline, "the owner never stored its blocks"
        time.sleep(0.05)
    raw = bytearray(blocks[0].read_bytes())
    raw[-100] ^= 0x01  # a bit flip in the payload
    blocks[0].write_bytes(bytes(raw))
    proxy.reset_counts()
    fs = reader("r2")
    assert fs.cat_file(f"{bucket}/flip.bin") == data
    assert fs.peers.counters["peer_checksum_errors"] == 1 and fs.peers.counters["peer_hits"] == 2
    assert len([r for r in proxy.get_ranges() if r is not None]) == 1, "the owner refetched the bad block once"
    assert _metric(node, token_file, "pcache_corrupt_blocks") == 1


def test_a_replica_upload_cut_off_midway_leaves_nothing_behind(tmp_path, s3_server, start_nodes, token_file) -> None:
    import socket

    from pcache.cluster.replica import replica_query

    (node,) = start_nodes(1, s3_server.endpoint_url)
    size = 8 * 1024 * 1024
    entry = {"id": "cut", "url": "s3://b/ckpt", "protocol": "s3", "path": "b/ckpt", "options": {},
             "size": size, "xxh3_128": "0" * 32, "created": time.time()}
    query = replica_query(entry, "another-node")
    with open(token_file, "rb") as fh:
        token = fh.read().strip()
    parts = urlsplit(node)
    for _ in range(5):  # the writer hangs up while the node is writing what it got so far
        sock = socket.create_connection((parts.hostname, parts.port))
        headers = {**sign_request(token, "PUT", query), "Content-Length": str(size), "Host": parts.netloc}
        head = f"PUT {query} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        sock.sendall(head.encode() + os.urandom(3 * 1024 * 1024))
        sock.close()
    deadline = time.monotonic() + 10
    while list(tmp_path.glob("node0/**/*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list(tmp_path.glob("node0/**/*.tmp")), "a cut-off replica left its temporary file"
    assert _metric(node, token_file, "pcache_standby_replicas") == 0
    status = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    status.request("GET", "/healthz")
    assert status.getresponse().status == 200  # and the node still serves
