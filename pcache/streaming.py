"""Streaming upload: send whole multipart parts of a write-back file while it is still being written.

Without it, a file reaches the origin only after ``close()``: stage, fsync, journal, then the background
uploader sends every byte. With it (``stream_uploads = true``, S3 origins, files larger than one part), a
:class:`StreamUpload` in the writer's process creates the multipart upload as soon as one full part is
staged and sends each full part from the staged file in background threads while the writer goes on.
``close()`` still returns once the file is durable locally; the stream then sends the remaining parts
(the tail included) in the background, records the upload id and its parts in the file's journal entry,
and hands over: the background uploader completes the upload under the usual per-URL ordering rules
(see :meth:`pcache.uploader.Uploader.upload_one`), exactly as it completes an upload of its own.

Why the stream, not the uploader, sends the parts left at ``close()``: handing over at ``close()`` would
leave the origin idle while the parts in flight finish (up to ``upload_concurrency`` parts), and measured
on a loaded machine that gap ate the whole gain. The parts are sent by an event-loop thread of the
stream's own, niced like the uploader process (:func:`_stream_loop`), whose hashing and socket work
release the GIL.

Correctness rests on three things:

- **An intent before the create.** The stream journals its multipart intent before
  CreateMultipartUpload leaves (:func:`pcache.multipart.create_upload`), so a writer killed at any point
  leaves a record, and the next ``pcache flush``/``gc`` aborts every upload of the key.
- **A live stream is never swept.** The stream holds an exclusive ``flock`` on its staged file from
  start to hand-over. Uploaders treat a URL with a live stream as busy (:func:`stream_live`): they
  neither sweep its uploads nor upload an older write of it. A killed writer's ``flock`` is gone with
  it, so its upload becomes an ordinary orphan. The intent is journaled under the URL's stripe lock, so
  an uploader that checked for live streams finishes its sweep before a new stream can create an upload.
- **Falling back is always safe.** Any error while streaming (after :func:`lingcore.retry.retry_call`
  has retried it) only stops the stream: nothing is recorded, the uploader's sweep aborts the upload,
  and the complete staged file is uploaded as if streaming were off. ``discard()`` aborts the upload.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import threading
import time
import weakref
from contextlib import suppress
from typing import Any

from lingcore.log import get_logger
from lingcore.retry import RetryPolicy
from pcache.config import CacheConfig
from pcache.journal import Journal, options_fingerprint
from pcache.locks import url_lock_key, url_locks
from pcache.multipart import abort_upload, create_upload, upload_part
from pcache.targets import build_target_fs

log = get_logger(__name__)

_FS: dict[tuple[int, str], Any] = {}  # origin filesystems of this process, by (pid, target)
_FS_LOCK = threading.Lock()
_LOOPS: dict[int, asyncio.AbstractEventLoop] = {}  # by pid: a forked child starts its own
_LOOP_LOCK = threading.Lock()
_LIVE: weakref.WeakSet[StreamUpload] = weakref.WeakSet()
# A stream's multipart intent has its own id (the entry id plus this), so that the uploader's own
# intent for the same entry (a fallback after the stream failed, or after the entry was renamed) can
# never overwrite it and orphan the stream's upload.
INTENT_SUFFIX = "-stream"


def _stream_loop(nice: int) -> asyncio.AbstractEventLoop:
    """This process's event loop for stream parts, on a thread of its own at the uploader's niceness.

    The parts' CPU (request signing and checksums, in the event loop) used to be the uploader process's,
    which runs niced so that training steps come first; sent from the writer's process on fsspec's shared
    loop, it slowed the steps of a training job (measured: 1.78x the step time while a persist ran, 1.23x
    without streaming). Linux keeps a niceness per thread, so this thread alone yields.
    """
    with _LOOP_LOCK:
        loop = _LOOPS.get(os.getpid())
        if loop is None:
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                if nice:
                    with suppress(OSError):  # a platform without per-thread niceness: run at normal priority
                        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(
                            os.PRIO_PROCESS, threading.get_native_id()) + nice)
                asyncio.set_event_loop(loop)
                ready.set()
                loop.run_forever()

            threading.Thread(target=run, name="pcache-stream-io", daemon=True).start()
            ready.wait()
            _LOOPS[os.getpid()] = loop
        return loop


def _origin_fs(protocol: str, options: dict[str, Any], nice: int) -> Any:
    """This process's s3fs instance for a target (built like the uploader's: one retry layer, ours),
    running on :func:`_stream_loop`."""
    key = (os.getpid(), options_fingerprint(protocol, options))  # in memory only: secrets may be in it
    with _FS_LOCK:
        if key not in _FS:
            _FS[key] = build_target_fs(protocol, {**options, "loop": _stream_loop(nice)}, skip_instance_cache=True)
        return _FS[key]


def start_stream(config: CacheConfig, journal: Journal, entry: dict[str, Any], staged_path: str,
                 options: dict[str, Any], replicated: bool) -> StreamUpload | None:
    """A :class:`StreamUpload` for a file being staged at ``staged_path``, or None where streaming is off.

    Off for non-S3 origins (``file://`` and friends are copied whole after ``close()``), when
    ``stream_uploads`` is false, and with ``replicas=1`` (the peer copy is made at ``close()``, and replica
    adoption compares the object's ``pcache-created`` time with the write's close time, which a stream
    cannot know when it creates the upload).
    """
    if not config.stream_uploads or replicated or entry["protocol"] not in ("s3", "s3a"):
        return None
    try:
        return StreamUpload(config, journal, entry, staged_path, _origin_fs(entry["protocol"], options,
                                                                               config.uploader_nice))
    except Exception as exc:  # noqa: BLE001 - streaming is an optimisation: the file is uploaded after close
        log.warning("streaming upload of %s not started: %s", entry["url"], exc, extra={"url": entry["url"]})
        return None


def stream_live(journal: Journal, url: str) -> bool:
    """True while a writer is streaming an upload of ``url`` (its staged file's ``flock`` is held)."""
    for intent in journal.multipart_intents(url):
        if not intent["id"].endswith(INTENT_SUFFIX):
            continue
        staged = intent["id"].removesuffix(INTENT_SUFFIX)
        for ext in ("tmp", "data"):  # renamed from .tmp to .data at close(): look in that order
            try:
                fd = os.open(os.path.join(journal.dir, f"{staged}.{ext}"), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            finally:
                os.close(fd)  # drops the shared lock, if taken
            break
    return False


class StreamUpload:
    """The streaming multipart upload of one write-back file (used by :class:`pcache.writeback.WriteBackFile`).

    The writer calls :meth:`staged` after each append, then :meth:`hand_over` with the final size once
    the file's journal entry is durable, or :meth:`abort` when the file is discarded.
    """

    def __init__(self, config: CacheConfig, journal: Journal, entry: dict[str, Any], staged_path: str,
                 fs: Any) -> None:
        self.journal, self.fs, self.url = journal, fs, entry["url"]
        self.entry = {k: entry[k] for k in ("url", "protocol", "path", "options")}
        self.entry["id"] = entry["id"] + INTENT_SUFFIX  # the intent's id, not the entry's
        self.part_size = config.upload_part_size
        self.policy = RetryPolicy(attempts=config.retry_attempts, base_delay=config.retry_base_delay)
        self._n_workers = config.upload_concurrency
        # The flock says "this stream is live" to every uploader (see stream_live); the same descriptor
        # reads the parts back, and keeps working after close() renames the staged file.
        self._staged_path = staged_path
        self._fd = os.open(staged_path, os.O_RDONLY | os.O_CLOEXEC)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._cond = threading.Condition()
        self._ready = 0  # parts 1.._ready are wholly staged
        self._final = 0  # once closed: the file's size (its last part may be short)
        self._next = 1  # the next part a worker takes
        self._parts: dict[int, dict[str, Any]] = {}
        self._stopped = False  # no new parts (discarded or failed)
        self._failed: BaseException | None = None
        self._upload_id: str | None = None
        self._registered = False  # the intent is journaled
        self._create_sent = False  # CreateMultipartUpload went out: an upload of ours may exist at the origin
        self._creates = 0
        self._create_lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        _LIVE.add(self)

    # -- called by the writer ---------------------------------------------------------------------
    def staged(self, nbytes: int) -> None:
        """The staged file now holds ``nbytes``: queue the parts that are complete (never blocks).

        Nothing starts until the file is known to exceed one part: a file of at most one part keeps the
        simple put path.
        """
        ready = nbytes // self.part_size if nbytes > self.part_size else 0
        if ready > self._ready:
            self._more(ready)

    def _more(self, ready: int, final: int = 0) -> None:
        with self._cond:
            if self._stopped:
                return
            self._ready, self._final = ready, final
            self._cond.notify_all()
            while len(self._workers) < min(self._n_workers, ready - self._next + 1):
                worker = threading.Thread(target=self._work, name=f"pcache-stream-{len(self._workers)}",
                                          daemon=True)
                self._workers.append(worker)
                worker.start()

    def hand_over(self, entry_id: str, size: int) -> None:
        """``close()`` journaled the file (``size`` bytes): send the remaining parts in the background,
        record them in the entry ``entry_id``, and let the uploader complete it (returns at once)."""
        if self._ready:  # a file of at most one part never started: the uploader puts it whole
            self._more(-(-size // self.part_size), final=size)
        else:
            self._stop()
        threading.Thread(target=self._hand_over, args=(entry_id,), name="pcache-stream-handover",
                         daemon=True).start()

    def abort(self) -> None:
        """The file is discarded: stop, abort the upload at the origin, and release the stream.

        Waits for the parts in flight (bounded by the retry policy and socket timeouts). If the abort
        fails, the intent stays and the next ``pcache flush``/``gc`` aborts the upload.
        """
        self._stop()
        self._join()
        try:
            if self._upload_id is not None:
                abort_upload(self.fs, self.entry["path"], self._upload_id, self.url, self.policy)
                if self._creates == 1:
                    self.journal.end_multipart([self.entry["id"]])
            elif self._registered and not self._create_sent:
                self.journal.end_multipart([self.entry["id"]])  # stopped before the create was sent
        except Exception as exc:  # noqa: BLE001 - the intent stays; flush or gc aborts the upload later
            log.warning("streamed upload of discarded %s not aborted (flush/gc will): %s", self.url, exc,
                        extra={"url": self.url})
        finally:
            self._release()

    # -- background work --------------------------------------------------------------------------
    def _stop(self, failure: BaseException | None = None) -> None:
        with self._cond:
            self._stopped = True
            if failure is not None and self._failed is None:
                self._failed = failure
            self._cond.notify_all()

    def _join(self) -> None:
        for worker in list(self._workers):
            worker.join()

    def _release(self) -> None:
        _LIVE.discard(self)
        if self._fd >= 0:
            os.close(self._fd)  # drops the flock: uploaders may now take this URL
            self._fd = -1

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and self._next > self._ready:
                    if self._final:
                        return  # every part is taken
                    self._cond.wait()
                if self._stopped:
                    return
                number = self._next
                self._next += 1
            try:
                upload_id = self._create()
                if upload_id is None:
                    return
                offset = (number - 1) * self.part_size
                body = os.pread(self._fd, self.part_size, offset)
                if len(body) != (min(self.part_size, self._final - offset) if self._final else self.part_size):
                    raise OSError(errno.EIO, f"staged file of {self.url} is short at part {number}")
                part = upload_part(self.fs, self.entry["path"], upload_id, number, body, self.url, self.policy)
            except Exception as exc:  # noqa: BLE001 - the uploader sends the whole file after close()
                log.warning("streaming upload of %s stopped (the file is uploaded after close): %s", self.url,
                            exc, extra={"url": self.url})
                self._stop(exc)
                return
            with self._cond:
                self._parts[number] = part

    def _create(self) -> str | None:
        """Create the upload once (the first worker does; the others wait); None when stopped first."""
        with self._create_lock:
            if self._upload_id is None and not self._registered:
                if not self._register():
                    return None
                self._create_sent = True
                self._upload_id, self._creates = create_upload(self.fs, self.journal, self.entry, time.time(),
                                                               self.policy)
            return self._upload_id

    def _register(self) -> bool:
        """Journal the intent under the URL's stripe lock (see the module docstring); False if stopped."""
        locks = url_locks(self.journal.dir)
        while True:
            lock = locks.try_acquire(url_lock_key(self.url))
            if lock is not None:
                break
            with self._cond:  # an uploader is sending this URL (or one on the same stripe): wait
                if self._stopped:
                    return False
                self._cond.wait(0.05)
        try:
            if not os.path.exists(self._staged_path) and self.journal.get(self.entry["id"]) is None:
                # close() renamed the staged file and no entry is pending: the uploader sent it whole
                # while this stream waited for the lock (or close() is between its rename and its
                # journal entry): either way the uploader sends it, and a stream could orphan its upload.
                self._stop()
                return False
            # create_upload journals the intent itself; doing it here, under the lock, is what orders
            # it after any sweep in progress. The create request then goes out without the lock.
            self.journal.begin_multipart(self.entry)
            self._registered = True
        finally:
            locks.release(lock)
        return True

    def _hand_over(self, entry_id: str) -> None:
        self._join()
        try:
            complete = self._final and len(self._parts) == self._ready
            if self._upload_id is not None and self._failed is None and complete:
                parts = [self._parts[n] for n in sorted(self._parts)]
                self.journal.update(entry_id, stream={"upload_id": self._upload_id, "part_size": self.part_size,
                                                      "parts": parts, "creates": self._creates,
                                                      "path": self.entry["path"], "intent": self.entry["id"]})
                log.info("streamed all %d parts of %s; the uploader completes it", len(parts), self.url,
                         extra={"url": self.url})
            elif self._registered and not self._create_sent:
                self.journal.end_multipart([self.entry["id"]])
            # Otherwise (failed, or never started): the intent stays, the uploader's sweep aborts the
            # upload and the staged file is uploaded whole.
        except Exception as exc:  # noqa: BLE001 - same fallback
            log.warning("streamed upload of %s not handed over (uploaded whole instead): %s", self.url, exc,
                        extra={"url": self.url})
        finally:
            self._release()


def _forget_streams_after_fork() -> None:
    """In a forked child: close the inherited stream descriptors, whose flocks would keep streams
    "live" for as long as the child runs (the parent's threads do not exist here)."""
    for stream in list(_LIVE):
        with suppress(OSError):
            if stream._fd >= 0:
                os.close(stream._fd)
        stream._fd = -1
    _LIVE.clear()
    _FS.clear()
    global _LOOP_LOCK
    _LOOP_LOCK = threading.Lock()  # the parent's loop thread is not here; _LOOPS is by pid


os.register_at_fork(after_in_child=_forget_streams_after_fork)
