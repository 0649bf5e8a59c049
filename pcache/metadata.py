"""pcache's own metadata plane: file ``info`` and directory listings, shared through ``cache_dir``.

Backing filesystems keep listing caches of their own (s3fs's never expires: after one ``ls`` every
``info`` of a listed key, or of a key that was not listed, is answered from memory forever). pcache
bypasses them and keeps its own answers here, each stamped with the wall-clock time the origin gave it:

- an entry younger than ``metadata_ttl`` is served without asking the origin;
- a missing path is remembered too (a negative entry), for the same time;
- an older entry is asked for again; if the origin is unreachable, an entry younger than
  ``metadata_ttl + stale_if_error`` is served instead (HTTP's ``stale-if-error``), so objects whose blocks
  are cached stay readable through an outage.

The entries live in their own LMDB environment (``cache_dir/metadata``, unsynced: it is a cache), so a
restarted process, DataLoader workers after ``fork`` and the fusefs daemon all see them. Values are
``<f64 checked time> + JSON`` (never pickle: the cache directory may be shared), with datetimes
round-tripped. Keys longer than LMDB allows are hashed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, NamedTuple

import lmdb

from lingcore.lmdb_env import is_under, open_env, transaction
from lingcore.log import get_logger

log = get_logger(__name__)

_STAMP = struct.Struct("<d")
_U64 = struct.Struct("<Q")
_MAX_KEY = 500  # LMDB's default key limit is 511 bytes
_KINDS = (b"info", b"ls")
_STALE = b"stale_reads"
_PRUNE_EVERY_PUTS = 10_000
_PRUNE_EVERY_S = 60.0
_LOGGED_MAX = 100_000
_MEMO_LISTINGS = 64


class Cached(NamedTuple):
    """One remembered origin answer.

    Attributes:
        checked: Wall-clock time (``time.time()``) at which the origin was asked.
        value: The ``info`` dict, the listing (list of ``info`` dicts), or None for "no such path".
    """

    checked: float
    value: Any


def _default(obj: Any) -> Any:
    if isinstance(obj, datetime):
        return {"__datetime__": obj.isoformat()}
    return str(obj)  # anything else exotic in an info dict (it is informational only)


def _hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and "__datetime__" in obj:
        return datetime.fromisoformat(obj["__datetime__"])
    return obj


def _json(value: Any) -> bytes:
    return json.dumps(value, default=_default, separators=(",", ":")).encode()


def _encode(checked: float, value: Any) -> bytes:
    return _STAMP.pack(checked) + _json(value)


def _decode(raw: bytes) -> Cached:
    return Cached(_STAMP.unpack_from(raw)[0], json.loads(bytes(raw[_STAMP.size:]), object_hook=_hook))


def _key(url: str) -> bytes:
    raw = url.encode()
    return raw if len(raw) <= _MAX_KEY else b"\0" + hashlib.sha256(raw).digest()


class MetadataStore:
    """Remembered ``info`` and ``ls`` answers for one ``cache_dir``, shared by every process using it.

    It stores and returns answers; what is fresh or stale is the caller's policy (:class:`~pcache.origin.Origin`).
    Failures of the store itself never fail a read: it is a cache, so an error is logged and counts
    as a miss.

    Args:
        cache_dir: The cache directory; the environment is ``cache_dir/metadata``.
    """

    def __init__(self, cache_dir: str) -> None:
        self.path = os.path.join(cache_dir, "metadata")
        self.keep_s = 0.0  # entries older than this are of no use to any policy seen in this process
        self._lock = threading.Lock()
        self._pid = -1
        self._env: Any = None
        self._dbs: dict[bytes, Any] = {}
        self._puts = 0
        self._last_prune = time.monotonic()
        self._logged: set[tuple[str, str]] = set()
        # Decoded listings, reused while the stored one is the same (a large listing decodes slowly).
        self._memo: dict[str, tuple[bytes, Any]] = {}
        self._warned = False

    # -- environment -----------------------------------------------------------------------------
    def _open(self) -> tuple[Any, dict[bytes, Any]]:
        if self._pid == os.getpid():
            return self._env, self._dbs
        with self._lock:
            if self._pid != os.getpid():  # first use, or first use in a forked child (handles are per process)
                try:
                    self._env, self._dbs = self._open_env()
                except lmdb.Error as exc:
                    # Only a cache: a damaged one is moved aside, and the next process starts afresh (this
                    # one may hold the damaged handle, so it does without persisted metadata).
                    aside = f"{self.path}.corrupt-{int(time.time())}"
                    log.error("metadata cache %s is unreadable (%s); moved to %s", self.path, exc, aside,
                              extra={"path": self.path})
                    with contextlib.suppress(OSError):
                        os.replace(self.path, aside)
                    self._env, self._dbs = self._open_env()
                self._pid = os.getpid()
        return self._env, self._dbs

    def _open_env(self) -> tuple[Any, dict[bytes, Any]]:
        # A metadata lookup can be the first use of a fresh cache_dir (ref_for before any read).
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        env = open_env(self.path, map_size=1 << 30, max_dbs=4, sync=False, metasync=False, readahead=False,
                       max_readers=1024)
        return env, {name: env.open_db(name) for name in (*_KINDS, b"counters")}

    def _failed(self, what: str, exc: BaseException) -> None:
        if not self._warned:
            self._warned = True
            log.warning("metadata cache %s: %s failed (%r); asking the origin instead", self.path, what, exc,
                        extra={"path": self.path})

    def _write(self, fn: Callable[[Any, dict[bytes, Any]], None]) -> None:
        """Run ``fn(txn, dbs)`` in a write transaction; a full map is cleared once and retried."""
        for attempt in range(2):
            try:
                env, dbs = self._open()
                with transaction(env, write=True) as txn:
                    fn(txn, dbs)
                return
            except lmdb.MapFullError:
                if attempt == 0:
                    self.clear()
            except lmdb.Error as exc:
                self._failed("a write", exc)
                return

    # -- entries ---------------------------------------------------------------------------------
    def get(self, kind: str, url: str) -> Cached | None:
        """Return the remembered answer of ``kind`` (``"info"`` or ``"ls"``) for ``url``, if any."""
        try:
            env, dbs = self._open()
            with transaction(env, buffers=True) as txn:
                raw = txn.get(_key(url), db=dbs[kind.encode()])
                if raw is None:
                    return None
                if kind != "ls":
                    return _decode(bytes(raw))
                stamp = bytes(raw[:_STAMP.size + 16]) + _U64.pack(len(raw))  # time, start of value and length
                memo = self._memo.get(url)
                if memo is not None and memo[0] == stamp:
                    return memo[1]
                cached = _decode(bytes(raw))
            with self._lock:
                if len(self._memo) >= _MEMO_LISTINGS:
                    self._memo.pop(next(iter(self._memo)))
                self._memo[url] = (stamp, cached)
            return cached
        except (lmdb.Error, ValueError, struct.error) as exc:
            self._failed("a read", exc)
            return None

    def put(self, kind: str, url: str, value: Any, checked: float) -> None:
        """Remember ``value`` (None: "no such path") as the origin's answer at ``checked``."""
        raw = _encode(checked, value)
        self._write(lambda txn, dbs: txn.put(_key(url), raw, db=dbs[kind.encode()]))
        self._after_put(1)

    def put_listing(self, url: str, entries: list[dict[str, Any]], checked: float,
                    url_of: Callable[[str], str]) -> None:
        """Remember a listing and, from the same answer, the ``info`` of each file in it (one transaction)."""
        stamp = _STAMP.pack(checked)
        parts = [_json(e) for e in entries]  # each entry is encoded once, for both uses
        items = [(b"ls", _key(url), stamp + b"[" + b",".join(parts) + b"]")]
        items += [(b"info", _key(url_of(e["name"])), stamp + part) for e, part in zip(entries, parts, strict=True)
                  if e.get("type") == "file"]

        def write(txn: Any, dbs: dict[bytes, Any]) -> None:
            for db, key, raw in items:
                txn.put(key, raw, db=dbs[db])

        self._write(write)
        self._after_put(len(items))

    def drop(self, keys: Iterable[tuple[str, str]]) -> None:
        """Forget the answers ``(kind, url)`` (after a write through pcache)."""
        keys = list(keys)

        def delete(txn: Any, dbs: dict[bytes, Any]) -> None:
            for kind, url in keys:
                txn.delete(_key(url), db=dbs[kind.encode()])

        self._write(delete)

    def clear(self) -> None:
        """Forget every answer (counters stay)."""
        with contextlib.suppress(lmdb.Error):
            env, dbs = self._open()
            with transaction(env, write=True) as txn:
                for kind in _KINDS:
                    txn.drop(dbs[kind], delete=False)

    def _after_put(self, count: int) -> None:
        self._puts += count
        if self._puts >= _PRUNE_EVERY_PUTS and time.monotonic() - self._last_prune >= _PRUNE_EVERY_S:
            self._puts, self._last_prune = 0, time.monotonic()
            self.prune(self.keep_s)

    def prune(self, keep_s: float, now: float | None = None) -> int:
        """Delete entries older than ``keep_s`` seconds (useless to fresh and stale reads alike)."""
        limit = (time.time() if now is None else now) - keep_s
        dropped = 0

        def sweep(txn: Any, dbs: dict[bytes, Any]) -> None:
            nonlocal dropped
            for kind in _KINDS:
                old = [k for k, v in txn.cursor(db=dbs[kind]) if _STAMP.unpack_from(v)[0] < limit]
                for key in old:
                    txn.delete(key, db=dbs[kind])
                dropped += len(old)

        self._write(sweep)
        return dropped

    # -- stale reads -----------------------------------------------------------------------------
    def note_stale(self, url: str, version: str, age_s: float, cause: BaseException | None) -> None:
        """Count a stale answer (shared counter) and log it once per object and version per process."""

        def bump(txn: Any, dbs: dict[bytes, Any]) -> None:
            raw = txn.get(_STALE, db=dbs[b"counters"])
            txn.put(_STALE, _U64.pack((_U64.unpack(raw)[0] if raw else 0) + 1), db=dbs[b"counters"])

        self._write(bump)
        with self._lock:
            first = (url, version) not in self._logged
            if first:
                if len(self._logged) >= _LOGGED_MAX:
                    self._logged.clear()
                self._logged.add((url, version))
        if first:
            log.warning("origin unavailable for %s; serving its cached version %s, checked %.0f s ago (%s)",
                        url, version, age_s, cause or "origin marked down by an earlier failure",
                        extra={"url": url, "version": version})

    def stale_reads(self) -> int:
        """Stale answers served by every process sharing this ``cache_dir``."""
        try:
            env, dbs = self._open()
            with transaction(env) as txn:
                raw = txn.get(_STALE, db=dbs[b"counters"])
            return _U64.unpack(raw)[0] if raw else 0
        except lmdb.Error:
            return 0


_STORES: dict[str, MetadataStore] = {}
_STORES_LOCK = threading.Lock()


def get_metadata(cache_dir: str, keep_s: float = 0.0) -> MetadataStore:
    """Return this process's store for ``cache_dir``; ``keep_s`` is how long its user needs entries."""
    with _STORES_LOCK:
        store = _STORES.get(cache_dir)
        if store is None:
            store = _STORES[cache_dir] = MetadataStore(cache_dir)
        store.keep_s = max(store.keep_s, keep_s)
        return store


def forget_stores(under: str) -> int:
    """Forget this process's metadata stores of cache directories at or under ``under``; return how many
    (their LMDB handles are closed by :func:`lingcore.lmdb_env.close_envs`)."""
    with _STORES_LOCK:
        gone = [d for d in _STORES if is_under(d, under)]
        for d in gone:
            del _STORES[d]
    return len(gone)


def _reset_locks_after_fork() -> None:
    # Another thread may have held a lock at the fork; the child has only the forking thread. (LMDB
    # handles are reopened lazily: each store notices the new pid.)
    global _STORES_LOCK
    _STORES_LOCK = threading.Lock()
    for store in _STORES.values():
        store._lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_locks_after_fork)


# -- reads of your own writes: staged files in listings -------------------------------------------
def staged_info(path: str, size: int) -> dict[str, Any]:
    """The ``info`` of a file written through pcache and not yet uploaded."""
    return {"name": path, "size": size, "type": "file", "pending_upload": True}


def _staged_tree(base: str, staged: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Entries for staged files under ``base`` and the directories they imply, keyed by name."""
    out: dict[str, dict[str, Any]] = {}
    for path, size in staged.items():
        out[path] = staged_info(path, size)
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        while parent.startswith(base + "/") and parent not in out:
            out[parent] = {"name": parent, "size": 0, "type": "directory"}
            parent = parent.rsplit("/", 1)[0]
    return out


def merge_listing(base: str, entries: list[dict[str, Any]], staged: dict[str, int]) -> list[dict[str, Any]]:
    """Add staged files (and the subdirectories holding them) to the origin's listing of ``base``.

    A staged file replaces the origin's entry of the same name: it is the newer write.
    """
    if not staged:
        return entries
    if base in staged:
        return [staged_info(base, staged[base])]  # ls of a file lists the file
    merged = {e["name"].rstrip("/"): e for e in entries}
    for name, entry in _staged_tree(base, staged).items():
        if name.rsplit("/", 1)[0] == base and (entry["type"] == "file" or name not in merged):
            merged[name] = entry
    return [merged[name] for name in sorted(merged)]


def merge_find(base: str, found: dict[str, dict[str, Any]], staged: dict[str, int], maxdepth: int | None,
               withdirs: bool) -> dict[str, dict[str, Any]]:
    """Add staged files under ``base`` (and, with ``withdirs``, their directories) to a ``find`` result."""
    if not staged:
        return found
    merged = dict(found)
    for name, entry in _staged_tree(base, staged).items():
        depth = name[len(base) + 1:].count("/") + 1 if name != base else 0
        if maxdepth is not None and depth > maxdepth:
            continue
        if entry["type"] == "file" or (withdirs and name not in merged):
            merged[name] = entry
    return {name: merged[name] for name in sorted(merged)}
