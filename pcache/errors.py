"""Typed errors raised by pcache (the base ones come from the kernel, :mod:`lingcore.errors`).

Each subclasses the built-in exception a caller would already catch (``OSError``, ``ValueError``), in
the fsspec tradition, and its message names the URL, path or config field involved.
"""

from __future__ import annotations

import errno

from lingcore.errors import ConfigError, OriginUnavailableError, StaleObjectError

__all__ = ["CacheFullError", "CacheIndexError", "CommitMismatchError", "ConfigError", "OriginUnavailableError",
           "StaleObjectError", "UploadError"]


class CacheFullError(OSError):
    """The cache directory's file system is out of space; the cache stays consistent."""

    def __init__(self, path: str, detail: str = "") -> None:
        self.path = path
        msg = f"no space left in cache directory for {path}"
        super().__init__(errno.ENOSPC, msg + (f": {detail}" if detail else ""))


class CacheIndexError(OSError):
    """The LMDB index of a cache directory failed, even after being rebuilt from the block files.

    Cached blocks stay valid (a hit needs no index); only accounting and eviction are affected.
    """

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        super().__init__(errno.EIO, f"cache index {path} failed: {detail}")


class UploadError(OSError):
    """A write-back upload failed; the file stays in the journal and is never dropped."""

    def __init__(self, url: str, detail: str) -> None:
        self.url = url
        super().__init__(errno.EIO, f"upload of {url} failed (still pending in the journal): {detail}")


class CommitMismatchError(OSError):
    """A file of a committed prefix is not listed in its ``_COMMITTED`` marker, or differs from it.

    The file is torn or was changed after the commit; the reader must not use it.
    """

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(errno.EIO, f"{url} does not match its commit marker: {reason}")
