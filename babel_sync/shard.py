"""Adaptive sharding of large files: the part size, and how many parts of one file are in flight.

A large object is copied as parallel ranged reads, each uploaded as one multipart part.

- **Part size** follows the object size: about four parts per parallel slot, so the first parts finish
  early and the last wave is short, within ``[min_part_size, max_part_size]`` and S3's 10,000 parts.
- **Parts in flight** (:class:`Window`) start at ``max(part_concurrency, transfers)`` divided among the
  large files being copied at that moment (a single large file gets every slot: at least ``transfers``
  parts in flight), and adapt to the throughput observed per round of parts: a round that is 10%
  faster than the one before widens the window by a quarter, one that is 20% slower narrows it, never
  below the starting share nor above the part pool. :class:`PartBudget` caps the part bytes held in
  memory by all files together (``max_inflight_bytes``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from babel_sync.config import SyncOptions

MiB = 1 << 20


def slots(options: SyncOptions) -> int:
    """Parallel part slots: ``max(part_concurrency, transfers)``."""
    return max(options.part_concurrency, options.transfers)


def part_size(size: int, options: SyncOptions) -> int:
    """Adaptive part size: about four parts per slot, within [min, max] and S3's 10,000 parts (MiB-rounded)."""
    want = math.ceil(size / (4 * slots(options)))
    part = max(options.min_part_size, min(options.max_part_size, want), math.ceil(size / 10_000))
    return math.ceil(part / MiB) * MiB


class Window:
    """Parts of one file in flight, adapted to the throughput of each round of completed parts.

    Args:
        low: Smallest window (the file's share of the slots).
        high: Largest window (the part pool).
        clock: Time source (tests pass their own).
    """

    def __init__(self, low: int, high: int, clock: Callable[[], float] | None = None) -> None:
        self.low = max(1, low)
        self.high = max(self.low, high)
        self.size = self.low
        self._clock = clock or time.monotonic
        self._start = self._clock()
        self._bytes = 0
        self._parts = 0
        self._last: float | None = None
        #: Throughput of each finished round (bytes per second), for the log and the tests.
        self.rounds: list[float] = []

    def done(self, nbytes: int) -> None:
        """Record a completed part; at the end of a round, widen or narrow the window."""
        self._bytes += nbytes
        self._parts += 1
        if self._parts < self.size:
            return
        now = self._clock()
        rate = self._bytes / max(now - self._start, 1e-9)
        self.rounds.append(rate)
        if self._last is not None:
            step = max(1, self.size // 4)
            if rate >= 1.1 * self._last:
                self.size = min(self.high, self.size + step)
            elif rate < 0.8 * self._last:
                self.size = max(self.low, self.size - step)
        self._last = rate
        self._start, self._bytes, self._parts = now, 0, 0


class PartBudget:
    """Shared by every file of a pass: the large files being copied, parts in flight and their bytes.

    Args:
        options: ``part_concurrency``, ``transfers`` and ``max_inflight_bytes``.
    """

    def __init__(self, options: SyncOptions) -> None:
        self.slots = slots(options)
        self.pool = 2 * self.slots
        self.max_bytes = options.max_inflight_bytes
        self._cond = threading.Condition()
        self._files = 0
        self._bytes = 0
        self.in_flight = 0
        self.peak = 0

    def window(self, parts: int) -> Window:
        """A window for a new large file of ``parts`` parts (call :meth:`finish` when it is done)."""
        with self._cond:
            self._files += 1
            share = max(2, self.slots // self._files)
        return Window(min(parts, share), min(parts, self.pool))

    def finish(self) -> None:
        """A large file is done (its share goes back to the others' next windows)."""
        with self._cond:
            self._files = max(0, self._files - 1)

    def acquire(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more part bytes fit in memory (one part always fits)."""
        with self._cond:
            while self._bytes and self._bytes + nbytes > self.max_bytes:
                self._cond.wait()
            self._bytes += nbytes
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)

    def release(self, nbytes: int) -> None:
        """A part is uploaded (or failed): its bytes leave memory."""
        with self._cond:
            self._bytes -= nbytes
            self.in_flight -= 1
            self._cond.notify_all()


__all__ = ["PartBudget", "Window", "part_size", "slots"]
