"""One sync pass: plan per unit (:mod:`babel_sync.plan`), copy through a priority queue, publish atomically.

Per (rule, destination):

1. List source and destination in parallel, into on-disk listings (:mod:`babel_sync.listdb`). A
   listing error aborts the rule before anything is copied or deleted.
2. Plan unit by unit (:func:`babel_sync.plan.plan`).
3. Changed units are unpublished first (marker, then manifest deleted), so readers never see a marker
   over files that are being replaced. Files go through one priority queue (rule priority, then unit).
4. When a unit's last file is copied and verified: delete removed files (``delete = true``), write the
   manifest, then the marker.
5. Units gone at the source (``delete = true``) and units beyond ``keep_last`` are removed at the
   destination, marker first (:meth:`Syncer.remove`, after every copy of the pass).
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from babel_sync import metrics
from babel_sync.config import Rule, SyncConfig
from babel_sync.journal import Journal
from babel_sync.listdb import ListingStore
from babel_sync.plan import Plan, UnitJob
from babel_sync.plan import plan as plan_pair
from babel_sync.s3util import RateLimiter
from babel_sync.shard import PartBudget
from babel_sync.store import ObjectInfo, S3Store
from babel_sync.transfer import Stats, Transfer
from babel_sync.units import list_prefix, make_manifest
from lingcore.checksum import content_hasher
from lingcore.log import get_logger

log = get_logger("babel_sync")


class Syncer:
    """Runs sync passes for a config; one instance per process (it holds the journal and clients).

    Args:
        config: The validated config.
        progress: Callback ``(done_bytes, total_bytes)`` for a progress bar, or None.
    """

    def __init__(self, config: SyncConfig, progress: Callable[[int, int], None] | None = None) -> None:
        self.config = config
        self.options = config.options
        self.journal = Journal(self.options.state_dir)
        self.listings = ListingStore(self.options.state_dir)
        self.limiter = RateLimiter(self.options.bandwidth_limit_bytes)
        self._stores: dict[str, S3Store] = {}
        self.progress = progress
        self._seq = itertools.count()
        #: Set to stop a pass early (SIGTERM): files in flight finish, queued ones are left for the next
        #: pass (their units stay unpublished; the journal resumes them).
        self.stopping = threading.Event()

    def store(self, site: str) -> S3Store:
        """The (cached) store of a site."""
        if site not in self._stores:
            self._stores[site] = S3Store(self.config.sites[site], self.options, self.limiter)
        return self._stores[site]

    def dest_id(self, site: str) -> str:
        """Journal identity of a destination: endpoint and URL, so renaming a site keeps its state."""
        s = self.config.sites[site]
        return f"{s.endpoint_url or ''}|{s.url}"

    def pairs(self, rules: Iterable[str] | None = None) -> list[tuple[Rule, str]]:
        """(rule, destination) pairs to handle: filtered by rule names and by ``options.site``."""
        wanted = set(rules) if rules else None
        return [(r, d) for r in self.config.rules if wanted is None or r.name in wanted
                for d in r.destinations if not self.options.site or d == self.options.site]

    # ------------------------------------------------------------------ planning
    def plan(self, rule: Rule, dest: str, only: set[str] | None = None) -> Plan:
        """List both sides and work out what (rule, dest) needs (see :func:`babel_sync.plan.plan`)."""
        return plan_pair(self, rule, dest, only)

    def release_listings(self) -> None:
        """Drop the on-disk listings of the pass (plans made before are unusable afterwards)."""
        self.listings.release()

    # ------------------------------------------------------------------ execution
    def _publish(self, job: UnitJob, stats: Stats) -> None:
        src, dst = self.store(job.rule.source), self.store(job.dest)
        base = f"{job.unit.path}/" if job.unit.path else ""
        if job.stale:
            dst.delete(job.stale)
            stats.add("objects_deleted", len(job.stale))
        hasher = content_hasher()
        marker = src.read(job.unit.marker.key, job.unit.marker.etag, sink=hasher.update)
        marker_rel = job.unit.marker.key[len(base):]
        files = [*job.records.values(), {"path": marker_rel, "size": len(marker), "etag": job.unit.marker.etag,
                                         "dest_etag": "", "xxh3_128": hasher.hexdigest()}]
        manifest = make_manifest(job.unit.path, src.url(job.unit.path), files)
        man_etag = dst.put(base + self.options.manifest_name, manifest)
        marker_etag = dst.put(job.unit.marker.key, marker)  # last: this makes the unit visible
        stats.add("bytes_sent", len(marker))
        stats.add("objects_copied")
        stats.add("bytes_copied", len(marker))
        did = self.dest_id(job.dest)
        self.journal.put(Journal.manifest_key(did, job.unit.path), {
            "marker_etag": marker_etag, "manifest_etag": man_etag, "files": {f["path"]: f for f in files}})
        self.journal.clear_done(did, job.unit.path)
        job.published = True
        stats.add("units_published")
        metrics.UNITS.labels(job.rule.name, job.dest).inc()
        log.info("published unit", extra={"rule": job.rule.name, "dest": job.dest, "unit": dst.url(job.unit.path),
                                           "files": len(files)})

    def _copy_file(self, job: UnitJob, obj: ObjectInfo, transfer: Transfer, stats: Stats,
                   errors: list[dict[str, Any]]) -> None:
        base = f"{job.unit.path}/" if job.unit.path else ""
        try:
            self._unpublish(job)
            if not job.failed:
                rec = transfer.copy(obj)
                self.journal.put(Journal.done_key(self.dest_id(job.dest), obj.key), rec)
                with job.lock:
                    job.records[obj.key[len(base):]] = {**rec, "path": obj.key[len(base):]}
                stats.add("objects_copied")
                stats.add("bytes_copied", obj.size)
                metrics.BYTES.labels(job.rule.name, job.dest).inc(obj.size)
                metrics.OBJECTS.labels(job.rule.name, job.dest).inc()
                if self.progress:
                    self.progress(obj.size, 0)
        except Exception as exc:  # noqa: BLE001 - reported per unit; other units go on
            job.failed = True
            self._error(errors, job, transfer.src.url(obj.key), exc)
        with job.lock:
            job.remaining -= 1
            last = job.remaining == 0
        if last and not job.failed:
            try:
                self._publish(job, stats)
            except Exception as exc:  # noqa: BLE001
                self._error(errors, job, transfer.dst.url(job.unit.path), exc)

    def _unpublish(self, job: UnitJob) -> None:
        """Take a published unit's marker (then manifest) away just before its first file changes.

        The records of its unchanged files are journaled first (``done:``, as verify's repair does), so
        a crash between here and the publish costs only the files that changed, not a full re-copy.
        Raises (and no file of the unit is touched) when the marker cannot be deleted.
        """
        with job.unpublish_lock:  # the unit's other copies wait here until the marker is gone
            if not job.was_published or job.unpublished or job.failed:
                return
            dst, did = self.store(job.dest), self.dest_id(job.dest)
            base = f"{job.unit.path}/" if job.unit.path else ""
            with job.lock:
                unchanged = dict(job.records)
            for rel, rec in unchanged.items():
                self.journal.put(Journal.done_key(did, base + rel), rec)
            try:
                dst.delete([base + job.rule.unit_marker])
                dst.delete([base + self.options.manifest_name])
            except BaseException:
                job.failed = True
                raise
            job.unpublished = True

    def _error(self, errors: list[dict[str, Any]], job: UnitJob, url: str, exc: BaseException) -> None:
        metrics.ERRORS.labels(job.rule.name, job.dest).inc()
        log.error("unit not published", extra={"rule": job.rule.name, "dest": job.dest, "url": url,
                                               "error": str(exc)})
        errors.append({"rule": job.rule.name, "dest": job.dest, "unit": job.unit.path, "url": url,
                       "type": type(exc).__name__, "error": str(exc)})

    def _sweep_uploads(self, plans: list[Plan]) -> int:
        """Abort multipart uploads at the destinations that these plans will not resume (no orphans)."""
        aborted = 0
        for dest in sorted({p.dest for p in plans}):
            dst, did = self.store(dest), self.dest_id(dest)
            mine = [p for p in plans if p.dest == dest]
            wanted = {(o.key, o.etag) for p in mine for job in p.jobs for o in job.copy}
            journaled = dict(self.journal.uploads(did))
            keep = set()
            for key, rec in journaled.items():
                if (key, rec["src_etag"]) in wanted:
                    keep.add(rec["upload_id"])
                else:
                    dst.abort_upload(key, rec["upload_id"])
                    self.journal.drop_upload(did, key, rec["upload_id"])
                    aborted += 1
            for prefix in sorted({list_prefix(pat) for p in mine for pat in p.rule.include}):
                for key, upload_id in dst.list_uploads(prefix):
                    if upload_id not in keep:  # e.g. killed between CreateMultipartUpload and the journal write
                        dst.abort_upload(key, upload_id)
                        aborted += 1
        return aborted

    def _remove_unit(self, plan: Plan, unit: str, stats: Stats) -> None:
        dst = self.store(plan.dest)
        base = f"{unit}/" if unit else ""
        marker, man = base + plan.rule.unit_marker, base + self.options.manifest_name
        dst.delete([marker])  # unpublish first: readers stop trusting the unit before files go
        rest = [e.key for e in plan.dest_listing.scan(base) if e.key != marker]
        dst.delete([k for k in rest if k != man] + [man])
        did = self.dest_id(plan.dest)
        self.journal.delete(Journal.manifest_key(did, unit), Journal.fingerprint_key(did, unit))
        stats.add("objects_deleted", len(rest) + 1)
        stats.add("units_removed")

    def execute(self, plans: list[Plan], stats: Stats, errors: list[dict[str, Any]], removals: bool = True) -> None:
        """Copy and publish every planned unit, highest rule priority first; then (``removals``) remove units."""
        self._sweep_uploads(plans)
        work: queue.PriorityQueue[tuple[int, int, Callable[[], None]]] = queue.PriorityQueue()
        total = sum(o.size for p in plans for j in p.jobs for o in j.copy)
        if self.progress:
            self.progress(0, total)
        budget = PartBudget(self.options)
        with ThreadPoolExecutor(budget.pool, thread_name_prefix="babel-part") as parts:
            transfers = {(p.rule.name, p.dest): Transfer(self.store(p.rule.source), self.store(p.dest),
                                                          self.dest_id(p.dest), self.journal, self.options,
                                                          stats, parts, budget) for p in plans}
            for plan in sorted(plans, key=lambda p: -p.rule.priority):
                transfer = transfers[(plan.rule.name, plan.dest)]
                for job in plan.jobs:  # a published unit is unpublished by its first task (_unpublish)
                    job.remaining = len(job.copy)
                    if not job.copy:
                        job.remaining = 1
                        work.put((-plan.rule.priority, next(self._seq),
                                  lambda j=job: self._finish_empty(j, stats, errors)))  # type: ignore[misc]
                    for obj in job.copy:
                        work.put((-plan.rule.priority, next(self._seq),
                                  lambda j=job, o=obj, t=transfer: self._copy_file(j, o, t, stats, errors)))  # type: ignore[misc]
            metrics.QUEUE.set(work.qsize())

            def worker() -> None:
                while not self.stopping.is_set():
                    try:
                        _, _, task = work.get_nowait()
                    except queue.Empty:
                        return
                    metrics.QUEUE.set(work.qsize())
                    task()

            threads = [threading.Thread(target=worker, name=f"babel-xfer-{i}", daemon=True)
                       for i in range(self.options.transfers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if removals:
            self.remove(plans, stats, errors)

    def remove(self, plans: list[Plan], stats: Stats, errors: list[dict[str, Any]]) -> None:
        """Remove units gone at the source, and units beyond ``keep_last`` once every kept one is published."""
        for plan in plans:
            if self.stopping.is_set():  # a stopped pass removes nothing; the next pass decides again
                continue
            removals = list(plan.remove_units)
            settled = not plan.kept & set(plan.held)  # a held-back kept unit is not published yet
            if plan.retire_units and settled and all(j.published for j in plan.jobs):
                removals += plan.retire_units  # every kept unit is published: the old ones may go
            elif plan.retire_units:
                log.warning("keep_last removals deferred: not every kept unit was published",
                            extra={"rule": plan.rule.name, "dest": plan.dest, "units": plan.retire_units})
            for unit in removals:
                try:
                    self._remove_unit(plan, unit, stats)
                except Exception as exc:  # noqa: BLE001
                    errors.append({"rule": plan.rule.name, "dest": plan.dest, "unit": unit,
                                   "url": self.store(plan.dest).url(unit), "type": type(exc).__name__,
                                   "error": str(exc)})

    def _finish_empty(self, job: UnitJob, stats: Stats, errors: list[dict[str, Any]]) -> None:
        job.remaining = 0
        try:
            self._unpublish(job)
            self._publish(job, stats)
        except Exception as exc:  # noqa: BLE001
            self._error(errors, job, self.store(job.dest).url(job.unit.path), exc)
