"""Checkpoint writes through ``fusefs mount --writable``, against local disk, rclone and JuiceFS (same run).

One ``torch.save`` of a ``BENCH_SIZE_MB`` (default 1 GiB) state dict per measure and repeat, each into a
fresh directory (an uploaded object is read-only through the mount):

- until ``torch.save`` returns (close() = fsynced in the cache directory) vs ``torch.save`` to local
  disk plus ``fsync`` (target: at most 1.3x the time)
- until committed at the origin (``torch.save`` + ``fusefs commit``) vs local ``torch.save`` + fsync +
  a raw s3fs upload of the file (target: at most 1.15x)
- until close returns vs ``rclone mount --vfs-cache-mode writes`` (target: 1.5x faster)
- until durable at the origin (``fusefs flush``) vs JuiceFS ``--writeback`` over the same SeaweedFS, its
  staging directory drained (reported)

Rows are throughputs (MB/s, larger is better), so a time target of 1.3x is a ratio of at least 1/1.3.
Client CPU seconds per GiB (writer + daemon + uploader; rclone and JuiceFS likewise) go in ``extra``.
Runs in the ``fusefs`` module; ``BENCH_ONLY=fusefs_write`` runs only this part.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import s3fs

from bench._common import MiB, env_int, log, make_row, object_size, proc_cpu_seconds
from bench.fusefs_bench import _bin, _pid_serving, _umount, _wait_mounted, rclone_mounted
from lingcore.files import fsync_path
from pcache.testing import SeaweedServer

NAME = "fusefs"
GiB = 1024 * MiB
TARGETS = {"return_local": 1 / 1.3, "commit_raw": 1 / 1.15, "close_rclone": 1.5}
WB_BUCKET = "bench-fusefs-write"
JFS_BUCKET = "bench-juicefs-wb"


def _children(pid: int | None) -> list[int]:
    if pid is None:
        return []
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
    return out


class ClientCpu:
    """CPU seconds of this process (the writer) plus a daemon and its children, over a window."""

    def __init__(self, daemon: int | None) -> None:
        self.daemon = daemon

    def _now(self) -> dict[int, float]:
        pids = [p for p in [self.daemon, *_children(self.daemon)] if p is not None]
        return {p: proc_cpu_seconds(p) or 0.0 for p in pids}

    def __enter__(self) -> ClientCpu:
        self._self = resource.getrusage(resource.RUSAGE_SELF)
        self._start = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._now()
        me = resource.getrusage(resource.RUSAGE_SELF)
        self.seconds = (me.ru_utime - self._self.ru_utime + me.ru_stime - self._self.ru_stime
                        + sum(v - self._start.get(p, 0.0) for p, v in end.items()))


def _save(state: Any, path: Path) -> float:
    import torch

    t0 = time.perf_counter()
    torch.save(state, path)
    return time.perf_counter() - t0


@contextlib.contextmanager
def _fusefs(server: SeaweedServer, workdir: Path, env: dict[str, str]) -> Iterator[Path]:
    mnt = workdir / f"mnt-fusefs-w-{time.monotonic_ns()}"
    mnt.mkdir()
    proc = subprocess.run([sys.executable, "-m", "fusefs", "mount", "--writable", f"s3://{WB_BUCKET}/ckpt", str(mnt),
                           "--endpoint-url", server.endpoint_url, "--cache-dir", str(workdir / "fw-cache"),
                           "--disk-bytes", "16GiB"], env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"fusefs mount --writable failed: {proc.stderr}")
    try:
        yield mnt
    finally:
        _umount(mnt)


@contextlib.contextmanager
def _rclone(server: SeaweedServer, workdir: Path) -> Iterator[Path]:
    mnt = workdir / f"mnt-rclone-w-{time.monotonic_ns()}"
    mnt.mkdir()
    env = dict(os.environ, RCLONE_CONFIG_SW_TYPE="s3", RCLONE_CONFIG_SW_PROVIDER="SeaweedFS",
               RCLONE_CONFIG_SW_ACCESS_KEY_ID=server.access_key, RCLONE_CONFIG_SW_SECRET_ACCESS_KEY=server.secret_key,
               RCLONE_CONFIG_SW_ENDPOINT=server.endpoint_url, RCLONE_CONFIG_SW_REGION="us-east-1")
    with rclone_mounted(mnt, [f"sw:{WB_BUCKET}/rclone", "--vfs-cache-mode", "writes",
                              "--cache-dir", str(workdir / "rc-cache")], env, stop_timeout=120):
        yield mnt


@contextlib.contextmanager
def _juicefs(server: SeaweedServer, workdir: Path, env: dict[str, str]) -> Iterator[tuple[Path, Path]]:
    meta = f"sqlite3://{workdir / 'juicefs-wb.db'}"
    server.make_bucket(JFS_BUCKET)
    subprocess.run([_bin("juicefs"), "format", "--storage", "s3", "--bucket", f"{server.endpoint_url}/{JFS_BUCKET}",
                    "--access-key", server.access_key, "--secret-key", server.secret_key, "--trash-days", "0",
                    "--no-update", meta, "benchjfswb"], check=True, capture_output=True, env=env)
    mnt, cache = workdir / "mnt-juicefs-wb", workdir / "jfs-wb-cache"
    mnt.mkdir(exist_ok=True)
    subprocess.run([_bin("juicefs"), "mount", "-d", "--writeback", "--no-usage-report", "--no-bgjob", "--cache-dir",
                    str(cache), "--log", str(workdir / "juicefs-wb.log"), meta, str(mnt)],
                   check=True, capture_output=True, env=env)
    try:
        _wait_mounted(mnt)
        yield mnt, cache
    finally:
        _umount(mnt)


def _staged_files(cache: Path) -> int:
    """Blocks JuiceFS still holds in its write-back staging directories (``rawstaging``)."""
    count = 0
    for root, _dirs, files in os.walk(cache):
        if "rawstaging" in root:
            count += len(files)
    return count


def _timed(step: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def run_write(server: SeaweedServer, workdir: Path) -> list[dict[str, Any]]:
    """The four write measures; see the module docstring."""
    import torch

    workdir = workdir / "fusefs-write"
    workdir.mkdir(parents=True, exist_ok=True)
    size, repeat = object_size(), env_int("FUSEFS_BENCH_REPEAT", 2)
    state = {"weights": torch.randn(size // 4 - 1024), "step": torch.tensor(100)}
    local_dir = workdir / "local"
    local_dir.mkdir(exist_ok=True)
    server.make_bucket(WB_BUCKET)
    s3 = s3fs.S3FileSystem(**server.storage_options(), skip_instance_cache=True)
    env = dict(os.environ, AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key,
               AWS_REGION="us-east-1")
    times: dict[str, list[float]] = {k: [] for k in ("local", "local_raw", "ret", "commit", "durable", "rclone",
                                                      "juicefs")}
    cpu: dict[str, list[float]] = {k: [] for k in ("fusefs", "rclone", "juicefs")}
    nbytes = 0
    with _fusefs(server, workdir, env) as mnt:
        daemon = _pid_serving(mnt)
        for i in range(repeat + 1):  # the first round warms the uploader and the page cache; not counted
            local = local_dir / "model.pt"
            t_local = _save(state, local) + _timed(lambda: fsync_path(local))  # noqa: B023
            nbytes = local.stat().st_size
            t_raw = t_local + _timed(lambda: s3.put_file(str(local), f"{WB_BUCKET}/raw/{i}/model.pt"))  # noqa: B023
            local.unlink()
            (mnt / f"r{i}").mkdir()
            with ClientCpu(daemon) as window:
                t0 = time.perf_counter()
                t_ret = _save(state, mnt / f"r{i}" / "model.pt")
                flush = subprocess.run([sys.executable, "-m", "fusefs", "flush", str(mnt / f"r{i}")], env=env,
                                       capture_output=True, text=True, check=False)
                durable = time.perf_counter() - t0
            if flush.returncode:
                raise RuntimeError(f"fusefs flush failed: {flush.stderr}")
            (mnt / f"c{i}").mkdir()
            t0 = time.perf_counter()
            _save(state, mnt / f"c{i}" / "model.pt")
            commit = subprocess.run([sys.executable, "-m", "fusefs", "commit", str(mnt / f"c{i}")], env=env,
                                    capture_output=True, text=True, check=False)
            t_commit = time.perf_counter() - t0
            if commit.returncode:
                raise RuntimeError(f"fusefs commit failed: {commit.stderr}")
            log(f"fusefs write round {i}: local+fsync {t_local:.2f}s, +raw upload {t_raw:.2f}s, mount return "
                f"{t_ret:.2f}s, durable {durable:.2f}s, committed {t_commit:.2f}s, client CPU {window.seconds:.1f}s")
            if i:
                times["local"].append(t_local)
                times["local_raw"].append(t_raw)
                times["ret"].append(t_ret)
                times["durable"].append(durable)
                times["commit"].append(t_commit)
                cpu["fusefs"].append(window.seconds / (nbytes / GiB))
    with _rclone(server, workdir) as mnt:
        for i in range(repeat + 1):
            with ClientCpu(_pid_serving(mnt)) as window:
                t = _save(state, mnt / f"model-{i}.pt")
            log(f"fusefs write round {i}: rclone close returned {t:.2f}s")
            if i:
                times["rclone"].append(t)
                cpu["rclone"].append(window.seconds / (nbytes / GiB))
    with _juicefs(server, workdir, env) as (mnt, cache):
        for i in range(repeat + 1):
            with ClientCpu(_pid_serving(mnt)) as window:
                t0 = time.perf_counter()
                _save(state, mnt / f"model-{i}.pt")
                while _staged_files(cache):
                    time.sleep(0.02)
                t = time.perf_counter() - t0
            log(f"fusefs write round {i}: JuiceFS --writeback durable {t:.2f}s")
            if i:
                times["juicefs"].append(t)
                cpu["juicefs"].append(window.seconds / (nbytes / GiB))

    def mbs(values: list[float]) -> list[float]:
        return [nbytes / MiB / t for t in values]

    extra = {"client_cpu_s_per_gib": cpu, "seconds": times}
    label = f"torch.save {nbytes // MiB} MiB"
    return [
        make_row(module=NAME, key="write_return_vs_local", measure=f"{label} to the mount, until it returns",
                 unit="MB/s", values=mbs(times["ret"]), baseline="torch.save to local disk + fsync",
                 baseline_values=mbs(times["local"]), target=TARGETS["return_local"], nbytes=nbytes,
                 seconds=times["ret"], baseline_seconds=times["local"], extra=extra,
                 notes="ratio >= 0.77 means at most 1.3x the time; same disk holds the cache directory"),
        make_row(module=NAME, key="write_commit_vs_raw", measure=f"{label}, until committed at the origin",
                 unit="MB/s", values=mbs(times["commit"]), baseline="local torch.save + fsync + raw s3fs upload",
                 baseline_values=mbs(times["local_raw"]), target=TARGETS["commit_raw"], nbytes=nbytes,
                 seconds=times["commit"], baseline_seconds=times["local_raw"],
                 notes="ratio >= 0.87 means at most 1.15x the time; fusefs commit also writes _COMMITTED"),
        make_row(module=NAME, key="write_close_vs_rclone", measure=f"{label}, until close returns",
                 unit="MB/s", values=mbs(times["ret"]), baseline="rclone mount --vfs-cache-mode writes",
                 baseline_values=mbs(times["rclone"]), target=TARGETS["close_rclone"], nbytes=nbytes,
                 seconds=times["ret"], baseline_seconds=times["rclone"],
                 notes="fusefs close() returns once fsynced locally; rclone's once in its cache (not fsynced)"),
        make_row(module=NAME, key="write_durable_vs_juicefs", measure=f"{label}, until durable at the origin",
                 unit="MB/s", values=mbs(times["durable"]), baseline="JuiceFS --writeback, staging drained",
                 baseline_values=mbs(times["juicefs"]), target=None, nbytes=nbytes, seconds=times["durable"],
                 baseline_seconds=times["juicefs"], extra={"client_cpu_s_per_gib": cpu}),
    ]
