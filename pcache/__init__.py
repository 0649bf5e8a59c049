"""pcache: a tiered, checksummed block cache and durable checkpoint write-back for any fsspec store.

Public API (other packages use pcache through these names only):

- :class:`PCacheFileSystem` (fsspec protocol ``pcache``) and :class:`PCacheFile`. Besides fsspec's
  methods, the filesystem offers:

  - ``origin_path(path)``: the origin filesystem's path of a ``pcache::``/origin URL or path;
    ``url(path)``: its origin URL; ``fs``: the origin fsspec filesystem (listing, bulk reads)
  - ``ref_for(path, version=None, size=None)``: the versioned :class:`ObjectRef` block keys come from
  - ``in_memory(ref, start, end)``: whether a byte range is all in this process's memory tier
  - ``put_atomic(path, data)``: a small file straight to the origin, whole or not at all
  - ``rm(path, recursive=False)``: delete at the origin, dropping cached metadata
  - ``flush(prefix)``, ``commit(prefix)``: write-back durability and the ``_COMMITTED`` marker
  - ``read_commit(prefix)``, ``read_committed(prefix, name)``, ``verify_commit(prefix)``: read and
    check a commit through the kernel's marker format (:mod:`lingcore.marker`)
- :class:`ObjectRef` and :func:`block_key`: the identity of every cached byte (:mod:`pcache.keys`)
- :class:`CacheConfig`
- :func:`flush` and :func:`commit` for write-back durability across the process's filesystems
- :func:`release`: close this process's engines, write-back managers and LMDB handles of cache
  directories under a path (a process done with a cache directory; the tests' temporary ones)
- staged writes of a writable mount (:mod:`pcache.staging`, :mod:`pcache.stagemoves`): :class:`StagedWrite` (a file written at
  any offset, then published to the write-back), :func:`move_staged` (rename before or after upload),
  :func:`drop_staged`, :func:`staged_files`, :func:`is_pending`, :func:`pending_bytes`,
  :func:`resume_uploads`, :func:`can_copy_server_side`, :func:`still_pending`, :func:`upload_errors`
- typed errors: :class:`ConfigError`, :class:`OriginUnavailableError`, :class:`StaleObjectError`,
  :class:`CacheFullError`, :class:`CacheIndexError`, :class:`UploadError`, :class:`CommitMismatchError`

Public modules, imported on their own because they pull in more:

- :mod:`pcache.admin`: stat, warm, flush, verify, gc and the node client, as a library
- :mod:`pcache.options`: the cache flags every CLI shares (``add_cache_options``, ``cache_config``)
- :mod:`pcache.s3server`: an embedded SeaweedFS S3 server (demos, ``pcache dev-s3``, :mod:`pcache.devs3`)
- :mod:`pcache.testing`: test-only helpers (chaos proxy, node processes); shipped code never imports it
"""

from __future__ import annotations

from pcache.config import CacheConfig
from pcache.errors import (
    CacheFullError,
    CacheIndexError,
    CommitMismatchError,
    ConfigError,
    OriginUnavailableError,
    StaleObjectError,
    UploadError,
)
from pcache.fs import PCacheFile, PCacheFileSystem, all_filesystems, all_writebacks, get_writeback, release
from pcache.keys import ObjectRef, block_key
from pcache.stagemoves import (
    can_copy_server_side,
    drop_staged,
    is_pending,
    move_staged,
    pending_bytes,
    resume_uploads,
    staged_files,
    still_pending,
    upload_errors,
)
from pcache.staging import StagedWrite

__all__ = [
    "CacheConfig",
    "CacheFullError",
    "CacheIndexError",
    "CommitMismatchError",
    "ConfigError",
    "ObjectRef",
    "OriginUnavailableError",
    "PCacheFile",
    "PCacheFileSystem",
    "StagedWrite",
    "StaleObjectError",
    "UploadError",
    "block_key",
    "can_copy_server_side",
    "commit",
    "drop_staged",
    "flush",
    "is_pending",
    "move_staged",
    "pending_bytes",
    "release",
    "resume_uploads",
    "staged_files",
    "still_pending",
    "upload_errors",
]


def _origin_url(prefix: str) -> str:
    """``pcache::s3://b/p`` -> ``s3://b/p``."""
    return prefix.split("::")[-1].replace("pcache://", "", 1).rstrip("/")


def flush(prefix: str | None = None, timeout: float | None = None, cache_dir: str | None = None) -> None:
    """Block until every write-back file under ``prefix`` (all when None) is durable at the origin.

    Covers every ``cache_dir`` used in this process, plus ``cache_dir`` if given (so a restarted
    process can finish what a killed one left in the journal; credentials then come from the
    environment). ``prefix`` is an origin URL such as ``s3://bucket/ckpt/step100`` (a ``pcache::``
    prefix is accepted too).

    Raises:
        TimeoutError: if ``timeout`` seconds pass first.
        UploadError: if an upload failed for good; the file stays staged and journaled.
    """
    if cache_dir is not None:
        get_writeback(CacheConfig.load(cache_dir=cache_dir))
    for wb in all_writebacks():
        wb.wait(_origin_url(prefix) if prefix else None, timeout)


def commit(prefix: str, timeout: float | None = None) -> str:
    """Flush ``prefix``, then write ``<prefix>/_COMMITTED``; return the marker's URL.

    The marker is written only after every file under ``prefix`` is durable at the origin; it is a JSON
    manifest (path, size, ETag, xxh3-128) of the files under the prefix.

    Raises:
        ValueError: if no pcache filesystem in this process serves ``prefix``'s protocol.
    """
    url = _origin_url(prefix)
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    candidates = [fs for fs in all_filesystems() if fs.target_protocol == scheme]
    if not candidates:
        raise ValueError(f"commit({prefix!r}): no pcache filesystem for protocol {scheme!r} in this process; "
                         "open one first or call PCacheFileSystem.commit")
    return candidates[-1].commit(url, timeout)
