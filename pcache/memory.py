"""The in-process memory tier: an LRU bounded in bytes.

LRU is right here (unlike on disk) because a hit only moves a pointer inside one process: there is no
shared index to write, and the tier is small enough that scan pollution only costs a disk read.
"""

from __future__ import annotations

import threading
from collections import OrderedDict


class MemoryLRU:
    """A thread-safe LRU of immutable ``bytes`` values, bounded by their total size.

    Args:
        capacity_bytes: Budget; 0 disables the tier. A value larger than the budget is not stored.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._items: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        """Bytes currently held."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes) -> bytes | None:
        """Return the value for ``key`` and mark it most recently used, or None."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def __contains__(self, key: bytes) -> bool:
        return key in self._items

    def put(self, key: bytes, value: bytes) -> None:
        """Insert ``value``, evicting least recently used items so the budget always holds."""
        size = len(value)
        if size > self.capacity_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            while self._items and self._bytes + size > self.capacity_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= len(evicted)
            self._items[key] = value
            self._bytes += size

    def discard(self, key: bytes) -> None:
        """Remove ``key`` if present."""
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)

    def clear(self) -> None:
        """Drop everything."""
        with self._lock:
            self._items.clear()
            self._bytes = 0
