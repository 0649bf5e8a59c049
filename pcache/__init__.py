"""pcache: a tiered, checksummed block cache and durable checkpoint write-back for any fsspec store.

Public API:

- :class:`PCacheFileSystem` (fsspec protocol ``pcache``) and :class:`PCacheFile`
- :class:`CacheConfig`
- :func:`flush` and :func:`commit` for write-back durability
- typed errors: :class:`ConfigError`, :class:`OriginUnavailableError`, :class:`CacheFullError`,
  :class:`UploadError`
"""

from __future__ import annotations

from pcache.config import CacheConfig
from pcache.errors import CacheFullError, ConfigError, OriginUnavailableError, UploadError
from pcache.fs import PCacheFile, PCacheFileSystem, all_filesystems, all_writebacks, get_writeback
from pcache.keys import ObjectRef

__all__ = [
    "CacheConfig",
    "CacheFullError",
    "ConfigError",
    "ObjectRef",
    "OriginUnavailableError",
    "PCacheFile",
    "PCacheFileSystem",
    "UploadError",
    "commit",
    "flush",
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
