"""Single-flight: one origin fetch per block, across threads and across processes.

Within a process, concurrent misses on a key wait on one :class:`~concurrent.futures.Future`. Across
processes that share a ``cache_dir``, the fetching thread also holds an exclusive ``flock`` on one of
a fixed set of stripe files, so another process that misses the same block waits and then finds it
published. A fixed stripe count keeps the lock directory small; an unrelated block that hashes to the
same stripe only waits for one fetch.

:func:`exclusive_lock` is the same ``flock`` on one named file, for rare whole-directory work such as
rebuilding a damaged index.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from typing import TypeVar

import xxhash

T = TypeVar("T")


# Every descriptor that holds (or is about to hold) a flock, in any StripeLocks or exclusive_lock of this
# process. A flock belongs to the open file description, which a forked child shares: a child that kept
# such a descriptor would hold the lock for its whole life (a DataLoader worker: the epoch), and a
# thread of its own that then asks for the same stripe waits forever. So the child closes them all.
# ``_FDS_LOCK`` is held across fork (see _before_fork), and every "open and register" and "unregister
# and close" runs under it, so no descriptor is ever open but unregistered when a fork happens.
_HELD_FDS: set[int] = set()
_FDS_LOCK = threading.Lock()


def _open_registered(path: str) -> int:
    with _FDS_LOCK:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        _HELD_FDS.add(fd)
    return fd


def _close_registered(fd: int) -> None:
    with _FDS_LOCK:
        _HELD_FDS.discard(fd)
        os.close(fd)  # closing the descriptor drops the flock


def _before_fork() -> None:
    _FDS_LOCK.acquire()


def _after_fork_in_parent() -> None:
    _FDS_LOCK.release()


def _after_fork_in_child() -> None:
    global _FDS_LOCK
    for fd in _HELD_FDS:
        with suppress(OSError):
            os.close(fd)  # the child's copy only: the parent keeps its lock
    _HELD_FDS.clear()
    _FDS_LOCK = threading.Lock()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


class StripeLocks:
    """Cross-process exclusive locks on ``n_stripes`` files in ``lock_dir``.

    Locks held by the parent at a fork are not held by the child (see ``_HELD_FDS``).
    """

    def __init__(self, lock_dir: str, n_stripes: int = 1024) -> None:
        self.lock_dir = lock_dir
        self.n_stripes = n_stripes
        os.makedirs(lock_dir, exist_ok=True)

    def stripe(self, key: bytes) -> int:
        """The stripe (lock file number) ``key`` maps to: two keys on one stripe share a lock."""
        return int.from_bytes(key[:4], "little") % self.n_stripes

    def _open(self, key: bytes) -> int:
        return _open_registered(os.path.join(self.lock_dir, f"{self.stripe(key):04x}"))

    def acquire(self, key: bytes) -> int:
        """Take the stripe lock for ``key`` (blocking); return the descriptor to pass to :meth:`release`."""
        fd = self._open(key)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            _close_registered(fd)
            raise
        return fd

    def try_acquire(self, key: bytes) -> int | None:
        """Take the stripe lock for ``key`` if it is free; return its descriptor, or None if held."""
        fd = self._open(key)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _close_registered(fd)
            return None
        return fd

    def release(self, fd: int) -> None:
        """Release a lock taken with :meth:`acquire` (closing the descriptor drops the flock)."""
        _close_registered(fd)

    def forget_after_fork(self) -> None:
        """Nothing left to do: the fork handler of this module closed the child's copies already."""


def url_locks(journal_dir: str) -> StripeLocks:
    """The per-URL locks of a write-back journal: the uploader holds one while it uploads a URL, and a
    rename of a staged file holds those of both names (so it never races an upload)."""
    return StripeLocks(os.path.join(journal_dir, "locks"), n_stripes=256)


def url_lock_key(url: str) -> bytes:
    """The key of ``url`` in :func:`url_locks`."""
    return xxhash.xxh3_64_digest(url.encode())


@contextmanager
def exclusive_lock(path: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) across processes, blocking until free.

    Like the stripe files, the lock file is never unlinked: two processes could otherwise lock two
    different inodes of "the same" lock. A child forked while the lock is held closes its copy.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = _open_registered(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        _close_registered(fd)


class SingleFlight:
    """Coalesces concurrent calls for the same key within a process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # key -> (the owner's future, how many other callers wait on it)
        self._inflight: dict[bytes, tuple[Future[bytes], list[int]]] = {}

    def in_flight(self, key: bytes) -> bool:
        """Return True if some thread is already producing ``key``."""
        return key in self._inflight

    def run(self, key: bytes, producer: Callable[[], bytes]) -> bytes:
        """Return ``producer()``; concurrent callers with the same key share one call and its result."""
        result = self._run(key, producer, None)
        assert result is not None
        return result

    def run_into(self, key: bytes, producer: Callable[[], None], share: Callable[[], bytes]) -> bytes | None:
        """Like :meth:`run` for a producer that fills its caller's own buffer.

        The owner gets None (its buffer holds the value). Callers that waited on it get ``share()``,
        made once and only if some caller waited; a caller that finds another owner gets that owner's
        value, as with :meth:`run`.
        """
        return self._run(key, producer, share)

    def _run(self, key: bytes, producer: Callable[[], bytes | None],
             share: Callable[[], bytes] | None) -> bytes | None:
        with self._lock:
            entry = self._inflight.get(key)
            if entry is not None:
                entry[1][0] += 1
            else:
                fut, waiting = self._inflight[key] = (Future(), [0])
        if entry is not None:
            return entry[0].result()
        try:
            value = producer()
        except BaseException as exc:
            with self._lock:
                self._inflight.pop(key, None)
            fut.set_exception(exc)
            raise
        with self._lock:
            self._inflight.pop(key, None)  # later callers start afresh; the ones counted wait on fut
            waiters = waiting[0]
        if share is None:
            assert value is not None
            fut.set_result(value)
            return value
        try:
            fut.set_result(share() if waiters else b"")
        except BaseException as exc:
            fut.set_exception(exc)
        return None
