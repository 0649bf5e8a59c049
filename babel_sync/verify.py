"""``babel-sync verify``: metadata checks plus sampled (or full) content checks of published units.

Every file a destination manifest lists is first checked against the destination listing: present,
same size, same destination ETag (metadata validation, no data read). Then its content:

- ``--full``: the whole file is read (ranged reads, hashed in order) and its xxh3-128 compared.
- ``--sample RATE``: the file's chunks (``chunk_size`` bytes, :mod:`babel_sync.digest`) are each read with
  probability RATE: ``floor(RATE * n)`` distinct chunks chosen uniformly at random out of ``n``, plus one
  more with probability ``frac(RATE * n)``, each compared with its xxh3-64 in the manifest, so about RATE
  of the bytes are read. A file of one chunk (or from a manifest without chunk checksums) is hashed whole
  with probability RATE. A corrupted range inside one chunk is found by one run with probability RATE;
  one touching ``m`` chunks with probability at least ``1 - (1 - RATE)^m``.

With repair (the default) a unit with a bad file is unpublished so the next pass re-copies the bad files.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from babel_sync.digest import chunk_count, chunk_sum
from babel_sync.listing import Entry
from babel_sync.store import S3Store
from babel_sync.units import list_prefix, parse_manifest, published, watch_names
from lingcore.checksum import block_checksum, content_hasher

if TYPE_CHECKING:
    from babel_sync.engine import Syncer

_STEP = 64 << 20


def hash_whole(store: S3Store, obj: Entry, pool: ThreadPoolExecutor, step: int = _STEP) -> str:
    """xxh3-128 of a whole object: ranged reads in parallel (pinned to its ETag), hashed in order."""
    hasher = content_hasher()
    window: deque[Future[bytes | bytearray]] = deque()
    for off in range(0, max(obj.size, 1), step):
        window.append(pool.submit(store.read, obj.key, obj.etag, off, min(off + step, obj.size)))
        if len(window) >= 4:
            hasher.update(window.popleft().result())
    while window:
        hasher.update(window.popleft().result())
    return str(hasher.hexdigest())


def pick_chunks(n: int, rate: float, rng: random.Random) -> list[int]:
    """Chunks to check out of ``n``: each is chosen with probability ``rate`` (see the module docstring)."""
    want = rate * n
    k = min(n, math.floor(want) + (1 if rng.random() < want - math.floor(want) else 0))
    return sorted(rng.sample(range(n), k))


def _check_chunk(store: S3Store, obj: Entry, rec: dict[str, Any], index: int) -> str | None:
    chunk = int(rec["chunk_size"])
    start = index * chunk
    data = store.read(obj.key, obj.etag, start, min(start + chunk, obj.size))
    if block_checksum(data) != chunk_sum(rec, index):
        return f"chunk {index} (bytes {start}-{start + len(data) - 1}): xxh3-64 differs from the manifest"
    return None


def _compare(digest: str, rec: dict[str, Any]) -> str | None:
    return None if digest == rec.get("xxh3_128") else f"xxh3-128 {digest} != manifest {rec.get('xxh3_128')}"


def _check_small(store: S3Store, obj: Entry, rec: dict[str, Any]) -> str | None:
    hasher = content_hasher()
    store.read(obj.key, obj.etag, sink=hasher.update)
    return _compare(str(hasher.hexdigest()), rec)


def _metadata(obj: Entry | None, rec: dict[str, Any]) -> str | None:
    if obj is None:
        return "missing"
    if obj.size != rec.get("size"):
        return f"size {obj.size} != manifest {rec.get('size')}"
    if rec.get("dest_etag") and obj.etag != rec["dest_etag"]:
        return f"ETag {obj.etag} != manifest {rec['dest_etag']} (replaced after the copy)"
    return None


def verify(syncer: Syncer, rule_name: str, sample: float = 1.0, repair: bool = True,
           rng: random.Random | None = None) -> dict[str, Any]:
    """Check the destination content of ``rule_name`` against its manifests.

    Args:
        sample: ``>= 1``: hash every file whole (``--full``); ``0 < sample < 1``: check each chunk with
            this probability (``--sample``); ``0``: metadata only.
        repair: Unpublish units with a bad file so the next pass re-copies the bad files.
        rng: Random source of the chunk choice (tests seed it).
    """
    t0 = time.monotonic()
    rule = syncer.config.rule(rule_name)
    rng = rng or random.Random()
    counts = {"objects_verified": 0, "bytes_verified": 0, "chunks_verified": 0}
    errors: list[dict[str, Any]] = []
    try:
        with ThreadPoolExecutor(max(2, syncer.options.transfers), thread_name_prefix="babel-verify") as pool:
            for dest in rule.destinations:
                if syncer.options.site and dest != syncer.options.site:
                    continue
                dst = syncer.store(dest)
                listing = syncer.listings.new(watch_names(rule))
                dst.list_tree([list_prefix(p) for p in rule.include], listing.add)
                for unit in sorted(published(listing, rule)):
                    bad, files = _verify_unit(syncer, dst, listing.scan(f"{unit}/" if unit else ""), unit, sample,
                                              rng, pool, counts)
                    for key, why in bad:
                        errors.append({"rule": rule.name, "dest": dest, "unit": unit, "url": dst.url(key),
                                       "type": "IntegrityError", "error": f"{dst.url(key)}: {why}"})
                    if bad and repair:
                        _unpublish(syncer, rule.unit_marker, dest, unit, files, {key for key, _ in bad})
    finally:
        syncer.release_listings()
    return {"ok": not errors, "rule": rule.name, "mode": "full" if sample >= 1.0 else "sample", "rate": min(sample, 1.0),
            **counts, "seconds": round(time.monotonic() - t0, 3), "errors": errors}


def _verify_unit(syncer: Syncer, dst: S3Store, entries: Any, unit: str, sample: float, rng: random.Random,
                 pool: ThreadPoolExecutor, counts: dict[str, int]) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """Check one published unit; return (key, what is wrong) for every bad file, and its manifest records."""
    base = f"{unit}/" if unit else ""
    there = {e.key: e for e in entries}
    man_key = base + syncer.options.manifest_name
    data, _ = dst.get_small(man_key)
    files = parse_manifest(data, dst.url(man_key))
    if not files:
        return [(man_key, "manifest missing or unreadable")], files
    bad: list[tuple[str, str]] = []
    checks: list[tuple[str, Future[str | None]]] = []
    for rel, rec in sorted(files.items()):
        obj = there.get(base + rel)
        why = _metadata(obj, rec)
        if why is not None or obj is None:
            bad.append((base + rel, why or "missing"))
            continue
        if sample >= 1.0 or (chunk_sum(rec, 0) is None and sample > 0 and rng.random() < sample):
            counts["objects_verified"] += 1
            counts["bytes_verified"] += obj.size
            if obj.size <= _STEP:  # one read: a task of its own
                checks.append((obj.key, pool.submit(_check_small, dst, obj, rec)))
            else:  # its ranges go through the pool, hashed here in order
                why = _compare(hash_whole(dst, obj, pool), rec)
                if why is not None:
                    bad.append((obj.key, why))
        elif chunk_sum(rec, 0) is not None and sample > 0:
            chunk = int(rec["chunk_size"])
            picks = pick_chunks(chunk_count(obj.size, chunk), sample, rng)
            for index in picks:
                checks.append((obj.key, pool.submit(_check_chunk, dst, obj, rec, index)))
                counts["chunks_verified"] += 1
                counts["bytes_verified"] += min(chunk, obj.size - index * chunk)
            counts["objects_verified"] += bool(picks)
    for key, fut in checks:
        why = fut.result()
        if why is not None and all(key != k for k, _ in bad):
            bad.append((key, why))
    return bad, files


def _unpublish(syncer: Syncer, marker: str, dest: str, unit: str, files: dict[str, Any], broken: set[str]) -> None:
    """Take a bad unit's marker and manifest away; journal its good files so only bad ones move again."""
    dst = syncer.store(dest)
    base = f"{unit}/" if unit else ""
    dst.delete([base + marker])
    dst.delete([base + syncer.options.manifest_name])
    for rel, rec in files.items():  # good files are reused, bad ones re-transferred
        if base + rel not in broken and rel != marker:
            syncer.journal.put(syncer.journal.done_key(syncer.dest_id(dest), base + rel), rec)


__all__ = ["hash_whole", "pick_chunks", "verify"]
