"""The commit-marker format (``pcache-commit/1``): write, read and verify.

A unit (a checkpoint step, a dataset version) is complete when ``<prefix>/_COMMITTED`` exists. The marker
is a JSON manifest of the files under the prefix as they were at the origin when it was written::

    {"format": "pcache-commit/1", "prefix": "s3://b/run/step_000100", "committed": 1733450000.0,
     "files": [{"path": "rank00000.pt", "size": 123, "etag": "...", "xxh3_128": "..." | null}, ...]}

``xxh3_128`` is null when the writer could not vouch for the content (the object changed since the
writer's own upload). pcache and ``loaders pack`` write markers, ``ling_train`` and ``fusefs commit`` read
and verify them, and babel-sync copies units that carry one (and no ``_PACKING`` file).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from lingcore.checksum import content_hash

MARKER_NAME = "_COMMITTED"
MARKER_FORMAT = "pcache-commit/1"
#: A directory holding this file is being written (``loaders pack`` keeps it until the corpus is whole):
#: it is not a complete unit, whatever else it holds.
PACKING_NAME = "_PACKING"


def build_marker(prefix: str, files: Iterable[Mapping[str, Any]], committed: float | None = None) -> bytes:
    """Encode a marker for ``prefix`` listing ``files`` (dicts with path, size, etag, xxh3_128)."""
    records = sorted(({"path": str(f["path"]), "size": f.get("size"), "etag": f.get("etag", ""),
                       "xxh3_128": f.get("xxh3_128")} for f in files), key=lambda r: r["path"])
    doc = {"format": MARKER_FORMAT, "prefix": prefix,
           "committed": time.time() if committed is None else committed, "files": records}
    return json.dumps(doc, indent=1).encode()


def parse_marker(raw: bytes) -> dict[str, Any] | None:
    """Decode a marker; None when it is torn, empty or not a marker (such a unit is not committed).

    A marker written with a truncating write (``pipe_file`` on a local origin) can be cut short by a
    kill: it never parses, so the unit stays uncommitted.
    """
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), list):
        return None
    if any(not isinstance(f, dict) or not isinstance(f.get("path"), str) for f in doc["files"]):
        return None
    return doc


def marker_entry(marker: Mapping[str, Any], path: str) -> dict[str, Any] | None:
    """The record of ``path`` (relative to the marker's prefix), or None if it is not listed."""
    return next((dict(f) for f in marker.get("files", []) if f.get("path") == path), None)


def verify_digest(entry: Mapping[str, Any], size: int, digest: str | None) -> str | None:
    """Check a file's ``size`` and xxh3-128 hex ``digest`` against a marker record.

    Returns why it differs, or None when it matches. The digest is compared only when the marker carries
    one (``digest`` may be None then: a caller need not hash what nobody vouched for).
    """
    if size != entry.get("size"):
        return f"size {size} differs from the marker's {entry.get('size')}"
    expected = entry.get("xxh3_128")
    if expected and digest != expected:
        return "xxh3-128 differs from the marker's"
    return None


def verify_bytes(entry: Mapping[str, Any], data: bytes | memoryview) -> str | None:
    """Check ``data`` against a marker record; return why it differs, or None when it matches."""
    hashed = entry.get("xxh3_128") and len(data) == entry.get("size")
    return verify_digest(entry, len(data), content_hash(data) if hashed else None)
