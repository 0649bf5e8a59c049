"""Units and manifests: which directories are complete, and what a published unit holds.

A unit is a directory holding the rule's marker file (``_COMMITTED``, DCP's ``.metadata``, ...) and no
``_PACKING`` file. Its files are every object below it (files of a nested unit belong to the nested one). At the destination a
unit is published in this order: files, then the manifest, then the marker; readers trust only units
that have their marker.
"""

from __future__ import annotations

import bisect
import json
import re
import time
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from typing import Any

from babel_sync.config import Rule
from babel_sync.listdb import Listing
from babel_sync.listing import Entry as ObjectInfo
from lingcore.marker import PACKING_NAME

FORMAT = "babel-manifest/1"


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a path glob: ``**`` matches across ``/``, ``*`` and ``?`` stay within one segment."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def list_prefix(pattern: str) -> str:
    """The literal directory prefix of a glob, the narrowest listing that can match it."""
    cut = min((i for i, c in enumerate(pattern) if c in "*?["), default=len(pattern))
    head = pattern[:cut]
    return head if cut == len(pattern) else head[: head.rfind("/") + 1]


def natural_key(name: str) -> list[Any]:
    """Sort key that orders ``step_9`` before ``step_10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


@dataclass
class Unit:
    """A complete unit at the source: its directory, marker and files (keys relative to the site root)."""

    path: str
    marker: ObjectInfo
    files: dict[str, ObjectInfo] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        """Total bytes of the unit, marker included."""
        return self.marker.size + sum(f.size for f in self.files.values())


def matcher(rule: Rule, manifest_name: str) -> Callable[[str], bool]:
    """The keys a rule copies: matching an include glob and no exclude glob, and not a manifest."""
    inc = [glob_regex(p) for p in rule.include]
    exc = [glob_regex(p) for p in rule.exclude]

    def match(key: str) -> bool:
        return (any(r.match(key) for r in inc) and not any(r.match(key) for r in exc)
                and key.rpartition("/")[2] != manifest_name)

    return match


def watch_names(rule: Rule) -> set[str]:
    """File names a listing keeps in memory for :func:`complete_units`: the marker and ``_PACKING``."""
    return {rule.unit_marker, PACKING_NAME}


def complete_units(listing: Listing, rule: Rule, manifest_name: str) -> dict[str, ObjectInfo]:
    """Unit directory -> marker entry, for every complete unit in a source listing.

    A directory is a complete unit when it holds the rule's marker, the marker matches the rule, and no
    ``_PACKING`` file (``loaders pack`` keeps one in a directory until the corpus is whole, so a corpus
    whose pack was re-run over it is never taken half-written).
    """
    match = matcher(rule, manifest_name)
    packing = {k.rpartition("/")[0] for k in listing.watched if k.rpartition("/")[2] == PACKING_NAME}
    return {k.rpartition("/")[0]: e for k, e in listing.watched.items()
            if k.rpartition("/")[2] == rule.unit_marker and match(k) and k.rpartition("/")[0] not in packing}


def owner(key: str, units: Container[str]) -> str | None:
    """The nearest unit directory containing ``key`` (a nested unit's files are not its parent's)."""
    head = key.rpartition("/")[0]
    while True:
        if head in units:
            return head
        if not head:
            return None
        head = head.rpartition("/")[0]


def has_nested(ordered: list[str], unit: str) -> bool:
    """True when another complete unit lies below ``unit`` (``ordered``: every unit, sorted)."""
    base = f"{unit}/" if unit else ""
    i = bisect.bisect_right(ordered, unit)
    return i < len(ordered) and ordered[i].startswith(base)


def covers(rule: Rule, base: str) -> bool:
    """True when every key below ``base`` matches the rule's globs (no exclude; an include ``LITERAL**``
    whose literal starts ``base``), so a unit's keys need no glob match one by one."""
    if rule.exclude:
        return False
    for pattern in rule.include:
        if pattern.endswith("**") and not any(c in pattern[:-2] for c in "*?[") and base.startswith(pattern[:-2]):
            return True
    return False


def owned_files(listing: Listing, unit: str, marker: str, units: Container[str], ordered: list[str], rule: Rule,
                manifest_name: str, match: Callable[[str], bool]) -> list[tuple[str, bytes]]:
    """(key, stored value) of the files of ``unit``: keys matching the rule, owned by no deeper unit, marker
    and manifests excluded. Values stay encoded (see :meth:`Listing.scan_raw`)."""
    base = f"{unit}/" if unit else ""
    nested = has_nested(ordered, unit)
    glob = not covers(rule, base)
    return [(k, v) for k, v in listing.scan_raw(base)
            if k != marker and (match(k) if glob else k.rpartition("/")[2] != manifest_name)
            and (not nested or owner(k, units) == unit)]


def published(listing: Listing, rule: Rule) -> set[str]:
    """Unit directories that have their marker in a destination listing."""
    inc = [glob_regex(p) for p in rule.include]
    return {k.rpartition("/")[0] for k in listing.watched
            if k.rpartition("/")[2] == rule.unit_marker and any(r.match(k) for r in inc)}


def unit_prefixes(units: Iterable[str]) -> list[str]:
    """Listing prefixes for a set of unit directories."""
    return [u + "/" if u else "" for u in units]


def make_manifest(unit: str, source_url: str, files: list[dict[str, Any]]) -> bytes:
    """Encode a manifest: one record per file (path relative to the unit, size, ETags, xxh3-128)."""
    doc = {"format": FORMAT, "unit": unit, "source": source_url, "created": time.time(),
           "files": sorted(files, key=lambda f: f["path"])}
    return json.dumps(doc, indent=1).encode()


def parse_manifest(data: bytes, url: str) -> dict[str, dict[str, Any]]:
    """Decode a manifest into path -> record; an unreadable one is treated as absent (re-copy)."""
    try:
        doc = json.loads(data)
        if doc.get("format") != FORMAT:
            return {}
        return {f["path"]: f for f in doc["files"]}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}
