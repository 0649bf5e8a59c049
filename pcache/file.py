"""Reading one object version through the cache: :class:`PCacheFile`, with sequential readahead."""

from __future__ import annotations

import io
import threading
from typing import TYPE_CHECKING, Any

from pcache.keys import ObjectRef

if TYPE_CHECKING:
    from pcache.fs import PCacheFileSystem


class PCacheFile(io.RawIOBase):
    """A read-only, seekable file served block by block from the cache tiers, with readahead."""

    def __init__(self, fs: PCacheFileSystem, path: str, ref: ObjectRef) -> None:
        super().__init__()
        self.fs, self.path, self.ref = fs, path, ref
        self.size = ref.size
        self._fetch = fs.fetcher_for(path, ref)
        self._pos = 0
        self._expected = -1
        self._streak = 0
        self._readahead_lock = threading.Lock()  # pread() callers share the sequential-read detection

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position in {self.fs.url(self.path)}")
        self._pos = base + offset
        return self._pos

    def _readahead(self, start: int, end: int) -> None:
        """Prefetch ahead when reads are sequential; the window doubles with each sequential read."""
        self._streak = self._streak + 1 if start == self._expected else 0
        self._expected = end
        config = self.fs.config
        limit = config.readahead_blocks
        if self._streak == 0 or limit == 0 or end >= self.size:
            return
        if config.peers and config.memory_bytes == 0 and not config.peer_blocks_on_disk:
            return  # a prefetched peer block would be kept nowhere: it would only be fetched twice
        bs = self.fs.engine.block_size
        window = min(limit, 2 ** min(self._streak, 16))
        nxt = (end - 1) // bs + 1
        self.fs.engine.prefetch(self.ref, range(nxt, nxt + window), self._fetch)

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError(f"read of closed file {self.fs.url(self.path)}")
        end = self.size if size is None or size < 0 else min(self.size, self._pos + size)
        start = self._pos
        if start >= end:
            return b""
        self._readahead(start, end)
        data = self.fs.engine.get_range(self.ref, start, end, self._fetch)
        self._pos = end
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def pread(self, offset: int, size: int) -> bytes:
        """Return up to ``size`` bytes at ``offset`` without moving the position; safe from many threads.

        Concurrent callers (a FUSE daemon serving one open file) fetch in parallel. Readahead sees the
        reads in the order their threads take its lock, which may differ from the order they were
        issued in; that can only reset the sequential streak (less readahead), never change bytes.
        """
        if self.closed:
            raise ValueError(f"read of closed file {self.fs.url(self.path)}")
        end = min(self.size, offset + max(0, size))
        if offset >= end:
            return b""
        with self._readahead_lock:
            self._readahead(offset, end)
        return self.fs.engine.get_range(self.ref, offset, end, self._fetch)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        start = self._pos
        self._readahead(start, min(self.size, start + len(view)))
        count = self.fs.engine.readinto(self.ref, start, view, self._fetch)
        self._pos += count
        return count
