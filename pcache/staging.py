"""Staged writes for a writable mount: random-access files, renames and deletes of write-back uploads.

:class:`~pcache.writeback.WriteBackFile` is a stream (``torch.save`` to ``pcache::s3://...``). A file
system mount gets writes at any offset, truncates, reads of the bytes just written, and renames of
files that may still be waiting for their upload. This module adds that, on top of the same journal
and uploader, so nothing about durability changes:

- :class:`StagedWrite`: a file staged in ``cache_dir/writeback`` at random offsets; :meth:`publish`
  fsyncs it and records it in the journal (from then on it is durable locally and uploads in the
  background). Writes after a publish go to a copy (the published bytes never change under the
  uploader).
- :func:`move_staged` (in :mod:`pcache.stagemoves`): rename a written file. If its upload has not started, the pending journal
  entry is re-targeted to the new name in one LMDB transaction (nothing reaches the origin under the
  old name). If the upload is running, the rename waits for it, then copies server-side and deletes the
  old name (S3 ``CopyObject``, a local rename for ``file://``); origins that cannot copy server-side
  refuse with ``EXDEV``. Either way, once :func:`move_staged` returns, no object is left at the origin
  under the old name, so a commit after it never lists a temporary name.
- :func:`drop_staged`: delete a written file: a pending upload is superseded (never sent), an uploaded
  one is deleted at the origin.

Races with the uploader are settled by the uploader's own per-URL lock (an ``flock`` stripe in the
journal directory): an uploader re-reads its entry after taking the lock, so it uploads the entry's
current name, and a rename taking the lock first never overlaps an upload of either name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from lingcore.checksum import content_hasher
from lingcore.files import fsync_dir, unlink_quiet
from lingcore.log import get_logger
from pcache.errors import CacheFullError
from pcache.journal import split_secrets

if TYPE_CHECKING:
    from pcache.fs import PCacheFileSystem
    from pcache.writeback import WriteBack

log = get_logger(__name__)

_COPY_CHUNK = 64 * 1024 * 1024
_BEHIND_BYTES = 64 * 1024 * 1024  # queued write_behind bytes per file before a caller waits


class StagedWrite:
    """One file being written through a mount, staged in ``cache_dir`` until :meth:`publish`.

    Args:
        pfs: The pcache filesystem of the origin.
        path: Origin path (or URL) the file will be uploaded to.
        initial: Optional local file whose bytes the new file starts with (re-opening a staged file
            for writing without ``O_TRUNC``).

    All methods are thread-safe. The disk budget is claimed as the file grows (clean blocks are evicted
    first); when dirty data alone fills it, writes raise :class:`~pcache.errors.CacheFullError`
    (``ENOSPC``) and nothing is journaled.
    """

    def __init__(self, pfs: PCacheFileSystem, path: str, initial: str | None = None) -> None:
        self.pfs = pfs
        self.target = pfs.origin_path(path)
        self.url = pfs.origin.url(self.target)
        self.manager: WriteBack = pfs.writeback
        public, secret = split_secrets(pfs.target_options)
        self.manager.remember_secret(pfs.target_protocol, public, secret)
        self._lock = threading.Lock()
        self._room = threading.Condition()
        self._behind_bytes = 0  # queued by write_behind, not yet written
        self._behind_error: BaseException | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._fd = -1
        self._reserved = 0
        self.size = 0
        self.dirty = True  # a new file is a write even if empty: publishing it creates the object
        self.published_id: str | None = None
        self._new_tmp()
        if initial is not None:
            with open(initial, "rb") as src:
                self._copy_from(src.fileno(), os.fstat(src.fileno()).st_size)
        self.manager.kick()  # the uploader's start-up overlaps the write

    # -- internals -----------------------------------------------------------------------------------
    def _new_tmp(self) -> None:
        self.upload_id = uuid.uuid4().hex
        self._tmp = os.path.join(self.manager.journal.dir, f"{self.upload_id}.tmp")
        self._fd = os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._hasher: Any = content_hasher()
        self._sequential = True  # while every write appends, the hash is kept as the bytes arrive
        self.size = 0

    def _copy_from(self, src_fd: int, size: int) -> None:
        self._claim(size)
        offset = 0
        while offset < size:
            chunk = os.pread(src_fd, min(_COPY_CHUNK, size - offset), offset)
            if not chunk:
                break
            self._write_at(chunk, offset)
            offset += len(chunk)

    def _claim(self, end: int) -> None:
        """Claim the disk budget up to byte ``end`` of this file."""
        if end > self._reserved:
            self.manager.reserve(self.url, end - self._reserved)
            self._reserved = end

    def _release(self) -> None:
        self.manager.release(self._reserved)
        self._reserved = 0

    def _write_at(self, data: Any, offset: int) -> None:
        view = memoryview(data).cast("B")
        while True:
            try:
                done = 0
                while done < len(view):
                    done += os.pwrite(self._fd, view[done:], offset + done)
                break
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                if self.manager.free_space(len(view), self.url) == 0:
                    raise CacheFullError(self.url, str(exc)) from exc
        if self._sequential and offset == self.size:
            self._hasher.update(view)
        else:
            self._sequential = False
        self.size = max(self.size, offset + len(view))

    def _unpublish(self) -> None:
        """Writes after a publish go to a fresh copy: the published bytes belong to the uploader now."""
        if self.published_id is None:
            return
        old_fd, size = self._fd, self.size
        self._new_tmp()
        try:
            self._copy_from(old_fd, size)
        finally:
            os.close(old_fd)
        self.published_id = None

    # -- the file ------------------------------------------------------------------------------------
    def pwrite(self, data: Any, offset: int) -> int:
        """Write ``data`` at ``offset``; return its length.

        Raises:
            CacheFullError: dirty data fills the disk budget (``ENOSPC``); nothing was written.
        """
        with self._lock:
            self._unpublish()
            self._claim(offset + len(data))
            self._write_at(data, offset)
            self.dirty = True
            return len(data)

    def write_behind(self, data: bytes, offset: int) -> int:
        """Like :meth:`pwrite`, but return once the bytes are queued for this file's writer thread.

        The disk budget is claimed here, so a full disk tier still fails this call
        (:class:`~pcache.errors.CacheFullError`); an error of the write itself surfaces at the next
        :meth:`drain` (every other method drains first). At most ``_BEHIND_BYTES`` are queued; past that
        this call waits. A FUSE daemon answers the kernel at once, so the copy into the page cache
        overlaps the transfer of the next request.
        """
        with self._lock:
            if self.published_id is None:  # after a publish, pwrite claims for its copy-on-write
                self._claim(offset + len(data))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="pcache-staged")
        with self._room:
            while self._behind_bytes > _BEHIND_BYTES:
                self._room.wait()
            self._behind_bytes += len(data)
        self._pool.submit(self._run_behind, data, offset)
        return len(data)

    def _run_behind(self, data: bytes, offset: int) -> None:
        try:
            if self._behind_error is None:  # after a failure the file is never published: skip the rest
                self.pwrite(data, offset)
        except BaseException as exc:  # noqa: BLE001 - kept for drain(), which raises it to the writer
            self._behind_error = exc
        finally:
            with self._room:
                self._behind_bytes -= len(data)
                self._room.notify_all()

    def drain(self) -> None:
        """Wait for every queued :meth:`write_behind`; raise the error one of them met (every time)."""
        if self._pool is not None:
            self._pool.submit(lambda: None).result()  # one writer thread, FIFO: all before it are done
        if self._behind_error is not None:
            raise self._behind_error

    def pread(self, size: int, offset: int) -> bytes:
        """Read back staged bytes."""
        self.drain()
        with self._lock:
            return os.pread(self._fd, size, offset)

    def truncate(self, size: int) -> None:
        """Cut or extend (with zeros) the file to ``size`` bytes."""
        self.drain()
        with self._lock:
            self._unpublish()
            self._claim(size)
            os.ftruncate(self._fd, size)
            if size == 0:
                self._hasher, self._sequential = content_hasher(), True
            elif size != self.size:
                self._sequential = False
            self.size = size
            self.dirty = True

    def publish(self) -> str | None:
        """Make the bytes written so far durable locally and queue their upload; return the entry id.

        fsyncs the data and the directory, then records the journal entry (fsynced LMDB): once this
        returns, a crash of this process loses nothing (``pcache flush --cache-dir`` uploads it). A
        second publish without writes in between does nothing.

        Raises:
            OSError: a queued :meth:`write_behind` failed; nothing is published.
        """
        self.drain()
        with self._lock:
            if not self.dirty:
                return self.published_id
            if self._sequential:
                digest = self._hasher.hexdigest()
            else:  # random writes: hash the finished file once
                hasher, offset = content_hasher(), 0
                while chunk := os.pread(self._fd, _COPY_CHUNK, offset):
                    hasher.update(chunk)
                    offset += len(chunk)
                digest = hasher.hexdigest()
            os.fsync(self._fd)
            journal = self.manager.journal
            os.replace(self._tmp, journal.data_path(self.upload_id))
            fsync_dir(journal.dir)
            public, _ = split_secrets(self.pfs.target_options)
            entry = {"id": self.upload_id, "url": self.url, "protocol": self.pfs.target_protocol,
                     "path": self.target, "options": public, "size": self.size, "xxh3_128": digest,
                     "created": time.time(), "attempts": 0}
            # The journal entry takes over this file's claim on the disk budget (as pending bytes).
            self._release()
            journal.add(entry)
            self.published_id, self.dirty = self.upload_id, False
        self.pfs.origin.invalidate(self.target)
        self.manager.kick()
        return self.published_id

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (the staged bytes are then read through pcache, if published)."""
        return self._fd < 0

    def close(self) -> None:
        """Let go of the file; bytes never published are dropped (nothing is uploaded)."""
        with contextlib.suppress(Exception):  # an unpublished file's failed write no longer matters
            self.drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self.published_id is None:
                unlink_quiet(self._tmp)
            self._release()

    def retarget(self, path: str) -> None:
        """The file was renamed while open: publish it under ``path`` from now on."""
        with self._lock:
            self.target = self.pfs.origin_path(path)
            self.url = self.pfs.origin.url(self.target)
