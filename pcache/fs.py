"""The fsspec filesystem ``pcache``: read-through block cache and write-back in front of any fsspec store.

Both spellings work::

    fsspec.open("pcache::s3://bucket/key", "rb", pcache={"cache_dir": D}, s3={...})
    fsspec.filesystem("pcache", target_protocol="s3", target_options={...}, cache_dir=D)
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from functools import partial
from typing import Any

from fsspec.implementations.chained import ChainedFileSystem

from lingcore.files import put_whole
from lingcore.lmdb_env import close_envs, is_under
from lingcore.log import get_logger
from lingcore.retry import RetryPolicy, retry_call
from pcache.cluster.auth import load_token
from pcache.cluster.client import PeerTier
from pcache.cluster.replica import node_id, replicate
from pcache.commits import read_commit, read_committed, verify_commit
from pcache.config import CacheConfig
from pcache.engine import BlockCache, Fetch, PeerBlock, close_engines, get_engine
from pcache.file import PCacheFile
from pcache.keys import ObjectRef
from pcache.metadata import forget_stores, get_metadata, merge_find, merge_listing, staged_info
from pcache.origin import Origin
from pcache.targets import build_target_fs, endpoint_of, strip_url
from pcache.writeback import WriteBack, WriteBackFile

log = get_logger(__name__)
_WRITEBACKS: dict[str, WriteBack] = {}
_REGISTRY_LOCK = threading.Lock()
# Keyed by id(): fsspec computes an instance's hash only after __init__ returns.
_INSTANCES: weakref.WeakValueDictionary[int, PCacheFileSystem] = weakref.WeakValueDictionary()


def get_writeback(config: CacheConfig) -> WriteBack:
    """Return this process's write-back manager for ``config.cache_dir``."""
    with _REGISTRY_LOCK:
        wb = _WRITEBACKS.get(config.cache_dir)
        if wb is None:
            wb = _WRITEBACKS[config.cache_dir] = WriteBack(config)
        return wb


def all_writebacks() -> list[WriteBack]:
    """Write-back managers created in this process."""
    with _REGISTRY_LOCK:
        return list(_WRITEBACKS.values())


def release(under: str) -> None:
    """Close and forget everything this process holds for cache directories at or under ``under``: engines
    (their fetch and publish threads), write-back managers, metadata stores and LMDB handles.

    For a process that is done with a cache directory (a test's temporary one, a tool that warmed a cache
    and goes on): they would otherwise live as long as the process, with their threads and descriptors.
    Filesystems still using that directory must not be used afterwards; uploads already journaled carry
    on in the uploader process, or at the next use of the directory.
    """
    close_engines(under)  # first: their write-behind threads still ask the write-back for its reservations
    with _REGISTRY_LOCK:
        gone = [d for d in _WRITEBACKS if is_under(d, under)]
        writebacks = [_WRITEBACKS.pop(d) for d in gone]
    for wb in writebacks:
        wb.close()
    forget_stores(under)
    close_envs(under)


def _forget_writebacks_after_fork() -> None:
    global _REGISTRY_LOCK
    _REGISTRY_LOCK = threading.Lock()
    for wb in _WRITEBACKS.values():
        wb.forget_after_fork()
    _WRITEBACKS.clear()


os.register_at_fork(after_in_child=_forget_writebacks_after_fork)


def all_filesystems() -> list[PCacheFileSystem]:
    """Live pcache filesystems in this process."""
    return list(_INSTANCES.values())


class PCacheFileSystem(ChainedFileSystem):
    """Cached, checksummed reads and durable write-back over a target fsspec filesystem.

    Args:
        target_protocol: Protocol of the origin (``"s3"``, ``"file"``, ...).
        target_options: Storage options for the origin (credentials stay in memory only).
        fs: An already built origin filesystem, instead of protocol and options.
        config_file: TOML file with a ``[pcache]`` table; ``PCACHE_*`` env vars override it.
        **cache_options: :class:`~pcache.config.CacheConfig` fields (``cache_dir``, ``block_size``, ...).
    """

    protocol = "pcache"

    def __init__(self, target_protocol: str | None = None, target_options: dict[str, Any] | None = None,
                 fs: Any = None, fo: str | None = None, config_file: str | None = None,
                 **cache_options: Any) -> None:
        fsspec_kw = {k: cache_options.pop(k) for k in ("skip_instance_cache", "use_listings_cache",
                                                         "listings_expiry_time", "max_paths", "asynchronous",
                                                         "loop") if k in cache_options}
        super().__init__(**fsspec_kw)
        self.target_options = dict(target_options or {})
        self.config = CacheConfig.load(config_file, **cache_options)
        if fs is None:
            target_protocol = target_protocol or "file"
            fs = build_target_fs(target_protocol, self.target_options, origin_timeout=self.config.origin_timeout)
        proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        self.target_protocol = "s3" if proto in ("s3", "s3a") else proto
        self._policy = RetryPolicy(attempts=self.config.retry_attempts, base_delay=self.config.retry_base_delay)
        endpoint = endpoint_of(self.target_options) or (os.environ.get("AWS_ENDPOINT_URL", "")
                                                         if self.target_protocol == "s3" else "")
        self._identity = f"{endpoint}|" if endpoint else ""
        # What rebuilds the origin filesystem in a forked child (s3fs and its event loop are not
        # fork-safe): the options it was built from, or those of the instance we were given.
        self._rebuild_options = self.target_options if target_options or not hasattr(fs, "storage_options") \
            else dict(fs.storage_options)
        self._origin = (os.getpid(), self._make_origin(fs))
        # Checked at construction, so a bad token file fails fast and names the file.
        self._token = load_token(self.config.token_file) if self.config.peers else b""
        self._peer_tier: tuple[int, PeerTier | None] = (0, None)
        self._engine: tuple[int, BlockCache | None] = (0, None)  # memoized per process (reads use it often)
        _INSTANCES[id(self)] = self

    def _make_origin(self, fs: Any) -> Origin:
        config = self.config
        metadata = get_metadata(config.cache_dir, keep_s=config.metadata_ttl + config.stale_if_error)
        return Origin(fs, self.target_protocol, self._identity, self._policy, metadata, config.metadata_ttl,
                      config.stale_if_error, config.origin_timeout)

    @property
    def origin(self) -> Origin:
        """This process's origin tier (rebuilt after a fork: DataLoader workers read S3 too)."""
        pid, origin = self._origin
        if pid != os.getpid():
            with _REGISTRY_LOCK:
                pid, origin = self._origin
                if pid != os.getpid():
                    fs = build_target_fs(self.target_protocol, self._rebuild_options, skip_instance_cache=True,
                                         origin_timeout=self.config.origin_timeout)
                    origin = self._make_origin(fs)
                    self._origin = (os.getpid(), origin)
        return origin

    @property
    def fs(self) -> Any:
        """The origin filesystem of this process."""
        return self.origin.fs

    @property
    def engine(self) -> BlockCache:
        """This process's block cache for the directory (resolved per process: fork-safe)."""
        pid, engine = self._engine
        if engine is None or pid != os.getpid():  # first use, or first use after a fork
            config = self.config
            engine = get_engine(config, reserved=lambda: get_writeback(config).reserved_bytes())
            self._engine = (os.getpid(), engine)
        return engine

    @property
    def peers(self) -> PeerTier | None:
        """This process's peer tier, when ``peers`` are configured (resolved per process: fork-safe)."""
        if not self.config.peers:
            return None
        with _REGISTRY_LOCK:  # fetch threads race to create it; there must be exactly one per process
            pid, tier = self._peer_tier
            if tier is None or pid != os.getpid():
                tier = PeerTier(self.config.peers, self._token, timeout_s=self.config.peer_timeout)
                weakref.finalize(self, tier.close)  # no health checks outlive the filesystem
                self._peer_tier = (os.getpid(), tier)
            return tier

    def fetcher_for(self, target: str, ref: ObjectRef) -> Fetch:
        """Block fetcher for ``target`` at ``ref``'s version: owner peer, next owner, then the origin."""
        origin_fetch = self.origin.fetcher(target, ref.version)
        if not self.config.peers:
            return origin_fetch
        block_size = self.config.block_size

        def fetch(start: int, end: int) -> bytes | PeerBlock:
            tier = self.peers
            data = tier.get_block(target, ref.version, ref.size, start // block_size, block_size) if tier else None
            return PeerBlock(data) if data is not None and len(data) == end - start else origin_fetch(start, end)

        return fetch

    @property
    def writeback(self) -> WriteBack:
        """This process's write-back manager for the directory (resolved per process: fork-safe)."""
        return get_writeback(self.config)

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        return strip_url(str(path))

    def _target_path(self, path: str) -> str:
        return self.origin_path(path)

    def url(self, path: str) -> str:
        """Return the origin URL (``s3://bucket/key``) for ``path``."""
        return self.origin.url(self._target_path(path))

    # -- metadata (pcache's own plane: pcache/metadata.py; staged writes are listed too) -------------
    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        target = self._target_path(path)
        staged = self.writeback.staged_path(self.origin.url(target))
        if staged is not None:
            try:
                return staged_info(target, os.path.getsize(staged))
            except FileNotFoundError:
                pass  # the upload completed meanwhile
        try:
            return self.origin.info(target)
        except FileNotFoundError:
            if self._staged(target):  # a directory that only files staged here make
                return {"name": target, "size": 0, "type": "directory"}
            raise

    # fsspec's exists/isdir/isfile answer False on *any* error; an unreachable origin is not "missing":
    # only FileNotFoundError means no, OriginUnavailableError propagates.
    def exists(self, path: str, **kwargs: Any) -> bool:
        try:
            self.info(path)
        except FileNotFoundError:
            return False
        return True

    def isdir(self, path: str) -> bool:
        try:
            return bool(self.info(path)["type"] == "directory")
        except FileNotFoundError:
            return False

    def isfile(self, path: str) -> bool:
        try:
            return bool(self.info(path)["type"] == "file")
        except FileNotFoundError:
            return False

    def _staged(self, target: str) -> dict[str, int]:
        return self.writeback.staged_under(self.origin.url(target))

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        target = self._target_path(path)
        staged = self._staged(target)
        try:
            # Not remembered while files under it are staged: once uploaded, it would hide them for a TTL.
            entries = self.origin.ls(target, True, remember=lambda: not staged and not self._staged(target))
        except FileNotFoundError:
            if not staged:
                raise
            entries = []
        entries = merge_listing(target, entries, staged)
        return entries if detail else [e["name"] for e in entries]

    def find(self, path: str, maxdepth: int | None = None, withdirs: bool = False, detail: bool = False,
             **kwargs: Any) -> Any:
        target = self._target_path(path)
        staged = self._staged(target)
        try:
            found = self.origin.find(target, maxdepth, withdirs, **kwargs)
        except FileNotFoundError:
            if not staged:
                raise
            found = {}
        found = merge_find(target, found, staged, maxdepth, withdirs)
        return found if detail else sorted(found)

    def glob(self, path: str, maxdepth: int | None = None, **kwargs: Any) -> Any:
        # In the target's own path form, the form find() returns names in (memory:// adds a leading
        # "/"), so a pattern given as a URL matches them.
        return super().glob(self._target_path(path), maxdepth=maxdepth, **kwargs)

    def ref(self, path: str) -> ObjectRef:
        """Return the versioned reference used for block keys."""
        return self.origin.ref(self._target_path(path))

    # -- data ------------------------------------------------------------------------------------
    def _open(self, path: str, mode: str = "rb", block_size: Any = None, autocommit: bool = True,
              cache_options: Any = None, **kwargs: Any) -> Any:
        target = self._target_path(path)
        url = self.origin.url(target)
        if mode not in ("rb", "wb"):
            raise ValueError(f"pcache supports modes 'rb' and 'wb', not {mode!r} (path {url})")
        if mode == "rb":
            staged = self.writeback.staged_path(url)
            if staged is not None:
                try:
                    return open(staged, "rb")  # not uploaded yet: the local copy is the truth
                except FileNotFoundError:
                    pass
            return PCacheFile(self, target, self.origin.ref(target))
        if self.target_protocol == "memory":
            # The uploader is another process: it would upload into its own memory, and the file would
            # vanish from this process once "done".
            raise ValueError(f"pcache cannot write back to {url}: memory:// lives in one process and uploads "
                             "run in a separate uploader process")
        return WriteBackFile(self.writeback, url, self.target_protocol, target, self.target_options,
                             on_close=lambda: self.origin.invalidate(target),
                             replicator=self._replicate if self.config.replicas else None)

    def _replicate(self, entry: dict[str, Any], data_path: str) -> dict[str, str] | None:
        """Store a closed write-back file on one peer (``replicas=1``); return where, for the journal."""
        tier = self.peers
        peers = tier.alive() if tier is not None else ()
        peer = replicate(peers, self._token, entry, data_path, node_id(self.config.cache_dir),
                         timeout_s=self.config.peer_timeout)
        if peer is None:
            log.warning("replicas=1 but no peer stored %s: until it is uploaded it exists on this node only",
                        entry["url"], extra={"url": entry["url"]})
            return None
        return {"peer": peer, "token_file": self.config.token_file}

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        """``data[start:end]``: Python slice semantics, as fsspec documents (negative offsets count from
        the end; out-of-range ones are clipped, so ``start=-N`` past the start is the whole file)."""
        with self._open(path, "rb") as f:
            size = f.size if isinstance(f, PCacheFile) else os.fstat(f.fileno()).st_size
            lo, hi, _ = slice(start, end).indices(size)
            f.seek(lo)
            return f.read(max(0, hi - lo))

    # -- durability ------------------------------------------------------------------------------
    def flush(self, prefix: str | None = None, timeout: float | None = None) -> None:
        """Block until every staged file under ``prefix`` is durable at the origin."""
        self.writeback.wait(self.url(prefix) if prefix else None, timeout)

    def commit(self, prefix: str, timeout: float | None = None) -> str:
        """Flush ``prefix``, then write its ``_COMMITTED`` marker; return the marker's URL."""
        return self.writeback.commit(self.url(prefix), self.fs, self._target_path(prefix), timeout,
                                     others=all_writebacks())

    # -- the surface other packages use (fusefs, loaders, ling_train) -----------------------------
    def origin_path(self, path: str) -> str:
        """Return the origin filesystem's path for ``path`` (``pcache::s3://b/k`` or ``s3://b/k`` -> ``b/k``)."""
        return self.fs._strip_protocol(strip_url(path))

    def ref_for(self, path: str, version: str | None = None, size: int | None = None) -> ObjectRef:
        """Return the versioned reference block keys are made from.

        With ``version`` and ``size`` (from a listing) no metadata request is made; without them the
        origin's current version is asked for (answers are reused for ``metadata_ttl`` seconds).
        """
        target = self.origin_path(path)
        if version is None or size is None:
            return self.origin.ref(target)
        # Origin.ref's identity: the endpoint, then the URL (equal paths on two stores never share blocks).
        return ObjectRef(url=f"{self.origin.identity}{self.origin.url(target)}", version=version, size=size)

    def in_memory(self, ref: ObjectRef, start: int, end: int) -> bool:
        """Return True when bytes ``[start, end)`` of ``ref`` are all in this process's memory tier."""
        return self.engine.in_memory(ref, start, end)

    def put_atomic(self, path: str, data: bytes) -> None:
        """Write a small file straight to the origin, so readers see all of it or nothing (pointers, markers).

        It bypasses the write-back and returns once the origin has it; cached metadata of ``path`` is
        dropped. Retried as a whole (on a local origin each try writes a fresh sibling and renames it).
        """
        target = self.origin_path(path)
        try:
            retry_call(lambda: put_whole(self.fs, target, data), url=self.origin.url(target), policy=self._policy)
        finally:
            self.origin.invalidate(target)

    def rm(self, path: str | list[str], recursive: bool = False, maxdepth: int | None = None) -> None:
        """Delete ``path`` at the origin (a directory needs ``recursive``) and drop its cached metadata.

        Files still staged in the write-back are not affected. A missing path raises FileNotFoundError where
        the origin filesystem checks (local files; S3 deletes are idempotent).
        """
        for one in path if isinstance(path, list) else [path]:
            target, url = self.origin_path(one), self.url(one)
            gone = [target]
            if recursive:  # every object below loses its cached metadata too
                with contextlib.suppress(FileNotFoundError):
                    gone += retry_call(partial(self.fs.find, target, withdirs=True), url=url, policy=self._policy)
            try:
                retry_call(partial(self.fs.rm, target, recursive=recursive, maxdepth=maxdepth), url=url,
                           policy=self._policy)
            finally:
                for name in gone:
                    self.origin.invalidate(name)

    # Commit markers (lingcore.marker's format), documented in pcache.commits.
    read_commit = read_commit
    read_committed = read_committed
    verify_commit = verify_commit
