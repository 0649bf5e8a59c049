"""The disk tier: checksummed block files plus an LMDB index with S3-FIFO eviction.

Each block is a self-describing file ``blocks/<aa>/<key hex>``::

    magic "PCB1" | flags u8 | 3 pad | raw_len u64 | stored_len u64 | xxh3-64(raw) u64 | payload

Publication is atomic: write ``tmp/…``, ``rename`` into place, then commit the index entry. A reader
needs no index lookup (the file's presence is the hit) and verifies the checksum on every read; on a
mismatch the block is dropped and the caller refetches, so corrupt bytes are never returned. Block
files are not fsynced: a torn block after a power loss fails its checksum and is refetched.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import lmdb

from lingcore.checksum import block_checksum
from lingcore.files import unlink_quiet, write_all
from lingcore.lmdb_env import open_env
from lingcore.log import get_logger
from pcache.errors import CacheFullError
from pcache.eviction import S3Fifo

log = get_logger(__name__)

HEADER = struct.Struct("<4sB3xQQQ")
MAGIC = b"PCB1"
FLAG_ZSTD = 1
# Hits reach the shared index with the process's next write, or after this many keys or seconds, so
# a read-only process's hits still count for eviction.
_HIT_FLUSH_EVERY = 4096
_HIT_FLUSH_SECONDS = 2.0


class _Opened(NamedTuple):
    """A block file opened for reading, with its validated header."""

    fd: int
    flags: int
    raw_len: int
    stored_len: int
    checksum: int


class DiskStore:
    """Block files and their LMDB index inside ``cache_dir``.

    Args:
        cache_dir: Root directory (shared by processes).
        budget_bytes: Disk budget for clean blocks plus ``reserved()`` bytes.
        compression: ``"none"`` or ``"zstd"``.
        zstd_level: Compression level.
        reserved: Returns bytes of the budget held by data that must not be evicted (staged uploads).
    """

    def __init__(
        self,
        cache_dir: str,
        budget_bytes: int,
        compression: str = "none",
        zstd_level: int = 3,
        reserved: Callable[[], int] | None = None,
    ) -> None:
        self.cache_dir = cache_dir
        self.blocks_dir = os.path.join(cache_dir, "blocks")
        self.tmp_dir = os.path.join(cache_dir, "tmp")
        self.budget_bytes = budget_bytes
        self.compression = compression
        self.zstd_level = zstd_level
        self.reserved = reserved or (lambda: 0)
        for d in (self.blocks_dir, self.tmp_dir):
            os.makedirs(d, exist_ok=True)
        # The index is a cache of what is on disk, rebuildable by gc(), so it skips fsync (kill -9 safe;
        # a power loss may undo the last transactions, which only leaves unaccounted files for gc).
        index = os.path.join(cache_dir, "index")
        options = {"map_size": 1 << 30, "max_dbs": 8, "sync": False, "metasync": False, "readahead": False,
                   "max_readers": 1024}
        try:
            self.env = open_env(index, **options)
            self.fifo = S3Fifo(self.env)
            rebuilt = False
        except lmdb.Error as exc:
            # The index is only a cache of what is on disk (and skips fsync), so a damaged one is moved
            # aside and rebuilt from the self-describing block files rather than failing every read.
            aside = f"{index}.corrupt-{int(time.time())}"
            log.error("cache index %s is unreadable (%s); moved to %s and rebuilding from block files",
                      index, exc, aside, extra={"path": index})
            os.replace(index, aside)
            self.env = open_env(index, **options)
            self.fifo = S3Fifo(self.env)
            rebuilt = True
        self._hits: dict[bytes, int] = {}
        self._stats: dict[str, int] = {}
        self._hits_lock = threading.Lock()
        self._last_flush = time.monotonic()
        if rebuilt:
            self.gc()

    # -- paths and encoding -----------------------------------------------------------------------
    def block_path(self, key: bytes) -> str:
        hexkey = key.hex()
        return os.path.join(self.blocks_dir, hexkey[:2], hexkey)

    def _encode(self, data: bytes) -> tuple[bytes, bytes]:
        flags, payload = 0, data
        if self.compression == "zstd":
            import zstandard

            payload = zstandard.ZstdCompressor(level=self.zstd_level).compress(data)
            flags = FLAG_ZSTD
        return HEADER.pack(MAGIC, flags, len(data), len(payload), block_checksum(data)), payload

    # -- reads -----------------------------------------------------------------------------------
    def _open_block(self, key: bytes) -> _Opened | None:
        """Open a block file and validate its header; return (fd, flags, raw_len, stored_len) or None."""
        path = self.block_path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        header = os.pread(fd, HEADER.size, 0)
        if len(header) == HEADER.size:
            magic, flags, raw_len, stored_len, checksum = HEADER.unpack(header)
            if magic == MAGIC:
                return _Opened(fd, flags, raw_len, stored_len, checksum)
        os.close(fd)
        self._corrupt(key, path, "bad or short header")
        return None

    def read(self, key: bytes) -> bytes | None:
        """Return the verified block, or None when absent or corrupt (a corrupt block is dropped)."""
        opened = self._open_block(key)
        if opened is None:
            return None
        fd, flags, raw_len, stored_len, checksum = opened
        try:
            payload = os.pread(fd, stored_len, HEADER.size)
        finally:
            os.close(fd)
        path = self.block_path(key)
        if len(payload) != stored_len:
            self._corrupt(key, path, "truncated payload")
            return None
        if flags & FLAG_ZSTD:
            import zstandard

            try:
                payload = zstandard.ZstdDecompressor().decompress(payload, max_output_size=raw_len)
            except zstandard.ZstdError:
                self._corrupt(key, path, "undecodable zstd payload")
                return None
        if len(payload) != raw_len or block_checksum(payload) != checksum:
            self._corrupt(key, path, "checksum mismatch")
            return None
        self._note_hit(key)
        return payload

    def read_into(self, key: bytes, out: memoryview) -> int | None:
        """Read and verify a block straight into ``out`` (no allocation); return its length or None.

        Returns None when the block is absent, corrupt (then dropped), compressed, or larger than
        ``out``; the caller falls back to :meth:`read`, which handles every case.
        """
        opened = self._open_block(key)
        if opened is None:
            return None
        fd, flags, raw_len, stored_len, checksum = opened
        try:
            if flags & FLAG_ZSTD or raw_len > len(out):
                return None
            got = os.preadv(fd, [out[:raw_len]], HEADER.size)
        finally:
            os.close(fd)
        if got != raw_len or block_checksum(out[:raw_len]) != checksum:
            self._corrupt(key, self.block_path(key), "checksum mismatch or truncated payload")
            return None
        self._note_hit(key)
        return raw_len

    def open_payload(self, key: bytes) -> tuple[int, int, int, int] | None:
        """Open an uncompressed block for zero-copy sending: return (fd, offset, length, checksum).

        The payload is *not* verified here: the receiving peer verifies the recorded checksum end to end
        (disk and network) and asks again with ``verify=1`` on a mismatch, which takes the verifying path
        and drops the bad block. The caller closes ``fd``. Returns None when the block is absent,
        compressed or visibly truncated (then the caller takes the verifying path).
        """
        opened = self._open_block(key)
        if opened is None:
            return None
        fd, flags, raw_len, stored_len, checksum = opened
        try:
            usable = not flags & FLAG_ZSTD and raw_len == stored_len and \
                os.fstat(fd).st_size == HEADER.size + stored_len
        except OSError:
            usable = False
        if not usable:
            os.close(fd)
            return None
        self._note_hit(key)
        return fd, HEADER.size, raw_len, checksum

    def _corrupt(self, key: bytes, path: str, why: str) -> None:
        log.warning("dropping corrupt cache block %s: %s", path, why, extra={"path": path, "reason": why})
        self.note_stat("corrupt_blocks")
        self.drop(key)

    def _note_hit(self, key: bytes) -> None:
        now = time.monotonic()
        with self._hits_lock:
            self._hits[key] = self._hits.get(key, 0) + 1
            flush = len(self._hits) >= _HIT_FLUSH_EVERY or now - self._last_flush >= _HIT_FLUSH_SECONDS
        if flush:
            self.flush_hits()

    def note_stat(self, name: str, delta: int = 1) -> None:
        """Count an event in-process; it reaches the shared index with the next write."""
        with self._hits_lock:
            self._stats[name] = self._stats.get(name, 0) + delta

    def _apply_pending(self, txn: Any) -> None:
        with self._hits_lock:
            hits, self._hits = self._hits, {}
            stats, self._stats = self._stats, {}
        self.fifo.apply_hits(txn, hits)
        for name, delta in stats.items():
            self.fifo.add_counter(txn, name, delta)

    def flush_hits(self) -> None:
        """Apply batched hit and stat counts to the shared index (done on writes, so reads never write)."""
        self._last_flush = time.monotonic()
        if self._hits or self._stats:
            try:
                with self.env.begin(write=True) as txn:
                    self._apply_pending(txn)
            except lmdb.Error as exc:  # statistics only: losing them must not fail a read
                log.warning("could not record cache statistics: %s", exc)

    # -- writes ----------------------------------------------------------------------------------
    def publish(self, key: bytes, data: bytes) -> None:
        """Atomically store ``data`` under ``key`` and evict until the budget holds.

        Raises:
            CacheFullError: when the file system is full; nothing partial is left behind.
        """
        header, payload = self._encode(data)
        path = self.block_path(key)
        tmp = os.path.join(self.tmp_dir, f"{key.hex()}.{uuid.uuid4().hex}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                write_all(fd, header)
                write_all(fd, payload)
            finally:
                os.close(fd)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.replace(tmp, path)
        except OSError as exc:
            unlink_quiet(tmp)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheFullError(path, str(exc)) from exc
            raise
        stored = HEADER.size + len(payload)
        try:
            with self.env.begin(write=True) as txn:
                self._apply_pending(txn)
                self.fifo.insert(txn, key, stored)
                victims = self.fifo.evict_until(txn, max(0, self.budget_bytes - self.reserved()))
                if victims:
                    self.fifo.add_counter(txn, "evictions", len(victims))
        except lmdb.Error as exc:
            # The index could not record the block (e.g. ENOSPC inside LMDB): un-publish the file so
            # index and files keep agreeing, and report a full cache.
            unlink_quiet(path)
            raise CacheFullError(path, f"index update failed: {exc}") from exc
        for victim in victims:
            unlink_quiet(self.block_path(victim))

    def drop(self, key: bytes) -> None:
        """Remove a block and its index entry (the file goes first, so a failed index write is harmless)."""
        unlink_quiet(self.block_path(key))
        try:
            with self.env.begin(write=True) as txn:
                self.fifo.remove(txn, key)
        except lmdb.Error as exc:
            log.warning("could not remove index entry of %s: %s", key.hex(), exc)

    def enforce_budget(self) -> int:
        """Evict until the budget holds (used after staged uploads grow); return blocks evicted."""
        with self.env.begin(write=True) as txn:
            victims = self.fifo.evict_until(txn, max(0, self.budget_bytes - self.reserved()))
        for victim in victims:
            unlink_quiet(self.block_path(victim))
        return len(victims)

    # -- statistics and maintenance --------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Shared counters (hits, misses, evictions, corrupt blocks) and index totals."""
        names = ("total", "small", "evictions", "corrupt_blocks", "hits_memory", "hits_disk", "hits_peer", "misses",
                 "origin_bytes", "peer_bytes")
        with self.env.begin() as txn:
            out = {name: self.fifo.get_counter(txn, name) for name in names}
            out["blocks"] = txn.stat(self.fifo.blocks)["entries"]
        return out


    def iter_block_files(self) -> Iterator[tuple[bytes, str]]:
        """Yield (key, path) for every block file on disk."""
        for sub in sorted(os.listdir(self.blocks_dir)):
            subdir = os.path.join(self.blocks_dir, sub)
            for name in os.listdir(subdir):
                try:
                    yield bytes.fromhex(name), os.path.join(subdir, name)
                except ValueError:
                    continue

    def verify(self, progress: Callable[[int], Any] | None = None) -> list[str]:
        """Re-check every block's checksum; drop and return the paths of corrupt ones."""
        corrupt = []
        for key, path in list(self.iter_block_files()):
            before = os.path.exists(path)
            if self.read(key) is None and before:
                corrupt.append(path)
            if progress:
                progress(1)
        return corrupt

    def gc(self, tmp_age_s: float = 3600.0) -> dict[str, int]:
        """Reconcile index and files: index orphans, unindexed files, stale temp files; enforce budget."""
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
        on_disk = dict(self.iter_block_files())
        adopted = forgotten = 0
        with self.env.begin(write=True) as txn:
            indexed = {bytes(k) for k, _ in txn.cursor(db=self.fifo.blocks)}
            for key in indexed - on_disk.keys():
                self.fifo.remove(txn, key)
                forgotten += 1
            for key in on_disk.keys() - indexed:
                try:
                    self.fifo.insert(txn, key, os.stat(on_disk[key]).st_size)
                    adopted += 1
                except FileNotFoundError:
                    continue
        evicted = self.enforce_budget()
        return {"removed_tmp": removed_tmp, "forgotten": forgotten, "adopted": adopted, "evicted": evicted}

    def close(self) -> None:
        """Record batched hits; the shared LMDB handle stays open for the process's other users."""
        self.flush_hits()
