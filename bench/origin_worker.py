"""Helper processes for ``bench.pcache_origin_bench``: one cold read per process, and a latency proxy.

``python -m bench.origin_worker read`` reads one object with one client and prints a JSON line. The
spec (client, storage options with credentials, path, cache options) arrives as JSON on stdin, never in
argv. A process of its own per read means the CPU figure is this client's alone: no other client's
threads, no proxy, no SeaweedFS, and no import or client start-up (those happen before the window).

``python -m bench.origin_worker proxy UPSTREAM LATENCY_S`` runs a :class:`pcache.testing.ChaosProxy`
in its own process, so the proxy's Python work never competes for the reading client's GIL. It prints
its endpoint URL, answers each ``count`` line on stdin with the requests seen since the last one (JSON),
and stops at EOF.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import xxhash

from lingcore.files import write_all


def _cpu() -> tuple[float, float]:
    """(user, system) CPU seconds of this process so far (every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def _client(spec: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Build the reading client; return it and the keyword arguments for its ``open``."""
    import fsspec
    import s3fs

    kind = spec["client"]
    if kind == "pcache":
        fs = fsspec.filesystem("pcache", target_protocol="s3", target_options=spec["opts"],
                               cache_dir=spec["cache_dir"], skip_instance_cache=True,
                               **spec.get("cache_options", {}))
        fs.engine  # noqa: B018  (the per-process engine: LMDB, thread pools, made before the window)
        fs.fs.connect()  # the origin's S3 session
        return fs, {}
    if kind in ("s3fs", "s3fs_chunked", "ceiling"):
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **spec["opts"])
        fs.connect()
        return fs, ({"block_size": spec["chunk"]} if kind == "s3fs_chunked" else {})
    raise ValueError(f"unknown client {kind!r}")


def read(spec: dict[str, Any]) -> dict[str, Any]:
    """Open and read ``spec["path"]`` once, cold; return timings, CPU seconds and the bytes' digest.

    With ``spec["sink_fd"]`` the client streams instead, as ``rclone cat`` does: ``readinto`` one reused
    buffer of ``spec["chunk"]`` bytes, each chunk written to that pipe, whose reader (the benchmark
    process) hashes it; the digest field is then empty.
    """
    fs, open_kw = _client(spec)
    chunk = int(spec.get("chunk") or 0)
    sink = spec.get("sink_fd")
    digest = ""
    c0, t0 = _cpu(), time.perf_counter()
    with contextlib.nullcontext() if spec["client"] == "ceiling" else fs.open(spec["path"], "rb", **open_kw) as f:
        if spec["client"] == "ceiling":
            data = _ceiling(fs, spec["path"], chunk)
            nbytes = len(data)
        elif sink is not None:
            nbytes = _stream(f, chunk, int(sink))
        else:
            # s3fs_chunked: one sequential stream of chunk-sized range GETs.
            data = b"".join(iter(lambda: f.read(chunk), b"")) if spec["client"] == "s3fs_chunked" else f.read()
            nbytes = len(data)
    t1 = time.perf_counter()
    counters: dict[str, Any] = {}
    if spec["client"] == "pcache":
        # Blocks reach the disk tier after read() returns (write-behind); that work is this read's too.
        fs.engine.drain_writes()
        counters = dict(fs.engine.counters)
    c1, t2 = _cpu(), time.perf_counter()
    user, system = c1[0] - c0[0], c1[1] - c0[1]
    if sink is None:
        digest = xxhash.xxh3_128_hexdigest(data)
    return {"read_s": t1 - t0, "read_and_publish_s": t2 - t0, "cpu_s": user + system, "cpu_user_s": user,
            "cpu_sys_s": system, "nbytes": nbytes, "xxh3_128": digest, "counters": counters}


def _ceiling(fs: Any, path: str, chunk: int) -> bytearray:
    """What any client could get here: ``chunk``-sized range GETs on 16 threads, each received straight
    into its place in one buffer (no cache, no disk, no per-block objects)."""
    from pcache.s3range import S3RangeReader

    size = int(fs.info(path)["size"])
    out = bytearray(size)
    reader = S3RangeReader(fs)
    with memoryview(out) as view, ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda off: reader.get_range_into(path, off, min(size, off + chunk),
                                                        view[off:min(size, off + chunk)]), range(0, size, chunk)))
    return out


def _stream(f: Any, chunk: int, fd: int) -> int:
    """Copy ``f`` to ``fd`` through one reused buffer; close ``fd``; return the byte count."""
    view = memoryview(bytearray(chunk))
    nbytes = 0
    try:
        while n := f.readinto(view):
            write_all(fd, view[:n])
            nbytes += n
    finally:
        os.close(fd)
    return nbytes


def proxy(upstream: str, latency_s: float) -> None:
    """Serve a latency proxy until stdin closes (see the module docstring)."""
    from pcache.testing import ChaosProxy

    with ChaosProxy(upstream, latency_s=latency_s) as chaos:
        print(chaos.endpoint_url, flush=True)
        for line in sys.stdin:
            if line.strip() == "count":
                counts = chaos.method_counts()
                chaos.reset_counts()
                print(json.dumps(dict(counts)), flush=True)


def main(argv: list[str]) -> int:
    """Entry point: ``read`` (spec on stdin) or ``proxy UPSTREAM LATENCY_S``."""
    if argv[:1] == ["read"]:
        print(json.dumps(read(json.load(sys.stdin))), flush=True)
        return 0
    if argv[:1] == ["proxy"] and len(argv) == 3:
        proxy(argv[1], float(argv[2]))
        return 0
    print("usage: python -m bench.origin_worker read < spec.json | proxy UPSTREAM LATENCY_S", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
