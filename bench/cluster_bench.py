"""pcache cluster benchmarks: peer-served blocks, 3 nodes against 1, origin GETs per distinct block.

Nodes are real ``pcache serve`` processes on loopback (``pcache.testing.NodeProcess``), reading the
origin through a counting :class:`~pcache.testing.ChaosProxy` (no injected faults).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import fsspec
import s3fs

from bench._common import log, make_row, mbps, object_size, repeats, selected, settle, timed
from pcache.testing import ChaosProxy, NodeProcess, SeaweedServer, write_token

NAME = "cluster"
BUCKET = "bench-cluster-bucket"
OBJECT = f"{BUCKET}/data/shared.bin"
CHUNK = 16 * 1024 * 1024

READER = textwrap.dedent("""
    import json, sys, time, fsspec
    cache_dir, url, options, peers, token, go = sys.argv[1:7]
    fs = fsspec.filesystem("pcache", target_protocol="s3", target_options=json.loads(options), cache_dir=cache_dir,
                           peers=tuple(peers.split(",")), token_file=token, memory_bytes=0)
    fs.info(url)
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    with fs.open(url) as f:
        n = sum(len(c) for c in iter(lambda: f.read(16 << 20), b""))
    print(json.dumps({"bytes": n, "seconds": time.perf_counter() - t0}), flush=True)
""")


class Cluster:
    """N nodes behind one proxy; stopped on exit."""

    def __init__(self, server: SeaweedServer, workdir: Path, proxy: ChaosProxy, n: int, token: str,
                 *extra_args: str) -> None:
        env = dict(os.environ, AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key)
        self.nodes = [NodeProcess(workdir / f"node{i}", token, proxy.endpoint_url, env, extra_args)
                      for i in range(n)]
        self.urls = [node.start() for node in self.nodes]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def reader_fs(server: SeaweedServer, proxy: ChaosProxy, cache_dir: Path, peers: list[str], token: str) -> Any:
    return fsspec.filesystem("pcache", target_protocol="s3",
                             target_options=server.storage_options(endpoint_url=proxy.endpoint_url),
                             cache_dir=str(cache_dir), peers=tuple(peers), token_file=token, memory_bytes=0,
                             skip_instance_cache=True)


def read_loop(fs: Any) -> int:
    with fs.open(OBJECT) as f:
        return sum(len(chunk) for chunk in iter(lambda: f.read(CHUNK), b""))


def parallel_readers(server: SeaweedServer, proxy: ChaosProxy, workdir: Path, peers: list[str], token: str,
                     count: int) -> float:
    """Start ``count`` cold reader processes together; return aggregate MB/s."""
    options = json.dumps(server.storage_options(endpoint_url=proxy.endpoint_url))
    procs = [subprocess.Popen([sys.executable, "-c", READER, str(workdir / f"reader-{i}"), OBJECT, options,
                               ",".join(peers), token, ""], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for i in range(count)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [json.loads(p.communicate(timeout=600)[0]) for p in procs]
    wall = time.perf_counter() - t0
    for i in range(count):
        shutil.rmtree(workdir / f"reader-{i}", ignore_errors=True)
    return mbps(sum(r["bytes"] for r in results), wall)


def loopback_ceiling(cache_dir: Path) -> float:
    """MB/s of ``sendfile`` from the block files of ``cache_dir`` to a loopback socket read with ``recv_into``.

    No HTTP, no checksums, no allocation: the most any peer protocol could move between two processes here.
    """
    files = sorted(p for p in (cache_dir / "blocks").rglob("*") if p.is_file())
    server = socket.create_server(("127.0.0.1", 0))
    total = sum(p.stat().st_size for p in files)

    def send() -> None:
        conn, _ = server.accept()
        with conn:
            for path in files:
                with open(path, "rb") as fh:
                    conn.sendfile(fh)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    buf = memoryview(bytearray(4 * 1024 * 1024))
    with socket.create_connection(server.getsockname()) as client:
        t0 = time.perf_counter()
        got = 0
        while got < total:
            n = client.recv_into(buf)
            if n == 0:
                break
            got += n
        seconds = time.perf_counter() - t0
    sender.join()
    server.close()
    return mbps(got, seconds)


def run(server: SeaweedServer, workdir: Path) -> list[dict[str, Any]]:
    """Run the cluster measures; see the module docstring."""
    if not selected("cluster"):
        return []
    size = min(object_size(), 256 * 1024 * 1024)
    server.make_bucket(BUCKET)
    s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options()).pipe_file(OBJECT, os.urandom(size))
    token = write_token(workdir / "token")
    rows: list[dict[str, Any]] = []
    with ChaosProxy(server.endpoint_url) as proxy:
        # Origin GETs against distinct blocks: a cold 3-node cluster, 3 cold readers at once.
        cluster = Cluster(server, workdir / "dedupe", proxy, 3, token)
        try:
            proxy.reset_counts()
            parallel_readers(server, proxy, workdir, cluster.urls, token, 3)
            gets = [(r.path, r.range) for r in proxy.records() if r.method == "GET" and r.range]
            distinct = len(set(gets))
            row = make_row(module=NAME, unit="GETs", key="origin_gets_per_block",
                           measure="origin GETs per distinct block (3 nodes, 3 readers, cold)",
                           values=[float(len(gets))], baseline="distinct blocks read",
                           baseline_values=[float(distinct)], target=None,
                           notes="target is exactly 1.0: every block fetched from the origin once for the cluster")
            row["target"], row["met"] = 1.0, len(gets) == distinct
            rows.append(row)
            log(f"cluster: {len(gets)} origin GETs for {distinct} distinct blocks")

            # Blocks served by a peer against local-tier hits of the same blocks: the peer reader keeps
            # nothing (memory_bytes=0, peer blocks are not copied to its disk by default); the local reader
            # has no peers and reads the owner node's own cache_dir, where the blocks are.
            peer_mbps, local_mbps, ceiling = [], [], []
            local = fsspec.filesystem("pcache", target_protocol="s3",
                                      target_options=server.storage_options(endpoint_url=proxy.endpoint_url),
                                      cache_dir=str(workdir / "peer-owner" / "node0"), memory_bytes=0,
                                      skip_instance_cache=True)
            owner = Cluster(server, workdir / "peer-owner", proxy, 1, token, "--memory-bytes", "0")
            try:
                reader_fs(server, proxy, workdir / "peer-warm", owner.urls, token).cat_file(OBJECT)  # owner warm
                for r in range(repeats()):
                    settle()
                    fs = reader_fs(server, proxy, workdir / f"peer-reader-{r}", owner.urls, token)
                    seconds, n = timed(partial(read_loop, fs))
                    peer_mbps.append(mbps(n, seconds))
                    settle()
                    seconds, n = timed(partial(read_loop, local))
                    local_mbps.append(mbps(n, seconds))
                    ceiling.append(loopback_ceiling(workdir / "peer-owner" / "node0"))
                    log(f"cluster/{r}: peer {peer_mbps[-1]:.0f} MB/s, local disk tier {local_mbps[-1]:.0f} MB/s, "
                        f"loopback TCP ceiling {ceiling[-1]:.0f} MB/s")
            finally:
                owner.stop()
            rows.append(make_row(module=NAME, unit="MB/s", key="peer_vs_local",
                                 measure="blocks served by a peer (sendfile), 16 MiB reads",
                                 values=peer_mbps, baseline="local disk-tier hit of the same blocks",
                                 baseline_values=local_mbps, target=0.5, nbytes=size,
                                 notes="memory_bytes=0 on both readers and on the owner, so every block is a "
                                       "verified disk read (local) or a disk block sent over loopback HTTP and "
                                       "verified by the reader (peer)"))
            rows.append(make_row(module=NAME, unit="MB/s", key="loopback_ceiling",
                                 measure="loopback TCP ceiling: sendfile of the block files to recv_into, no HTTP",
                                 values=ceiling, baseline="local disk-tier hit of the same blocks",
                                 baseline_values=local_mbps, target=None, nbytes=size,
                                 notes="upper bound for any peer protocol between two processes on this machine: "
                                       "if its ratio is near 0.5, the peer target is out of reach here"))

            # Aggregate throughput of 3 readers: 3 warm nodes against 1 warm node.
            three = [parallel_readers(server, proxy, workdir, cluster.urls, token, 3) for _ in range(repeats())]
        finally:
            cluster.stop()
        single = Cluster(server, workdir / "single", proxy, 1, token)
        try:
            parallel_readers(server, proxy, workdir, single.urls, token, 1)  # warm the single node
            one = [parallel_readers(server, proxy, workdir, single.urls, token, 3) for _ in range(repeats())]
        finally:
            single.stop()
        rows.append(make_row(module=NAME, unit="MB/s", key="three_vs_one_node",
                             measure="aggregate read throughput, 3 readers, 3 warm nodes", values=three,
                             baseline="same with 1 warm node", baseline_values=one, target=None, nbytes=size * 3,
                             notes="all processes share 2 cores here; scaling needs nodes on separate machines"))
        log(f"cluster: 3 nodes {three}, 1 node {one}")
    return rows
