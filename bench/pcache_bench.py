"""pcache benchmarks against a real SeaweedFS S3 server, each as a ratio to a baseline timed in the same run.

Groups (select with ``BENCH_ONLY=warm,cold,writeback,cpu``):

``warm``
    Warm sequential read through pcache (memory tier, and disk tier only) vs ``os.pread`` of the same bytes
    from the page cache, in 16 MiB and 4 MiB reads.
``cold``
    Cold ``open().read()`` of the whole object with an empty cache vs plain s3fs and vs fsspec's
    ``blockcache``. The three are interleaved, so both ratios share the pcache timings.
``writeback``
    Write-back ``close()`` (open to ``close()`` return, 16 MiB writes) vs a local write with fsync, and the
    background upload (``close()`` return to ``flush()`` return) vs ``s3fs.put_file`` of the same bytes.
``cpu``
    Pure-Python ops/s of the caller's thread while a write-back upload is in flight vs idle, next to the
    same loop while ``s3fs.put_file`` runs in a thread of the same process.

Every read is checked: whole-object reads are hashed (xxh3-128) against the source outside the timed
region, timed chunk loops compare the first and last 64 bytes of every chunk at its offset (a full hash
inside the loop would add the same cost to both sides and pull every ratio towards 1), and one untimed
pass through each warm path is fully hashed first. Uploads are checked by size, the xxh3-128 pcache
journaled, and sampled ranges read back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import fsspec
import s3fs
import xxhash

from bench._common import (
    CpuWindow,
    MiB,
    cpu_loop,
    log,
    make_row,
    mbps,
    median,
    object_size,
    repeats,
    run_groups,
    selected,
    settle,
    timed,
)
from pcache.testing import SeaweedServer

NAME = "pcache"
BUCKET = "bench-pcache-bucket-1"
OBJECT = f"{BUCKET}/data/object.bin"
CHUNKS = (16 * MiB, 4 * MiB)
WRITE_CHUNK = 16 * MiB
SAMPLE = 64

TARGETS = {"warm": 0.9, "cold_s3fs": 2.0, "cold_blockcache": 2.0, "close": 0.7, "upload": 0.8, "cpu": 0.9}

Check = Callable[[bytes, int], None]
ZERO_COPY_NOTE = ("; a 4 MiB read on the memory tier returns the cached block object itself (no copy), "
                  "while pread copies")


@dataclass
class Context:
    """Everything the groups share: the server, the source bytes and where they live.

    Attributes:
        server: The running SeaweedFS server.
        workdir: Scratch directory of this module (cache dirs, local files).
        opts: s3fs storage options for ``server``.
        size: Object size in bytes.
        repeat: Repetitions per timing.
        data: The object's bytes.
        digest: xxh3-128 hex digest of ``data``.
        local_path: A local file holding ``data`` (pread baseline, put_file baseline).
        s3: An s3fs filesystem for setup and verification (never timed).
        upload_s: Median upload seconds measured by the write-back group (sizes the CPU window).
    """

    server: SeaweedServer
    workdir: Path
    opts: dict[str, Any]
    size: int
    repeat: int
    data: bytes
    digest: str
    local_path: str
    s3: Any
    upload_s: list[float] = field(default_factory=list)

    @property
    def view(self) -> memoryview:
        """A zero-copy view of :attr:`data`."""
        return memoryview(self.data)


# -- helpers ----------------------------------------------------------------------------------------
def pcache_fs(ctx: Context, cache_dir: Path, **cache_options: Any) -> Any:
    """Build a fresh pcache filesystem over the benchmark server with its own ``cache_dir``.

    Every call must use a new ``cache_dir``: pcache keeps one engine per (cache_dir, process), so a
    second filesystem on the same directory would silently reuse the first one's memory budget.

    Args:
        ctx: The benchmark context.
        cache_dir: A directory no other pcache filesystem in this process has used.
        **cache_options: Further :class:`pcache.CacheConfig` fields (``memory_bytes``, ...).

    Returns:
        A :class:`pcache.PCacheFileSystem`.
    """
    return fsspec.filesystem("pcache", target_protocol="s3", target_options=ctx.opts,
                             cache_dir=str(cache_dir), skip_instance_cache=True, **cache_options)


def close_pcache(fs: Any, cache_dir: Path) -> None:
    """Release a pcache filesystem's memory tier, threads and LMDB handles, then delete its cache dir."""
    engine = fs.engine
    with contextlib.suppress(AttributeError):  # cleanup only: tolerate engine API changes
        engine.memory.clear()
        engine.close()
    shutil.rmtree(cache_dir, ignore_errors=True)


def sample_checker(ctx: Context) -> Check:
    """Return a check comparing the first and last :data:`SAMPLE` bytes of a chunk with the source."""
    view = ctx.view

    def check(chunk: bytes, pos: int) -> None:
        n = len(chunk)
        head, tail = min(SAMPLE, n), max(0, n - SAMPLE)
        if view[pos:pos + head] != chunk[:head] or view[pos + tail:pos + n] != chunk[tail:]:
            raise AssertionError(f"wrong bytes at offset {pos} (chunk of {n})")

    return check


def hash_checker() -> tuple[Check, Any]:
    """Return a check that feeds every chunk into an xxh3-128 hasher, and the hasher."""
    hasher = xxhash.xxh3_128()
    expected = [0]

    def check(chunk: bytes, pos: int) -> None:
        if pos != expected[0]:
            raise AssertionError(f"chunk at offset {pos}, expected {expected[0]}")
        hasher.update(chunk)
        expected[0] += len(chunk)

    return check, hasher


def verify_bytes(ctx: Context, data: bytes, what: str) -> None:
    """Raise unless ``data`` is exactly the source object."""
    if len(data) != ctx.size or xxhash.xxh3_128_hexdigest(data) != ctx.digest:
        raise AssertionError(f"{what}: read {len(data)} bytes that differ from the source object")


def pread_loop(path: str, chunk: int, size: int, check: Check) -> float:
    """Time reading ``path`` with ``os.pread`` in ``chunk``-sized calls; return seconds."""
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        t0 = time.perf_counter()
        while True:
            buf = os.pread(fd, chunk, pos)
            if not buf:
                break
            check(buf, pos)
            pos += len(buf)
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
    if pos != size:
        raise AssertionError(f"pread read {pos} of {size} bytes")
    return elapsed


def fs_read_loop(fs: Any, path: str, chunk: int, size: int, check: Check) -> float:
    """Time ``f.read(chunk)`` until EOF on an already opened file (open is not timed); return seconds."""
    with fs.open(path, "rb") as f:
        pos = 0
        t0 = time.perf_counter()
        while True:
            buf = f.read(chunk)
            if not buf:
                break
            check(buf, pos)
            pos += len(buf)
        elapsed = time.perf_counter() - t0
    if pos != size:
        raise AssertionError(f"read {pos} of {size} bytes")
    return elapsed


def read_whole(fs: Any, path: str) -> bytes:
    """``open(path).read()`` on any fsspec filesystem."""
    with fs.open(path, "rb") as f:
        data: bytes = f.read()
    return data


def s3fs_put(ctx: Context, path: str) -> None:
    """Upload the local copy of the object with a fresh ``s3fs.S3FileSystem(**opts).put_file``."""
    s3fs.S3FileSystem(skip_instance_cache=True, **ctx.opts).put_file(ctx.local_path, path)


def write_chunks(f: Any, view: memoryview) -> None:
    """Write ``view`` to ``f`` in :data:`WRITE_CHUNK` slices."""
    for off in range(0, len(view), WRITE_CHUNK):
        f.write(view[off:off + WRITE_CHUNK])


def quiesce_disk() -> None:
    """Flush all dirty data (and the discards of deleted files) before a timed write.

    Without it, whichever writer goes second in a repeat ran ~4x faster than the first (pcache or the
    baseline alike): the disk's recent past decided the figure, not the code.
    """
    os.sync()
    time.sleep(1.0)


def write_local_fsync(path: str, view: memoryview) -> float:
    """Time writing ``view`` to a new local file in 16 MiB writes, fsync, close; return seconds."""
    quiesce_disk()
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        write_chunks(f, view)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def uploader_proc(fs: Any) -> Any:
    """The background uploader process of ``fs`` (a ``subprocess.Popen``), or None."""
    return getattr(getattr(fs, "writeback", None), "_proc", None)


def wait_uploader_exit(fs: Any, timeout_s: float = 60.0) -> None:
    """Wait until ``fs``'s uploader process has exited, so the next upload pays its normal start-up."""
    deadline = time.monotonic() + timeout_s
    proc = uploader_proc(fs)
    while proc is not None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def verify_upload(ctx: Context, path: str) -> None:
    """Check an uploaded object: its size, and three 1 MiB ranges (start, middle, end) read back."""
    ctx.s3.invalidate_cache(path)
    size = ctx.s3.info(path)["size"]
    if size != ctx.size:
        raise AssertionError(f"{path}: origin has {size} bytes, expected {ctx.size}")
    for start in (0, ctx.size // 2, max(0, ctx.size - MiB)):
        end = min(ctx.size, start + MiB)
        if ctx.s3.cat_file(path, start=start, end=end) != ctx.data[start:end]:
            raise AssertionError(f"{path}: bytes {start}-{end} differ from the source")


def weed_pid(server: SeaweedServer) -> int | None:
    """Process id of the weed server (all roles run in one process), if known."""
    proc = getattr(server, "_proc", None)
    return proc.pid if proc is not None else None


def journal_digest(fs: Any, url: str) -> str | None:
    """The xxh3-128 that pcache journaled for a completed upload of ``url``."""
    for done_url, rec in fs.writeback.journal.done(url):
        if done_url == url:
            return rec.get("xxh3_128")
    return None


# -- setup ------------------------------------------------------------------------------------------
def setup(server: SeaweedServer, workdir: Path) -> Context:
    """Generate the object, write it to a local file and upload it to a fresh bucket."""
    size, repeat = object_size(), repeats()
    log(f"pcache: generating {size / MiB:.0f} MiB of random bytes (repeat={repeat})")
    data = os.urandom(size)
    digest = xxhash.xxh3_128_hexdigest(data)
    local_path = str(workdir / "source.bin")
    with open(local_path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    opts = server.storage_options()
    server.make_bucket(BUCKET)
    s3 = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    seconds, _ = timed(lambda: s3.put_file(local_path, OBJECT))
    log(f"pcache: uploaded the object in {seconds:.1f}s ({mbps(size, seconds):.0f} MB/s)")
    ctx = Context(server=server, workdir=workdir, opts=opts, size=size, repeat=repeat, data=data,
                  digest=digest, local_path=local_path, s3=s3)
    verify_upload(ctx, OBJECT)
    return ctx


# -- a: warm reads ------------------------------------------------------------------------------------
def bench_warm(ctx: Context) -> list[dict[str, Any]]:
    """Warm sequential reads through pcache vs ``os.pread`` from the page cache (measure a)."""
    rows: list[dict[str, Any]] = []
    check = sample_checker(ctx)
    full, hasher = hash_checker()
    pread_loop(ctx.local_path, CHUNKS[0], ctx.size, full)  # warms the page cache and checks the file
    if hasher.hexdigest() != ctx.digest:
        raise AssertionError("local source file differs from the source bytes")
    variants = (("memory", "2GiB", "memory tier (memory_bytes=2GiB)"),
                ("disk", 0, "disk tier only (memory_bytes=0, checksum per read)"))
    for variant, memory_bytes, label in variants:
        cache_dir = ctx.workdir / f"warm-{variant}"
        fs = pcache_fs(ctx, cache_dir, memory_bytes=memory_bytes)
        try:
            seconds, data = timed(partial(read_whole, fs, OBJECT))
            verify_bytes(ctx, data, f"pcache cold fill ({variant})")
            del data
            log(f"warm/{variant}: filled the cache in {seconds:.1f}s")
            full, hasher = hash_checker()
            fs_read_loop(fs, OBJECT, CHUNKS[0], ctx.size, full)
            if hasher.hexdigest() != ctx.digest:
                raise AssertionError(f"warm pcache read ({variant}) returned wrong bytes")
            for chunk in CHUNKS:
                before = dict(fs.engine.counters)
                pcache_s: list[float] = []
                base_s: list[float] = []
                for _ in range(ctx.repeat):
                    base_s.append(pread_loop(ctx.local_path, chunk, ctx.size, check))
                    pcache_s.append(fs_read_loop(fs, OBJECT, chunk, ctx.size, check))
                counters = {k: v - before.get(k, 0) for k, v in fs.engine.counters.items()}
                if counters.get("misses", 0):
                    raise AssertionError(
                        f"warm/{variant}: {counters['misses']} origin fetches in timed reads")
                mib = chunk // MiB
                rows.append(make_row(
                    module=NAME, key=f"warm_{variant}_{mib}MiB",
                    measure=f"a. warm read, {label}, {mib} MiB reads",
                    unit="MB/s", nbytes=ctx.size,
                    values=[mbps(ctx.size, s) for s in pcache_s], seconds=pcache_s,
                    baseline=f"os.pread from page cache, {mib} MiB",
                    baseline_values=[mbps(ctx.size, s) for s in base_s], baseline_seconds=base_s,
                    target=TARGETS["warm"],
                    notes="open() not timed; first/last 64 bytes of every chunk checked; one untimed "
                          "fully hashed pass before timing"
                          + (ZERO_COPY_NOTE if variant == "memory" and chunk == 4 * MiB else ""),
                    extra={"cache_fill_s": seconds, "engine_counters_during_timing": counters,
                           "blocks_read_in_timed_passes": ctx.repeat * -(-ctx.size // fs.engine.block_size)},
                ))
                pc_mbps, base_mbps = median([mbps(ctx.size, s) for s in pcache_s]), median(
                    [mbps(ctx.size, s) for s in base_s])
                log(f"warm/{variant}/{mib}MiB: pcache {pc_mbps:.0f} MB/s vs pread {base_mbps:.0f} MB/s")
        finally:
            close_pcache(fs, cache_dir)
    return rows


# -- b, c: cold reads ---------------------------------------------------------------------------------
def bench_cold(ctx: Context) -> list[dict[str, Any]]:
    """Cold whole-object reads: pcache vs s3fs (measure b) and vs fsspec blockcache (measure c)."""
    order = ["s3fs", "blockcache", "pcache", "ceiling"]
    times: dict[str, list[float]] = {name: [] for name in order}
    cpu: dict[str, list[dict[str, Any]]] = {name: [] for name in order}
    pids: dict[str, int | None] = {"weed": weed_pid(ctx.server), "bench_process": os.getpid()}
    misses: list[int] = []
    for r in range(ctx.repeat):
        for name in order[r % 4:] + order[:r % 4]:  # rotate, so no system always goes first
            if name == "ceiling":
                # What this server can deliver to a client doing no work at all: 16 parallel range GETs
                # whose bytes are dropped. No client can beat it, so it bounds the ratio over s3fs.
                settle()
                with CpuWindow(pids) as win:
                    seconds, _ = timed(partial(server_ceiling_read, ctx))
                cpu[name].append(win.result)
                times[name].append(seconds)
                log(f"cold/{r}: server ceiling {seconds:.2f}s ({mbps(ctx.size, seconds):.0f} MB/s)")
                continue
            settle()
            cache_dir = ctx.workdir / f"cold-{name}-{r}"
            fs: Any
            if name == "s3fs":
                fs = s3fs.S3FileSystem(skip_instance_cache=True, **ctx.opts)
            elif name == "blockcache":
                fs = fsspec.filesystem("blockcache", target_protocol="s3", target_options=ctx.opts,
                                       cache_storage=str(cache_dir), skip_instance_cache=True)
            else:
                fs = pcache_fs(ctx, cache_dir)
            try:
                with CpuWindow(pids) as win:
                    seconds, data = timed(partial(read_whole, fs, OBJECT))
                cpu[name].append(win.result)
                verify_bytes(ctx, data, f"cold read via {name}")
                del data
                if name == "pcache":
                    misses.append(fs.engine.counters["misses"])
            finally:
                if name == "pcache":
                    close_pcache(fs, cache_dir)
                else:
                    shutil.rmtree(cache_dir, ignore_errors=True)
            times[name].append(seconds)
            log(f"cold/{r}: {name} {seconds:.2f}s ({mbps(ctx.size, seconds):.0f} MB/s)")
    pc = [mbps(ctx.size, s) for s in times["pcache"]]
    note = ("open()+read() of the whole object timed, fresh empty cache each repeat; the server's own page "
            "cache is warm for all three; bytes hashed after timing; extra.cpu has the CPU seconds of this "
            "process and of weed, and the machine's busy cores, during each read")
    extra = {"pcache_origin_block_fetches": misses, "cpu": cpu}
    return [
        make_row(module=NAME, unit="MB/s", nbytes=ctx.size, values=pc, seconds=times["pcache"],
                 key="cold_vs_s3fs", measure="b. cold sequential read vs s3fs",
                 baseline="s3fs open().read()", baseline_values=[mbps(ctx.size, s) for s in times["s3fs"]],
                 baseline_seconds=times["s3fs"], target=TARGETS["cold_s3fs"], notes=note, extra=extra),
        make_row(module=NAME, unit="MB/s", nbytes=ctx.size, values=pc, seconds=times["pcache"],
                 key="cold_vs_blockcache", measure="c. cold sequential read vs fsspec blockcache",
                 baseline="fsspec blockcache open().read()",
                 baseline_values=[mbps(ctx.size, s) for s in times["blockcache"]],
                 baseline_seconds=times["blockcache"], target=TARGETS["cold_blockcache"], notes=note,
                 extra=extra),
        make_row(module=NAME, unit="MB/s", nbytes=ctx.size,
                 values=[mbps(ctx.size, s) for s in times["ceiling"]], seconds=times["ceiling"],
                 key="cold_server_ceiling", measure="b'. server ceiling: 16 parallel range GETs, bytes dropped",
                 baseline="s3fs open().read()", baseline_values=[mbps(ctx.size, s) for s in times["s3fs"]],
                 baseline_seconds=times["s3fs"], target=None,
                 notes="upper bound for ANY client of this server on this machine (no cache writes, no "
                       "assembly); if its ratio is below 2, measure b's target is out of reach here",
                 extra={"cpu": cpu["ceiling"]}),
    ]


def server_ceiling_read(ctx: Context) -> int:
    """Fetch the object as 4 MiB ranges on 16 threads and drop the bytes; return the byte count."""
    from concurrent.futures import ThreadPoolExecutor

    from pcache.s3range import S3RangeReader

    reader = S3RangeReader(s3fs.S3FileSystem(skip_instance_cache=True, **ctx.opts))
    step = 4 * 1024 * 1024
    with ThreadPoolExecutor(16) as pool:
        return sum(pool.map(lambda off: len(reader.get_range(OBJECT, off, min(ctx.size, off + step))),
                            range(0, ctx.size, step)))


# -- d, e: write-back ---------------------------------------------------------------------------------
def bench_writeback(ctx: Context) -> list[dict[str, Any]]:
    """Write-back close() vs local write+fsync (measure d); background upload vs s3fs put_file (e)."""
    cache_dir = ctx.workdir / "writeback-cache"
    local_out = str(ctx.workdir / "local-write.bin")  # same parent directory as cache_dir
    fs = pcache_fs(ctx, cache_dir)
    close_s: list[float] = []
    local_s: list[float] = []
    upload_s: list[float] = []
    put_s: list[float] = []
    upload_cpu: list[dict[str, Any]] = []
    put_cpu: list[dict[str, Any]] = []
    pids: dict[str, int | None] = {"weed": weed_pid(ctx.server), "bench_process": os.getpid()}
    view = ctx.view
    try:
        for r in range(ctx.repeat):
            if r % 2 == 0:  # alternate which side goes first: fsync timings depend on the disk's recent past
                settle()
                local_s.append(write_local_fsync(local_out, view))
                os.unlink(local_out)

            settle()
            wait_uploader_exit(fs)
            path = f"{BUCKET}/ckpt/x-{r}.bin"
            quiesce_disk()
            t0 = time.perf_counter()
            with fs.open(path, "wb") as f:
                write_chunks(f, view)
            t1 = time.perf_counter()
            proc = uploader_proc(fs)
            with CpuWindow({**pids, "uploader": proc.pid if proc is not None else None}) as win:
                fs.flush(path)
                t2 = time.perf_counter()
            upload_cpu.append(win.result)
            close_s.append(t1 - t0)
            upload_s.append(t2 - t1)
            if r % 2 == 1:
                settle()
                local_s.append(write_local_fsync(local_out, view))
                os.unlink(local_out)
            if journal_digest(fs, fs.url(path)) != ctx.digest:
                raise AssertionError(f"pcache journaled a different xxh3-128 for {path}")
            verify_upload(ctx, path)
            ctx.s3.rm(path)

            settle()
            put_path = f"{BUCKET}/ckpt/put-{r}.bin"
            with CpuWindow(pids) as win:
                seconds, _ = timed(partial(s3fs_put, ctx, put_path))
            put_s.append(seconds)
            put_cpu.append(win.result)
            verify_upload(ctx, put_path)
            ctx.s3.rm(put_path)
            log(f"writeback/{r}: local write+fsync {local_s[-1]:.2f}s, pcache close {close_s[-1]:.2f}s, "
                f"upload {upload_s[-1]:.2f}s, s3fs put_file {put_s[-1]:.2f}s")
        wait_uploader_exit(fs)
    finally:
        close_pcache(fs, cache_dir)
    ctx.upload_s = [median(upload_s), median(put_s)]
    size = ctx.size
    return [
        make_row(module=NAME, key="writeback_close", measure="d. write-back close(): open..close() return",
                 unit="MB/s", nbytes=size, values=[mbps(size, s) for s in close_s], seconds=close_s,
                 baseline="local write + fsync + close", baseline_values=[mbps(size, s) for s in local_s],
                 baseline_seconds=local_s, target=TARGETS["close"],
                 notes="16 MiB writes; local file in the parent directory of cache_dir; each repeat starts "
                       "with no uploader process running",
                 extra={"background_upload_s": upload_s}),
        make_row(module=NAME, key="writeback_upload",
                 measure="e. background upload: close() return..flush() return", unit="MB/s", nbytes=size,
                 values=[mbps(size, s) for s in upload_s], seconds=upload_s,
                 baseline="s3fs put_file (multipart)", baseline_values=[mbps(size, s) for s in put_s],
                 baseline_seconds=put_s, target=TARGETS["upload"],
                 notes="includes the uploader process start-up; put_file time includes building the "
                       "S3FileSystem; uploads verified by size, journaled xxh3-128 and sampled ranges; "
                       "extra has CPU seconds per process (weed, uploader, this process) during each upload",
                 extra={"pcache_upload_cpu": upload_cpu, "s3fs_put_cpu": put_cpu}),
    ]


# -- f: caller CPU during uploads ------------------------------------------------------------------
def bench_cpu(ctx: Context) -> list[dict[str, Any]]:
    """Caller ops/s while an upload is in flight vs idle: pcache write-back and an s3fs thread (measure f)."""
    # Keep the window inside the upload (measured by the writeback group), also for small BENCH_SIZE_MB.
    window = min(3.0, max(0.5, 0.8 * min(ctx.upload_s))) if ctx.upload_s else 3.0
    cache_dir = ctx.workdir / "cpu-cache"
    fs = pcache_fs(ctx, cache_dir)
    pids: dict[str, int | None] = {"weed": weed_pid(ctx.server), "bench_process": os.getpid()}
    idle: list[dict[str, Any]] = []
    busy_pc: list[dict[str, Any]] = []
    busy_thread: list[dict[str, Any]] = []
    view = ctx.view
    try:
        for r in range(ctx.repeat):
            settle()
            wait_uploader_exit(fs)
            with CpuWindow(pids) as win:
                res = cpu_loop(window)
            idle.append({**res, **win.result})

            settle()
            path = f"{BUCKET}/ckpt/cpu-{r}.bin"
            with fs.open(path, "wb") as f:
                write_chunks(f, view)
            t_closed = time.perf_counter()
            proc = uploader_proc(fs)
            with CpuWindow({**pids, "uploader": proc.pid if proc is not None else None}) as win:
                res = cpu_loop(window)
            in_flight = fs.writeback.is_pending(fs.url(path))
            t0 = time.perf_counter()
            fs.flush(path)
            t1 = time.perf_counter()
            busy_pc.append({**res, **win.result, "upload_in_flight_at_end": in_flight,
                            "flush_after_window_s": t1 - t0, "upload_total_s": t1 - t_closed})
            verify_upload(ctx, path)
            ctx.s3.rm(path)

            settle()
            put_path = f"{BUCKET}/ckpt/cpu-put-{r}.bin"
            errors: list[BaseException] = []

            def put(put_path: str = put_path, errors: list[BaseException] = errors) -> None:
                try:
                    s3fs_put(ctx, put_path)
                except BaseException as exc:  # re-raised in the main thread
                    errors.append(exc)

            thread = threading.Thread(target=put, name="bench-s3fs-put", daemon=True)
            t_start = time.perf_counter()
            thread.start()
            with CpuWindow(pids) as win:
                res = cpu_loop(window)
            alive = thread.is_alive()
            thread.join()
            if errors:
                raise errors[0]
            busy_thread.append({**res, **win.result, "upload_in_flight_at_end": alive,
                                "upload_total_s": time.perf_counter() - t_start})
            verify_upload(ctx, put_path)
            ctx.s3.rm(put_path)
            log(f"cpu/{r}: idle {idle[-1]['ops_per_s'] / 1e6:.2f} Mops/s, during pcache upload "
                f"{busy_pc[-1]['ops_per_s'] / 1e6:.2f}, "
                f"during s3fs thread {busy_thread[-1]['ops_per_s'] / 1e6:.2f}")
        wait_uploader_exit(fs)
    finally:
        close_pcache(fs, cache_dir)
    idle_ops = [x["ops_per_s"] for x in idle]
    note = (f"{window:.2f}s pure-Python loop started right after close() (or thread start); 2 shared cores "
            "also run SeaweedFS, so part of any slowdown is the machine, not the GIL: see extra (CPU seconds "
            "of each process, the loop thread's CPU share and busy cores over the window; weed_cpu_s shows "
            "whether the upload progressed during the window, upload_total_s how long it took in all)")
    return [
        make_row(module=NAME, key="cpu_during_writeback", measure="f. caller ops/s during pcache upload",
                 unit="ops/s", values=[x["ops_per_s"] for x in busy_pc], baseline="same loop, idle",
                 baseline_values=idle_ops, target=TARGETS["cpu"], notes=note,
                 extra={"window_s": window, "busy": busy_pc, "idle": idle}),
        make_row(module=NAME, key="cpu_during_s3fs_thread",
                 measure="f. caller ops/s during s3fs put_file in a thread (peer)", unit="ops/s",
                 values=[x["ops_per_s"] for x in busy_thread], baseline="same loop, idle",
                 baseline_values=idle_ops, target=None, notes=note + "; informational peer comparison",
                 extra={"window_s": window, "busy": busy_thread, "idle": idle}),
    ]


GROUPS: list[tuple[str, Callable[[Context], list[dict[str, Any]]]]] = [
    ("warm", bench_warm),
    ("cold", bench_cold),
    ("writeback", bench_writeback),
    ("cpu", bench_cpu),
]


def run(server: SeaweedServer, workdir: Path) -> list[dict[str, Any]]:
    """Run every selected pcache benchmark group against ``server``.

    A group that fails is recorded as an error row and the others still run.

    Args:
        server: A running SeaweedFS server.
        workdir: An empty scratch directory for this module (on the disk under test).

    Returns:
        Result rows (see :func:`bench._common.make_row`).
    """
    if not any(selected(name) for name, _ in GROUPS):
        log("pcache: skipping (BENCH_ONLY)")  # without generating and uploading the object
        return []
    ctx = setup(server, workdir)
    try:
        return run_groups(NAME, [(name, partial(group, ctx)) for name, group in GROUPS])
    finally:
        with contextlib.suppress(Exception):
            os.unlink(ctx.local_path)


__all__ = ["NAME", "run"]
