"""Passes (``once``, with held-back units waited out) and the daemon loop on top of :class:`~babel_sync.engine.Syncer`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from babel_sync import metrics
from babel_sync.engine import Syncer
from babel_sync.plan import Plan
from babel_sync.transfer import Stats
from lingcore.log import get_logger

log = get_logger("babel_sync")
_COUNTERS = ("objects_copied", "bytes_copied", "bytes_sent", "bytes_resumed", "objects_skipped",
             "bytes_skipped", "objects_verified", "bytes_verified", "objects_deleted", "units_published",
             "units_removed", "integrity_retries", "parts_in_flight_max", "units_waited")


def _err(rule: str, dest: str, url: str, exc: BaseException) -> dict[str, Any]:
    return {"rule": rule, "dest": dest, "unit": None, "url": url, "type": type(exc).__name__, "error": str(exc)}


def _settle(syncer: Syncer, plans: list[Plan], stats: Stats, errors: list[dict[str, Any]]) -> None:
    """Wait out the settle margin of held-back units and plan them again, until none is held.

    The wait for a unit ends ``listing_settle_seconds`` after its marker's ``LastModified`` (this host's
    clock); a unit still held a minute past that (the site's clock runs ahead) stays held and is reported.
    """
    margin = syncer.options.listing_settle_seconds
    deadline = time.monotonic() + margin + 60.0
    while not syncer.stopping.is_set():
        pending = [p for p in plans if p.held]
        if not pending:
            return
        wake = max(m.mtime for p in pending for m in p.held.values()) + margin
        wait = max(0.0, wake - time.time())
        if time.monotonic() + wait > deadline:
            return
        log.info("waiting for fresh units to settle", extra={"seconds": round(wait, 2),
                                                              "units": sum(len(p.held) for p in pending)})
        if syncer.stopping.wait(wait):
            return
        again: list[Plan] = []
        for plan in pending:
            stats.add("units_waited", len(plan.held))
            try:
                extra = syncer.plan(plan.rule, plan.dest, only=set(plan.held))
            except Exception as exc:  # noqa: BLE001 - a listing error: the units stay held and are reported
                errors.append(_err(plan.rule.name, plan.dest, syncer.config.sites[plan.dest].url, exc))
                plan.held = {}
                continue
            stats.add("objects_skipped", extra.in_sync_objects)
            stats.add("bytes_skipped", extra.in_sync_bytes)
            plan.jobs.extend(extra.jobs)
            plan.held, plan.held_bytes = extra.held, extra.held_bytes
            plan.in_sync_objects += extra.in_sync_objects
            plan.in_sync_bytes += extra.in_sync_bytes
            if extra.oldest_pending:
                plan.oldest_pending = min(plan.oldest_pending or extra.oldest_pending, extra.oldest_pending)
            extra.held = {}
            again.append(extra)
        syncer.execute(again, stats, errors, removals=False)


def sync_once(syncer: Syncer, rules: list[str] | None = None, wait: bool = True) -> dict[str, Any]:
    """Run one pass over the selected (rule, destination) pairs; return the JSON summary.

    Args:
        wait: Wait out the settle margin of units committed just before the listing and copy them in
            this pass (``babel-sync once``). The daemon passes ``False``: its next pass takes them.

    ``ok`` is True only when every pair listed cleanly and every complete unit at the source is
    published at every destination (none failed, none held back).
    """
    t0 = time.monotonic()
    stats, errors = Stats(), []
    pairs = syncer.pairs(rules)
    syncer.journal.lock()
    held_units = held_bytes = 0
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
        syncer.execute(plans, stats, errors, removals=False)
        if wait:
            _settle(syncer, plans, stats, errors)
        syncer.remove(plans, stats, errors)
        for plan in plans:  # a stopped pass (SIGTERM) leaves queued units for the next one
            for job in plan.jobs:
                if job.remaining > 0 and not job.failed:
                    errors.append({"rule": plan.rule.name, "dest": plan.dest, "unit": job.unit.path,
                                   "url": syncer.store(plan.dest).url(job.unit.path), "type": "Interrupted",
                                   "error": "pass stopped before this unit was copied"})
            if wait:
                for unit, marker in sorted(plan.held.items()):
                    errors.append({"rule": plan.rule.name, "dest": plan.dest, "unit": unit,
                                   "url": syncer.store(plan.rule.source).url(marker.key), "type": "HeldBack",
                                   "error": f"marker written at {marker.mtime:.0f} (site clock) is still within "
                                            f"listing_settle_seconds of this host's clock; is the site's clock "
                                            f"ahead?"})
            held_units += len(plan.held)
            held_bytes += plan.held_bytes
        now = time.time()
        for plan in plans:
            failed = {e["unit"] for e in errors if e["rule"] == plan.rule.name and e["dest"] == plan.dest
                      and e["type"] != "HeldBack"}
            pending = [j for j in plan.jobs if j.unit.path in failed]
            stamps = [j.unit.marker.mtime for j in pending] + [m.mtime for m in plan.held.values()]
            lag = now - min(stamps) if stamps else 0.0
            pending_bytes = sum(j.unit.bytes for j in pending) + plan.held_bytes
            fields: dict[str, Any] = {"last_pass_end": now, "lag_seconds": lag, "pending_bytes": pending_bytes,
                                      "pending_units": len(pending), "held_units": len(plan.held),
                                      "held_bytes": plan.held_bytes, "orphan_bytes": plan.orphan_bytes}
            if not pending and not plan.held:
                fields["last_success"] = now
            elif pending:
                fields.update(last_error=next(e["error"] for e in errors if e["unit"] in failed),
                              last_error_time=now)
            syncer.journal.set_status(plan.rule.name, plan.dest, **fields)
            metrics.LAG.labels(plan.rule.name, plan.dest).set(lag)
            metrics.PENDING.labels(plan.rule.name, plan.dest).set(pending_bytes)
        metrics.LAST_PASS.set(now)
    finally:
        syncer.release_listings()
        syncer.journal.flush()
        syncer.journal.unlock()
    out: dict[str, Any] = {"ok": not errors and not held_units}
    out.update({name: stats.get(name) for name in _COUNTERS})
    out.update(units_held_back=held_units, bytes_held_back=held_bytes, seconds=round(time.monotonic() - t0, 3),
               errors=errors)
    return out


def daemon(syncer: Syncer, stop: threading.Event, on_pass: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Run passes every ``options.interval`` seconds until ``stop`` is set; return the number of passes."""
    passes = 0
    syncer.stopping = stop  # SIGTERM also ends a running pass after the files in flight
    while not stop.is_set():
        try:
            summary = sync_once(syncer, wait=False)
        except Exception as exc:  # noqa: BLE001 - the daemon keeps going; the error is logged and counted
            log.exception("pass failed")
            summary = {"ok": False, "errors": [{"error": str(exc), "type": type(exc).__name__}]}
        passes += 1
        log.info("pass done", extra={k: v for k, v in summary.items() if not isinstance(v, list)})
        if on_pass is not None:
            on_pass(summary)
        stop.wait(syncer.options.interval)
    return passes


__all__ = ["daemon", "sync_once"]
