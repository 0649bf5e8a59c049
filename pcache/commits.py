"""Read and verify commit markers through pcache: ``<prefix>/_COMMITTED`` in the kernel's format.

:meth:`~pcache.fs.PCacheFileSystem.commit` writes the marker once every file under the prefix is
durable; the format (``pcache-commit/1``) lives in :mod:`lingcore.marker`. Readers (``ling_train``
resume, tools that check a unit) trust a prefix only once it has a complete marker, and check the files
they read against it. These functions back the filesystem's ``read_commit``, ``read_committed`` and
``verify_commit`` methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lingcore.checksum import hash_stream
from lingcore.log import get_logger
from lingcore.marker import MARKER_NAME, marker_entry, parse_marker, verify_bytes, verify_digest
from lingcore.retry import retry_call
from pcache.errors import CommitMismatchError

if TYPE_CHECKING:
    from pcache.fs import PCacheFileSystem

log = get_logger(__name__)


def read_commit(pfs: PCacheFileSystem, prefix: str) -> dict[str, Any] | None:
    """Return the parsed marker of ``prefix``; None when there is none or it does not parse.

    The marker is read from the origin itself, never from the block cache or cached metadata: a unit's
    committed state must be the origin's current one.
    """
    target = f"{pfs.origin_path(prefix).rstrip('/')}/{MARKER_NAME}"
    url = pfs.origin.url(target)
    try:
        raw = retry_call(lambda: pfs.fs.cat_file(target), url=url, policy=pfs.origin.policy)
    except FileNotFoundError:
        return None
    marker = parse_marker(raw)
    if marker is None:
        log.warning("commit marker %s does not parse (%d bytes): %s is not committed", url, len(raw),
                    pfs.url(prefix), extra={"url": url})
    return marker


def _require(pfs: PCacheFileSystem, prefix: str, marker: dict[str, Any] | None) -> dict[str, Any]:
    marker = read_commit(pfs, prefix) if marker is None else marker
    if marker is None:
        raise FileNotFoundError(f"{pfs.url(prefix)} is not committed (no complete {MARKER_NAME} marker)")
    return marker


def read_committed(pfs: PCacheFileSystem, prefix: str, name: str, marker: dict[str, Any] | None = None) -> bytes:
    """Return file ``name`` (relative to ``prefix``) read through the cache and checked against the marker.

    Raises:
        FileNotFoundError: ``prefix`` has no complete marker, or the file is missing.
        CommitMismatchError: the marker does not list the file, or its size or xxh3-128 differ.
    """
    marker = _require(pfs, prefix, marker)
    path = f"{prefix.rstrip('/')}/{name}"
    entry = marker_entry(marker, name)
    if entry is None:
        raise CommitMismatchError(pfs.url(path), "not listed in the commit marker")
    with pfs.open(path, "rb") as f:
        data = f.read()
    why = verify_bytes(entry, data)
    if why is not None:
        raise CommitMismatchError(pfs.url(path), why)
    return data


def verify_commit(pfs: PCacheFileSystem, prefix: str) -> dict[str, str]:
    """Check every file the marker of ``prefix`` lists against the origin as it is now.

    Files with an xxh3-128 in the marker are read (through the cache, streaming) and hashed; the others
    are checked by size only, as nobody vouched for their content.

    Returns:
        ``{relative path: what differs}``; empty when the commit is intact.

    Raises:
        FileNotFoundError: ``prefix`` has no complete marker.
    """
    marker = _require(pfs, prefix, None)
    problems: dict[str, str] = {}
    for entry in marker["files"]:
        path = f"{prefix.rstrip('/')}/{entry['path']}"
        pfs.origin.invalidate(pfs.origin_path(path))  # the current version, not a cached answer
        try:
            if entry.get("xxh3_128"):
                with pfs.open(path, "rb") as f:
                    size, digest = hash_stream(f)
            else:
                size, digest = int(pfs.info(path)["size"]), None
        except FileNotFoundError:
            problems[entry["path"]] = "missing at the origin"
            continue
        why = verify_digest(entry, size, digest)
        if why is not None:
            problems[entry["path"]] = why
    return problems
