"""The ``ling`` bench's ``commit`` group: snapshot end -> committed at the origin, through pcache write-back.

A checkpoint-sized file (``BENCH_LING_COMMIT_MB`` MiB, default 512) is in memory (the snapshot has ended);
the clock runs from there until its step is committed at the origin: write through pcache (16 MiB
writes, as a serializer makes), ``close()`` (durable locally), ``commit`` (flush until durable at the
origin, then the ``_COMMITTED`` marker). Once with streaming upload (the default: parts go to S3 while
the file is written, see :mod:`pcache.streaming`), once with ``stream_uploads=False`` (the whole file is
uploaded after ``close()``), against a raw ``s3fs.pipe_file`` of the same bytes to the same SeaweedFS,
in the same run, the three interleaved per repeat. Client CPU seconds per GiB count this process and
its children (pcache's background uploader); the SeaweedFS server's CPU is not counted.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any

import fsspec
import s3fs
import xxhash

from bench._common import GiB, MiB, env_int, log, make_row, proc_cpu_seconds, repeats, settle
from pcache.testing import SeaweedServer

TARGET = 1 / 1.1  # at most 1.1x the raw upload's seconds
_WRITE = 16 * MiB


def _children() -> list[int]:
    """Pids of this process's live pcache uploader processes (not the SeaweedFS server, also a child)."""
    me, out = os.getpid(), []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as fh:
                    raw = fh.read().decode()
                with open(f"/proc/{name}/cmdline", "rb") as fh:
                    cmdline = fh.read()
            except OSError:
                continue
            if int(raw[raw.rindex(")") + 2:].split()[1]) == me and b"pcache.uploader" in cmdline:
                out.append(int(name))
    return out


class _ClientCpu:
    """CPU seconds of this process plus its children (live ones from /proc, reaped ones from rusage)."""

    def __enter__(self) -> _ClientCpu:
        self._self = time.process_time()
        self._reaped = self._reaped_children()
        self._kids = {pid: proc_cpu_seconds(pid) or 0.0 for pid in _children()}
        return self

    @staticmethod
    def _reaped_children() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    def __exit__(self, *exc: object) -> None:
        kids = sum((proc_cpu_seconds(pid) or 0.0) - self._kids.get(pid, 0.0) for pid in _children())
        self.seconds = time.process_time() - self._self + kids + self._reaped_children() - self._reaped


def _through_pcache(fs: Any, prefix: str, payload: bytes) -> tuple[float, float, float]:
    """Write, close and commit ``payload``; return (seconds, client CPU seconds, seconds until close)."""
    view = memoryview(payload)
    with _ClientCpu() as cpu:
        t0 = time.perf_counter()
        with fs.open(f"{prefix}/rank0.distcp", "wb") as f:
            for off in range(0, len(view), _WRITE):
                f.write(view[off:off + _WRITE])
        closed = time.perf_counter() - t0
        fs.commit(prefix, timeout=600)
        seconds = time.perf_counter() - t0
    return seconds, cpu.seconds, closed


def _raw(s3: s3fs.S3FileSystem, path: str, payload: bytes) -> tuple[float, float]:
    with _ClientCpu() as cpu:
        t0 = time.perf_counter()
        s3.pipe_file(path, payload)
        seconds = time.perf_counter() - t0
    return seconds, cpu.seconds


def commit_rows(server: SeaweedServer, workdir: Path) -> list[dict[str, Any]]:
    """Measure snapshot end -> committed, with and without streaming, against a raw upload."""
    size = env_int("BENCH_LING_COMMIT_MB", 512) * MiB
    bucket = server.make_bucket("bench-ling-commit")
    opts = server.storage_options()
    payload = os.urandom(size)
    digest = xxhash.xxh3_128_hexdigest(payload)
    s3 = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    modes = {
        name: fsspec.filesystem("pcache", target_protocol="s3", target_options=opts, skip_instance_cache=True,
                                cache_dir=str(workdir / f"commit-{name}"), stream_uploads=(name == "stream"))
        for name in ("stream", "after_close")
    }
    seconds: dict[str, list[float]] = {"stream": [], "after_close": [], "raw": []}
    cpu: dict[str, list[float]] = {k: [] for k in seconds}
    closed: dict[str, list[float]] = {"stream": [], "after_close": []}  # of those seconds, until close()
    for i in range(repeats()):
        order = ["raw", "stream", "after_close"]
        order = order[i % 3:] + order[:i % 3]  # rotate, so no mode always runs first on a cold machine
        for mode in order:
            settle()
            if mode == "raw":
                s, c = _raw(s3, f"{bucket}/raw/{i}/rank0.distcp", payload)
            else:
                s, c, w = _through_pcache(modes[mode], f"{bucket}/{mode}/{i}", payload)
                closed[mode].append(w)
            seconds[mode].append(s)
            cpu[mode].append(c)
            log(f"ling commit: {mode} repeat {i}: {s:.2f}s, client CPU {c:.2f}s")
    for mode in ("stream", "after_close"):  # the bytes at the origin are the bytes written
        got = s3.cat_file(f"{bucket}/{mode}/0/rank0.distcp")
        assert xxhash.xxh3_128_hexdigest(got) == digest, f"{mode}: origin bytes differ from the snapshot"
    per_gib = {k: [c / (size / GiB) for c in v] for k, v in cpu.items()}
    extra = {"cpu_s_per_gib": per_gib, "seconds": seconds, "until_close_s": closed, "size_bytes": size}
    rows = []
    for mode, key, target in (("stream", "commit", TARGET), ("after_close", "commit_no_stream", None)):
        rows.append(make_row(
            module="ling", key=key, unit="1/s",
            measure=f"snapshot end -> committed at the origin ({size // MiB} MiB, "
                    f"{'streaming upload' if mode == 'stream' else 'stream_uploads=false'})",
            values=[1 / s for s in seconds[mode]], seconds=seconds[mode], nbytes=size,
            baseline="raw s3fs pipe_file of the same bytes", baseline_values=[1 / s for s in seconds["raw"]],
            baseline_seconds=seconds["raw"], target=target, extra=extra,
            notes=(f"write + close + commit; client CPU s/GiB: ours {min(per_gib[mode]):.2f}-"
                   f"{max(per_gib[mode]):.2f}, raw {min(per_gib['raw']):.2f}-{max(per_gib['raw']):.2f}"
                   + ("; target <= 1.1x means ratio >= 0.909" if target else "; informational"))))
    server.delete_bucket(bucket)
    return rows
