"""I/O shared by the shard readers and writers.

* :class:`Location` names one file or directory: a plain local path (memory-mapped by the readers) or any
  fsspec URL, chained ones such as ``pcache::s3://bucket/corpus`` included (read in large ranges). A
  ``file://`` URL deliberately takes the ranged path too: it is how tests exercise remote reads.
* :class:`HandleCache` is the per-process LRU of open shard handles. Corpora may have thousands of shards,
  so handles open lazily and at most ``LOADERS_MAX_OPEN_SHARDS`` (default 64) stay open; after ``fork`` the
  child forgets the parent's handles (LMDB environments and file objects must not cross a fork) while the
  page cache behind the mappings stays shared.
* :class:`RangeReader` serves small reads of a remote file out of one cached read-ahead range.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from lingcore.checksum import hash_stream
from loaders.errors import TruncatedDataError

#: Remote reads fetch at least this many bytes and keep them for the following reads.
READ_AHEAD_BYTES = 8 << 20
_HASH_CHUNK = 8 << 20


@dataclasses.dataclass(frozen=True)
class Location:
    """A file or directory: its fsspec filesystem, the path within it, and the URL used in messages.

    Attributes:
        fs: The fsspec filesystem (picklable; fsspec re-creates its clients after fork).
        path: Path inside ``fs``.
        url: The user-facing URL (keeps a ``pcache::`` chain), used in errors and fingerprints.
        local: True for plain local paths, which readers memory-map instead of reading in ranges.
    """

    fs: Any
    path: str
    url: str
    local: bool

    @classmethod
    def from_url(cls, url: str, storage_options: dict[str, Any] | None = None) -> Location:
        """Resolve ``url`` (a plain path or an fsspec URL) to a location."""
        if "://" not in url and "::" not in url:
            return cls(LocalFileSystem(), os.path.abspath(url), url, True)
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        return cls(fs, path, url, False)

    def child(self, name: str) -> Location:
        """Return the location of ``name`` inside this directory."""
        return Location(self.fs, f"{self.path.rstrip('/')}/{name}", f"{self.url.rstrip('/')}/{name}",
                        self.local)

    def sibling(self, suffix: str) -> Location:
        """Return this path with ``suffix`` appended (``prefix`` -> ``prefix.idx``)."""
        return Location(self.fs, self.path + suffix, self.url + suffix, self.local)

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def isdir(self) -> bool:
        return bool(self.fs.isdir(self.path))

    def isfile(self) -> bool:
        return bool(self.fs.isfile(self.path))

    def info(self) -> dict[str, Any]:
        return dict(self.fs.info(self.path))

    def size(self) -> int:
        if self.local:
            return os.stat(self.path).st_size
        return int(self.fs.size(self.path))

    def read_bytes(self, start: int | None = None, end: int | None = None) -> bytes:
        """Read the whole file, or ``[start, end)``."""
        return bytes(self.fs.cat_file(self.path, start=start, end=end))

    def listdir(self) -> list[dict[str, Any]]:
        """Entries directly under this directory (fsspec ``ls`` detail dicts), sorted by name."""
        entries = self.fs.ls(self.path, detail=True)
        return sorted(entries, key=lambda e: e["name"])


def hash_file(loc: Location) -> tuple[int, str]:
    """Return ``(size, xxh3-128 hex)`` of a file, streamed in large chunks."""
    with loc.fs.open(loc.path, "rb", block_size=_HASH_CHUNK) as fh:
        return hash_stream(fh, _HASH_CHUNK)


class Handle(Protocol):
    """An open shard: whatever a reader needs for reads; ``close`` releases it and sets ``closed``."""

    closed: bool

    def close(self) -> None: ...


class HandleCache:
    """A per-process LRU of open shard handles, keyed by a string the reader chooses (its URL).

    Opening happens under the cache lock so that two threads never open one LMDB environment twice
    (py-lmdb refuses that); shard opens are rare next to reads, so the contention does not matter.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, Handle] = OrderedDict()
        self._pid = os.getpid()

    def get(self, key: str, opener: Callable[[], Handle]) -> Any:
        """Return the open handle for ``key``, opening it with ``opener`` (and evicting the LRU one)."""
        with self._lock:
            self._check_pid()
            handle = self._entries.get(key)
            if handle is not None:
                self._entries.move_to_end(key)
                return handle
            handle = opener()
            self._entries[key] = handle
            while len(self._entries) > self.capacity:
                _, old = self._entries.popitem(last=False)
                old.close()
            return handle

    def discard(self, key: str) -> None:
        """Close and forget the handle for ``key`` if it is open."""
        with self._lock:
            self._check_pid()
            handle = self._entries.pop(key, None)
            if handle is not None:
                handle.close()

    def __len__(self) -> int:
        return len(self._entries)

    def _check_pid(self) -> None:
        # A fork() between at-fork hooks (or a cache created before the hook ran) still must not reuse
        # the parent's handles; dropping them is enough, the child's copies die with their references.
        if self._pid != os.getpid():
            self._entries = OrderedDict()
            self._pid = os.getpid()

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._entries = OrderedDict()
        self._pid = os.getpid()


HANDLES = HandleCache(int(os.environ.get("LOADERS_MAX_OPEN_SHARDS", "64")))
os.register_at_fork(after_in_child=HANDLES._after_fork)


class CachedHandleMixin:
    """Gives a reader a lock-free fast path to its handle in :data:`HANDLES`.

    The reader remembers the handle it got and the pid it got it in; while that handle is open and the
    process is the same, reads skip the cache's lock (a few microseconds per document otherwise). Recency
    in the LRU is therefore "last opened", which only matters once more shards than its capacity are hot.
    Subclasses define ``_key`` and ``_open``.
    """

    _h: Any = None
    _h_pid: int = -1

    @property
    def _key(self) -> str:
        raise NotImplementedError

    def _open(self) -> Any:
        raise NotImplementedError

    def _get_handle(self) -> Any:
        handle = self._h
        if handle is None or handle.closed or self._h_pid != os.getpid():
            handle = HANDLES.get(self._key, self._open)
            self._h, self._h_pid = handle, os.getpid()
        return handle

    def close(self) -> None:
        """Release this reader's handle in this process (it reopens on the next read)."""
        self._h = None
        HANDLES.discard(self._key)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_h", None)  # open files and mappings never travel; the receiver reopens lazily
        state.pop("_h_pid", None)
        return state


class HeaderDtypeMixin:
    """``dtype`` of a shard whose header is read when it opens (``_handle()`` sets ``_dtype``)."""

    _dtype: Any = None

    def _handle(self) -> Any:
        raise NotImplementedError

    @property
    def dtype(self) -> np.dtype[Any]:
        if self._dtype is None:
            self._handle()
        if self._dtype is None:
            raise RuntimeError("opening the shard did not set its dtype")
        return np.dtype(self._dtype)


class RangeReader:
    """Reads a remote file in ranges of at least ``block`` bytes, keeping the latest range.

    Sequential small reads (documents in storage order, tar headers) then cost one request per range
    instead of one per document. Reads larger than a range go straight to the store, uncached.
    """

    closed = False

    def __init__(self, loc: Location, size: int, block: int = READ_AHEAD_BYTES) -> None:
        self.loc = loc
        self.size = size
        self.block = block
        self._cached: tuple[int, bytes] = (0, b"")

    def read(self, offset: int, length: int) -> memoryview:
        """Return bytes ``[offset, offset + length)`` of the file.

        Raises:
            TruncatedDataError: when the range lies past the end of the file, naming it.
        """
        end = offset + length
        if offset < 0 or length < 0 or end > self.size:
            raise TruncatedDataError(self.loc.url, f"read of bytes [{offset}, {end}) past the end "
                                                   f"of the {self.size}-byte file")
        start, data = self._cached
        if start <= offset and end <= start + len(data):
            return memoryview(data)[offset - start:end - start]
        if length >= self.block:
            return memoryview(self._fetch(offset, end))
        fetch_end = min(self.size, offset + self.block)
        data = self._fetch(offset, fetch_end)
        self._cached = (offset, data)
        return memoryview(data)[:length]

    def _fetch(self, start: int, end: int) -> bytes:
        data = self.loc.read_bytes(start, end)
        if len(data) != end - start:
            raise TruncatedDataError(self.loc.url, f"asked for bytes [{start}, {end}), got {len(data)} bytes "
                                                   "(file shrank or is truncated)")
        return data

    def close(self) -> None:
        self._cached = (0, b"")
        self.closed = True
