"""Helpers shared by benchmark modules: knobs, timing, result rows, CPU accounting and logging.

A benchmark module exposes ``NAME`` (used for ``bench/results/<NAME>.json`` and the plot file names) and
``run(server, workdir) -> list[dict]``; every dict is a result row built with :func:`make_row`.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

MiB = 1024 * 1024
GiB = 1024 * MiB
MB = 1_000_000  # throughput is reported in decimal MB/s

_T0 = time.monotonic()


def log(message: str) -> None:
    """Print a progress line to stderr, prefixed with the seconds since the benchmark started.

    Args:
        message: The text to print.
    """
    print(f"[bench {time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def env_int(name: str, default: int, minimum: int = 1) -> int:
    """Read a positive integer knob from the environment.

    Args:
        name: Environment variable name.
        default: Value when the variable is unset or empty.
        minimum: Smallest accepted value.

    Returns:
        The parsed value.

    Raises:
        ValueError: if the value is not an integer >= ``minimum``.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def object_size() -> int:
    """Bytes of the benchmark object: ``BENCH_SIZE_MB`` MiB (default 1024, i.e. 1 GiB)."""
    return env_int("BENCH_SIZE_MB", 1024) * MiB


def repeats() -> int:
    """How often each timing is repeated (``BENCH_REPEAT``, default 3); results use the median."""
    return env_int("BENCH_REPEAT", 3)


def selected(group: str) -> bool:
    """Return True when ``group`` should run, per the optional ``BENCH_ONLY`` filter.

    ``BENCH_ONLY`` is a comma-separated list of group names (for example ``warm,cold``); unset runs all.

    Args:
        group: The benchmark group's name.
    """
    only = {g.strip() for g in os.environ.get("BENCH_ONLY", "").split(",") if g.strip()}
    return not only or group in only


def median(values: Sequence[float]) -> float:
    """Median of ``values`` (which must not be empty)."""
    return float(statistics.median(values))


def mbps(nbytes: int, seconds: float) -> float:
    """Throughput in decimal MB/s."""
    return nbytes / seconds / MB if seconds > 0 else float("inf")


def settle() -> None:
    """Flush dirty pages and collect garbage so one timing does not pay for the previous one's writes."""
    gc.collect()
    os.sync()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Run ``fn`` and return (seconds, result), measured with ``time.perf_counter``."""
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def make_row(
    *,
    module: str,
    key: str,
    measure: str,
    unit: str,
    values: Sequence[float],
    baseline: str,
    baseline_values: Sequence[float],
    target: float | None,
    nbytes: int | None = None,
    seconds: Sequence[float] | None = None,
    baseline_seconds: Sequence[float] | None = None,
    notes: str = "",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build one result row: medians, the ratio of medians, the target and whether it was met.

    Args:
        module: Benchmark module name (``pcache``).
        key: Stable identifier of the measure (``warm_memory_16MiB``).
        measure: Human-readable name of the measure.
        unit: Unit of ``values`` (``MB/s`` or ``ops/s``); larger is better.
        values: Per-repeat values of the system under test.
        baseline: Human-readable name of the baseline.
        baseline_values: Per-repeat values of the baseline.
        target: Minimum acceptable ``ratio`` (None: informational only).
        nbytes: Bytes moved per repeat, for throughput rows.
        seconds: Raw per-repeat timings of the system under test.
        baseline_seconds: Raw per-repeat timings of the baseline.
        notes: Free text shown in the JSON (caveats, what was verified).
        extra: Further raw data (CPU accounting, upload timings).

    Returns:
        The row as a JSON-serialisable dict.
    """
    value = median(values)
    base = median(baseline_values)
    ratio = value / base if base > 0 else float("inf")
    return {
        "module": module,
        "key": key,
        "measure": measure,
        "unit": unit,
        "bytes": nbytes,
        "value": value,
        "values": list(values),
        "seconds": list(seconds) if seconds is not None else None,
        "baseline": baseline,
        "baseline_value": base,
        "baseline_values": list(baseline_values),
        "baseline_seconds": list(baseline_seconds) if baseline_seconds is not None else None,
        "ratio": ratio,
        "paired_ratios": [v / b if b > 0 else float("inf")
                          for v, b in zip(values, baseline_values, strict=True)],
        "target": target,
        "met": None if target is None else bool(ratio >= target),
        "notes": notes,
        "extra": extra or {},
    }


def error_row(module: str, key: str, measure: str, error: str) -> dict[str, Any]:
    """Build a row recording that a measure could not be taken.

    Args:
        module: Benchmark module name.
        key: Identifier of the failed measure or group.
        measure: Human-readable name.
        error: The traceback or message.

    Returns:
        A row with ``error`` set and ``met`` False.
    """
    return {"module": module, "key": key, "measure": measure, "unit": "", "value": None, "baseline": "",
            "baseline_value": None, "ratio": None, "target": None, "met": False, "error": error}


def skipped_row(module: str, key: str, measure: str, baseline: str, target: float | None,
                reason: str) -> dict[str, Any]:
    """Build a row recording that a measure was not taken because the code under test lacks something.

    Not an error (``run_all`` still exits 0): the table shows ``skipped: <reason>``.

    Args:
        module: Benchmark module name.
        key: Identifier of the measure.
        measure: Human-readable name.
        baseline: The baseline it would have been compared with.
        target: Its target.
        reason: Why it was skipped, e.g. ``needs stale_if_error``.

    Returns:
        A row with ``skipped`` set and no values.
    """
    return {"module": module, "key": key, "measure": measure, "unit": "", "value": None, "values": [],
            "baseline": baseline, "baseline_value": None, "baseline_values": [], "ratio": None,
            "paired_ratios": [], "target": target, "met": None, "skipped": reason,
            "notes": f"skipped: {reason}", "extra": {}}


# -- CPU accounting ---------------------------------------------------------------------------------
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int | None) -> float | None:
    """User plus system CPU seconds used so far by process ``pid`` (None if unknown or gone)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_cpu_jiffies() -> tuple[int, int]:
    """Return (busy, total) jiffies summed over all CPUs, from ``/proc/stat``."""
    with open("/proc/stat") as fh:
        parts = [int(x) for x in fh.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)  # idle + iowait
    total = sum(parts[:8])  # guest time is already counted in user
    return total - idle, total


class CpuWindow:
    """CPU seconds used by some processes and by the whole machine over a time window.

    Args:
        pids: Named process ids to account (a None id is skipped).
    """

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self._start: dict[str, float | None] = {}
        self._machine: tuple[int, int] = (0, 0)
        self._wall = 0.0

    def __enter__(self) -> CpuWindow:
        self._start = {name: proc_cpu_seconds(pid) for name, pid in self.pids.items()}
        self._machine = machine_cpu_jiffies()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._wall
        busy, total = machine_cpu_jiffies()
        d_busy, d_total = busy - self._machine[0], total - self._machine[1]
        self.result: dict[str, Any] = {
            "window_s": wall,
            "machine_busy_cores": (d_busy / d_total * (os.cpu_count() or 1)) if d_total else None,
        }
        for name, pid in self.pids.items():
            start, end = self._start.get(name), proc_cpu_seconds(pid)
            self.result[f"{name}_cpu_s"] = (end - start) if start is not None and end is not None else None


def cpu_loop(duration_s: float, batch: int = 20_000) -> dict[str, float]:
    """Run a fixed pure-Python workload (dict lookups, stores and integer arithmetic) for ``duration_s``.

    One "op" is one loop iteration: a dict get, an add, a shift, a multiply and a dict store.

    Args:
        duration_s: Wall-clock seconds to run.
        batch: Iterations between clock checks.

    Returns:
        ``ops``, ``wall_s``, ``ops_per_s``, ``thread_cpu_s`` (CPU time this thread actually got) and
        ``thread_cpu_share`` (``thread_cpu_s / wall_s``: below 1 when the thread waited for a core or for
        the GIL).
    """
    table: dict[int, int] = {}
    ops = 0
    c0 = time.thread_time()
    t0 = time.perf_counter()
    deadline = t0 + duration_s
    while True:
        for i in range(batch):
            k = i & 1023
            table[k] = table.get(k, 0) + (i >> 2) * 3
        ops += batch
        now = time.perf_counter()
        if now >= deadline:
            break
    wall = now - t0
    thread_cpu = time.thread_time() - c0
    return {"ops": ops, "wall_s": wall, "ops_per_s": ops / wall, "thread_cpu_s": thread_cpu,
            "thread_cpu_share": thread_cpu / wall}


def run_groups(module: str, groups: Sequence[tuple[str, Callable[[], list[dict[str, Any]]]]],
               filtered: bool = True) -> list[dict[str, Any]]:
    """Run each ``(name, group)`` in order and return their rows; a group that raises becomes an error row
    (the others still run) and every group's time is logged.

    Args:
        module: The module's ``NAME`` (for logs and error rows).
        groups: ``(name, zero-argument callable returning rows)``.
        filtered: Skip the groups that :func:`selected` (``BENCH_ONLY``) leaves out.
    """
    rows: list[dict[str, Any]] = []
    for name, group in groups:
        if filtered and not selected(name):
            log(f"{module}: skipping {name} (BENCH_ONLY)")
            continue
        log(f"{module}: running {name}")
        t0 = time.monotonic()
        try:
            rows += group()
        except Exception:
            tb = traceback.format_exc()
            log(f"{module}: {name} FAILED:\n{tb}")
            rows.append(error_row(module, name, f"{module} {name}", tb))
        log(f"{module}: {name} took {time.monotonic() - t0:.1f}s")
    return rows
