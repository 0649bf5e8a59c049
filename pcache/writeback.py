"""Checkpoint write-back: stage locally with fsync, upload in the background, flush and commit.

``close()`` of a :class:`WriteBackFile` returns once the bytes are fsynced in ``cache_dir`` and the
journal entry is durable; a background uploader process then sends them to the origin. Staged files are
outside the block index, so eviction can never touch data that is not yet at the origin.

Staged (dirty) bytes have first claim on the disk budget ``disk_bytes``: before a chunk is staged,
clean blocks are evicted to make room for it, and if the file system fills up anyway, more clean
blocks are evicted and the write is retried. :class:`CacheFullError` is raised only when dirty data
alone fills the budget, or the file system has no clean block left to give.
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict
from typing import Any

from lingcore.checksum import content_hasher
from lingcore.files import fsync_dir, put_whole, unlink_quiet, write_all
from lingcore.log import get_logger
from lingcore.marker import MARKER_NAME, build_marker
from lingcore.retry import RetryPolicy, retry_call
from pcache.config import CacheConfig
from pcache.diskstore import DiskStore
from pcache.errors import CacheFullError, UploadError
from pcache.journal import Journal, options_fingerprint, split_secrets
from pcache.streaming import StreamUpload, start_stream

log = get_logger(__name__)

_BUFFER = 8 * 1024 * 1024
MARKER = MARKER_NAME


class WriteBackFile(io.RawIOBase):
    """A write-only file staged in ``cache_dir``; ``close()`` makes it durable locally and queues it.

    Use :meth:`discard` (or leave a ``with`` block by an exception) to drop it without uploading.
    ``replicator(entry, data_path)``, when given, stores the closed file on a peer before ``close()``
    returns and returns what the journal entry records about it (see :mod:`pcache.cluster.replica`).
    """

    def __init__(self, manager: WriteBack, url: str, protocol: str, path: str, options: dict[str, Any],
                 on_close: Any = None, replicator: Any = None) -> None:
        super().__init__()
        self._fd, self._size = -1, 0  # set first: __del__ must work even if os.open below fails
        self._stream: StreamUpload | None = None  # parts sent while writing (pcache.streaming)
        self._reserved = 0  # bytes of the disk budget this file has claimed (see WriteBack.reserve)
        self._staged = 0  # bytes in the staged file so far
        self.manager, self.url, self.protocol, self.path = manager, url, protocol, path
        self.options = options
        self.on_close = on_close
        self.replicator = replicator
        self.upload_id = uuid.uuid4().hex
        self._tmp = os.path.join(manager.journal.dir, f"{self.upload_id}.tmp")
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._buf = bytearray()
        self._hasher = content_hasher()
        self._size = 0
        # Start the uploader now, so its start-up (a Python process importing s3fs) overlaps the write.
        public, secret = split_secrets(options)
        self._stream = start_stream(manager.config, manager.journal, {
            "id": self.upload_id, "url": url, "protocol": protocol, "path": path, "options": public,
        }, self._tmp, options, replicated=replicator is not None)
        manager.remember_secret(protocol, public, secret)
        manager.kick()

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._size

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError(f"write to closed file {self.url}")
        view = memoryview(data).cast("B")
        self._hasher.update(view)
        self._size += len(view)
        if len(self._buf) + len(view) < _BUFFER:
            self._buf += view
            return len(view)
        try:
            self._stage(self._buf)
            self._buf = bytearray()
            self._stage(view)
        except OSError as exc:
            self._fail(exc)
        return len(view)

    def _stage(self, data: Any) -> None:
        """Append ``data`` to the staged file, after claiming room for it in the disk budget.

        If the file system is full all the same (other processes, or a disk smaller than the budget),
        clean blocks are evicted and the write retried, until no clean block is left.
        """
        view = memoryview(data).cast("B")
        if not view:
            return
        self.manager.reserve(self.url, len(view))
        self._reserved += len(view)
        while True:
            try:
                write_all(self._fd, view)
                break
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                os.ftruncate(self._fd, self._staged)  # drop a partial write before trying again
                os.lseek(self._fd, self._staged, os.SEEK_SET)
                if self.manager.free_space(len(view), self.url) == 0:
                    raise
        self._staged += len(view)
        if self._stream is not None:
            self._stream.staged(self._staged)

    def _fail(self, exc: OSError) -> None:
        """Drop the staged file and raise; a full disk becomes :class:`CacheFullError` naming the URL."""
        self.discard()
        if isinstance(exc, CacheFullError):
            raise exc
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheFullError(self.url, str(exc)) from exc
        raise exc

    def _release(self) -> None:
        self.manager.release(self._reserved)
        self._reserved = 0

    def discard(self) -> None:
        """Drop the staged bytes; nothing is uploaded (a streamed upload is aborted)."""
        if self._stream is not None:
            stream, self._stream = self._stream, None
            stream.abort()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        unlink_quiet(self._tmp)
        self._release()
        super().close()

    def __del__(self) -> None:
        # io.IOBase.__del__ would close() -- i.e. commit and upload -- a file its writer abandoned
        # (a save that crashed without a with-block). Never publish a partial checkpoint.
        if not self.closed:
            log.warning("write-back file %s was never closed; discarding %d staged bytes", self.url, self._size)
            self.discard()

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is not None:
            self.discard()
        else:
            self.close()

    def close(self) -> None:
        """fsync locally, record durably in the journal, start the upload, and return."""
        if self.closed:
            return
        try:
            self._stage(self._buf)
            self._buf = bytearray()
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.replace(self._tmp, self.manager.journal.data_path(self.upload_id))
            fsync_dir(self.manager.journal.dir)
        except OSError as exc:
            self._fail(exc)
        public, _ = split_secrets(self.options)
        entry = {
            "id": self.upload_id, "url": self.url, "protocol": self.protocol, "path": self.path,
            "options": public, "size": self._size, "xxh3_128": self._hasher.hexdigest(),
            "created": time.time(), "attempts": 0,
        }
        try:
            if self.replicator is not None:
                # Before the journal entry: the uploader must never finish (and drop the replica) before
                # the replica exists.
                entry["replica"] = self.replicator(entry, self.manager.journal.data_path(self.upload_id))
        finally:
            # The journal entry takes over this file's claim on the disk budget (as pending bytes).
            # Released just before, so no moment counts the file twice and refuses another write.
            self._release()
        self.manager.journal.add(entry)
        if self._stream is not None:  # the stream sends the rest, records it; the uploader completes
            stream, self._stream = self._stream, None
            stream.hand_over(self.upload_id, self._size)
        super().close()
        self.manager.kick()
        if self.on_close is not None:
            self.on_close()


class WriteBack:
    """Staging, background upload and durability waits for one ``cache_dir`` in one process."""

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.journal = Journal(config.cache_dir)
        self._secrets: dict[str, dict[str, Any]] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._proc_secrets: set[str] = set()
        self._lock = threading.Lock()
        self._disk: DiskStore | None = None
        self._staging = 0  # bytes claimed by files this process is still writing (not yet journaled)
        self._staging_lock = threading.Lock()

    @property
    def disk(self) -> DiskStore:
        """The disk tier of the directory, whose budget staged files share with clean blocks."""
        with self._staging_lock:
            if self._disk is None:
                c = self.config
                self._disk = DiskStore(c.cache_dir, c.disk_bytes, c.compression, c.zstd_level,
                                       reserved=self.journal.pending_bytes, direct_writes=c.direct_writes)
            return self._disk

    def reserved_bytes(self) -> int:
        """Disk budget held by dirty data: journaled uploads plus files this process is still writing.

        Readers' block writes evict against this, so a long checkpoint write keeps its room between
        chunks instead of clean blocks refilling it.
        """
        with self._staging_lock:
            staging = self._staging
        return int(self.journal.pending_bytes()) + staging

    def reserve(self, url: str, nbytes: int) -> None:
        """Claim ``nbytes`` of the disk budget for bytes about to be staged for ``url``.

        Clean blocks are evicted to make room. Bytes of files still being written in other processes
        are not known here; if they fill the file system, :meth:`free_space` evicts more.

        Raises:
            CacheFullError: naming ``url``, when dirty data (journaled plus being written in this
                process) would exceed ``disk_bytes``.
        """
        disk = self.disk
        with self._staging_lock:
            self._staging += nbytes
            staging = self._staging
        try:
            disk.make_room(staging, url)
        except BaseException:
            self.release(nbytes)
            raise

    def release(self, nbytes: int) -> None:
        """Give back a claim made with :meth:`reserve` (the file was journaled or discarded)."""
        with self._staging_lock:
            self._staging = max(0, self._staging - nbytes)

    def free_space(self, nbytes: int, url: str) -> int:
        """The file system is full under a write to ``url``: evict clean blocks; return bytes freed."""
        freed = self.disk.free_space(max(nbytes, 1 << 20), url)
        if freed:
            log.info("evicted %d bytes of clean cache blocks to stage %s", freed, url, extra={"url": url})
        return freed

    def close(self) -> None:
        """Record the disk tier's batched hits; its LMDB handle is closed with the others of the directory."""
        with self._staging_lock:
            disk, self._disk = self._disk, None
        if disk is not None:
            disk.close()

    def forget_after_fork(self) -> None:
        """In a forked child: forget the parent's uploader process (the child spawns its own if needed)."""
        self._proc = None
        self._disk = None  # its LMDB handle and locks belong to the parent

    def remember_secret(self, protocol: str, public: dict[str, Any], secret: dict[str, Any]) -> None:
        """Keep credentials in memory only, for the uploader process this one spawns."""
        if secret:
            self._secrets[options_fingerprint(protocol, public)] = secret

    def kick(self) -> None:
        """Make sure an uploader process is running with every credential this process knows."""
        with self._lock:
            alive = self._proc is not None and self._proc.poll() is None
            if alive and set(self._secrets) <= self._proc_secrets:
                return
            log_path = os.path.join(self.config.cache_dir, "uploader.log")
            # Owner-only: at DEBUG level botocore logs request headers.
            with open(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log_fh:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "pcache.uploader", "--stdin-json"], stdin=subprocess.PIPE,
                    stdout=log_fh, stderr=log_fh, close_fds=True,
                )
            assert proc.stdin is not None
            # Credentials travel over a pipe, never argv, env files or the journal.
            proc.stdin.write(json.dumps({"config": asdict(self.config), "secrets": self._secrets}).encode())
            proc.stdin.close()
            self._proc, self._proc_secrets = proc, set(self._secrets)

    def wait(self, prefix: str | None = None, timeout: float | None = None, max_failed_runs: int = 3) -> None:
        """Block until nothing under ``prefix`` is pending (durable at the origin).

        A failed uploader run (origin down, say) is restarted; after ``max_failed_runs`` consecutive
        failed runs the last error is raised. Staged files stay journaled either way.

        Raises:
            TimeoutError: if ``timeout`` passes first, naming how many files are still pending.
            UploadError: if uploads kept failing, naming the URL and the last error.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        failed_runs = 0
        while True:
            pending = self.journal.pending(prefix)
            if not pending:
                return
            with self._lock:
                proc = self._proc
            code = proc.poll() if proc is not None else 0
            if proc is None or code is not None:
                failed_runs = failed_runs + 1 if code not in (0, None) else 0
                if failed_runs >= max_failed_runs:
                    failed = next((e for e in pending if e.get("last_error")), pending[0])
                    raise UploadError(failed["url"], failed.get("last_error") or f"uploader exited {code}")
                with self._lock:
                    self._proc = None
                self.kick()
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{len(pending)} file(s) under {prefix or 'the cache'} still pending upload "
                                   f"after {timeout}s, e.g. {pending[0]['url']}")
            time.sleep(0.05)

    def commit(self, prefix: str, fs: Any, path_prefix: str, timeout: float | None = None,
               others: list[WriteBack] | None = None) -> str:
        """Write ``<prefix>/_COMMITTED`` once every file under ``prefix`` is durable; return its URL.

        Waits on this manager and on ``others`` (every cache directory of the process), so a file staged
        in any of them keeps the marker back. Files staged on *other nodes* are not visible here: a
        multi-node checkpoint needs a barrier (every rank flushed) before one rank commits.

        The marker is a JSON manifest of the prefix at the origin (path, size, ETag, and the xxh3-128
        of every file uploaded through this cache).
        """
        managers = [self, *(m for m in (others or []) if m is not self)]
        for manager in managers:
            manager.wait(prefix, timeout)
        for manager in managers:  # re-check: never write a marker over pending data
            if manager.journal.pending(prefix):
                raise UploadError(prefix, f"files still pending under it in {manager.config.cache_dir}")
        hashes: dict[str, dict[str, Any]] = {}
        for manager in managers:
            hashes.update(manager.journal.done(prefix))
        policy = RetryPolicy(attempts=self.config.retry_attempts, base_delay=self.config.retry_base_delay)
        base = path_prefix.rstrip("/")
        fs.invalidate_cache(base)
        listing = retry_call(lambda: fs.find(base, detail=True), url=prefix, policy=policy)
        files = []
        for name, info in sorted(listing.items()):
            rel = name[len(base):].lstrip("/")
            if rel == MARKER:
                continue
            rec = hashes.get(f"{prefix.rstrip('/')}/{rel}", {})
            etag = str(info.get("ETag", "")).strip('"')
            # The journal remembers the last upload of this URL *from this node*: its hash describes the
            # object only if the object is still that upload (same size, and same ETag where there is one).
            same = rec.get("size") == info.get("size") and (not etag or not rec.get("etag")
                                                            or str(rec["etag"]).strip('"') == etag)
            files.append({"path": rel, "size": info.get("size"), "etag": etag,
                          "xxh3_128": rec.get("xxh3_128") if same else None})
        marker = build_marker(prefix, files)
        marker_path = f"{base}/{MARKER}"
        retry_call(lambda: put_whole(fs, marker_path, marker), url=f"{prefix.rstrip('/')}/{MARKER}", policy=policy)
        return f"{prefix.rstrip('/')}/{MARKER}"

    def is_pending(self, url: str) -> bool:
        """True while a write of ``url`` is staged and not yet durable at the origin."""
        return self.journal.pending_for_url(url) is not None

    def staged_path(self, url: str) -> str | None:
        """Local path of the newest pending copy of ``url``, or None if it is not pending."""
        entry = self.journal.pending_for_url(url)
        return self.journal.data_path(entry["id"]) if entry else None

    def staged_under(self, prefix: str) -> dict[str, int]:
        """``{target path: size}`` of the newest pending copy of every file at or under the URL ``prefix``.

        One pass over the journal (not one lookup per file): listings call it on every ``ls``/``find``.
        """
        pending = self.journal.pending(prefix)
        if not pending:
            return {}
        newest = {entry["url"]: entry for entry in pending}  # oldest first: the newest write wins
        done = dict(self.journal.done(prefix))
        out: dict[str, int] = {}
        for url, entry in newest.items():
            if done.get(url, {}).get("created", -1.0) >= entry["created"]:
                continue  # a newer write of this URL is already uploaded
            try:
                out[entry["path"]] = os.path.getsize(self.journal.data_path(entry["id"]))
            except FileNotFoundError:
                continue  # uploaded meanwhile
        return out
