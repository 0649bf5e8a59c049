"""The disk tier's LMDB index, and its recovery when damaged.

The index (``cache_dir/index``) only records what the block files already say, for accounting and
eviction; it skips fsync. So a damaged index is never a reason to fail: it is moved aside and rebuilt
from the block files. Damage shows in two ways. Either LMDB cannot open the files, or they open and
transactions then fail (``MDB_CORRUPTED``, ``MDB_PAGE_NOTFOUND``, ``MDB_BAD_TXN`` and the like). The
second way used to leave every insert failing, so nothing was cached any more.

Many processes share one index: DataLoader workers, the fusefs daemon, the trainer. A rebuild runs
under an exclusive ``flock`` on ``locks/index.lock``. Under that lock, the process that still finds
the damaged files in place (the same inode) moves them to ``index.corrupt-<time>-<pid>``, opens a fresh
index and adopts every block file. Any other process that noticed at the same time finds new files
once it gets the lock, and switches to them. Processes that noticed nothing switch before their next
transaction, because every transaction first checks the index file's inode (one ``stat``). A process
rebuilds at most once per damaged index: if an index it has just rebuilt fails as well, the error is
raised as :class:`~pcache.errors.CacheIndexError`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import lmdb

from lingcore.lmdb_env import env_identity, open_env, transaction
from lingcore.log import get_logger
from pcache.errors import CacheIndexError
from pcache.eviction import S3Fifo
from pcache.locks import exclusive_lock

log = get_logger(__name__)

T = TypeVar("T")

# Errors in a transaction that mean the files are damaged, not that the disk is full or a limit was
# reached. (pcache never uses a transaction again after one of its calls failed, so MDB_BAD_TXN can only
# come from LMDB itself giving up on damaged pages.)
DAMAGED: tuple[type[lmdb.Error], ...] = (
    lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.BadTxnError, lmdb.InvalidError, lmdb.PanicError,
    lmdb.IncompatibleError, lmdb.VersionMismatchError,
)
# Errors opening the index that say nothing about its files: those are raised, never "repaired".
_ENVIRONMENTAL: tuple[type[lmdb.Error], ...] = (
    lmdb.ReadonlyError, lmdb.LockError, lmdb.ReadersFullError, lmdb.DiskError, lmdb.MapFullError,
    lmdb.TlsFullError, lmdb.MemoryError,
)
# Not fsynced: the index is a cache of the files. kill -9 is safe; a power loss may undo the last
# transactions, which only leaves unaccounted files for gc (or a damaged index, rebuilt here).
_OPTIONS: dict[str, Any] = {"map_size": 1 << 30, "max_dbs": 8, "sync": False, "metasync": False,
                            "readahead": False, "max_readers": 1024}


class _Binding(NamedTuple):
    """One opened index: its environment, the S3-FIFO tables in it, and its data file's identity."""

    env: Any
    fifo: S3Fifo
    ident: tuple[int, int] | None


class BlockIndex:
    """The shared LMDB index of one ``cache_dir``, as seen by one process.

    Args:
        cache_dir: The cache directory (the index lives in ``index/``).
        adopt: ``adopt(txn, fifo)`` records every block file on disk in a fresh index; returns how
            many it adopted. Called while the rebuild lock is held.
    """

    def __init__(self, cache_dir: str, adopt: Callable[[Any, S3Fifo], int]) -> None:
        self.path = os.path.join(cache_dir, "index")
        self._lock_path = os.path.join(cache_dir, "locks", "index.lock")
        self._adopt = adopt
        self._lock = threading.Lock()
        self._rebuilt: set[tuple[int, int] | None] = set()  # identities of indexes this process built
        with self._lock, exclusive_lock(self._lock_path):
            self._binding = self._open_locked()

    @property
    def env(self) -> Any:
        """The current LMDB environment (it changes after a rebuild)."""
        return self._current().env

    @property
    def fifo(self) -> S3Fifo:
        """The S3-FIFO tables of the current environment."""
        return self._current().fifo

    def run(self, fn: Callable[[Any, S3Fifo], T], write: bool = True) -> T:
        """Return ``fn(txn, fifo)`` run in one transaction; a damaged index is rebuilt and ``fn`` run again.

        ``fn`` may run twice, so it must not consume anything it cannot give back on the second run.

        Raises:
            CacheIndexError: the index failed again after a rebuild, naming the index directory.
            lmdb.Error: other LMDB errors (a full map or disk), for the caller to map.
        """
        for attempt in (1, 2):
            binding = self._current()
            try:
                with transaction(binding.env, write=write) as txn:
                    return fn(txn, binding.fifo)
            except DAMAGED as exc:
                if attempt == 2:
                    raise CacheIndexError(self.path, f"{exc} (after a rebuild)") from exc
                self._recover(binding, exc)
        raise AssertionError("unreachable")

    # -- opening and recovery ---------------------------------------------------------------------
    def _current(self) -> _Binding:
        """Return the binding for the files now at the index path (switching if another process rebuilt)."""
        binding = self._binding
        if env_identity(self.path) == binding.ident:
            return binding
        with self._lock:
            if self._binding is binding:
                with exclusive_lock(self._lock_path):  # a rebuild in progress finishes first
                    self._binding = self._open_locked()
            return self._binding

    def _open_locked(self) -> _Binding:
        """Open the index at the path (the rebuild lock is held); rebuild it if it cannot open."""
        fresh = env_identity(self.path) is None
        try:
            env = open_env(self.path, **_OPTIONS)
            binding = _Binding(env, S3Fifo(env), env_identity(self.path))
        except _ENVIRONMENTAL as exc:
            raise CacheIndexError(self.path, f"cannot open: {exc}") from exc
        except lmdb.Error as exc:  # files LMDB cannot make sense of (a power loss, say)
            return self._rebuild_locked(exc)
        if fresh:  # a new index (first use, or deleted by hand): account for the files already there
            self._adopt_all(binding)
        return binding

    def _recover(self, failed: _Binding, exc: BaseException) -> None:
        """A transaction on ``failed`` hit damage: rebuild the index, unless someone already did."""
        with self._lock:
            if self._binding is not failed:
                return  # another thread of this process has switched already
            with exclusive_lock(self._lock_path):
                if env_identity(self.path) != failed.ident:
                    self._binding = self._open_locked()  # another process rebuilt it meanwhile
                    return
                if failed.ident in self._rebuilt:
                    raise CacheIndexError(self.path, f"{exc} (in the index this process has just rebuilt)")
                self._binding = self._rebuild_locked(exc)

    def _rebuild_locked(self, exc: BaseException) -> _Binding:
        """Move the damaged index aside and build a fresh one from the block files (lock held)."""
        aside = f"{self.path}.corrupt-{int(time.time())}-{os.getpid()}"
        log.error("cache index %s is damaged (%s); moved to %s and rebuilding it from the block files",
                  self.path, exc, aside, extra={"path": self.path})
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path, aside)
        try:
            env = open_env(self.path, **_OPTIONS)
            binding = _Binding(env, S3Fifo(env), env_identity(self.path))
            self._rebuilt.add(binding.ident)
            adopted = self._adopt_all(binding)
        except lmdb.Error as again:
            raise CacheIndexError(self.path, f"rebuild failed: {again}") from again
        log.info("rebuilt cache index %s: %d block files adopted", self.path, adopted, extra={"path": self.path})
        return binding

    def _adopt_all(self, binding: _Binding) -> int:
        with transaction(binding.env, write=True) as txn:
            return self._adopt(txn, binding.fifo)
