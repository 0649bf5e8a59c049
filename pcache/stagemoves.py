"""Renames and deletes of files written through pcache's write-back, before or after their upload.

Races with the uploader are settled by the uploader's own per-URL lock (an ``flock`` stripe in the
journal directory, :attr:`pcache.uploader.Uploader.url_locks`): an uploader re-reads its journal entry
after taking the lock, so it uploads the entry's current name, and a rename that takes the locks of
both names first never overlaps an upload of either. See :mod:`pcache.staging` for the contract.
"""

from __future__ import annotations

import contextlib
import errno
import time
from typing import TYPE_CHECKING

from lingcore.files import unlink_quiet
from lingcore.log import get_logger
from lingcore.retry import retry_call
from pcache.journal import split_secrets
from pcache.locks import StripeLocks, url_lock_key, url_locks

if TYPE_CHECKING:
    from pcache.fs import PCacheFileSystem
    from pcache.writeback import WriteBack

log = get_logger(__name__)

# -- renames and deletes of written files ------------------------------------------------------------
def _lock_urls(manager: WriteBack, urls: list[str], deadline: float) -> tuple[StripeLocks, list[int]]:
    """Take the uploader's lock of every URL (distinct stripes once), waiting while an upload runs."""
    locks = url_locks(manager.journal.dir)  # the uploader's own
    keys = {locks.stripe(url_lock_key(u)): url_lock_key(u) for u in urls}
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
