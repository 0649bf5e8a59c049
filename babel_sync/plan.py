"""Planning one (rule, destination): list both sides to disk, then compare unit by unit.

Both listings stream into LMDB (:mod:`babel_sync.listdb`); what stays in memory is the complete units'
markers, the jobs (files that must move) and, one unit at a time, that unit's source and destination
entries. A unit is in sync when the destination has its marker and a manifest whose records match the
source listing (size, source ETag) and the destination listing (size, destination ETag). The manifest
comes from the journal cache when the listed marker and manifest ETags match, so a no-op pass makes
listing calls only.

A listing is no snapshot (its pages are read at different times): a unit whose marker is newer than the
listing start minus ``listing_settle_seconds`` is *held back*, reported in :attr:`Plan.held`, and
planned again later (``babel-sync once`` waits out the margin and re-plans it in the same pass).
"""

from __future__ import annotations

import posixpath
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from babel_sync.config import Rule
from babel_sync.errors import ListingError
from babel_sync.journal import Journal
from babel_sync.listdb import Listing, value_prefix, value_size
from babel_sync.listing import Entry as ObjectInfo
from babel_sync.units import (
    Unit,
    complete_units,
    covers,
    has_nested,
    list_prefix,
    matcher,
    natural_key,
    owned_files,
    owner,
    parse_manifest,
    published,
    watch_names,
)

if TYPE_CHECKING:
    from babel_sync.engine import Syncer


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
    ``held`` are complete units whose marker is too fresh to trust this listing (unit -> marker).
    """

    rule: Rule
    dest: str
    jobs: list[UnitJob]
    remove_units: list[str]
    dest_listing: Listing
    retire_units: list[str] = field(default_factory=list)
    in_sync_objects: int = 0
    in_sync_bytes: int = 0
    orphan_bytes: int = 0
    oldest_pending: float = 0.0
    held: dict[str, ObjectInfo] = field(default_factory=dict)
    held_bytes: int = 0
    #: Units kept by ``keep_last`` (all complete units without it): retirement waits for all of them.
    kept: set[str] = field(default_factory=set)


def cached_manifest(syncer: Syncer, dest: str, unit: str, entries: dict[str, ObjectInfo],
                    rule: Rule) -> dict[str, Any] | None:
    """The destination manifest of a published unit (journal cache first), or None."""
    base = f"{unit}/" if unit else ""
    name = syncer.options.manifest_name
    marker = entries.get(base + rule.unit_marker)
    man = entries.get(base + name)
    if man is None:  # a manifest without its marker (killed between the two writes) still counts
        return None
    marker_etag = marker.etag if marker is not None else ""
    key = Journal.manifest_key(syncer.dest_id(dest), unit)
    cached = syncer.journal.get(key)
    if cached and cached["marker_etag"] == marker_etag and cached["manifest_etag"] == man.etag:
        return dict(cached["files"])
    data, etag = syncer.store(dest).get_small(base + name)
    files = parse_manifest(data, syncer.store(dest).url(base + name))
    syncer.journal.put(key, {"marker_etag": marker_etag, "manifest_etag": etag, "files": files})
    return files


def _list_pair(syncer: Syncer, rule: Rule, dest: str, prefixes: list[str]) -> tuple[Listing, Listing, float]:
    """List source and destination under ``prefixes`` at the same time; return both and the start time."""
    src, dst = syncer.store(rule.source), syncer.store(dest)
    src_listing = syncer.listings.new(watch_names(rule), matcher(rule, syncer.options.manifest_name))
    dst_listing = syncer.listings.new(watch_names(rule))
    started = time.time()
    with ThreadPoolExecutor(2) as pool:
        fs = pool.submit(src.list_tree, prefixes, src_listing.add)
        fd = pool.submit(dst.list_tree, prefixes, dst_listing.add)
        fs.result()
        fd.result()
    return src_listing, dst_listing, started


def plan(syncer: Syncer, rule: Rule, dest: str, only: set[str] | None = None) -> Plan:
    """List both sides and work out what (rule, dest) needs. Copies and deletes nothing.

    Args:
        only: Plan just these units (held back by an earlier plan): only their prefixes are listed and
            no unit is removed.
    """
    options = syncer.options
    if only is None:
        prefixes = [list_prefix(p) for p in rule.include]
    else:
        prefixes = [f"{u}/" if u else "" for u in sorted(only)]
    src_listing, dst_listing, started = _list_pair(syncer, rule, dest, prefixes)
    match = matcher(rule, options.manifest_name)
    every = complete_units(src_listing, rule, options.manifest_name)  # nested units own their files
    found = every if only is None else {u: m for u, m in every.items() if u in only}
    for marker in found.values():
        if marker.mtime <= 0:
            raise ListingError(syncer.store(rule.source).url(marker.key),
                               "the listing has no LastModified for the marker")
    settle = started - options.listing_settle_seconds
    held = {u: m for u, m in found.items() if m.mtime > settle}
    kept = set(found)
    oldest: dict[str, str] = {}
    if rule.keep_last:  # per parent directory: run1/ and run2/ each keep their own last N
        groups: dict[str, list[str]] = {}
        for u in found:
            groups.setdefault(posixpath.dirname(u), []).append(u)
        newest = {d: sorted(g, key=natural_key)[-rule.keep_last:] for d, g in groups.items()}
        oldest = {d: k[0] for d, k in newest.items()}
        kept = {u for k in newest.values() for u in k}
    dest_units = published(dst_listing, rule)
    result = Plan(rule, dest, [], [], dst_listing, held=held, kept=kept)
    if only is None:
        result.remove_units = sorted(dest_units - set(every)) if rule.delete else []
        if rule.keep_last:  # retention only drops units older than the ones kept in their directory
            result.retire_units = sorted(
                u for u in dest_units - kept - set(result.remove_units) if posixpath.dirname(u) in oldest
                and natural_key(u) < natural_key(oldest[posixpath.dirname(u)]))
    unit_bytes = 0
    ordered = sorted(every)
    for name in sorted(found, key=natural_key):
        if name in held or name not in kept:
            owned = owned_files(src_listing, name, found[name].key, every, ordered, rule, options.manifest_name,
                                match)
            size = found[name].size + sum(value_size(v) for _, v in owned)
            unit_bytes += size
            if name in held:
                result.held_bytes += size
        else:
            unit_bytes += _plan_unit(syncer, result, name, found[name], src_listing, dest_units, every, ordered)
    if only is None:
        result.orphan_bytes = max(0, src_listing.bytes - unit_bytes)
    return result


def _in_sync(manifest: dict[str, Any], base: str, owned: list[tuple[str, bytes]], there: dict[str, bytes]) -> bool:
    """True when every file of the unit matches its manifest record at the source and the destination.

    Compares the stored listing values as bytes (size and ETag prefix): no entry is decoded.
    """
    for key, value in owned:
        rec = manifest.get(key[len(base):])
        if rec is None or not value.startswith(value_prefix(rec["size"], rec["etag"])):
            return False
        got = there.get(key)
        if got is None or not got.startswith(value_prefix(rec["size"], rec["dest_etag"])):
            return False
    return True


def _fingerprints(syncer: Syncer, result: Plan, name: str, marker: ObjectInfo, src_listing: Listing,
                  heads: dict[str, ObjectInfo]) -> tuple[int, int, dict[str, Any]]:
    """(files, their bytes, the state to compare with the journal) of a unit every key of which is its own."""
    base = f"{name}/" if name else ""
    manifest_name = syncer.options.manifest_name
    count, nbytes, src_fp = src_listing.fingerprint(base, marker.key, manifest_name)
    _, _, dst_fp = result.dest_listing.fingerprint(base, marker.key, manifest_name)
    dest_marker, manifest = heads.get(marker.key), heads.get(base + manifest_name)
    return count, nbytes, {"marker": marker.etag, "dest_marker": dest_marker.etag if dest_marker else None,
                           "manifest": manifest.etag if manifest else None, "src": src_fp, "dst": dst_fp}


def _plan_unit(syncer: Syncer, result: Plan, name: str, marker: ObjectInfo, src_listing: Listing,
               dest_units: set[str], every: dict[str, Any], ordered: list[str]) -> int:
    """Compare one unit with the destination; add a job unless it is in sync. Returns the unit's bytes.

    Fast path, for a unit that owns every key below it (no nested unit, include globs covering it): the
    fingerprints of both listings under the unit, with the marker and manifest ETags, equal to those of
    the last pass that found it in sync mean it still is: no manifest is read, no entry decoded.
    """
    rule, dest = result.rule, result.dest
    manifest_name = syncer.options.manifest_name
    base = f"{name}/" if name else ""
    heads = {k: e for k in (marker.key, base + manifest_name) if (e := result.dest_listing.get(k)) is not None}
    nested = has_nested(ordered, name)
    fp_key = Journal.fingerprint_key(syncer.dest_id(dest), name)
    state: dict[str, Any] | None = None
    if not nested and covers(rule, base):
        count, nbytes, state = _fingerprints(syncer, result, name, marker, src_listing, heads)
        if state["dest_marker"] is not None and state["manifest"] is not None and syncer.journal.get(fp_key) == state:
            result.in_sync_objects += count + 1
            result.in_sync_bytes += nbytes + marker.size
            return nbytes + marker.size
    owned = owned_files(src_listing, name, marker.key, every, ordered, rule, manifest_name,
                        matcher(rule, manifest_name))
    there = dict(result.dest_listing.scan_raw(base))  # one unit's entries in memory at a time
    total = marker.size + sum(value_size(v) for _, v in owned)
    manifest = cached_manifest(syncer, dest, name, heads, rule)
    marker_rel = marker.key[len(base):]
    mrec = (manifest or {}).get(marker_rel)
    marker_ok = bool(mrec and mrec["etag"] == marker.etag) and marker.key in there
    if manifest is not None and marker_ok and _in_sync(manifest, base, owned, there):
        # Every source file has its copy; with delete, the destination must hold nothing more.
        extra = 0
        if rule.delete:
            extra = sum(1 for k in there if k not in (marker.key, base + manifest_name)
                        and (not nested or owner(k, every) == name)) - len(owned)
        if extra == 0:
            result.in_sync_objects += len(owned) + 1
            result.in_sync_bytes += total
            if state is not None:
                syncer.journal.put(fp_key, state)
            return total
    unit = Unit(name, marker, {k: src_listing.decode(k, v) for k, v in owned})
    dest_entries = {k: result.dest_listing.decode(k, v) for k, v in there.items()}
    did = syncer.dest_id(dest)
    records: dict[str, dict[str, Any]] = {}
    copy: list[ObjectInfo] = []
    for obj in unit.files.values():
        rel = obj.key[len(base):]
        rec = (manifest or {}).get(rel) or syncer.journal.get(Journal.done_key(did, obj.key))
        got = dest_entries.get(obj.key)
        if (rec and rec["size"] == obj.size and rec["etag"] == obj.etag and got is not None
                and got.size == obj.size and got.etag == rec["dest_etag"]):
            records[rel] = {**rec, "path": rel}
        else:
            copy.append(obj)
    stale = [k for k in dest_entries if k not in unit.files and k != marker.key and k != base + manifest_name
             and (not nested or owner(k, every) == name)] if rule.delete else []
    result.oldest_pending = min(result.oldest_pending or marker.mtime, marker.mtime)
    # A manifest without its marker (a kill between the two writes) is unpublished too: it must not
    # stay visible over files that are about to be replaced.
    visible = name in dest_units or base + manifest_name in there
    result.jobs.append(UnitJob(rule, dest, unit, copy, records, stale, was_published=visible))
    return total


__all__ = ["Plan", "UnitJob", "cached_manifest", "plan"]
