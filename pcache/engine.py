"""The block cache engine: memory tier -> disk tier -> origin, with single-flight and readahead.

One engine exists per (``cache_dir``, process): every :class:`~pcache.fs.PCacheFileSystem` in a process
that names the same directory shares its memory tier, fetch threads and in-flight table. After a
``fork`` (DataLoader workers) the child builds its own, since threads and LMDB handles do not survive.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from functools import partial

from lingcore.lmdb_env import is_under
from lingcore.log import get_logger
from pcache.config import CacheConfig
from pcache.diskstore import DiskStore
from pcache.fill import DirectFill
from pcache.keys import ObjectRef, block_key
from pcache.locks import SingleFlight, StripeLocks
from pcache.memory import MemoryLRU
from pcache.origin import RangeFetch

log = get_logger(__name__)


class PeerBlock:
    """A block that a peer node served: it already lives on that node's disk.

    A fetcher returns one to tell the engine so. The engine counts a peer hit rather than an origin miss,
    and keeps the block in the memory tier only, unless ``peer_blocks_on_disk`` is set. Without that
    setting the cluster's capacity is the sum of its disks and not one node's, and a reader does not
    pay the cost of writing a local copy of every block.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


Fetch = Callable[[int, int], "bytes | PeerBlock"]

# Reads of up to this many blocks from disk use per-thread scratch buffers (32 MiB at 4 MiB blocks).
_MAX_SCRATCH_BLOCKS = 8



class BlockCache(DirectFill):
    """Tiered block reads for one ``cache_dir`` in one process."""

    def __init__(self, config: CacheConfig, reserved: Callable[[], int] | None = None) -> None:
        self.config = config
        self.block_size = config.block_size
        self.memory = MemoryLRU(config.memory_bytes)
        self.disk = DiskStore(config.cache_dir, config.disk_bytes, config.compression, config.zstd_level,
                              reserved=reserved, direct_writes=config.direct_writes)
        self.locks = StripeLocks(os.path.join(config.cache_dir, "locks"))
        self.flight = SingleFlight()
        self.pool = ThreadPoolExecutor(config.fetch_workers, thread_name_prefix="pcache-fetch")
        self._inflight_budget = threading.BoundedSemaphore(max(1, config.max_inflight_bytes // self.block_size))
        # Blocks handed to readers but not yet on disk, bounded like the bytes being fetched.
        self.publisher = ThreadPoolExecutor(2, thread_name_prefix="pcache-publish")
        self._write_budget = threading.BoundedSemaphore(max(1, config.max_inflight_bytes // self.block_size))
        self.counters = {"hits_memory": 0, "hits_disk": 0, "hits_peer": 0, "misses": 0, "origin_bytes": 0,
                         "peer_bytes": 0}
        self._tls = threading.local()
        self._counters_lock = threading.Lock()
        self._drain_lock = threading.Lock()

    def _count(self, name: str, delta: int = 1) -> None:
        with self._counters_lock:
            self.counters[name] += delta
        self.disk.note_stat(name, delta)

    # -- single blocks ---------------------------------------------------------------------------
    def block_span(self, obj: ObjectRef, index: int) -> tuple[int, int]:
        start = index * self.block_size
        return start, min(obj.size, start + self.block_size)

    def get_block(self, obj: ObjectRef, index: int, fetch: Fetch) -> bytes:
        """Return block ``index`` of ``obj`` from the fastest tier that has it."""
        key = block_key(obj, index, self.block_size)
        data = self.memory.get(key)
        if data is not None:
            self._count("hits_memory")
            return data
        return self.flight.run(key, lambda: self._load(obj, index, key, fetch))

    def _load(self, obj: ObjectRef, index: int, key: bytes, fetch: Fetch) -> bytes:
        data = self.disk.read(key)
        if data is not None:
            self._count("hits_disk")
            self.memory.put(key, data)
            return data
        # Another process may be fetching this block: wait for its stripe lock, then look again.
        lock = self.locks.acquire(key)
        try:
            data = self.disk.read(key)
            if data is not None:
                self._count("hits_disk")
                self.memory.put(key, data)
                return data
            data, keep = self._fetch(obj, index, fetch)
            self.memory.put(key, data)
            if not keep:
                return data
            if self._write_budget.acquire(blocking=False):
                # Write-behind: the reader gets its bytes now; the block reaches disk on the publish
                # pool, which also releases the stripe lock, so other processes wait for the block
                # rather than fetch it again.
                try:
                    self.publisher.submit(self._publish_quietly_and_release, obj,
                                          partial(self.disk.publish, key, data), lock)
                    lock = -1
                    return data
                except RuntimeError:  # pool shut down (interpreter exit): publish inline below
                    self._write_budget.release()
            # budget used up (backpressure) or no pool: publish inline
            self._publish_quietly(obj, partial(self.disk.publish, key, data))
            return data
        finally:
            if lock >= 0:
                self.locks.release(lock)

    def _fetch(self, obj: ObjectRef, index: int, fetch: Fetch) -> tuple[bytes, bool]:
        """Fetch a block; return it and whether the disk tier should keep it."""
        start, end = self.block_span(obj, index)
        got = fetch(start, end)
        from_peer = isinstance(got, PeerBlock)
        data = got.data if isinstance(got, PeerBlock) else got
        if len(data) != end - start:
            raise OSError(f"short read from origin {obj.url} (version {obj.version}) bytes {start}-{end}: "
                          f"got {len(data)} bytes; the object may have changed")
        if from_peer:
            self._count("hits_peer")
            self._count("peer_bytes", len(data))
            return data, self.config.peer_blocks_on_disk
        self._count("misses")
        self._count("origin_bytes", len(data))
        return data, True

    def drain_writes(self) -> None:
        """Wait until every write-behind block is on disk (safe to call from several threads)."""
        slots = max(1, self.config.max_inflight_bytes // self.block_size)
        with self._drain_lock:  # two drains each holding part of the slots would wait forever
            for _ in range(slots):
                self._write_budget.acquire()
            for _ in range(slots):
                self._write_budget.release()

    def forget_after_fork(self) -> None:
        """In a forked child: release what the parent's threads held; the child builds a new engine."""
        self.locks.forget_after_fork()  # (LMDB handles are dropped by lingcore.lmdb_env)

    def contains(self, obj: ObjectRef, index: int) -> bool:
        """Return True if the block is in memory or on disk (no checksum verification)."""
        key = block_key(obj, index, self.block_size)
        return key in self.memory or os.path.exists(self.disk.block_path(key))

    def in_memory(self, obj: ObjectRef, start: int, end: int) -> bool:
        """Return True if every block of bytes ``[start, end)`` of ``obj`` is in the memory tier.

        A read of such a range cannot block on I/O (a block may still be evicted right after the check).
        """
        end = min(end, obj.size)
        if start >= end:
            return True
        bs = self.block_size
        return all(block_key(obj, i, bs) in self.memory for i in range(start // bs, (end - 1) // bs + 1))

    # -- ranges and readahead -------------------------------------------------------------------
    def get_range(self, obj: ObjectRef, start: int, end: int, fetch: Fetch) -> bytes:
        """Return bytes ``[start, end)`` of ``obj``, fetching missing blocks in parallel."""
        end = min(end, obj.size)
        if start >= end:
            return b""
        bs = self.block_size
        first, last = start // bs, (end - 1) // bs
        if first == last:
            block = self.get_block(obj, first, fetch)
            lo = start - first * bs
            return block if lo == 0 and end - start == len(block) else block[lo:end - first * bs]
        cached = [self.memory.get(block_key(obj, i, bs)) for i in range(first, last + 1)]
        if all(block is not None for block in cached):
            # Everything is in memory: one join of slices (streaming into a buffer only pays off while
            # blocks are still arriving; here it would add a memset pass).
            self._count("hits_memory", len(cached))
            views = [memoryview(block) for block in cached]  # type: ignore[arg-type]
            views[0], views[-1] = views[0][start - first * bs:], views[-1][: end - last * bs]
            return b"".join(views)
        # A multi-block read from disk is scan-like: serve it from scratch buffers and do not promote it
        # into the memory tier, where it would evict hot blocks (single-block reads and origin fetches
        # still fill the memory tier).
        local = self._local_range(obj, first, last, start, end)
        if local is not None:
            return local
        # Copy each block into one result buffer as it arrives, instead of joining all of them at the
        # end: the copies overlap the fetches still in flight, and each block is freed right away.
        out = io.BytesIO()
        out.seek(end - start - 1)
        out.write(b"\0")
        view = out.getbuffer()
        try:
            self._copy_blocks(obj, first, last, start, end, view, fetch)
        finally:
            view.release()
        return out.getvalue()  # hands over BytesIO's own bytes object: no copy once the view is released

    def readinto(self, obj: ObjectRef, start: int, buf: memoryview, fetch: Fetch) -> int:
        """Fill ``buf`` with bytes from ``start``; return the count (short only at end of object)."""
        end = min(obj.size, start + len(buf))
        if start >= end:
            return 0
        bs = self.block_size
        first, last = start // bs, (end - 1) // bs
        if self.memory.capacity_bytes == 0 and start % bs == 0 and (end % bs == 0 or end == obj.size):
            # Whole blocks: verify them in the caller's own buffer, with no copy at all.
            pos = 0
            for i in range(first, last + 1):
                got = self.disk.read_into(block_key(obj, i, bs), buf[pos:pos + bs])
                if got is None:
                    break
                pos += got
            else:
                self._count("hits_disk", last - first + 1)
                return pos
        self._copy_blocks(obj, first, last, start, end, buf, fetch)
        return end - start

    def _copy_blocks(self, obj: ObjectRef, first: int, last: int, start: int, end: int, out: memoryview,
                     fetch: Fetch) -> None:
        """Fill ``out`` with bytes ``[start, end)`` block by block, in order, as blocks become available.

        A block that lies wholly inside the range and must come from the origin is received straight
        into its place in ``out`` where the fetcher can do that (see :meth:`_get_into`); every other
        block is copied in from its tier.
        """
        bs = self.block_size

        def dest(i: int) -> memoryview | None:
            lo, hi = i * bs, min(obj.size, (i + 1) * bs)
            return out[lo - start:hi - start] if start <= lo and hi <= end else None

        pos = 0
        for i, block in self._blocks(obj, first, last, fetch, dest):
            lo = max(start, i * bs) - i * bs
            hi = min(end, (i + 1) * bs) - i * bs
            if block is not None:
                out[pos:pos + hi - lo] = memoryview(block)[lo:hi]
            pos += hi - lo

    def _scratch(self, count: int) -> list[bytearray]:
        """Per-thread reusable block buffers: re-used memory is never page-faulted in again."""
        bufs: list[bytearray] = self._tls.__dict__.setdefault("scratch", [])
        while len(bufs) < count:
            bufs.append(bytearray(self.block_size))
        return bufs

    def _local_range(self, obj: ObjectRef, first: int, last: int, start: int, end: int) -> bytes | None:
        """Assemble a range whose blocks are all on local disk, verifying each in a scratch buffer.

        The only allocation is the result, as with a plain ``pread``. Returns None (the caller takes the
        general path) if any block is missing from disk or fails its checksum.
        """
        if last - first + 1 > _MAX_SCRATCH_BLOCKS:
            return None  # bounded per-thread scratch memory; larger reads stream through _copy_blocks
        bs = self.block_size
        views = []
        for n, buf in enumerate(self._scratch(last - first + 1)[: last - first + 1]):
            i = first + n
            got = self.disk.read_into(block_key(obj, i, bs), memoryview(buf))
            if got is None:
                return None
            lo = max(start, i * bs) - i * bs
            hi = min(end, (i + 1) * bs) - i * bs
            views.append(memoryview(buf)[lo:hi])
        self._count("hits_disk", len(views))
        return b"".join(views)

    def _blocks(self, obj: ObjectRef, first: int, last: int, fetch: Fetch,
                dest: Callable[[int], memoryview | None]) -> Iterator[tuple[int, bytes | None]]:
        """Yield ``(index, block)`` for ``first..last`` in order; None: the block is already in ``dest(index)``.

        Memory hits and local disk reads happen inline (faster than a thread handoff); when some block
        must come from the origin, the missing ones go through the fetch pool with a bounded window.
        """
        bs = self.block_size
        keys = [block_key(obj, i, bs) for i in range(first, last + 1)]
        remote = any(k not in self.memory and not os.path.exists(self.disk.block_path(k)) for k in keys)
        if not remote or first == last:
            for i in range(first, last + 1):
                yield i, self.get_block(obj, i, fetch)
            return
        window = max(1, min(self.config.fetch_workers, self.config.max_inflight_bytes // bs))
        filler = fetch if isinstance(fetch, RangeFetch) and fetch.can_fill else None
        pending: dict[int, Future[bytes | None]] = {}
        nxt = first
        try:
            for i in range(first, last + 1):
                while nxt <= last and len(pending) < window:
                    target = dest(nxt) if filler is not None else None
                    if target is not None and filler is not None:
                        pending[nxt] = self.pool.submit(self._get_into, obj, nxt, target, filler)
                    else:
                        pending[nxt] = self.pool.submit(self.get_block, obj, nxt, fetch)
                    nxt += 1
                yield i, pending.pop(i).result()
        finally:
            # On an error, fetches still running may be writing into the caller's buffer: they must end
            # before it is handed back (each ends within origin_timeout).
            for future in pending.values():
                future.cancel()
            wait(pending.values())

    def prefetch(self, obj: ObjectRef, indices: range, fetch: Fetch) -> int:
        """Start background loads of blocks not already cached or in flight; return how many started.

        Bytes in flight stay under ``max_inflight_bytes``: when the budget is used up, the remaining
        blocks are skipped (the reader fetches them on demand) rather than queued without bound.
        """
        started = 0
        for i in indices:
            if i * self.block_size >= obj.size:
                break
            key = block_key(obj, i, self.block_size)
            # Readahead hides origin latency; a block already on local disk needs none (and reading it
            # early only helps if the memory tier could keep it, at the cost of a second read).
            if key in self.memory or self.flight.in_flight(key) or os.path.exists(self.disk.block_path(key)):
                continue
            if not self._inflight_budget.acquire(blocking=False):
                break
            future = self.pool.submit(self.get_block, obj, i, fetch)
            future.add_done_callback(self._prefetch_done)
            started += 1
        return started

    def _prefetch_done(self, future: Future[bytes]) -> None:
        self._inflight_budget.release()
        exc = future.exception()
        if exc is not None:
            log.debug("prefetch failed: %r", exc)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.publisher.shutdown(wait=True)
        self.disk.close()


_ENGINES: dict[str, BlockCache] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(config: CacheConfig, reserved: Callable[[], int] | None = None) -> BlockCache:
    """Return this process's engine for ``config.cache_dir`` (created on first use, and after fork).

    The first config seen for a directory in a process wins; a later one that differs only gets a
    warning, since one directory has one memory tier and one fetch pool per process.
    """
    with _ENGINES_LOCK:
        engine = _ENGINES.get(config.cache_dir)
        if engine is None:
            engine = _ENGINES[config.cache_dir] = BlockCache(config, reserved=reserved)
        elif engine.config is not config and engine.config != config:
            log.warning("cache_dir %s is already open in this process with other settings; using those",
                        config.cache_dir)
        return engine


def close_engines(under: str) -> int:
    """Close and forget this process's engines of cache directories at or under ``under``; return how many."""
    with _ENGINES_LOCK:
        gone = [d for d in _ENGINES if is_under(d, under)]
        engines = [_ENGINES.pop(d) for d in gone]
    for engine in engines:
        try:
            engine.close()
        except OSError as exc:  # the directory is gone already (a test's tmpfs unmounted): nothing to keep
            log.debug("closing the cache engine of %s: %r", engine.config.cache_dir, exc)
    return len(engines)


def _forget_engines_after_fork() -> None:
    # Threads do not survive fork; locks, LMDB handles and sockets must not be shared with the parent.
    global _ENGINES_LOCK
    _ENGINES_LOCK = threading.Lock()  # another thread may have held it at the fork
    for engine in _ENGINES.values():
        engine.forget_after_fork()
    _ENGINES.clear()


os.register_at_fork(after_in_child=_forget_engines_after_fork)


@atexit.register
def _flush_hits_at_exit() -> None:
    for engine in list(_ENGINES.values()):
        with contextlib.suppress(Exception):  # best effort at interpreter exit
            engine.disk.flush_hits()
