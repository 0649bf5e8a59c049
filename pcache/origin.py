"""The origin tier: any fsspec filesystem, reached through the shared retry helper.

It turns paths into versioned :class:`ObjectRef` s (ETag, else size and mtime) and serves ranged reads.
Metadata answers are cached for ``metadata_ttl`` seconds, so a hot ``open`` costs no HEAD.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from fsspec import AbstractFileSystem

from lingcore.retry import RetryPolicy, retry_call
from lingcore.versions import object_version
from pcache.keys import ObjectRef
from pcache.s3range import S3RangeReader


class Origin:
    """A target filesystem plus the identity used in block keys.

    Args:
        fs: The fsspec filesystem holding the data.
        protocol: Its protocol name (``s3``, ``file``, ...).
        identity: Extra identity (e.g. the endpoint URL) so equal paths on different stores never share
            blocks.
        policy: Retry policy for every call.
        metadata_ttl: Seconds to reuse ``info``/``ls`` answers.
    """

    def __init__(
        self, fs: AbstractFileSystem, protocol: str, identity: str, policy: RetryPolicy, metadata_ttl: float
    ) -> None:
        self.fs = fs
        self.protocol = protocol
        self.identity = identity
        self.policy = policy
        self.metadata_ttl = metadata_ttl
        self._meta: dict[tuple[str, str], tuple[float, Any]] = {}
        self._lock = threading.Lock()
        # S3 gets the direct ranged-GET path; every other store goes through fsspec's cat_file.
        self._s3 = S3RangeReader(fs) if protocol == "s3" and hasattr(fs, "url") else None

    def url(self, path: str) -> str:
        """Return the user-facing URL of ``path`` (``s3://bucket/key``)."""
        return f"{self.protocol}://{path}" if self.protocol not in ("file", "local") else path

    def _cached(self, kind: str, path: str, call: Any) -> Any:
        now = time.monotonic()
        with self._lock:
            hit = self._meta.get((kind, path))
        if hit is not None and now - hit[0] < self.metadata_ttl:
            return hit[1]
        value = retry_call(call, url=self.url(path), policy=self.policy)
        with self._lock:
            if len(self._meta) > 100_000:
                self._meta.clear()
            self._meta[(kind, path)] = (now, value)
        return value

    def invalidate(self, path: str) -> None:
        """Forget cached metadata for ``path`` and its parent listing."""
        parent = path.rsplit("/", 1)[0]
        with self._lock:
            for kind in ("info", "ls", "lsd"):
                self._meta.pop((kind, path), None)
                self._meta.pop((kind, parent), None)

    def info(self, path: str) -> dict[str, Any]:
        """Return ``fs.info(path)`` (cached); a missing object raises FileNotFoundError naming its URL."""
        try:
            return self._cached("info", path, lambda: self.fs.info(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"no such object: {self.url(path)}") from None

    def ls(self, path: str, detail: bool) -> list[Any]:
        """Return ``fs.ls(path, detail=True)`` (cached), reduced to names when ``detail`` is False."""
        try:
            entries = self._cached("lsd", path, lambda: self.fs.ls(path, detail=True))
        except FileNotFoundError:
            raise FileNotFoundError(f"no such directory: {self.url(path)}") from None
        return entries if detail else [e["name"] for e in entries]

    def ref(self, path: str) -> ObjectRef:
        """Return the current version of ``path`` as an :class:`ObjectRef`."""
        info = self.info(path)
        if info.get("type") == "directory":
            raise IsADirectoryError(f"is a directory: {self.url(path)}")
        return ObjectRef(url=f"{self.identity}{self.url(path)}", version=object_version(info),
                         size=int(info["size"]))

    def fetcher(self, path: str, version: str | None = None) -> Any:
        """Return ``fetch(start, end) -> bytes`` for ``path`` pinned to ``version``, with retries."""
        url = self.url(path)
        s3 = self._s3
        if s3 is not None:
            etag = version if version and ":" not in version else None

            def call(start: int, end: int) -> bytes:
                return s3.get_range(path, start, end, etag)
        else:

            def call(start: int, end: int) -> bytes:
                return self.fs.cat_file(path, start=start, end=end)

        def fetch(start: int, end: int) -> bytes:
            return retry_call(lambda: call(start, end), url=url, policy=self.policy)

        return fetch
