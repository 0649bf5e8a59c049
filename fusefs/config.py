"""Mount settings (one frozen dataclass), loaded like every other config in the project.

Precedence is defaults < TOML ``[fusefs]`` table < ``FUSEFS_*`` environment < flags, through the shared
:func:`lingcore.config.load_config`. Cache settings (``cache_dir``, ``peers``, ...) are a separate
:class:`pcache.CacheConfig` read from the ``[pcache]`` table and ``PCACHE_*`` variables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lingcore.config import load_config
from lingcore.errors import ConfigError

MiB = 1024 * 1024


@dataclass(frozen=True)
class MountConfig:
    """How the mount behaves towards the kernel and the origin.

    Attributes:
        foreground: Stay attached to the terminal instead of daemonizing once the mount is ready.
        allow_other: Let other users see the mount (off by default: only the mounting user can).
        refresh: Seconds between re-listings of the origin (0: list once, at mount time).
        entry_timeout: Seconds the kernel may cache a name lookup.
        attr_timeout: Seconds the kernel may cache attributes (size, mtime).
        read_ahead_bytes: Kernel readahead for the mount (its BDI ``read_ahead_kb``), in bytes; 0 keeps the
            kernel default (128 KiB), which makes a sequential reader wait on many small requests.
        list_workers: Parallel listings, one per top-level prefix.
        metrics_port: Serve Prometheus metrics on 127.0.0.1 at this port (0: off).
        log_file: Where a daemonized mount writes its log (default ``<cache_dir>/fusefs.log``).
        fsname: The source name shown in ``/proc/mounts`` (default: the source URL).
        writable: New files and directories can be made; they are written through pcache write-back
            (origin objects stay read-only). Not with ``refresh``: the mount's own writes are its view.
    """

    foreground: bool = False
    allow_other: bool = False
    refresh: float = 0.0
    entry_timeout: float = 60.0
    attr_timeout: float = 60.0
    read_ahead_bytes: int = 16 * MiB
    list_workers: int = 16
    metrics_port: int = 0
    log_file: str = ""
    fsname: str = ""
    writable: bool = False

    def __post_init__(self) -> None:
        for name in ("refresh", "entry_timeout", "attr_timeout"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.read_ahead_bytes < 0:
            raise ConfigError("read_ahead_bytes", "must be >= 0")
        if self.list_workers < 1:
            raise ConfigError("list_workers", f"must be >= 1, got {self.list_workers}")
        if self.writable and self.refresh:
            raise ConfigError("refresh", "a writable mount does not re-list the origin; leave --refresh off")
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError("metrics_port", f"must be a TCP port or 0, got {self.metrics_port}")

    @classmethod
    def load(cls, toml_path: str | None = None, **overrides: Any) -> MountConfig:
        """Build from defaults, ``toml_path`` (``[fusefs]`` table), ``FUSEFS_*`` env and ``overrides``."""
        return load_config(cls, toml_path=toml_path, section="fusefs", env_prefix="FUSEFS_", overrides=overrides)
