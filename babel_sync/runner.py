"""Passes, verification and the daemon loop on top of :class:`~babel_sync.engine.Syncer`."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

from babel_sync import metrics
from babel_sync.engine import Plan, Syncer
from babel_sync.transfer import Stats
from babel_sync.units import list_prefix, parse_manifest, published
from lingcore.checksum import content_hasher
from lingcore.log import get_logger

log = get_logger("babel_sync")
_COUNTERS = ("objects_copied", "bytes_copied", "bytes_sent", "bytes_resumed", "objects_skipped",
             "bytes_skipped", "objects_verified", "bytes_verified", "objects_deleted", "units_published",
             "units_removed", "integrity_retries")


def _err(rule: str, dest: str, url: str, exc: BaseException) -> dict[str, Any]:
    return {"rule": rule, "dest": dest, "unit": None, "url": url, "type": type(exc).__name__, "error": str(exc)}


def sync_once(syncer: Syncer, rules: list[str] | None = None) -> dict[str, Any]:
    """Run one pass over the selected (rule, destination) pairs; return the JSON summary.

    ``ok`` is True only when every pair listed cleanly and every unit is published.
    """
    t0 = time.monotonic()
    stats, errors = Stats(), []
    pairs = syncer.pairs(rules)
    syncer.journal.lock()
    try:
        checked: dict[str, BaseException | None] = {}
        for site in sorted({s for r, d in pairs for s in (r.source, d)}):
            try:
                syncer.store(site).check()
                checked[site] = None
            except Exception as exc:  # noqa: BLE001 - reported per pair below
                checked[site] = exc
        plans: list[Plan] = []
        for rule, dest in pairs:
            syncer.journal.set_status(rule.name, dest, last_pass_start=time.time())
            bad_site = next((s for s in (rule.source, dest) if checked[s] is not None), dest)
            bad = checked[bad_site]
            try:
                if bad is not None:
                    raise bad
                plan = syncer.plan(rule, dest)
            except Exception as exc:  # noqa: BLE001 - a listing error: nothing copied or deleted
                # The URL of the site that failed its check (the source, say), else the destination's.
                errors.append(_err(rule.name, dest, syncer.config.sites[bad_site].url, exc))
                syncer.journal.set_status(rule.name, dest, last_error=str(exc), last_error_time=time.time())
                metrics.ERRORS.labels(rule.name, dest).inc()
                continue
            stats.add("objects_skipped", plan.in_sync_objects)
            stats.add("bytes_skipped", plan.in_sync_bytes)
            plans.append(plan)
        syncer.execute(plans, stats, errors)
        for plan in plans:  # a stopped pass (SIGTERM) leaves queued units for the next one
            for job in plan.jobs:
                if job.remaining > 0 and not job.failed:
                    errors.append({"rule": plan.rule.name, "dest": plan.dest, "unit": job.unit.path,
                                   "url": syncer.store(plan.dest).url(job.unit.path), "type": "Interrupted",
                                   "error": "pass stopped before this unit was copied"})
        now = time.time()
        for plan in plans:
            failed = {e["unit"] for e in errors if e["rule"] == plan.rule.name and e["dest"] == plan.dest}
            pending = [j for j in plan.jobs if j.unit.path in failed]
            lag = now - min(j.unit.marker.mtime for j in pending) if pending else 0.0
            pending_bytes = sum(j.unit.bytes for j in pending)
            fields: dict[str, Any] = {"last_pass_end": now, "lag_seconds": lag, "pending_bytes": pending_bytes,
                                      "pending_units": len(pending), "orphan_bytes": plan.orphan_bytes}
            if not pending:
                fields["last_success"] = now
            else:
                fields.update(last_error=next(e["error"] for e in errors if e["unit"] in failed),
                              last_error_time=now)
            syncer.journal.set_status(plan.rule.name, plan.dest, **fields)
            metrics.LAG.labels(plan.rule.name, plan.dest).set(lag)
            metrics.PENDING.labels(plan.rule.name, plan.dest).set(pending_bytes)
        metrics.LAST_PASS.set(now)
    finally:
        syncer.journal.flush()
        syncer.journal.unlock()
    out: dict[str, Any] = {"ok": not errors}
    out.update({name: stats.get(name) for name in _COUNTERS})
    out.update(seconds=round(time.monotonic() - t0, 3), errors=errors)
    return out


def verify(syncer: Syncer, rule_name: str, sample: float = 1.0, repair: bool = True,
           rng: random.Random | None = None) -> dict[str, Any]:
    """Re-hash destination content of ``rule_name`` against its manifests (``sample`` = fraction of files).

    A mismatching or missing file is reported as an error and, with ``repair``, its unit is
    unpublished so the next pass re-transfers it.
    """
    t0 = time.monotonic()
    rule = syncer.config.rule(rule_name)
    rng = rng or random.Random()
    checked = nbytes = 0
    errors: list[dict[str, Any]] = []
    for dest in rule.destinations:
        if syncer.options.site and dest != syncer.options.site:
            continue
        dst = syncer.store(dest)
        listing = dst.list_tree([list_prefix(p) for p in rule.include])
        for unit in sorted(published(listing, rule)):
            base = f"{unit}/" if unit else ""
            data, _ = dst.get_small(base + syncer.options.manifest_name)
            files = parse_manifest(data, dst.url(base + syncer.options.manifest_name))
            bad = [] if files else [(base + syncer.options.manifest_name, "manifest missing or unreadable")]
            for rel, rec in sorted(files.items()):
                if sample < 1.0 and rng.random() >= sample:
                    continue
                obj = listing.get(base + rel)
                if obj is None:
                    bad.append((base + rel, "missing"))
                    continue
                hasher = content_hasher()
                dst.read(obj.key, obj.etag, sink=hasher.update)
                checked += 1
                nbytes += obj.size
                if hasher.hexdigest() != rec.get("xxh3_128"):
                    bad.append((base + rel, f"xxh3-128 {hasher.hexdigest()} != manifest {rec.get('xxh3_128')}"))
            for key, why in bad:
                errors.append({"rule": rule.name, "dest": dest, "unit": unit, "url": dst.url(key), "type":
                               "IntegrityError", "error": f"{dst.url(key)}: {why}"})
            if bad and repair:  # unpublish: the next pass re-copies every file whose record does not match
                dst.delete([base + rule.unit_marker])
                dst.delete([base + syncer.options.manifest_name])
                broken = {key for key, _ in bad}
                for rel, rec in files.items():  # good files are reused, bad ones re-transferred
                    if base + rel not in broken and rel != rule.unit_marker:
                        syncer.journal.put(syncer.journal.done_key(syncer.dest_id(dest), base + rel), rec)
    return {"ok": not errors, "rule": rule.name, "objects_verified": checked, "bytes_verified": nbytes,
            "seconds": round(time.monotonic() - t0, 3), "errors": errors}


def daemon(syncer: Syncer, stop: threading.Event, on_pass: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Run passes every ``options.interval`` seconds until ``stop`` is set; return the number of passes."""
    passes = 0
    syncer.stopping = stop  # SIGTERM also ends a running pass after the files in flight
    while not stop.is_set():
        try:
            summary = sync_once(syncer)
        except Exception as exc:  # noqa: BLE001 - the daemon keeps going; the error is logged and counted
            log.exception("pass failed")
            summary = {"ok": False, "errors": [{"error": str(exc), "type": type(exc).__name__}]}
        passes += 1
        log.info("pass done", extra={k: v for k, v in summary.items() if not isinstance(v, list)})
        if on_pass is not None:
            on_pass(summary)
        stop.wait(syncer.options.interval)
    return passes


__all__ = ["daemon", "sync_once", "verify"]
