"""Budget, statistics and maintenance of the disk tier (a mixin of :class:`~pcache.diskstore.DiskStore`).

Kept apart from the block format and the read path: what is here walks or evicts many blocks at once
(``pcache verify``, ``pcache gc``, room for write-back data) and touches the index in every call.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import lmdb

from lingcore.files import unlink_quiet
from lingcore.log import get_logger
from pcache.errors import CacheFullError, CacheIndexError
from pcache.eviction import S3Fifo
from pcache.index import BlockIndex

log = get_logger(__name__)

KEY_SIZE = 16


class DiskMaintenance:
    """Budget enforcement, statistics, ``verify`` and ``gc`` over the block files and their index."""

    index: BlockIndex
    budget_bytes: int
    reserved: Callable[[], int]
    blocks_dir: str
    tmp_dir: str

    def block_path(self, key: bytes) -> str:
        """Where the block ``key`` lives (defined by the store)."""
        raise NotImplementedError

    def _sound(self, key: bytes) -> bool:
        """Verify one block; False when it is corrupt (then dropped). Defined by the store."""
        raise NotImplementedError

    def note_stat(self, name: str, delta: int = 1) -> None:
        """Count an event (defined by the store)."""
        raise NotImplementedError

    # -- budget ----------------------------------------------------------------------------------
    def _evict_to(self, limit: int) -> list[bytes]:
        """Evict clean blocks until they total at most ``limit`` bytes; return the keys evicted."""
        def evict(txn: Any, fifo: S3Fifo) -> list[bytes]:
            victims = fifo.evict_until(txn, max(0, limit))
            if victims:
                fifo.add_counter(txn, "evictions", len(victims))
            return victims

        victims = self.index.run(evict)
        for victim in victims:
            unlink_quiet(self.block_path(victim))
        return victims

    def enforce_budget(self) -> int:
        """Evict until the budget holds (used after staged uploads grow); return blocks evicted."""
        return len(self._evict_to(self.budget_bytes - self.reserved()))

    def make_room(self, extra: int, url: str) -> int:
        """Evict clean blocks so that they, ``reserved()`` and ``extra`` more dirty bytes fit the budget.

        A write-back calls this before it stages bytes: dirty data (not yet at the origin) is never
        evicted, so it has first claim on the budget and clean blocks make way for it.

        Returns:
            The number of blocks evicted.

        Raises:
            CacheFullError: naming ``url``, when dirty data alone (``reserved()`` plus ``extra``) would
                exceed the budget.
        """
        dirty = self.reserved() + extra
        if dirty > self.budget_bytes:
            raise CacheFullError(url, f"{dirty} bytes of write-back data not yet uploaded would exceed the "
                                      f"disk budget disk_bytes={self.budget_bytes}")
        try:
            return len(self._evict_to(self.budget_bytes - dirty))
        except (lmdb.Error, CacheIndexError) as exc:  # accounting only: the write itself can go on
            log.warning("could not evict for a write to %s: %s", url, exc, extra={"url": url})
            return 0

    def free_space(self, nbytes: int, url: str) -> int:
        """Evict clean blocks holding at least ``nbytes`` (the file system is full under a write).

        Victims are chosen in the index and their files removed even if the index cannot record it (an
        index on the full file system may fail to commit); ``gc`` reconciles that later.

        Returns:
            Bytes of disk space actually released (0 once no clean block is left).
        """
        chosen: list[bytes] = []

        def pick(txn: Any, fifo: S3Fifo) -> None:
            chosen[:] = fifo.evict_until(txn, max(0, fifo.get_counter(txn, "total") - nbytes))
            if chosen:
                fifo.add_counter(txn, "evictions", len(chosen))

        try:
            self.index.run(pick)
        except (lmdb.Error, CacheIndexError) as exc:
            log.warning("index could not record evictions for a write to %s (%s); removing the blocks anyway",
                        url, exc, extra={"url": url})
        freed = sum(self._unlink_counted(self.block_path(key)) for key in chosen)
        if freed < nbytes:  # the index knew too little (or failed): every block file is clean
            for _, path in self.iter_block_files():
                freed += self._unlink_counted(path)
                if freed >= nbytes:
                    break
        return freed

    @staticmethod
    def _unlink_counted(path: str) -> int:
        """Remove ``path``; return the disk space it held (0 if it was already gone)."""
        try:
            size = os.stat(path).st_blocks * 512
            os.unlink(path)
        except FileNotFoundError:
            return 0
        return int(size)

    # -- statistics and maintenance --------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Shared counters (hits, misses, evictions, corrupt blocks) and index totals.

        Raises:
            CacheIndexError: the index failed even after a rebuild.
        """
        names = ("total", "small", "evictions", "corrupt_blocks", "hits_memory", "hits_disk", "hits_peer", "misses",
                 "origin_bytes", "peer_bytes")

        def read(txn: Any, fifo: S3Fifo) -> dict[str, int]:
            out = {name: fifo.get_counter(txn, name) for name in names}
            out["blocks"] = txn.stat(fifo.blocks)["entries"]
            return out

        return self._maintain("read statistics", lambda: self.index.run(read, write=False))

    def _maintain(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run a maintenance step; any LMDB error becomes :class:`CacheIndexError` naming the index."""
        try:
            return fn()
        except lmdb.Error as exc:
            raise CacheIndexError(self.index.path, f"{what}: {exc}") from exc

    def _scan(self) -> Iterator[tuple[bytes | None, str]]:
        """Yield (key, path) for every file under ``blocks/``; key is None where the name is no key."""
        for sub in sorted(os.listdir(self.blocks_dir)):
            subdir = os.path.join(self.blocks_dir, sub)
            try:
                names = os.listdir(subdir)
            except NotADirectoryError:
                yield None, subdir
                continue
            for name in names:
                path = os.path.join(subdir, name)
                try:
                    key: bytes | None = bytes.fromhex(name)
                except ValueError:
                    key = None
                yield (key, path) if key is not None and len(key) == KEY_SIZE and sub == name[:2] else (None, path)

    def iter_block_files(self) -> Iterator[tuple[bytes, str]]:
        """Yield (key, path) for every block file on disk whose name is a key in its right place."""
        for key, path in self._scan():
            if key is not None:
                yield key, path

    def verify(self, progress: Callable[[int], Any] | None = None) -> list[str]:
        """Re-check every block file; drop and return the paths of corrupt ones.

        Corrupt means a failed checksum, a truncated file, a header naming another key (a file copied or
        renamed over this one), or a file whose name is no block key. Files of an older format are
        dropped as misses, not reported. The index is read through too, and rebuilt if it is damaged.

        Raises:
            CacheIndexError: the index failed even after a rebuild.
        """
        self._maintain("check the index", lambda: self.index.run(_walk, write=False))
        corrupt = []
        for key, path in list(self._scan()):
            if key is None:
                log.warning("dropping stray file in the cache's blocks directory: %s", path, extra={"path": path})
                self.note_stat("corrupt_blocks")
                with contextlib.suppress(OSError):  # a stray directory stays; it is never read
                    unlink_quiet(path)
                corrupt.append(path)
            elif not self._sound(key):
                corrupt.append(path)
            if progress:
                progress(1)
        return corrupt

    def _adopt(self, txn: Any, fifo: S3Fifo) -> int:
        """Record in the index every block file it lacks; forget entries whose file is gone."""
        on_disk = dict(self.iter_block_files())
        indexed = {bytes(k) for k, _ in txn.cursor(db=fifo.blocks)}
        for key in indexed - on_disk.keys():
            fifo.remove(txn, key)
        adopted = 0
        for key in on_disk.keys() - indexed:
            try:
                fifo.insert(txn, key, os.stat(on_disk[key]).st_size)
                adopted += 1
            except FileNotFoundError:
                continue
        return adopted

    def gc(self, tmp_age_s: float = 3600.0) -> dict[str, int]:
        """Reconcile index and files: index orphans, unindexed files, stale temp files; enforce budget.

        Raises:
            CacheIndexError: the index failed even after a rebuild.
        """
        removed_tmp = 0
        now = time.time()
        for name in os.listdir(self.tmp_dir):
            path = os.path.join(self.tmp_dir, name)
            try:
                if now - os.stat(path).st_mtime > tmp_age_s:
                    os.unlink(path)
                    removed_tmp += 1
            except FileNotFoundError:
                continue
        counts: dict[str, int] = {}

        def reconcile(txn: Any, fifo: S3Fifo) -> None:
            blocks_before = txn.stat(fifo.blocks)["entries"]
            counts["adopted"] = self._adopt(txn, fifo)
            counts["forgotten"] = blocks_before + counts["adopted"] - txn.stat(fifo.blocks)["entries"]

        self._maintain("reconcile", lambda: self.index.run(reconcile))
        evicted = self._maintain("enforce the budget", self.enforce_budget)
        return {"removed_tmp": removed_tmp, "forgotten": counts["forgotten"], "adopted": counts["adopted"],
                "evicted": evicted}


def _walk(txn: Any, fifo: S3Fifo) -> int:
    """Read every entry of every table of the index (damage anywhere shows); return how many."""
    count = 0
    for db in (fifo.blocks, *fifo.queues.values(), fifo.ghost, fifo.ghostq, fifo.meta):
        for _ in txn.cursor(db=db).iternext(values=False):
            count += 1
    return count
