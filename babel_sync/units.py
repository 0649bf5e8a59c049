"""Units and manifests: which directories are complete, and what a published unit holds.

A unit is a directory holding the rule's marker file (``_COMMITTED``, DCP's ``.metadata``, ...). Its
files are every object below it (files of a nested unit belong to the nested one). At the destination a
unit is published in this order: files, then the manifest, then the marker; readers trust only units
that have their marker.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from babel_sync.config import Rule
from babel_sync.store import ObjectInfo

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


def discover(listing: Mapping[str, ObjectInfo], rule: Rule, manifest_name: str) -> tuple[dict[str, Unit], int]:
    """Group a source listing into complete units.

    Returns:
        (units by directory, bytes of matching files that belong to no complete unit yet).
    """
    inc = [glob_regex(p) for p in rule.include]
    exc = [glob_regex(p) for p in rule.exclude]
    matched = {k: o for k, o in listing.items() if any(r.match(k) for r in inc) and not any(r.match(k) for r in exc)}
    units: dict[str, Unit] = {}
    for key, obj in matched.items():
        head, _, base = key.rpartition("/")
        if base == rule.unit_marker:
            units[head] = Unit(head, obj)
    orphan = 0
    for key, obj in matched.items():
        head, _, base = key.rpartition("/")
        if base == rule.unit_marker and head in units or base == manifest_name:
            continue
        # The nearest enclosing unit (a nested unit's files are not its parent's): walk up the
        # directories, a dict lookup per level instead of a scan over every unit per file.
        owner = None
        while True:
            if head in units:
                owner = head
                break
            if not head:
                break
            head = head.rpartition("/")[0]
        if owner is None:
            orphan += obj.size
        else:
            units[owner].files[key] = obj
    return units, orphan


def published(listing: Mapping[str, ObjectInfo], rule: Rule) -> set[str]:
    """Unit directories that have their marker in a destination listing."""
    inc = [glob_regex(p) for p in rule.include]
    return {k.rpartition("/")[0] for k in listing
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
