"""Writing new block files: with ``O_DIRECT`` from reused aligned buffers where the file system allows it.

Why: a buffered write of a new file copies every byte into freshly allocated page-cache pages. On
this project's VMs (Firecracker, balloon free-page reporting) pages the guest has not touched recently
fault in from the host one by one: perf put 41% of a cold 1 GiB read's CPU samples in that copy
(``copy_folio_from_iter_atomic``), and the read cost 2.8-3.4 CPU-s per GiB with buffered block writes
against 2.2-2.5 with ``O_DIRECT`` (a micro-benchmark of the writes alone: 2.1-2.6 system CPU-s per
GiB of new files, 0.12 to rewrite cached pages or to write ``O_DIRECT`` from a reused buffer). It also
keeps cache fills from flushing the page cache (a cold scan through a cache larger than RAM would
otherwise evict everything else on the node) and from piling up dirty pages. The cost moves to the
first re-read of a block that is no longer in the memory tier: it comes from the device (and then
stays in the page cache).

``O_DIRECT`` needs the memory address, the file offset and the length aligned to the device's block
size. The block format (:mod:`pcache.diskstore`) has a 40-byte header before the payload, so both are
copied into one reused page-aligned buffer (a user-space copy into memory that is already mapped),
written in whole 4 KiB units, and the file is cut back to its exact length with ``ftruncate``. Where the file
system refuses ``O_DIRECT`` (``EINVAL`` on open or on write: some FUSE and network file systems) the
writer falls back to plain buffered writes for the rest of the process, logged once.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Sequence
from typing import Any

from lingcore.files import unlink_quiet, write_all
from lingcore.log import get_logger

log = get_logger(__name__)

# Alignment for O_DIRECT: 4 KiB suits devices with 512-byte and with 4 KiB logical blocks.
ALIGN = 4096
# Aligned buffers kept for reuse: the publish pool's backlog is short (a 4 MiB O_DIRECT write takes a
# few ms), so a few cover it; more would only hold memory.
_KEEP_BUFFERS = 8


class Staged:
    """The bytes of one block file, copied out of the caller's buffers and ready to write.

    Attributes:
        length: Bytes in the file.
    """

    __slots__ = ("_buf", "_data", "length")

    def __init__(self, length: int, buf: mmap.mmap | None, data: bytes | None) -> None:
        self.length = length
        self._buf = buf  # page-aligned and padded to ALIGN (direct writes), or
        self._data = data  # the joined bytes (buffered writes)

    def view(self) -> memoryview:
        """The file's bytes (the caller releases the view)."""
        return memoryview(self._buf)[:self.length] if self._buf is not None else memoryview(self._data or b"")


class BlockFileWriter:
    """Creates block files, with ``O_DIRECT`` while the file system accepts it.

    Writing is split in two: :meth:`stage` copies the parts (so the caller may reuse its buffers at
    once, for example a reader's result buffer that the block was received into), and :meth:`create`
    writes them later, on a write-behind thread.

    Args:
        direct: Try ``O_DIRECT`` writes (False: always buffered).
    """

    def __init__(self, direct: bool = True) -> None:
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def stage(self, parts: Sequence[Any]) -> Staged:
        """Copy ``parts`` (bytes-like) into a new :class:`Staged`: an aligned buffer while direct."""
        length = sum(len(p) for p in parts)
        if not self.direct:
            return Staged(length, None, b"".join(parts))
        padded = -(-length // ALIGN) * ALIGN
        buf = self._take(padded)
        with memoryview(buf) as view:
            pos = 0
            for part in parts:
                view[pos:pos + len(part)] = part
                pos += len(part)
            view[length:padded] = bytes(padded - length)  # no stale bytes of an earlier block past EOF
        return Staged(length, buf, None)

    def create(self, path: str, staged: Staged) -> None:
        """Create ``path`` (it must not exist) holding ``staged``; its buffer goes back to the pool.

        Raises:
            FileExistsError: ``path`` exists. OSError: the write failed (``ENOSPC`` included); the
            caller removes the partial file.
        """
        try:
            if staged._buf is not None and self.direct and self._create_direct(path, staged._buf, staged.length):
                return
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with staged.view() as view:
                    write_all(fd, view)
            finally:
                os.close(fd)
        finally:
            self.discard(staged)

    def discard(self, staged: Staged) -> None:
        """Give a staged block's buffer back without writing it (idempotent)."""
        buf, staged._buf = staged._buf, None
        if buf is None:
            return
        with self._lock:
            if len(self._free) < _KEEP_BUFFERS:
                self._free.append(buf)
        # Otherwise dropped: the mapping goes when its last reference does (close() would raise while
        # a traceback still holds a view of it).

    def _create_direct(self, path: str, buf: mmap.mmap, length: int) -> bool:
        """Create ``path`` with one ``O_DIRECT`` write; return False if the file system refused it."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._give_up(path, exc)
            return False
        try:
            with memoryview(buf) as view:
                write_all(fd, view[:-(-length // ALIGN) * ALIGN])
            os.ftruncate(fd, length)
            return True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._give_up(path, exc)
        finally:
            os.close(fd)
        unlink_quiet(path)
        return False

    def _give_up(self, path: str, exc: OSError) -> None:
        if self.direct:
            self.direct = False
            log.info("the file system of %s does not take O_DIRECT writes (%s); writing cache blocks "
                     "through the page cache", path, exc, extra={"path": path})

    def _take(self, size: int) -> mmap.mmap:
        with self._lock:
            for i, buf in enumerate(self._free):
                if len(buf) >= size:
                    return self._free.pop(i)
        return mmap.mmap(-1, size)  # anonymous mappings are page-aligned
