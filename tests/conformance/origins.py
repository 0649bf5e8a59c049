"""Origin kinds for the conformance suite: how to put bytes at an origin and how to make it fail.

Each kind writes and reads the origin *directly* (never through pcache), the way another client would,
and builds pcache filesystems in front of it. The abstract suite only talks to this interface, so an
origin kind's test class is an empty subclass that provides the ``origin`` fixture.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import s3fs
from fsspec.implementations.memory import MemoryFileSystem

from pcache import PCacheFileSystem
from pcache.testing import ChaosProxy, SeaweedServer

KiB = 1024
# Small blocks and a short metadata TTL keep every case fast while still spanning several blocks.
BLOCK_SIZE = 64 * KiB
METADATA_TTL = 0.5
_memory_ids = itertools.count(1)
_prefix_ids = itertools.count(1)


class OriginKind:
    """One origin store, seen from outside pcache.

    Attributes:
        name: Short name used in messages.
        root: This test's directory at the origin, in the form pcache returns names in (``bucket/conf``
            for S3, an absolute path for local files, ``/pcache-conformance-1`` for memory).
        pins_versions: The store has ETags and honours ``If-Match``, so an open file pins its version.
        process_local: The store's state lives in this process only (``memory://``): pcache's
            uploader, a separate process, cannot reach it.
        can_fail: The suite can make this origin unreachable (:meth:`outage`).
        can_blackhole: The suite can make this origin accept requests and never answer (:meth:`blackhole`).
        transient_faults: The origin fails a few requests at random throughout (pcache must retry).
    """

    name = "abstract"
    root = ""
    protocol = "file"
    pins_versions = True
    process_local = False
    can_fail = False
    can_blackhole = False
    transient_faults = False

    def target_options(self) -> dict[str, Any]:
        """Storage options pcache gets for the origin."""
        return {}

    def make_fs(self, cache_dir: Path | str, **cache_options: Any) -> PCacheFileSystem:
        """A fresh pcache filesystem in front of this origin, with the suite's small defaults."""
        options: dict[str, Any] = {"block_size": BLOCK_SIZE, "metadata_ttl": METADATA_TTL, "retry_attempts": 4,
                                   "retry_base_delay": 0.01, "uploader_idle_exit": 1.0}
        options.update(cache_options)
        return fsspec.filesystem("pcache", target_protocol=self.protocol, target_options=self.target_options(),
                                 cache_dir=str(cache_dir), skip_instance_cache=True, **options)

    def path(self, rel: str) -> str:
        """``rel`` under :attr:`root`, in pcache's name form."""
        return f"{self.root}/{rel}" if rel else self.root

    def url(self, path: str) -> str:
        """The user-facing URL of ``path`` (``s3://b/k``, ``memory://x``; local paths stay paths)."""
        return path

    def put(self, path: str, data: bytes) -> None:
        """Write ``data`` at the origin, as another client would."""
        raise NotImplementedError

    def cat(self, path: str) -> bytes:
        """Read ``path`` straight from the origin."""
        raise NotImplementedError

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists at the origin."""
        raise NotImplementedError

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """Make the origin unreachable inside the block."""
        raise NotImplementedError(f"{self.name} origins cannot be made unreachable")
        yield

    @contextlib.contextmanager
    def blackhole(self) -> Iterator[None]:
        """Make the origin accept requests and never answer inside the block."""
        raise NotImplementedError(f"{self.name} origins cannot be blackholed")
        yield


class LocalOrigin(OriginKind):
    """Local files. Versions are ``size:mtime`` (no ETag, no ``If-Match``); it is never unreachable."""

    name = "local"
    protocol = "file"
    pins_versions = False

    def __init__(self, base: Path) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.root = str(base)

    def put(self, path: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:  # in place, like a careless writer: the inode stays the same
            f.write(data)

    def cat(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def exists(self, path: str) -> bool:
        return os.path.exists(path)


class MemoryOrigin(OriginKind):
    """fsspec ``memory://``: one store per process. Versions are ``size:created``; never unreachable."""

    name = "memory"
    protocol = "memory"
    pins_versions = False
    process_local = True

    def __init__(self) -> None:
        self.store = MemoryFileSystem()
        self.root = f"/pcache-conformance-{os.getpid()}-{next(_memory_ids)}"

    def url(self, path: str) -> str:
        return f"memory://{path.lstrip('/')}"

    def put(self, path: str, data: bytes) -> None:
        self.store.pipe_file(path, data)

    def cat(self, path: str) -> bytes:
        return bytes(self.store.cat_file(path))

    def exists(self, path: str) -> bool:
        return bool(self.store.exists(path))

    def cleanup(self) -> None:
        """Drop this test's tree from the process-wide memory store."""
        if self.store.exists(self.root):
            self.store.rm(self.root, recursive=True)


class S3Origin(OriginKind):
    """S3 on the real SeaweedFS server; an outage stops the server (connection refused)."""

    name = "s3"
    protocol = "s3"
    can_fail = True

    def __init__(self, server: SeaweedServer, bucket: str, options: dict[str, Any]) -> None:
        self.server = server
        self.direct_options = options
        # One bucket serves a whole module (SeaweedFS makes volumes per bucket: slow); a prefix per test.
        self.root = f"{bucket}/conf-{os.getpid()}-{next(_prefix_ids)}"
        self._s3: Any = None

    def target_options(self) -> dict[str, Any]:
        return dict(self.direct_options)

    def _client(self) -> Any:
        # No listing cache: it must never hide what another writer did.
        if self._s3 is None:
            self._s3 = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False,
                                         **self.direct_options)
        return self._s3

    def url(self, path: str) -> str:
        return f"s3://{path}"

    def put(self, path: str, data: bytes) -> None:
        self._client().pipe_file(path, data)

    def cat(self, path: str) -> bytes:
        return bytes(self._client().cat_file(path))

    def exists(self, path: str) -> bool:
        return bool(self._client().exists(path))

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        self.server.stop()
        try:
            yield
        finally:
            self.server.start()
            self._s3 = None  # its connections point at the old server process


class ChaosS3Origin(S3Origin):
    """S3 behind the chaos proxy, which fails a few requests with 503 throughout (pcache must retry).

    An outage answers every request with 503 ("5xx after retries"); a blackhole holds every request
    without answering (the proxy sleeps before handling it).
    """

    name = "s3-chaos"
    can_blackhole = True
    transient_faults = True
    background_fail_ratio = 0.05

    def __init__(self, server: SeaweedServer, bucket: str, options: dict[str, Any], proxy: ChaosProxy) -> None:
        super().__init__(server, bucket, options)
        self.proxy = proxy
        proxy.fail_ratio = self.background_fail_ratio

    def target_options(self) -> dict[str, Any]:
        return self.server.storage_options(endpoint_url=self.proxy.endpoint_url)

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        self.proxy.fail_ratio = 1.0
        try:
            yield
        finally:
            self.proxy.fail_ratio = self.background_fail_ratio

    @contextlib.contextmanager
    def blackhole(self) -> Iterator[None]:
        # Requests that arrive meanwhile stay parked in the proxy for 30 s, then go on to a client that
        # has long given up (the proxy ignores the broken pipe).
        self.proxy.latency_s = 30.0
        try:
            yield
        finally:
            self.proxy.latency_s = 0.0
