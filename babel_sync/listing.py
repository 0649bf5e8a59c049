"""Parallel metadata prefetch: ListObjectsV2 over an adaptively split key space.

A listing starts with one task per root prefix. A task lists the keys of its prefix in the range
``(lo, hi]`` (``lo`` is sent as ``StartAfter``; ``None`` means open). When a page comes back truncated
and the scheduler has fewer queued tasks than workers, the rest of the range is split instead of read
page after page:

- **by delimiter** where the keys have one: a ``/``-delimited listing of the page's deepest common
  directory, starting after the page's last key, names the directories that follow; they become range
  boundaries (each range covers whole directories, so a tree of small directories costs one request per
  range, not one per directory);
- **by key ranges sampled from the page** everywhere (flat prefixes have nothing else): from the last key
  ``L``, candidate boundaries ``L[:j] + c`` for every position ``j`` from the page's first varying
  character up to the prefix, and every character ``c > L[j]`` of the classes the page shows at that
  position (digits, lower case, upper case). Deeper positions first: the nearest ranges are small, later
  ones grow geometrically, and every range splits again when it turns out to be large.

Up to ``workers`` requests are in flight at all times (one thread each). Pages stream into a sink as they
arrive; nothing here keeps the keys.

Key order: S3 lists in byte order, SeaweedFS in path-component order (``a/x`` before ``a-x``), and
SeaweedFS skips the subtree of a ``StartAfter`` that names a directory. A range therefore ends at the
first key that is beyond ``hi`` in *both* orders and not below ``hi/``: whichever order the server uses,
no key is left between two ranges (a few may be listed twice; the sink keeps one). Once a page comes
back out of byte order, the server is known to sort by path components and ranges end by that order
alone (no more double listing).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from babel_sync.errors import ListingError

_CLASSES = ("0123456789", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
#: Keys per ListObjectsV2 page (the S3 maximum).
PAGE = 1000


class Entry(NamedTuple):
    """One listed object, key relative to the site root (the listing's currency: a tuple, not a class)."""

    key: str
    size: int
    etag: str
    mtime: float


@dataclass
class Page:
    """One ListObjectsV2 answer: objects, common prefixes (delimiter listings), truncation, next token."""

    entries: list[Entry]
    prefixes: list[str]
    truncated: bool
    token: str | None


#: ``page(prefix, start_after, token, delimiter, max_keys) -> Page``, keys relative to the site root.
PageFn = Callable[[str, "str | None", "str | None", bool, int], Page]


@dataclass
class _Task:
    prefix: str
    lo: str | None
    hi: str | None
    token: str | None = None
    #: Fetch one key only: does a bounded range go on after a full page? (Most end there by design.)
    probe: bool = False
    #: Keys sampled from the last full page (a probe splits with them when the range goes on).
    sample: list[str] = field(default_factory=list)


@dataclass
class ListingStats:
    """What a listing did: requests, splits, per-worker requests and the most requests in flight at once."""

    requests: int = 0
    probes: int = 0
    splits: int = 0
    ranges: int = 0
    entries: int = 0
    max_in_flight: int = 0
    seconds: float = 0.0
    per_worker: dict[str, int] = field(default_factory=dict)


def _components(key: str) -> list[str]:
    return key.split("/")


def beyond(key: str, hi: str | None, path_order: bool = False) -> bool:
    """True when ``key`` lies after the range bound ``hi`` whatever order the server lists in.

    Args:
        path_order: The server is known to list in path-component order (a page was out of byte
            order), so byte order need not agree.
    """
    if hi is None or (key <= hi and not path_order):
        return False
    return _components(key) > _components(hi) and not key.startswith(hi + "/")


def after(key: str, lo: str) -> bool:
    """True when ``key`` sorts after ``lo`` in byte order and in path-component order."""
    return key > lo and _components(key) > _components(lo)


def _alphabet(chars: Iterable[str]) -> str:
    """The characters a position may hold, from those a page shows there (whole classes, sorted)."""
    out: set[str] = set()
    for ch in chars:
        cls = next((c for c in _CLASSES if ch in c), None)
        out.update(cls if cls is not None else ch)
    out.discard("/")  # a boundary never ends a directory name: it would split one directory
    return "".join(sorted(out))


def char_boundaries(keys: Sequence[str], last: str, floor: int, limit: int) -> list[str]:
    """Range boundaries after ``last`` sampled from a page's keys (see the module docstring).

    Args:
        keys: The page's keys.
        last: The page's last key in the server's order: every boundary sorts after it.
        floor: Positions before this (the task's prefix) are never varied.
        limit: At most this many boundaries (deeper positions first).
    """
    lo, hi = min(keys), max(keys)
    varying = next((i for i, (a, b) in enumerate(zip(lo, hi, strict=False)) if a != b), min(len(lo), len(hi)))
    out: list[str] = []
    for j in range(min(varying, len(last) - 1), floor - 1, -1):
        seen = _alphabet(k[j] for k in keys if len(k) > j)
        for ch in seen:
            if ch > last[j]:
                out.append(last[:j] + ch)
                if len(out) >= limit:
                    return out
    return out


class ParallelLister:
    """Lists prefixes with up to ``workers`` requests in flight, splitting large ranges as it goes.

    Args:
        page: Fetches one page (see :data:`PageFn`); called from the worker threads.
        workers: Requests in flight.
        sink: Called with each page's entries (from worker threads, possibly concurrently).
        call: Wraps each page call (the store's retry helper with typed errors); identity by default.
    """

    def __init__(self, page: PageFn, workers: int, sink: Callable[[list[Entry]], None],
                 call: Callable[[Callable[[], Page], str], Page] | None = None) -> None:
        self._page = page
        self.workers = max(1, workers)
        self._sink = sink
        self._call = call or (lambda fn, where: fn())
        self._cond = threading.Condition()
        self._queue: deque[_Task] = deque()
        self._busy = 0
        self._live = 0
        self._threads: list[threading.Thread] = []
        self._in_flight = 0
        self._error: BaseException | None = None
        #: Set once a page comes back out of byte order: the server sorts by path components (SeaweedFS).
        self.path_order = False
        self.stats = ListingStats()

    def run(self, prefixes: Iterable[str]) -> ListingStats:
        """List every key under ``prefixes``; return the statistics. The first error is raised."""
        roots = sorted(set(prefixes))
        for p in roots:
            if not any(p != q and p.startswith(q) for q in roots):
                self._queue.append(_Task(p, None, None))
        t0 = time.monotonic()
        with self._cond:
            self._grow()
        joined = 0
        while True:  # workers start more workers while they run, so the list grows until the end
            with self._cond:
                if joined == len(self._threads):
                    break
                thread = self._threads[joined]
            thread.join()
            joined += 1
        self.stats.seconds = time.monotonic() - t0
        if self._error is not None:
            raise self._error
        return self.stats

    # ------------------------------------------------------------------ scheduling
    def _grow(self) -> None:
        """Start workers for queued tasks no idle worker will take (call with the lock held).

        Threads start on demand: a small listing (one page) costs one thread, not ``workers``.
        """
        idle = self._live - self._busy
        for _ in range(min(self.workers - len(self._threads), len(self._queue) - idle)):
            thread = threading.Thread(target=self._worker, name=f"babel-list-{len(self._threads)}", daemon=True)
            self._threads.append(thread)
            self._live += 1
            thread.start()

    def _worker(self) -> None:
        name = threading.current_thread().name
        while True:
            with self._cond:
                while not self._queue and self._busy and self._error is None:
                    self._cond.wait()
                if self._error is not None or not self._queue:
                    self._live -= 1
                    self._cond.notify_all()  # nothing queued and nobody busy: every worker ends
                    return
                task = self._queue.popleft()
                self._busy += 1
            try:
                follow = self._step(task, name)
            except BaseException as exc:  # noqa: BLE001 - the first error ends the listing, raised by run()
                with self._cond:
                    self._error = self._error or exc
                    self._busy -= 1
                    self._live -= 1
                    self._cond.notify_all()
                return
            with self._cond:
                self._queue.extend(follow)
                self._busy -= 1
                self._grow()
                self._cond.notify_all()

    def _fetch(self, prefix: str, start_after: str | None, token: str | None, delimiter: bool, worker: str,
               max_keys: int = PAGE) -> Page:
        with self._cond:
            self._in_flight += 1
            self.stats.requests += 1
            self.stats.probes += delimiter
            self.stats.max_in_flight = max(self.stats.max_in_flight, self._in_flight)
            self.stats.per_worker[worker] = self.stats.per_worker.get(worker, 0) + 1
        try:
            return self._call(lambda: self._page(prefix, start_after, token, delimiter, max_keys), prefix)
        finally:
            with self._cond:
                self._in_flight -= 1

    def _step(self, task: _Task, worker: str) -> list[_Task]:
        """Fetch one page of ``task``; return the tasks that continue it (none when it is done)."""
        page = self._fetch(task.prefix, None if task.token else task.lo, task.token, False, worker,
                           1 if task.probe else PAGE)
        entries = page.entries
        if not self.path_order and any(a.key > b.key for a, b in zip(entries, entries[1:], strict=False)):
            self.path_order = True  # ranges stop where this server's order says, not later
        if task.hi is not None:
            cut = next((i for i, e in enumerate(entries) if beyond(e.key, task.hi, self.path_order)), None)
            if cut is not None:
                self._emit(entries[:cut])
                return []
        self._emit(entries)
        if not page.truncated:
            return []
        if not entries or not page.token:
            raise ListingError(f"{task.prefix}*", "a truncated listing page without keys or continuation token")
        keys = [e.key for e in entries]
        if task.hi is not None and not task.probe:
            # A range split off a page is sized to end about here: one key tells whether it does,
            # instead of a whole page of keys that belong to the next range.
            return [_Task(task.prefix, task.lo, task.hi, page.token, probe=True, sample=[*keys[::10], keys[-1]])]
        with self._cond:
            spare = len(self._queue) < self.workers
        if spare:
            ranges = self._split(task, task.sample + keys if task.probe else keys, worker)
            if ranges:
                return ranges
        return [_Task(task.prefix, task.lo, task.hi, page.token)]

    def _emit(self, entries: list[Entry]) -> None:
        if entries:
            self._sink(entries)
            with self._cond:
                self.stats.entries += len(entries)

    def _split(self, task: _Task, keys: list[str], worker: str) -> list[_Task]:
        """Split the rest of ``task`` after ``keys`` (the page just read, last key last) into ranges."""
        last = keys[-1]
        limit = 2 * self.workers
        lo, hi = min(keys), max(keys)
        common = next((i for i, (a, b) in enumerate(zip(lo, hi, strict=False)) if a != b), min(len(lo), len(hi)))
        cdir = lo[: lo.rfind("/", 0, common) + 1]
        if len(cdir) < len(task.prefix):
            cdir = task.prefix
        dirs: list[str] = []
        if any("/" in k[len(cdir):] for k in keys):  # the keys have structure: ask for the directories
            probe = self._fetch(cdir, last, None, True, worker)
            dirs = [d for d in probe.prefixes if d.startswith(cdir) and after(d, last)
                    and (task.hi is None or after(task.hi, d))]
            if len(dirs) > limit:  # evenly spaced: each range covers about as many directories
                step = len(dirs) / limit
                dirs = [dirs[int(i * step)] for i in range(limit)]
        chars = [b for b in char_boundaries(keys, last, len(task.prefix), max(0, limit - len(dirs)))
                 if b + "/" not in dirs]  # a directory's own name: its subtree would be listed twice
        bounds: list[str] = []
        for b in sorted({*dirs, *chars}):
            if not after(b, last) or (task.hi is not None and not after(task.hi, b)):
                continue
            if bounds and not after(b, bounds[-1]):
                continue  # keep boundaries increasing in both orders
            bounds.append(b)
        if not bounds:
            return []
        edges: list[str | None] = [last, *bounds, task.hi]
        out = [_Task(task.prefix, edges[i], edges[i + 1]) for i in range(len(edges) - 1)]
        with self._cond:
            self.stats.splits += 1
            self.stats.ranges += len(out)
        return out


def list_serial(page: PageFn, prefix: str, sink: Callable[[list[Entry]], None]) -> int:
    """One paginated listing of ``prefix``, page after page (the baseline the benchmark compares with)."""
    token: str | None = None
    n = 0
    while True:
        result = page(prefix, None, token, False, PAGE)
        sink(result.entries)
        n += len(result.entries)
        if not result.truncated:
            return n
        token = result.token


__all__ = ["Entry", "ListingStats", "Page", "PageFn", "ParallelLister", "after", "beyond", "char_boundaries",
           "list_serial"]
