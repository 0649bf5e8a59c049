"""``babel-sync``: keep datasets and checkpoints in step across clusters.

Commands: ``once`` (one pass, JSON summary, exit 0 only when in sync), ``run`` (the daemon),
``status`` (lag, pending bytes, last error per rule) and ``verify RULE`` (re-hash destination content).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from babel_sync import config as config_mod
from babel_sync import metrics
from babel_sync.engine import Syncer
from babel_sync.errors import ConfigError
from babel_sync.journal import Journal
from babel_sync.runner import daemon, sync_once
from babel_sync.verify import verify
from lingcore.log import get_logger, setup_logging

log = get_logger("babel_sync")

_EPILOG = """\
Configuration comes from the TOML file (--config or $BABEL_CONFIG): [sites.NAME] tables (url plus
storage options such as endpoint_url, credentials_file), [[rules]] tables (name, source, destinations,
include, unit_marker, priority, keep_last, delete) and an optional [sync] table of engine options.
Every [sync] option can also be set as env BABEL_<OPTION> or as a flag here. Credentials come from
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a site's credentials_file, and are never logged.
See docs/babel_sync.md for every option.

exit codes: 0 in sync, 1 errors (the JSON summary lists them), 2 bad configuration or arguments.
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=os.environ.get("BABEL_CONFIG"), help="TOML config file ($BABEL_CONFIG)")
    p.add_argument("--state-dir", help="journal/state directory (default ~/.cache/babel-sync)")
    p.add_argument("--site", help="only handle rules whose destination is this site (one daemon per cluster)")
    p.add_argument("--log-format", choices=("text", "json"), help="log format on stderr (default text)")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING, ERROR")


def _engine(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rule", action="append", help="only this rule (repeatable)")
    p.add_argument("--transfers", type=int, help="files copied in parallel (default 8)")
    p.add_argument("--part-concurrency", type=int, help="multipart parts in flight (default 8)")
    p.add_argument("--bandwidth-limit", dest="bandwidth_limit_bytes", help="bytes/s, e.g. 100MiB (0 = none)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                   help="no progress bar (it is shown only on a terminal anyway)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="babel-sync", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)
    once = sub.add_parser("once", help="one sync pass; prints a JSON summary; exit 0 only when in sync",
                          epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(once)
    _engine(once)
    run = sub.add_parser("run", help="daemon: a pass every --interval seconds until SIGTERM",
                         epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(run)
    _engine(run)
    run.add_argument("--interval", type=float, help="seconds between passes (default 30)")
    run.add_argument("--metrics-port", type=int, help="Prometheus /metrics port on 127.0.0.1 (default 9464; 0 = off)")
    run.add_argument("--metrics-addr", help="bind address for metrics (default 127.0.0.1)")
    status = sub.add_parser("status", help="lag, pending bytes and last error per rule and destination")
    _common(status)
    ver = sub.add_parser("verify", help="check destination content against the manifests (metadata, then "
                                        "sampled or full content checksums)")
    _common(ver)
    ver.add_argument("rule", help="rule name")
    mode = ver.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="hash every file whole (xxh3-128)")
    mode.add_argument("--sample", type=float, metavar="RATE",
                      help="check each checksummed chunk with probability RATE, reading about RATE of the bytes "
                           "(default: [sync] verify_sample)")
    ver.add_argument("--no-repair", dest="repair", action="store_false",
                     help="only report; by default a bad unit is unpublished so the next pass re-copies it")
    return parser


def _load(args: argparse.Namespace) -> config_mod.SyncConfig:
    if not args.config:
        raise ConfigError("config", "no config file: pass --config babel.toml or set BABEL_CONFIG")
    keys = ("state_dir", "site", "transfers", "part_concurrency", "bandwidth_limit_bytes", "progress",
            "interval", "metrics_port", "metrics_addr")
    overrides = {k: getattr(args, k, None) for k in keys}
    return config_mod.load(args.config, overrides=overrides)


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), transient=True) as bar:
        task = bar.add_task("copying", total=0)

        def update(done: int, total: int) -> None:
            if total:
                bar.update(task, total=total)
            bar.advance(task, done)

        yield update


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=1, default=str), flush=True)


def _status(cfg: config_mod.SyncConfig) -> int:
    journal = Journal(cfg.options.state_dir)
    states = journal.statuses()
    now = time.time()
    rows = []
    for rule in cfg.rules:
        for dest in rule.destinations:
            rec = states.get((rule.name, dest), {})
            rows.append({"rule": rule.name, "source": rule.source, "dest": dest,
                         "in_sync": bool(rec.get("last_success")) and not rec.get("pending_units")
                         and not rec.get("held_units"),
                         "lag_seconds": round(rec.get("lag_seconds", 0.0), 3) if rec else None,
                         "pending_bytes": rec.get("pending_bytes"), "pending_units": rec.get("pending_units"),
                         "held_units": rec.get("held_units"), "held_bytes": rec.get("held_bytes"),
                         "last_success_age_s": round(now - rec["last_success"], 1) if rec.get("last_success")
                         else None, "last_error": rec.get("last_error")})
    _print({"state_dir": journal.dir, "rules": rows})
    return 0


def _report_errors(command: str, summary: dict[str, Any], limit: int = 20) -> None:
    """One stderr line per error of a pass (the JSON summary on stdout keeps every detail)."""
    errors = summary.get("errors") or []
    for err in errors[:limit]:
        unit = f" unit {err['unit']}" if err.get("unit") else ""
        text = re.sub(r"^\[Errno \d+\] ", "", str(err.get("error", "")))
        print(f"babel-sync {command}: error: rule {err.get('rule')!r} -> {err.get('dest')}{unit}: {text}",
              file=sys.stderr)
    if len(errors) > limit:
        print(f"babel-sync {command}: ... and {len(errors) - limit} more errors (see the JSON summary)",
              file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``babel-sync`` console script."""
    # The modules and objects loaded so far live for the whole process: moved out of the collector's
    # view, the cyclic GC (triggered by listing and transfer allocations) no longer re-scans them.
    gc.freeze()
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, None if args.log_format is None else args.log_format == "json")
    try:
        return _main(args)
    except KeyboardInterrupt:
        # Units are published only once complete (files, manifest, then marker), and the journal
        # remembers every finished file: nothing half-published is left, and the next pass resumes.
        print(f"babel-sync {args.command}: interrupted; no unit was half-published, and the next pass resumes "
              "where this one stopped", file=sys.stderr)
        return 130


def _main(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args)
    except ConfigError as exc:
        print(f"babel-sync: {exc}", file=sys.stderr)
        return 2
    if args.command == "status":
        return _status(cfg)
    if args.command == "run":
        return _run(cfg, args.rule)
    with _progress(cfg.options.progress) as progress:
        syncer = Syncer(cfg, progress=progress)
        if args.command == "once":
            try:
                summary = sync_once(syncer, args.rule)
            except ConfigError as exc:
                print(f"babel-sync: {exc}", file=sys.stderr)
                return 2
            _print(summary)
            _report_errors("once", summary)
            return 0 if summary["ok"] else 1
        if args.command == "verify":
            try:
                sample = 1.0 if args.full else (args.sample if args.sample is not None else cfg.options.verify_sample)
                if not 0.0 <= sample <= 1.0:
                    raise ConfigError("--sample", f"must be within 0..1, got {sample}")
                result = verify(syncer, args.rule, sample=sample, repair=args.repair)
            except ConfigError as exc:
                print(f"babel-sync: {exc}", file=sys.stderr)
                return 2
            _print(result)
            _report_errors("verify", result)
            return 0 if result["ok"] else 1
    return 2


def _run(cfg: config_mod.SyncConfig, rules: list[str] | None) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if cfg.options.metrics_port:
        metrics.serve(cfg.options.metrics_port, cfg.options.metrics_addr)
    syncer = Syncer(cfg)
    log.info("babel-sync daemon started", extra={"site": cfg.options.site or "*", "rules": len(cfg.rules),
                                                 "interval": cfg.options.interval})
    if rules:
        syncer.config = config_mod.SyncConfig(cfg.options, cfg.sites, tuple(cfg.rule(r) for r in rules), cfg.path)
    passes = daemon(syncer, stop)
    log.info("babel-sync daemon stopped", extra={"passes": passes})
    return 0


if __name__ == "__main__":
    sys.exit(main())
