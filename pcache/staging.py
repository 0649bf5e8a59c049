"""Staged writes for a writable mount: random-access files, renames and deletes of write-back uploads.

:class:`~pcache.writeback.WriteBackFile` is a stream (``torch.save`` to ``pcache::s3://...``). A file
system mount gets writes at any offset, truncates, reads of the bytes just written, and renames of
files that may still be waiting for their upload. This module adds that, on top of the same journal
and uploader, so nothing about durability changes:

- :class:`StagedWrite`: a file staged in ``cache_dir/writeback`` at random offsets; :meth:`publish`
  fsyncs it and records it in the journal (from then on it is durable locally and uploads in the
  background). Writes after a publish go to a copy (the published bytes never change under the
  uploader).
- :func:`move_staged`: rename a written file. If its upload has not started, the pending journal
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

import xxhash

from lingcore.checksum import content_hasher
from lingcore.files import fsync_dir, unlink_quiet
from lingcore.log import get_logger
from lingcore.retry import retry_call
from pcache.errors import CacheFullError
from pcache.journal import split_secrets
from pcache.locks import StripeLocks

if TYPE_CHECKING:
    from pcache.fs import PCacheFileSystem
    from pcache.writeback import WriteBack

log = get_logger(__name__)

_LOCK_STRIPES = 256  # the uploader's (pcache.uploader.Uploader.url_locks): both must pick the same stripe
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


# -- renames and deletes of written files ------------------------------------------------------------
def _stripe(url: str) -> int:
    return int.from_bytes(xxhash.xxh3_64_digest(url.encode())[:4], "little") % _LOCK_STRIPES


def _lock_urls(manager: WriteBack, urls: list[str], deadline: float) -> tuple[StripeLocks, list[int]]:
    """Take the uploader's lock of every URL (distinct stripes once), waiting while an upload runs."""
    locks = StripeLocks(os.path.join(manager.journal.dir, "locks"), n_stripes=_LOCK_STRIPES)
    keys = {_stripe(u): xxhash.xxh3_64_digest(u.encode()) for u in urls}
    while True:
        held: list[int] = []
        for _, key in sorted(keys.items()):  # a fixed order: two renames never deadlock
            fd = locks.try_acquire(key)
            if fd is None:
                break
            held.append(fd)
        if len(held) == len(keys):
            return locks, held
        for fd in held:
            locks.release(fd)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"the upload of {urls[0]} is still running; try again")
        time.sleep(0.02)


def _supersede_all(manager: WriteBack, url: str) -> int:
    """Drop every pending write of exactly ``url`` (the caller holds its lock); return how many."""
    dropped = 0
    for entry in manager.journal.pending(url):
        if entry["url"] == url:
            manager.journal.supersede(entry["id"])
            unlink_quiet(manager.journal.data_path(entry["id"]))
            dropped += 1
    return dropped


def can_copy_server_side(pfs: PCacheFileSystem) -> bool:
    """True when the origin copies objects without sending the bytes through this node."""
    return pfs.target_protocol in ("s3", "file", "local", "gcs", "gs")


def move_staged(pfs: PCacheFileSystem, src: str, dst: str, timeout: float = 600.0) -> str:
    """Rename a file written through pcache from ``src`` to ``dst`` (an existing ``dst`` is replaced).

    Returns:
        ``"retargeted"`` when the upload had not started (the journal entry now names ``dst``), or
        ``"copied"`` when ``src`` was already at the origin (server-side copy, then delete).

    Raises:
        OSError: ``EXDEV`` when ``src`` is at the origin and the origin cannot copy server-side.
        TimeoutError: an upload of either name kept running for ``timeout`` seconds.
    """
    manager = pfs.writeback
    src_t, dst_t = pfs.origin_path(src), pfs.origin_path(dst)
    src_url, dst_url = pfs.origin.url(src_t), pfs.origin.url(dst_t)
    locks, held = _lock_urls(manager, [src_url, dst_url], time.monotonic() + timeout)
    try:
        pending = [e for e in manager.journal.pending(src_url) if e["url"] == src_url]
        if pending:
            for older in pending[:-1]:
                manager.journal.supersede(older["id"])
                unlink_quiet(manager.journal.data_path(older["id"]))
            dropped = manager.journal.retarget(pending[-1]["id"], dst_url, dst_t)
            if dropped is not None:
                for entry_id in dropped:
                    unlink_quiet(manager.journal.data_path(entry_id))
                how = "retargeted"
            else:  # cannot happen under the lock; treated as uploaded to stay safe
                how = ""
        else:
            how = ""
        if not how:
            if not can_copy_server_side(pfs):
                raise OSError(errno.EXDEV, f"{src_url} is already uploaded and {pfs.target_protocol}:// cannot "
                                           f"copy server-side: rename refused")
            _supersede_all(manager, dst_url)  # an older staged dst must not land over the copy later
            fs, policy = pfs.fs, pfs.origin.policy
            if pfs.target_protocol in ("file", "local"):
                retry_call(lambda: fs.mv(src_t, dst_t), url=src_url, policy=policy)
            else:
                retry_call(lambda: fs.copy(src_t, dst_t), url=src_url, policy=policy)
                retry_call(lambda: fs.rm(src_t), url=src_url, policy=policy)
            fs.invalidate_cache(dst_t)
            etag = str(retry_call(lambda: fs.info(dst_t), url=dst_url, policy=policy).get("ETag", "")).strip('"')
            manager.journal.move_done(src_url, dst_url, etag or None)
            how = "copied"
    finally:
        for fd in held:
            locks.release(fd)
        pfs.origin.invalidate(src_t)
        pfs.origin.invalidate(dst_t)
    manager.kick()
    log.info("renamed %s to %s (%s)", src_url, dst_url, how, extra={"url": dst_url})
    return how


def drop_staged(pfs: PCacheFileSystem, path: str, timeout: float = 600.0) -> str:
    """Delete a file written through pcache: its pending upload is dropped, an uploaded copy deleted.

    Returns:
        ``"dropped"`` (never reached the origin) or ``"deleted"`` (deleted at the origin).
    """
    manager = pfs.writeback
    target = pfs.origin_path(path)
    url = pfs.origin.url(target)
    locks, held = _lock_urls(manager, [url], time.monotonic() + timeout)
    try:
        if _supersede_all(manager, url):
            how = "dropped"
        else:
            with contextlib.suppress(FileNotFoundError):
                retry_call(lambda: pfs.fs.rm(target), url=url, policy=pfs.origin.policy)
            how = "deleted"
    finally:
        for fd in held:
            locks.release(fd)
        pfs.origin.invalidate(target)
    return how


def staged_files(pfs: PCacheFileSystem, path: str) -> dict[str, int]:
    """``{origin path: size}`` of every file under ``path`` that is staged and not yet uploaded."""
    return pfs.writeback.staged_under(pfs.url(path))


def is_pending(pfs: PCacheFileSystem, path: str) -> bool:
    """True while a write of ``path`` is staged and not yet durable at the origin."""
    return pfs.writeback.is_pending(pfs.url(path))


def still_pending(pfs: PCacheFileSystem, entry_ids: list[str]) -> set[str]:
    """The ids among ``entry_ids`` (from :meth:`StagedWrite.publish`) not yet durable at the origin."""
    journal = pfs.writeback.journal
    return {entry_id for entry_id in entry_ids if journal.get(entry_id) is not None}


def upload_errors(pfs: PCacheFileSystem, path: str) -> dict[str, str]:
    """``{url: last error}`` of pending uploads under ``path`` whose last attempt failed."""
    return {e["url"]: str(e["last_error"]) for e in pfs.writeback.journal.pending(pfs.url(path))
            if e.get("last_error")}


def pending_bytes(pfs: PCacheFileSystem) -> int:
    """Bytes staged in the cache directory and not yet durable at the origin."""
    return int(pfs.writeback.journal.pending_bytes())


def resume_uploads(pfs: PCacheFileSystem) -> int:
    """Start an uploader for writes a previous process left in the journal; return how many are pending.

    A mount killed after ``close()`` returned left its files journaled; the next mount of the same cache
    directory calls this, so they upload without a ``pcache flush``.
    """
    public, secret = split_secrets(pfs.target_options)
    pfs.writeback.remember_secret(pfs.target_protocol, public, secret)
    count = len(pfs.writeback.journal.pending())
    if count:
        pfs.writeback.kick()
    return count
