"""The origin tier: any fsspec filesystem, reached through the shared retry helper, with deadlines.

It turns paths into versioned :class:`ObjectRef` s (ETag, else size and mtime) and serves ranged reads.
``info`` and ``ls`` answers come from pcache's own metadata plane (:mod:`pcache.metadata`): reused for
``metadata_ttl`` seconds by every process sharing the cache directory, so a hot ``open`` costs no HEAD,
and served stale for up to ``stale_if_error`` more seconds while the origin is unreachable. The backing
filesystem's own listing cache is bypassed on every call (s3fs's never expires).

Every call has a total deadline of ``origin_timeout`` seconds, retries included, and every request a
connect and a read timeout clipped to it, so a blackholed origin fails a read in bounded time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from fsspec import AbstractFileSystem

from lingcore.errors import OriginUnavailableError
from lingcore.retry import RetryPolicy, retry_call
from lingcore.versions import object_version
from pcache.keys import ObjectRef
from pcache.metadata import Cached, MetadataStore
from pcache.s3range import S3RangeReader

# How long, after the origin failed a metadata call, later calls with a usable stale answer skip it
# (bounds: at least 1 s, at most 30 s, else metadata_ttl): during an outage each open would otherwise
# wait out the full retry cycle before falling back.
_DOWN_MIN_S, _DOWN_MAX_S = 1.0, 30.0
# With a usable stale answer in hand, a revalidation gets three quick tries within this many seconds: a reader
# of a fully cached object should not wait out the whole retry budget (about 3 s of backoff, and
# origin_timeout when the origin never answers) before it is served from the cache.
_STALE_REVALIDATE = RetryPolicy(attempts=3, base_delay=0.05)
_STALE_REVALIDATE_S = 3.0


class Origin:
    """A target filesystem plus the identity used in block keys.

    Args:
        fs: The fsspec filesystem holding the data.
        protocol: Its protocol name (``s3``, ``file``, ...).
        identity: Extra identity (e.g. the endpoint URL) so equal paths on different stores never share
            blocks (nor metadata).
        policy: Retry policy for every call.
        metadata: The shared metadata store of the cache directory.
        metadata_ttl: Seconds an ``info``/``ls`` answer is reused.
        stale_if_error: Seconds past ``metadata_ttl`` an answer may be served while the origin is
            unreachable (0: never).
        origin_timeout: Total seconds for one call, retries included.
        clock: Wall clock, injected for tests.
    """

    def __init__(self, fs: AbstractFileSystem, protocol: str, identity: str, policy: RetryPolicy,
                 metadata: MetadataStore, metadata_ttl: float = 10.0, stale_if_error: float = 3600.0,
                 origin_timeout: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self.fs = fs
        self.protocol = protocol
        self.identity = identity
        self.policy = policy
        self.metadata = metadata
        self.metadata_ttl = metadata_ttl
        self.stale_if_error = stale_if_error
        self.origin_timeout = origin_timeout
        self.clock = clock
        self._down_until = 0.0
        # S3 gets the direct ranged-GET path; every other store goes through fsspec's cat_file.
        self._s3 = S3RangeReader(fs) if protocol == "s3" and hasattr(fs, "url") else None

    def url(self, path: str) -> str:
        """Return the user-facing URL of ``path`` (``s3://bucket/key``)."""
        return f"{self.protocol}://{path}" if self.protocol not in ("file", "local") else path

    def _key(self, path: str) -> str:
        return f"{self.identity}{self.url(path)}"

    # -- metadata --------------------------------------------------------------------------------
    def _call(self, path: str, call: Callable[[], Any], revalidate: bool = False) -> Any:
        """One metadata call at the origin: past the backend's listing cache, within the deadline
        (a short one when ``revalidate``: a stale answer can be served if it fails)."""
        self.fs.invalidate_cache(path)
        if revalidate:
            return retry_call(call, url=self.url(path), policy=_STALE_REVALIDATE,
                              deadline=time.monotonic() + min(self.origin_timeout, _STALE_REVALIDATE_S))
        return retry_call(call, url=self.url(path), policy=self.policy,
                          deadline=time.monotonic() + self.origin_timeout)

    def _lookup(self, kind: str, path: str, call: Callable[[], Any], store: Callable[[float, Any], None],
                remember: Callable[[], bool] | None) -> Any:
        """Return the answer of ``kind`` for ``path`` (None: no such path): remembered, fresh or stale."""
        key = self._key(path)
        cached = self.metadata.get(kind, key)
        now = self.clock()
        if cached is not None and 0 <= now - cached.checked < self.metadata_ttl:
            return cached.value
        stale_ok = (cached is not None and cached.value is not None and self.stale_if_error > 0
                    and now - cached.checked < self.metadata_ttl + self.stale_if_error)
        if stale_ok and time.monotonic() < self._down_until:
            return self._stale(path, cached, now, None)  # type: ignore[arg-type]
        may_store = remember is None or remember()
        try:
            value = self._call(path, call, revalidate=stale_ok)
        except FileNotFoundError:
            value = None
        except OriginUnavailableError as exc:
            if not stale_ok:
                raise
            self._down_until = time.monotonic() + min(_DOWN_MAX_S, max(_DOWN_MIN_S, self.metadata_ttl))
            return self._stale(path, cached, now, exc)  # type: ignore[arg-type]
        if may_store and (remember is None or remember()):  # asked before and after: see PCacheFileSystem.ls
            store(now, value)
        return value

    def _stale(self, path: str, cached: Cached, now: float, cause: BaseException | None) -> Any:
        value = cached.value
        version = object_version(value) if isinstance(value, dict) else "listing"
        self.metadata.note_stale(self.url(path), version, now - cached.checked, cause)
        return value

    def invalidate(self, path: str) -> None:
        """Forget remembered metadata for ``path`` and its ancestors (after a write: a new file may make
        new directories, and every listing above it may change)."""
        self.fs.invalidate_cache(path)
        keys = [("info", self._key(path)), ("ls", self._key(path))]
        while "/" in path.strip("/"):
            path = path.rstrip("/").rsplit("/", 1)[0]
            keys += [("info", self._key(path)), ("ls", self._key(path))]
        self.metadata.drop(keys)

    def info(self, path: str) -> dict[str, Any]:
        """Return ``fs.info(path)``; a missing object raises FileNotFoundError naming its URL."""
        key = self._key(path)
        value = self._lookup("info", path, lambda: self.fs.info(path),
                             lambda checked, v: self.metadata.put("info", key, v, checked), None)
        if value is None:
            raise FileNotFoundError(f"no such object: {self.url(path)}")
        return dict(value)

    def ls(self, path: str, detail: bool, remember: Callable[[], bool] | None = None) -> list[Any]:
        """Return ``fs.ls(path, detail=True)``, reduced to names when ``detail`` is False.

        Args:
            path: The directory.
            detail: Return info dicts rather than names.
            remember: Asked before and after the origin call; the answer is stored only if both say
                True (the caller's view of the origin may be about to change).
        """
        key = self._key(path)

        def store(checked: float, entries: Any) -> None:
            if entries is None:
                self.metadata.put("ls", key, None, checked)
            else:
                self.metadata.put_listing(key, entries, checked, self._key)

        entries = self._lookup("ls", path, lambda: self._list(path), store, remember)
        if entries is None:
            raise FileNotFoundError(f"no such directory: {self.url(path)}")
        return entries if detail else [e["name"] for e in entries]

    def _list(self, path: str) -> list[dict[str, Any]]:
        """``fs.ls(path, detail=True)`` where only ``info`` may say "no such path".

        s3fs lists a file's parent to list the file, and answers "not found" when that listing fails (a
        5xx included); ``info`` raises every error but a 404, so a "not found" is checked with it.
        """
        try:
            return list(self.fs.ls(path, detail=True))
        except FileNotFoundError:
            info = self.fs.info(path)  # FileNotFoundError here is the real answer
            return [] if info.get("type") == "directory" else [info]

    def find(self, path: str, maxdepth: int | None, withdirs: bool, **kwargs: Any) -> dict[str, Any]:
        """Return ``fs.find(path, detail=True)`` straight from the origin (not remembered); {} if missing.

        fsspec's own ``find`` (s3fs's too, with ``maxdepth``) walks with ``on_error="omit"`` and asks
        ``isfile`` under a bare ``except``: a failed listing becomes an empty directory, which no retry
        sees. So only s3fs's flat listing (paginated requests that raise on any error) and memory://'s
        single pass over its store (no I/O to fail) are used as they are; every other ``find`` is a walk
        of :meth:`_list` calls here, each retried on its own.
        """
        trusted = (self._s3 is not None and maxdepth is None) or self.protocol == "memory"
        if trusted or kwargs:  # kwargs: options only the backend knows (s3fs's prefix=)
            return dict(self._call(path, lambda: self.fs.find(path, maxdepth=maxdepth, withdirs=withdirs,
                                                              detail=True, **kwargs)))
        if maxdepth is not None and maxdepth < 1:
            raise ValueError(f"maxdepth must be at least 1, got {maxdepth} (find {self.url(path)})")
        try:
            top = self._call(path, lambda: self._list(path))
        except FileNotFoundError:
            return {}
        if len(top) == 1 and top[0]["name"].rstrip("/") == path and top[0].get("type") != "directory":
            return {path: top[0]}  # find of a file lists the file
        out: dict[str, Any] = {}
        if withdirs and path:  # the root itself, as fsspec's find gives it (globs like "d/**" match it)
            out[path] = self._call(path, lambda: self.fs.info(path))
        todo = [(path, top, 1)]  # a directory, its listing, the depth of its entries
        while todo:
            parent, listing, depth = todo.pop()
            for entry in listing:
                name = entry["name"].rstrip("/")
                if entry.get("type") != "directory":
                    out[entry["name"]] = entry
                elif name != parent:
                    if withdirs:
                        out[entry["name"]] = entry
                    if maxdepth is None or depth < maxdepth:
                        with contextlib.suppress(FileNotFoundError):  # removed since its parent was listed
                            todo.append((name, self._call(name, partial(self._list, name)), depth + 1))
        return {name: out[name] for name in sorted(out)}

    def ref(self, path: str) -> ObjectRef:
        """Return the current version of ``path`` as an :class:`ObjectRef`."""
        info = self.info(path)
        if info.get("type") == "directory":
            raise IsADirectoryError(f"is a directory: {self.url(path)}")
        return ObjectRef(url=f"{self.identity}{self.url(path)}", version=object_version(info),
                         size=int(info["size"]))

    # -- data ------------------------------------------------------------------------------------
    def fetcher(self, path: str, version: str | None = None) -> RangeFetch:
        """Return ``fetch(start, end) -> bytes`` for ``path`` pinned to ``version``, with retries.

        Each fetch ends within ``origin_timeout`` seconds: with the bytes, or with
        :class:`OriginUnavailableError` naming the URL. For S3, ``fetch.into(start, end, out)`` does
        the same into a caller's buffer.
        """
        url = self.url(path)
        s3 = self._s3
        if s3 is not None:
            etag = version if version and ":" not in version else None

            def call(start: int, end: int, deadline: float) -> bytes:
                return s3.get_range(path, start, end, etag, deadline=deadline)

            def call_into(start: int, end: int, out: memoryview, deadline: float) -> None:
                s3.get_range_into(path, start, end, out, etag, deadline=deadline)

            return RangeFetch(url, self.policy, self.origin_timeout, call, call_into)

        def cat(start: int, end: int, deadline: float) -> bytes:
            return self.fs.cat_file(path, start=start, end=end)

        return RangeFetch(url, self.policy, self.origin_timeout, cat, None)


class RangeFetch:
    """A block fetcher for one object version: ``fetch(start, end) -> bytes``, plus :meth:`into` when
    the origin can receive straight into a caller's buffer (:attr:`can_fill`).

    Every call has its own deadline of ``timeout`` seconds, retries included.
    """

    def __init__(self, url: str, policy: RetryPolicy, timeout: float,
                 call: Callable[[int, int, float], bytes],
                 call_into: Callable[[int, int, memoryview, float], None] | None) -> None:
        self.url = url
        self.policy = policy
        self.timeout = timeout
        self._call = call
        self._call_into = call_into
        self.can_fill = call_into is not None

    def __call__(self, start: int, end: int) -> bytes:
        deadline = time.monotonic() + self.timeout
        return retry_call(lambda: self._call(start, end, deadline), url=self.url, policy=self.policy,
                          deadline=deadline)

    def into(self, start: int, end: int, out: memoryview) -> None:
        """Fill ``out`` with bytes ``[start, end)`` (only when :attr:`can_fill`)."""
        call_into = self._call_into
        if call_into is None:
            raise TypeError(f"{self.url}: this origin cannot fetch into a buffer")
        deadline = time.monotonic() + self.timeout
        retry_call(lambda: call_into(start, end, out, deadline), url=self.url, policy=self.policy, deadline=deadline)
