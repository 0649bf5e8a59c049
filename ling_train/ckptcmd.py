"""``ling-train ckpt list URL``: the committed steps under a checkpoint root, their sizes, and ``latest``;
``ling-train ckpt clean-shm``: remove memory snapshots (``/dev/shm`` segments, :mod:`ling_train.shmsnap`).

Only steps with a complete ``_COMMITTED`` marker count (they are what ``--resume`` may load); step
directories without one (an interrupted or abandoned save) are listed apart: they are never loaded,
and retention deletes them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from ling_train import shmsnap
from ling_train.checkpoint import CheckpointManager
from lingcore.cli import run_command
from lingcore.errors import ConfigError
from lingcore.log import setup_logging
from lingcore.probe import check_readable


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def listing(url: str, endpoint_url: str = "", cache_dir: str = "",
            storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``ckpt list`` shows, as data.

    Returns:
        ``{"url", "steps": [{"step", "bytes", "latest"}], "uncommitted": [step, ...], "latest": step or None,
        "resume_step": step or None}``; ``latest`` is what the ``latest`` file names (a hint), ``resume_step``
        what ``--resume`` takes (the newest committed step).

    Raises:
        StoreAccessError: the root is unreachable, refused or missing.
    """
    check_readable(url, "", storage_options, endpoint_url or None)
    manager = CheckpointManager(url, cache_dir=cache_dir, endpoint_url=endpoint_url, storage_options=storage_options)
    committed = manager.committed_steps()
    latest = manager.latest_pointer()
    steps = [{"step": s, "bytes": manager.bytes_at_origin(s), "latest": s == latest} for s in committed]
    uncommitted = [s for s in manager.all_steps() if s not in committed]
    return {"url": url, "steps": steps, "uncommitted": uncommitted, "latest": latest,
            "resume_step": committed[-1] if committed else None}


def _list(args: argparse.Namespace) -> int:
    data = listing(args.url, args.endpoint_url or "", args.cache_dir or "")
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    print(f"checkpoints under {data['url']}: {len(data['steps'])} committed")
    if data["steps"]:
        print(f"  {'step':>8}  {'size':>10}")
    for row in data["steps"]:
        print(f"  {row['step']:>8}  {_human(row['bytes']):>10}" + ("  <- latest" if row["latest"] else ""))
    for step in data["uncommitted"]:
        print(f"  {step:>8}  not committed (no _COMMITTED marker: never loaded; retention deletes it)")
    latest, resume = data["latest"], data["resume_step"]
    if latest is not None and latest != resume:
        print(f"latest names step {latest}; --resume takes the newest committed step, {resume}")
    elif resume is None:
        print("nothing committed: --resume would refuse (use --resume-if-exists to start from step 0)")
    return 0


def _clean_shm(args: argparse.Namespace) -> int:
    if bool(args.all) == bool(args.url or args.job_id):
        raise ConfigError("clean-shm", "give the checkpoint URL, --job-id, or --all (exactly one way)")
    job = None if args.all else shmsnap.job_hash(args.url or "", args.job_id or "")
    removed = shmsnap.remove_segments(shmsnap.job_segments(job))
    for path in removed:
        print(f"removed {path}")
    print(f"{len(removed)} memory snapshot segment(s) removed")
    return 0


def ckpt_main(argv: Sequence[str]) -> int:
    """Entry point of ``ling-train ckpt``."""
    parser = argparse.ArgumentParser(prog="ling-train ckpt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("list", help="committed steps, their sizes and which one `latest` names")
    p.add_argument("url", metavar="URL", help="checkpoint root, e.g. pcache::s3://bucket/run1 or /dir")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL, else AWS)")
    p.add_argument("--cache-dir", help="pcache directory (default: pcache's)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--log-level", help="DEBUG (errors with their traceback), INFO (default), WARNING")
    p = sub.add_parser("clean-shm", help="remove the memory snapshots (/dev/shm segments) of a job, or all of ours")
    p.add_argument("url", metavar="URL", nargs="?", help="the job's checkpoint root (as given to --ckpt)")
    p.add_argument("--job-id", help="the job's --job-id (instead of the URL)")
    p.add_argument("--all", action="store_true", help=f"every segment named {shmsnap.PREFIX}* (every job)")
    p.add_argument("--log-level", help="DEBUG (errors with their traceback), INFO (default), WARNING")
    args = parser.parse_args(list(argv))
    setup_logging(args.log_level)
    return run_command("ling-train ckpt", {"list": _list, "clean-shm": _clean_shm}, args,
                       (ConfigError, ValueError, FileNotFoundError),
                       url_of=lambda a: a.url if a.command == "list" else None)
