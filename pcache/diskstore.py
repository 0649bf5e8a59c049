"""The disk tier: block files bound to their keys, plus an LMDB index with S3-FIFO eviction.

Each block is a self-describing file ``blocks/<aa>/<key hex>``::

    magic "PCB2" | flags u8 | 3 pad | raw_len u64 | stored_len u64 | xxh3-64(raw) u64 | key 16B | payload

Publication is atomic: write ``tmp/…`` (with ``O_DIRECT`` where possible, :mod:`pcache.blockfile`),
``rename`` into place, then commit the index entry. A reader
needs no index lookup (the file's presence is the hit) and verifies on every read that the header
names the key it asked for and that the payload matches its checksum. A file copied or renamed over
another block's file therefore fails like a flipped byte or a truncated file: the block is dropped,
counted in ``corrupt_blocks``, and the caller refetches, so wrong bytes are never returned. Files of
the old format (``PCB1``, no key) are misses, dropped without counting. Block files are not fsynced:
a torn block after a power loss fails its checks and is refetched. The index is rebuilt from the block
files when it is damaged (see :mod:`pcache.index`).
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import lmdb

from lingcore.checksum import block_checksum
from lingcore.files import unlink_quiet
from lingcore.log import get_logger
from pcache.blockfile import BlockFileWriter, Staged
from pcache.diskmaint import DiskMaintenance
from pcache.errors import CacheFullError, CacheIndexError
from pcache.eviction import S3Fifo
from pcache.index import BlockIndex

log = get_logger(__name__)

HEADER = struct.Struct("<4sB3xQQQ16s")
MAGIC = b"PCB2"
OLD_MAGICS = (b"PCB1",)  # earlier formats: read as misses and replaced, never reported as corrupt
FLAG_ZSTD = 1
# Hits reach the shared index with the process's next write, or after this many keys or seconds, so
# a read-only process's hits still count for eviction.
_HIT_FLUSH_EVERY = 4096
_HIT_FLUSH_SECONDS = 2.0
# LMDB errors that mean "no room" rather than damage.
_FULL = (lmdb.MapFullError, lmdb.DiskError)
MISSING, OUTDATED, CORRUPT = "missing", "outdated", "corrupt"


class _Opened(NamedTuple):
    """A block file opened for reading, with its validated header."""

    fd: int
    flags: int
    raw_len: int
    stored_len: int
    checksum: int


class DiskStore(DiskMaintenance):
    """Block files and their LMDB index inside ``cache_dir``.

    Args:
        cache_dir: Root directory (shared by processes).
        budget_bytes: Disk budget for clean blocks plus ``reserved()`` bytes.
        compression: ``"none"`` or ``"zstd"``.
        zstd_level: Compression level.
        reserved: Returns bytes of the budget held by data that must not be evicted (staged uploads).
        direct_writes: Write new block files with ``O_DIRECT`` where the file system allows it (see
            :mod:`pcache.blockfile`).
    """

    def __init__(
        self,
        cache_dir: str,
        budget_bytes: int,
        compression: str = "none",
        zstd_level: int = 3,
        reserved: Callable[[], int] | None = None,
        direct_writes: bool = True,
    ) -> None:
        self.cache_dir = cache_dir
        self.blocks_dir = os.path.join(cache_dir, "blocks")
        self.tmp_dir = os.path.join(cache_dir, "tmp")
        self.budget_bytes = budget_bytes
        self.compression = compression
        self.zstd_level = zstd_level
        self.reserved = reserved or (lambda: 0)
        self.writer = BlockFileWriter(direct_writes)
        for d in (self.blocks_dir, self.tmp_dir):
            os.makedirs(d, exist_ok=True)
        self._hits: dict[bytes, int] = {}
        self._stats: dict[str, int] = {}
        self._hits_lock = threading.Lock()
        self._last_flush = time.monotonic()
        self._outdated_seen = False
        self.index = BlockIndex(cache_dir, self._adopt)

    @property
    def env(self) -> Any:
        """The index's current LMDB environment (it changes when a damaged index is rebuilt)."""
        return self.index.env

    @property
    def fifo(self) -> S3Fifo:
        """The S3-FIFO tables in :attr:`env`."""
        return self.index.fifo

    # -- paths and encoding -----------------------------------------------------------------------
    def block_path(self, key: bytes) -> str:
        hexkey = key.hex()
        return os.path.join(self.blocks_dir, hexkey[:2], hexkey)

    def _encode(self, key: bytes, data: Any) -> tuple[bytes, Any]:
        flags, payload = 0, data
        if self.compression == "zstd":
            import zstandard

            payload = zstandard.ZstdCompressor(level=self.zstd_level).compress(data)
            flags = FLAG_ZSTD
        return HEADER.pack(MAGIC, flags, len(data), len(payload), block_checksum(data), key), payload

    # -- reads -----------------------------------------------------------------------------------
    def _open_block(self, key: bytes) -> _Opened | str:
        """Open a block file and validate its header; return it, or MISSING, OUTDATED or CORRUPT.

        A header that names another key (a file copied or renamed over this one) is corrupt. This check
        costs nothing extra: the header is read anyway.
        """
        path = self.block_path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return MISSING
        header = os.pread(fd, HEADER.size, 0)
        if len(header) == HEADER.size:
            magic, flags, raw_len, stored_len, checksum, owner = HEADER.unpack(header)
            if magic == MAGIC and owner == key:
                return _Opened(fd, flags, raw_len, stored_len, checksum)
            why = f"it holds block {owner.hex()} (copied or renamed over this one)" if magic == MAGIC \
                else None if magic in OLD_MAGICS else "bad magic"
        else:
            why = None if header[:4] in OLD_MAGICS else "short header"
        os.close(fd)
        if why is None:
            self._outdated(key, path)
            return OUTDATED
        self._corrupt(key, path, why)
        return CORRUPT

    def _read(self, key: bytes) -> tuple[bytes | None, str]:
        """Return (verified block, "ok"), or (None, MISSING | OUTDATED | CORRUPT); bad blocks are dropped."""
        opened = self._open_block(key)
        if not isinstance(opened, _Opened):
            return None, opened
        fd, flags, raw_len, stored_len, checksum = opened
        try:
            payload = os.pread(fd, stored_len, HEADER.size)
        finally:
            os.close(fd)
        path = self.block_path(key)
        if len(payload) != stored_len:
            self._corrupt(key, path, "truncated payload")
            return None, CORRUPT
        if flags & FLAG_ZSTD:
            import zstandard

            try:
                payload = zstandard.ZstdDecompressor().decompress(payload, max_output_size=raw_len)
            except zstandard.ZstdError:
                self._corrupt(key, path, "undecodable zstd payload")
                return None, CORRUPT
        if len(payload) != raw_len or block_checksum(payload) != checksum:
            self._corrupt(key, path, "checksum mismatch")
            return None, CORRUPT
        return payload, "ok"

    def _sound(self, key: bytes) -> bool:
        return self._read(key)[1] != CORRUPT

    def read(self, key: bytes) -> bytes | None:
        """Return the verified block, or None when absent or bad (a bad block is dropped)."""
        payload, _ = self._read(key)
        if payload is not None:
            self._note_hit(key)
        return payload

    def read_into(self, key: bytes, out: memoryview) -> int | None:
        """Read and verify a block straight into ``out`` (no allocation); return its length or None.

        Returns None when the block is absent, bad (then dropped), compressed, or larger than
        ``out``; the caller falls back to :meth:`read`, which handles every case.
        """
        opened = self._open_block(key)
        if not isinstance(opened, _Opened):
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

        The header is checked here (it must name ``key``, so a swapped file is never sent), the payload
        is not: the receiving peer verifies the recorded checksum end to end (disk and network) and asks
        again with ``verify=1`` on a mismatch, which takes the verifying path and drops the bad block.
        The caller closes ``fd``. Returns None when the block is absent, bad, compressed or visibly
        truncated (then the caller takes the verifying path).
        """
        opened = self._open_block(key)
        if not isinstance(opened, _Opened):
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

    def _outdated(self, key: bytes, path: str) -> None:
        if not self._outdated_seen:  # once per process: an upgraded cache has many such files
            self._outdated_seen = True
            log.info("cache blocks in %s have an older format; they are refetched as they are read",
                     self.blocks_dir, extra={"path": path})
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

    def _take_pending(self) -> Callable[[Any, S3Fifo], None]:
        """Take the batched hit and stat counts; return what applies them inside an index transaction."""
        with self._hits_lock:
            hits, self._hits = self._hits, {}
            stats, self._stats = self._stats, {}

        def apply(txn: Any, fifo: S3Fifo) -> None:
            fifo.apply_hits(txn, hits)
            for name, delta in stats.items():
                fifo.add_counter(txn, name, delta)

        return apply

    def flush_hits(self) -> None:
        """Apply batched hit and stat counts to the shared index (done on writes, so reads never write)."""
        self._last_flush = time.monotonic()
        if self._hits or self._stats:
            try:
                self.index.run(self._take_pending())
            except (lmdb.Error, CacheIndexError) as exc:  # statistics only: losing them must not fail a read
                log.warning("could not record cache statistics: %s", exc)

    # -- writes ----------------------------------------------------------------------------------
    def stage(self, key: bytes, data: Any) -> Staged:
        """Encode ``data`` (bytes-like) as the block file of ``key`` and copy it out of the caller's buffer.

        The caller may reuse ``data`` at once; :meth:`publish_staged` writes the copy.
        """
        header, payload = self._encode(key, data)
        return self.writer.stage((header, payload))

    def publish(self, key: bytes, data: Any) -> None:
        """Atomically store ``data`` under ``key`` and evict until the budget holds.

        Raises:
            CacheFullError: when the file system or the index is full; nothing partial is left behind.
            CacheIndexError: when the index fails even after a rebuild (the block is not kept).
        """
        self.publish_staged(key, self.stage(key, data))

    def publish_staged(self, key: bytes, staged: Staged) -> None:
        """:meth:`publish` for a block already :meth:`stage` d."""
        path = self.block_path(key)
        tmp = os.path.join(self.tmp_dir, f"{key.hex()}.{uuid.uuid4().hex}")
        try:
            self.writer.create(tmp, staged)
            try:
                os.replace(tmp, path)
            except FileNotFoundError:  # the first block under this prefix: make its directory (once)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.replace(tmp, path)
        except OSError as exc:
            unlink_quiet(tmp)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheFullError(path, str(exc)) from exc
            raise
        stored = staged.length
        apply_pending = self._take_pending()

        def record(txn: Any, fifo: S3Fifo) -> list[bytes]:
            apply_pending(txn, fifo)
            fifo.insert(txn, key, stored)
            victims = fifo.evict_until(txn, max(0, self.budget_bytes - self.reserved()))
            if victims:
                fifo.add_counter(txn, "evictions", len(victims))
            return victims

        try:
            victims = self.index.run(record)
        except (lmdb.Error, CacheIndexError) as exc:
            # The index could not record the block: un-publish the file so index and files keep agreeing.
            unlink_quiet(path)
            if isinstance(exc, _FULL):
                raise CacheFullError(path, f"index update failed: {exc}") from exc
            if isinstance(exc, CacheIndexError):
                raise
            raise CacheIndexError(self.index.path, f"recording {path}: {exc}") from exc
        for victim in victims:
            unlink_quiet(self.block_path(victim))

    def drop(self, key: bytes) -> None:
        """Remove a block and its index entry (the file goes first, so a failed index write is harmless)."""
        unlink_quiet(self.block_path(key))
        try:
            self.index.run(lambda txn, fifo: fifo.remove(txn, key))
        except (lmdb.Error, CacheIndexError) as exc:
            log.warning("could not remove index entry of %s: %s", key.hex(), exc)

    def close(self) -> None:
        """Record batched hits; the shared LMDB handle stays open for the process's other users."""
        self.flush_hits()
