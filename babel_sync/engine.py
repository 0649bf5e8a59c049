"""One sync pass: list both sides, plan per unit, copy through a priority queue, publish atomically.

Per (rule, destination):

1. List source and destination in parallel (:meth:`S3Store.list_tree`). A listing error aborts the rule
   before anything is copied or deleted.
2. Plan: a unit is in sync when the destination has its marker and a manifest whose records match the
   source listing (size, source ETag) and the destination listing (size, destination ETag). The
   manifest comes from the journal cache when the listed marker and manifest ETags match, so a no-op
   pass makes listing calls only.
3. Changed units are unpublished first (marker, then manifest deleted), so readers never see a marker
   over files that are being replaced. Files go through one priority queue (rule priority, then unit).
4. When a unit's last file is copied and verified: delete removed files (``delete = true``), write the
   manifest, then the marker.
5. Units gone at the source (``delete = true``) and units beyond ``keep_last`` are removed at the
   destination, marker first.
"""

from __future__ import annotations

import itertools
import posixpath
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from babel_sync import metrics
from babel_sync.config import Rule, SyncConfig
from babel_sync.errors import ListingError
from babel_sync.journal import Journal
from babel_sync.store import ObjectInfo, RateLimiter, S3Store
from babel_sync.transfer import Stats, Transfer
from babel_sync.units import (
    Unit,
    discover,
    list_prefix,
    make_manifest,
    natural_key,
    parse_manifest,
    published,
)
from lingcore.checksum import content_hasher
from lingcore.log import get_logger

log = get_logger("babel_sync")


@dataclass
class UnitJob:
    """The work for one unit at one destination."""

    rule: Rule
    dest: str
    unit: Unit
    copy: list[ObjectInfo]
    records: dict[str, dict[str, Any]]
    stale: list[str]
    was_published: bool
    remaining: int = 0
    failed: bool = False
    published: bool = False
    unpublished: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Held while the unit is unpublished, so no copy of the unit starts before its marker is gone.
    unpublish_lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Plan:
    """What one (rule, destination) needs: unit jobs, unit removals and what is in sync already.

    ``remove_units`` are gone at the source (``delete = true``): nothing replaces them, they go
    whatever else happens. ``retire_units`` are beyond ``keep_last``: they go only once every kept unit
    is published at the destination, so a failed or stopped pass never leaves fewer complete units.
    """

    rule: Rule
    dest: str
    jobs: list[UnitJob]
    remove_units: list[str]
    dest_listing: dict[str, ObjectInfo]
    retire_units: list[str] = field(default_factory=list)
    in_sync_objects: int = 0
    in_sync_bytes: int = 0
    orphan_bytes: int = 0
    oldest_pending: float = 0.0


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
    def _manifest(self, dest: str, unit: str, listing: dict[str, ObjectInfo], rule: Rule) -> dict[str, Any] | None:
        """The destination manifest of a published unit (journal cache first), or None."""
        base = f"{unit}/" if unit else ""
        marker = listing.get(base + rule.unit_marker)
        man = listing.get(base + self.options.manifest_name)
        if man is None:  # a manifest without its marker (killed between the two writes) still counts
            return None
        marker_etag = marker.etag if marker is not None else ""
        key = Journal.manifest_key(self.dest_id(dest), unit)
        cached = self.journal.get(key)
        if cached and cached["marker_etag"] == marker_etag and cached["manifest_etag"] == man.etag:
            return dict(cached["files"])
        data, etag = self.store(dest).get_small(base + self.options.manifest_name)
        files = parse_manifest(data, self.store(dest).url(base + self.options.manifest_name))
        self.journal.put(key, {"marker_etag": marker_etag, "manifest_etag": etag, "files": files})
        return files

    def plan(self, rule: Rule, dest: str) -> Plan:
        """List both sides and work out what (rule, dest) needs. Copies and deletes nothing."""
        src, dst = self.store(rule.source), self.store(dest)
        prefixes = [list_prefix(p) for p in rule.include]
        started = time.time()
        with ThreadPoolExecutor(2) as pool:
            fs, fd = pool.submit(src.list_tree, prefixes), pool.submit(dst.list_tree, prefixes)
            src_listing, dst_listing = fs.result(), fd.result()
        found, orphan = discover(src_listing, rule, self.options.manifest_name)
        # A listing is no snapshot: its pages are read at different times. A marker written after the
        # listing began may sit over files listed before they existed, so such a unit waits a pass.
        settle = started - self.options.listing_settle_seconds
        for found_unit in found.values():
            if found_unit.marker.mtime <= 0:
                raise ListingError(src.url(found_unit.marker.key), "the listing has no LastModified for the marker")
        units = {u: unit for u, unit in found.items() if unit.marker.mtime <= settle}
        orphan += sum(found[u].bytes for u in found if u not in units)
        oldest: dict[str, str] = {}
        if rule.keep_last:  # per parent directory: run1/ and run2/ each keep their own last N
            groups: dict[str, list[str]] = {}
            for u in units:
                groups.setdefault(posixpath.dirname(u), []).append(u)
            kept = {d: sorted(g, key=natural_key)[-rule.keep_last:] for d, g in groups.items()}
            oldest = {d: k[0] for d, k in kept.items()}
            units = {u: units[u] for k in kept.values() for u in k}
        dest_units = published(dst_listing, rule)
        plan = Plan(rule, dest, [], [], dst_listing, orphan_bytes=orphan)
        gone = dest_units - set(found)
        plan.remove_units = sorted(gone) if rule.delete else []
        if rule.keep_last:  # retention only drops units older than the ones kept in their directory
            plan.retire_units = sorted(
                u for u in dest_units - set(units) - set(plan.remove_units) if posixpath.dirname(u) in oldest
                and natural_key(u) < natural_key(oldest[posixpath.dirname(u)]))
        did = self.dest_id(dest)
        for name in sorted(units, key=natural_key):
            unit = units[name]
            manifest = self._manifest(dest, name, dst_listing, rule)
            base = f"{name}/" if name else ""
            records: dict[str, dict[str, Any]] = {}
            copy: list[ObjectInfo] = []
            for obj in unit.files.values():
                rel = obj.key[len(base):]
                rec = (manifest or {}).get(rel) or self.journal.get(Journal.done_key(did, obj.key))
                there = dst_listing.get(obj.key)
                if (rec and rec["size"] == obj.size and rec["etag"] == obj.etag and there is not None
                        and there.size == obj.size and there.etag == rec["dest_etag"]):
                    records[rel] = {**rec, "path": rel}
                else:
                    copy.append(obj)
            marker_rel = unit.marker.key[len(base):]
            mrec = (manifest or {}).get(marker_rel)
            marker_ok = bool(mrec and mrec["etag"] == unit.marker.etag)
            nested = [u + "/" for u in units if u != name and u.startswith(base)]
            stale = [k for k in dst_listing if k.startswith(base) and k not in unit.files
                     and k != unit.marker.key and k != base + self.options.manifest_name
                     and not any(k.startswith(n) for n in nested)] if rule.delete else []
            in_sync = (manifest is not None and not copy and marker_ok and not stale
                       and unit.marker.key in dst_listing)
            if in_sync:
                plan.in_sync_objects += len(unit.files) + 1
                plan.in_sync_bytes += unit.bytes
                continue
            plan.oldest_pending = min(plan.oldest_pending or unit.marker.mtime, unit.marker.mtime)
            # A manifest without its marker (a kill between the two writes) is unpublished too:
            # it must not stay visible over files that are about to be replaced.
            visible = name in dest_units or base + self.options.manifest_name in dst_listing
            plan.jobs.append(UnitJob(rule, dest, unit, copy, records, stale, was_published=visible))
        return plan

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
        rest = [k for k in plan.dest_listing if k.startswith(base) and k != marker]
        dst.delete([k for k in rest if k != man] + [man])
        self.journal.delete(Journal.manifest_key(self.dest_id(plan.dest), unit))
        stats.add("objects_deleted", len(rest) + 1)
        stats.add("units_removed")

    def execute(self, plans: list[Plan], stats: Stats, errors: list[dict[str, Any]]) -> None:
        """Copy and publish every planned unit, highest rule priority first; then remove units."""
        self._sweep_uploads(plans)
        work: queue.PriorityQueue[tuple[int, int, Callable[[], None]]] = queue.PriorityQueue()
        total = sum(o.size for p in plans for j in p.jobs for o in j.copy)
        if self.progress:
            self.progress(0, total)
        with ThreadPoolExecutor(self.options.part_concurrency, thread_name_prefix="babel-part") as parts:
            transfers = {(p.rule.name, p.dest): Transfer(self.store(p.rule.source), self.store(p.dest),
                                                          self.dest_id(p.dest), self.journal, self.options,
                                                          stats, parts) for p in plans}
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
        for plan in plans:
            if self.stopping.is_set():  # a stopped pass removes nothing; the next pass decides again
                continue
            removals = list(plan.remove_units)
            if plan.retire_units and all(j.published for j in plan.jobs):
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
