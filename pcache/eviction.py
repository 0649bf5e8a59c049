"""S3-FIFO eviction over the shared LMDB index (Yang et al., SOSP 2023).

Why S3-FIFO and not LRU or 2Q for the disk tier:
- The index is shared by every process using the ``cache_dir``. LRU must *move* an entry on every hit,
  which is a write transaction that serialises all readers across processes. S3-FIFO only bumps a
  2-bit frequency counter, and we batch those bumps in memory and apply them when the process next
  writes, so the warm read path does no index write at all.
- Training reads whole shards once per epoch: a scan. S3-FIFO's small probationary queue (10%) lets
  one-hit blocks leave quickly without flushing the blocks that are re-read (indexes, hot shards,
  checkpoints read back), which plain LRU does not.

Layout (all in one LMDB environment):
- ``blocks``: key(16B) -> ``<BBQQ`` (queue, freq, seq, size)
- ``small``/``main``: seq(8B big-endian) -> key, FIFO order
- ``ghost``: key -> seq, and ``ghostq``: seq -> key, a bounded FIFO of recently evicted keys
- ``meta``: counters (``total``, ``small``, ``seq`` and statistics)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

SMALL, MAIN = 0, 1
_ENTRY = struct.Struct("<BBQQ")
_U64 = struct.Struct("<Q")
MAX_FREQ = 3
SMALL_FRACTION = 0.10


@dataclass
class Entry:
    """One block's eviction state."""

    queue: int
    freq: int
    seq: int
    size: int

    def pack(self) -> bytes:
        return _ENTRY.pack(self.queue, self.freq, self.seq, self.size)

    @classmethod
    def unpack(cls, raw: bytes) -> Entry:
        return cls(*_ENTRY.unpack(raw))


def _seq_key(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


class S3Fifo:
    """S3-FIFO bookkeeping; every method runs inside a caller-supplied LMDB write transaction."""

    def __init__(self, env: Any) -> None:
        self.blocks = env.open_db(b"blocks")
        self.queues = {SMALL: env.open_db(b"small"), MAIN: env.open_db(b"main")}
        self.ghost = env.open_db(b"ghost")
        self.ghostq = env.open_db(b"ghostq")
        self.meta = env.open_db(b"meta")

    # -- counters ---------------------------------------------------------------------------------
    def get_counter(self, txn: Any, name: str) -> int:
        raw = txn.get(name.encode(), db=self.meta)
        return _U64.unpack(raw)[0] if raw else 0

    def add_counter(self, txn: Any, name: str, delta: int) -> int:
        value = max(0, self.get_counter(txn, name) + delta)
        txn.put(name.encode(), _U64.pack(value), db=self.meta)
        return value

    def _next_seq(self, txn: Any) -> int:
        return self.add_counter(txn, "seq", 1)

    # -- queue operations -------------------------------------------------------------------------
    def _enqueue(self, txn: Any, key: bytes, entry: Entry) -> None:
        entry.seq = self._next_seq(txn)
        txn.put(_seq_key(entry.seq), key, db=self.queues[entry.queue])
        txn.put(key, entry.pack(), db=self.blocks)

    def get(self, txn: Any, key: bytes) -> Entry | None:
        raw = txn.get(key, db=self.blocks)
        return Entry.unpack(raw) if raw else None

    def insert(self, txn: Any, key: bytes, size: int) -> None:
        """Add a newly published block: into ``main`` if it was recently evicted, else ``small``."""
        if self.get(txn, key) is not None:
            self.remove(txn, key)
        ghost_seq = txn.get(key, db=self.ghost)
        queue = SMALL
        if ghost_seq is not None:
            txn.delete(key, db=self.ghost)
            txn.delete(ghost_seq, db=self.ghostq)
            queue = MAIN
        self._enqueue(txn, key, Entry(queue, 0, 0, size))
        self.add_counter(txn, "total", size)
        if queue == SMALL:
            self.add_counter(txn, "small", size)

    def remove(self, txn: Any, key: bytes) -> int:
        """Forget ``key`` entirely (no ghost); return the bytes released."""
        entry = self.get(txn, key)
        if entry is None:
            return 0
        txn.delete(_seq_key(entry.seq), db=self.queues[entry.queue])
        txn.delete(key, db=self.blocks)
        self.add_counter(txn, "total", -entry.size)
        if entry.queue == SMALL:
            self.add_counter(txn, "small", -entry.size)
        return entry.size

    def apply_hits(self, txn: Any, hits: dict[bytes, int]) -> None:
        """Fold batched hit counts into the frequency counters (capped at MAX_FREQ)."""
        for key, count in hits.items():
            entry = self.get(txn, key)
            if entry is not None and entry.freq < MAX_FREQ:
                entry.freq = min(MAX_FREQ, entry.freq + count)
                txn.put(key, entry.pack(), db=self.blocks)

    def evict_until(self, txn: Any, budget: int) -> list[bytes]:
        """Evict until the total fits ``budget``; return the evicted keys (caller deletes files)."""
        victims: list[bytes] = []
        while self.get_counter(txn, "total") > budget:
            victim = self._evict_one(txn, budget)
            if victim is None:
                break
            victims.append(victim)
        return victims

    def _head(self, txn: Any, queue: int) -> tuple[bytes, Entry] | None:
        while True:
            with txn.cursor(db=self.queues[queue]) as cur:
                if not cur.first():
                    return None
                slot, key = cur.key(), cur.value()
            entry = self.get(txn, key)
            if entry is not None and _seq_key(entry.seq) == slot:
                return key, entry
            txn.delete(slot, db=self.queues[queue])  # dangling or stale slot: repair and look again

    def _evict_one(self, txn: Any, budget: int) -> bytes | None:
        while True:
            small_bytes = self.get_counter(txn, "small")
            main_head = self._head(txn, MAIN)
            use_small = small_bytes > budget * SMALL_FRACTION or main_head is None
            head = self._head(txn, SMALL) if use_small else main_head
            if head is None:
                head = main_head if use_small else self._head(txn, SMALL)
                if head is None:
                    return None
            key, entry = head
            txn.delete(_seq_key(entry.seq), db=self.queues[entry.queue])
            if entry.queue == SMALL and entry.freq >= 1:
                # Re-read while on probation: promote to main instead of evicting.
                self.add_counter(txn, "small", -entry.size)
                self._enqueue(txn, key, Entry(MAIN, 0, 0, entry.size))
                continue
            if entry.queue == MAIN and entry.freq > 0:
                self._enqueue(txn, key, Entry(MAIN, entry.freq - 1, 0, entry.size))
                continue
            txn.delete(key, db=self.blocks)
            self.add_counter(txn, "total", -entry.size)
            if entry.queue == SMALL:
                self.add_counter(txn, "small", -entry.size)
                self._remember_ghost(txn, key)
            return key

    def _remember_ghost(self, txn: Any, key: bytes) -> None:
        seq = _seq_key(self._next_seq(txn))
        txn.put(key, seq, db=self.ghost)
        txn.put(seq, key, db=self.ghostq)
        limit = max(64, txn.stat(self.blocks)["entries"])
        excess = txn.stat(self.ghostq)["entries"] - limit
        if excess > 0:
            with txn.cursor(db=self.ghostq) as cur:
                cur.first()
                for _ in range(excess):
                    txn.delete(cur.value(), db=self.ghost)
                    if not cur.delete():
                        break
