"""Listings on disk: one LMDB database per listing, so a pass over 10^6 objects keeps no key in memory.

Pages stream in from the listing workers (:class:`~babel_sync.listing.ParallelLister`) and are written
one transaction per page. The planner then reads a unit at a time with a prefix scan. What stays in
memory is what the planner asks for up front: the entries whose file name is *watched* (unit markers,
``_PACKING``), and the count and bytes of the keys a rule matches.

The environment is ``state_dir/listings/<pid>`` (LMDB through :func:`lingcore.lmdb_env.open_env`,
unsynced: it is scratch space, rebuilt by every pass). Directories of processes that are gone are
removed when the next process opens its own, and a process removes its own at exit.

LMDB keys are at most 511 bytes and S3 keys up to 1024: a longer key is stored under its first 480
bytes plus an xxh3-64 of the whole key, with the whole key in the value. Prefix scans of shorter
prefixes still find it.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
import struct
import threading
from collections.abc import Callable, Iterable, Iterator

from babel_sync.listing import Entry
from lingcore.checksum import block_checksum, content_hasher
from lingcore.lmdb_env import open_env, transaction

_NAMES = itertools.count()  # database names are unique in the process (Syncers share its environment)
_SIZE = struct.Struct("<Q")
_MTIME = struct.Struct("<d")
_LONG = 480
_MAX_KEY = 500


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _db_key(key: str) -> tuple[bytes, bool]:
    raw = key.encode()
    if len(raw) <= _MAX_KEY:
        return raw, False
    return raw[:_LONG] + b"\xff" + block_checksum(raw).to_bytes(8, "big"), True


def value_prefix(size: int, etag: str) -> bytes:
    """The start of a stored value: size and ETag. ``value.startswith(value_prefix(...))`` compares an
    entry with a manifest record without decoding it (the no-op pass does this for every object)."""
    return _SIZE.pack(size) + etag.encode() + b"\0"


def value_size(value: bytes) -> int:
    """The size stored in a value."""
    return int(_SIZE.unpack_from(value)[0])


def _encode(e: Entry, long: bool) -> bytes:
    # size | etag | NUL | mtime [| full key]: the fixed-size fields around the ETag keep the prefix
    # (size, etag) comparable as bytes.
    value = value_prefix(e.size, e.etag) + _MTIME.pack(e.mtime)
    return value + e.key.encode() if long else value


def _decode(raw_key: bytes, value: bytes) -> Entry:
    size = value_size(value)
    end = value.index(b"\0", _SIZE.size)
    mtime = _MTIME.unpack_from(value, end + 1)[0]
    full = value[end + 1 + _MTIME.size:]
    return Entry((full or raw_key).decode(), size, value[_SIZE.size:end].decode(), mtime)


def _key(raw_key: bytes, value: bytes) -> str:
    if len(raw_key) <= _MAX_KEY:
        return raw_key.decode()
    end = value.index(b"\0", _SIZE.size)
    return value[end + 1 + _MTIME.size:].decode()


class Listing:
    """One listing: a named LMDB database plus the watched entries and matched totals.

    Use :meth:`add` as the lister's sink. Duplicates (ranges may overlap) keep the first entry.

    Args:
        env: The LMDB environment.
        name: The database name.
        watch: File names (the part after the last ``/``) whose entries are kept in :attr:`watched`.
        match: Keys counted in :attr:`objects` / :attr:`bytes` (a rule's include/exclude); None = none.
    """

    def __init__(self, env: object, name: bytes, watch: Iterable[str] = (),
                 match: Callable[[str], bool] | None = None) -> None:
        self._env = env
        self.name = name
        self._db = env.open_db(name)  # type: ignore[attr-defined]
        with transaction(env, write=True) as txn:
            txn.drop(self._db, delete=False)  # a name reused after a crash starts empty
        self._watch = frozenset(watch)
        self._match = match
        self._lock = threading.Lock()
        self.watched: dict[str, Entry] = {}
        self.count = 0
        self.objects = 0
        self.bytes = 0
        self.dropped = False

    def add(self, entries: list[Entry]) -> None:
        """Store one page of entries (thread-safe; one write transaction)."""
        with self._lock, transaction(self._env, write=True, db=self._db) as txn:
            for e in entries:  # encoded inside the lock: a page waiting for it holds one copy, not two
                key, long = _db_key(e.key)
                if not txn.put(key, _encode(e, long), overwrite=False):
                    continue  # listed twice (overlapping ranges): keep the first
                self.count += 1
                if e.key.rpartition("/")[2] in self._watch:
                    self.watched[e.key] = e
                if self._match is not None and self._match(e.key):
                    self.objects += 1
                    self.bytes += e.size

    def get(self, key: str) -> Entry | None:
        """The entry of ``key``, or None."""
        raw, _ = _db_key(key)
        with transaction(self._env, db=self._db) as txn:
            value = txn.get(raw)
        return None if value is None else _decode(raw, value)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def __len__(self) -> int:
        return self.count

    def scan(self, prefix: str = "") -> Iterator[Entry]:
        """Entries whose key starts with ``prefix``, in byte order (read in batches, no long transaction)."""
        for raw, value in self._raw(prefix):
            e = _decode(raw, value)
            if e.key.startswith(prefix):
                yield e

    def scan_raw(self, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        """(key, stored value) under ``prefix``: for :func:`value_prefix` comparisons and :func:`value_size`."""
        exact = len(prefix.encode()) <= _LONG  # then every stored key under the raw prefix is under prefix
        for raw, value in self._raw(prefix):
            key = raw.decode() if len(raw) <= _MAX_KEY else _key(raw, value)
            if exact or key.startswith(prefix):
                yield key, value

    def fingerprint(self, prefix: str, skip_key: str, skip_name: str) -> tuple[int, int, str]:
        """(count, total bytes, xxh3-128 of every key, size and ETag) under ``prefix``, leaving out
        ``skip_key`` and keys whose file name is ``skip_name``.

        One tight pass over the stored bytes, nothing decoded: the no-op pass compares it with the
        fingerprint of the last pass that found the unit in sync.
        """
        hasher = content_hasher()
        skip, tail, name = skip_key.encode(), b"/" + skip_name.encode(), skip_name.encode()
        count = total = 0
        for raw, value in self._raw(prefix):
            if raw in (skip, name) or raw.endswith(tail):
                continue
            hasher.update(raw + b"\0" + value[:value.index(b"\0", _SIZE.size) + 1])
            count += 1
            total += _SIZE.unpack_from(value)[0]
        return count, total, str(hasher.hexdigest())

    def decode(self, key: str, value: bytes) -> Entry:
        """The entry of a (key, value) pair from :meth:`scan_raw`."""
        return _decode(key.encode(), value) if len(key.encode()) <= _MAX_KEY else _decode(b"", value)

    def _raw(self, prefix: str) -> Iterator[tuple[bytes, bytes]]:
        start = prefix.encode()
        raw_prefix = start[:_LONG]
        while True:
            with transaction(self._env, db=self._db) as txn:
                cur = txn.cursor()
                if not cur.set_range(start):
                    return
                batch = []
                for raw, value in cur:
                    if not raw.startswith(raw_prefix):
                        break
                    batch.append((raw, value))
                    if len(batch) >= 4096:
                        start = raw + b"\0"  # the next key after this one
                        break
            yield from batch
            if len(batch) < 4096:
                return

    def drop(self) -> None:
        """Delete the database (the listing is no longer needed)."""
        if not self.dropped:
            with transaction(self._env, write=True) as txn:
                txn.drop(self._db, delete=True)
            self.dropped = True


class ListingStore:
    """The per-process LMDB environment for listings, under ``state_dir/listings/<pid>``."""

    def __init__(self, state_dir: str) -> None:
        root = os.path.join(os.path.abspath(os.path.expanduser(state_dir)), "listings")
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # left behind by processes that were killed
            if name.isdigit() and int(name) != os.getpid() and not _pid_alive(int(name)):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        self.path = os.path.join(root, str(os.getpid()))
        # Sparse: the map is address space, the file grows with the data (about 70 bytes per entry).
        self.env = open_env(self.path, map_size=1 << 38, max_dbs=4096, sync=False, metasync=False,
                            readahead=False)
        self._open: list[Listing] = []
        self._lock = threading.Lock()
        atexit.register(shutil.rmtree, self.path, True)

    def new(self, watch: Iterable[str] = (), match: Callable[[str], bool] | None = None) -> Listing:
        """A fresh, empty listing."""
        with self._lock:
            listing = Listing(self.env, f"l{next(_NAMES)}".encode(), watch, match)
            self._open.append(listing)
            return listing

    def release(self) -> None:
        """Drop every listing made so far (the end of a pass)."""
        with self._lock:
            todo, self._open = self._open, []
        for listing in todo:
            with contextlib.suppress(Exception):
                listing.drop()


__all__ = ["Listing", "ListingStore", "value_prefix", "value_size"]
