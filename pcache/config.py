"""Configuration of a pcache instance (one frozen dataclass, validated on construction)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from lingcore.config import load_config
from pcache.errors import ConfigError

MiB = 1024 * 1024
GiB = 1024 * MiB


_OFF = ("", "off", "none")


def parse_listen(value: str, name: str = "listen") -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:PORT`` for IPv6) into host and port.

    Raises:
        ConfigError: naming ``name`` when the value is not HOST:PORT with a port from 0 to 65535.
    """
    host, _, port = value.rpartition(":")
    if not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ConfigError(name, f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def default_cache_dir() -> str:
    """Return ``$XDG_CACHE_HOME/pcache`` (or ``~/.cache/pcache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pcache")


@dataclass(frozen=True)
class CacheConfig:
    """Settings of the local cache engine. Sizes accept ``"4MiB"``-style strings in TOML/env/flags.

    Attributes:
        cache_dir: Directory holding the disk tier, LMDB index, journal and staged uploads. Many
            processes may share it.
        block_size: Bytes per cache block; part of the block key, so changing it starts a fresh cache.
        memory_bytes: In-process memory tier budget (LRU), per process.
        disk_bytes: Disk tier budget for clean blocks plus staged (not yet uploaded) write-back files.
        compression: ``"none"`` or ``"zstd"`` for blocks on disk.
        zstd_level: zstd level when compression is on.
        direct_writes: Write new disk-tier blocks with ``O_DIRECT`` (bypassing the page cache) where the
            file system accepts it, else buffered. Cheaper in CPU per cold byte and keeps cache fills
            from evicting the rest of the page cache; the first re-read of a block that left the memory
            tier then comes from the device. False: always buffered.
        readahead_blocks: Maximum blocks prefetched ahead of a sequential reader.
        max_inflight_bytes: Bound on bytes being fetched from the origin at once, per process.
        fetch_workers: Threads fetching blocks from the origin in parallel, per process.
        metadata_ttl: Seconds an ``info``/``ls`` answer (or a "no such object" answer) is reused, by every
            process sharing ``cache_dir``; after it, the origin is asked again.
        stale_if_error: Seconds past ``metadata_ttl`` during which, if the origin is unreachable, the last
            known version of an object is served from the cache (like HTTP's ``stale-if-error``); 0 turns
            it off.
        origin_timeout: Seconds one origin call (a block fetch, an ``info``) may take, retries included,
            before :class:`OriginUnavailableError`; each request's connect and read timeouts are clipped
            to what is left.
        retry_attempts: Attempts per origin call before :class:`OriginUnavailableError`.
        retry_base_delay: First backoff delay, in seconds (doubles each retry, with jitter).
        upload_part_size: Multipart upload part size.
        upload_concurrency: Parts uploaded in parallel per file.
        upload_workers: Files uploaded in parallel by the background uploader.
        stream_uploads: Upload whole parts of a large write-back file to an S3 origin while it is still
            being written (see :mod:`pcache.streaming`); the background uploader then sends the rest and
            completes it after ``close()``. False: the whole file is uploaded after ``close()``.
        uploader_idle_exit: Seconds the background uploader waits for new work before exiting.
        uploader_nice: CPU niceness increment of the background uploader process, so that on a busy
            node the training process keeps the CPU and uploads use what is left (0 to disable).
        peers: URLs of ``pcache serve`` nodes (``http://host:port``), comma-separated in env/flags.
        token_file: File holding the secret shared with the peers (needed when ``peers`` is set).
        peer_timeout: Seconds before a peer request gives up and the reader falls back.
        peer_blocks_on_disk: Also keep blocks served by a peer on the local disk tier (default: memory
            tier only; the owner node keeps them on its disk).
        replicas: 1 stores every write-back file on one peer too before ``close()`` returns (0: off).
        metrics_listen: ``HOST:PORT`` where ``pcache serve`` answers an unsigned ``GET /metrics`` for a
            Prometheus scrape, on its own port (block routes stay signed on the main one); ``"off"`` (or
            empty) turns it off. Loopback by default.
    """

    cache_dir: str = field(default_factory=default_cache_dir)
    block_size: int = 4 * MiB
    memory_bytes: int = 256 * MiB
    disk_bytes: int = 16 * GiB
    compression: str = "none"
    zstd_level: int = 3
    direct_writes: bool = True
    readahead_blocks: int = 16
    max_inflight_bytes: int = 128 * MiB
    fetch_workers: int = 16
    metadata_ttl: float = 10.0
    stale_if_error: float = 3600.0
    origin_timeout: float = 60.0
    retry_attempts: int = 6
    retry_base_delay: float = 0.1
    upload_part_size: int = 32 * MiB
    upload_concurrency: int = 8
    upload_workers: int = 2
    stream_uploads: bool = True
    uploader_idle_exit: float = 5.0
    uploader_nice: int = 10
    peers: tuple[str, ...] = ()
    token_file: str = ""
    peer_timeout: float = 1.0
    peer_blocks_on_disk: bool = False
    replicas: int = 0
    metrics_listen: str = "127.0.0.1:9471"

    def __post_init__(self) -> None:
        if not self.cache_dir:
            raise ConfigError("cache_dir", "must not be empty")
        object.__setattr__(self, "cache_dir", os.path.abspath(os.path.expanduser(self.cache_dir)))
        object.__setattr__(self, "peers", tuple(self.peers))
        if self.block_size < 4096 or self.block_size > 1024 * MiB:
            raise ConfigError("block_size", f"must be between 4KiB and 1GiB, got {self.block_size}")
        for name in ("memory_bytes", "disk_bytes", "max_inflight_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(name, "must be >= 0")
        if self.compression not in ("none", "zstd"):
            raise ConfigError("compression", f"must be 'none' or 'zstd', got {self.compression!r}")
        for name in ("fetch_workers", "retry_attempts", "upload_concurrency", "upload_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.readahead_blocks < 0:
            raise ConfigError("readahead_blocks", "must be >= 0")
        if self.upload_part_size < 5 * MiB:
            raise ConfigError("upload_part_size", "must be >= 5MiB (the S3 minimum part size)")
        if not 0 <= self.uploader_nice <= 19:
            raise ConfigError("uploader_nice", f"must be between 0 and 19, got {self.uploader_nice}")
        for peer in self.peers:
            parts = urlsplit(peer)
            if parts.scheme not in ("http", "https") or not parts.hostname or not parts.port:
                raise ConfigError("peers", f"malformed peer URL {peer!r}; expected http://host:port")
        if self.peers and not self.token_file:
            raise ConfigError("token_file", "peers are set but no token file is given")
        if self.replicas not in (0, 1):
            raise ConfigError("replicas", f"must be 0 or 1, got {self.replicas}")
        if self.replicas and not self.peers:
            raise ConfigError("replicas", "replicas=1 needs peers to replicate to")
        if self.metadata_ttl < 0:
            raise ConfigError("metadata_ttl", "must be >= 0")
        if self.stale_if_error < 0:
            raise ConfigError("stale_if_error", f"must be >= 0 (0 turns it off), got {self.stale_if_error}")
        if self.origin_timeout <= 0:
            raise ConfigError("origin_timeout", f"must be > 0, got {self.origin_timeout}")
        if self.metrics_listen.strip().lower() in _OFF:
            object.__setattr__(self, "metrics_listen", "")
        else:
            parse_listen(self.metrics_listen, "metrics_listen")

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the unsigned metrics listener, or None when it is off."""
        return parse_listen(self.metrics_listen, "metrics_listen") if self.metrics_listen else None

    @classmethod
    def load(cls, toml_path: str | None = None, **overrides: Any) -> CacheConfig:
        """Build a config from defaults, ``toml_path`` (or ``$PCACHE_CONFIG``), ``PCACHE_*`` env, kwargs."""
        return load_config(cls, toml_path=toml_path, section="pcache", env_prefix="PCACHE_", overrides=overrides)
