"""The mount itself: list the origin, mount with pyfuse3, serve until unmounted or signalled.

:func:`serve` runs in the foreground process or in the daemon child that ``fusefs mount`` forks; it
calls ``ready(None)`` once the kernel mount exists, or ``ready(message)`` when setting it up failed.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import trio

from fusefs import metrics
from fusefs.config import MountConfig
from fusefs.errors import MountError
from fusefs.mounts import check_mountpoint, set_read_ahead
from fusefs.namespace import Changes, Namespace, list_origin
from fusefs.ops import ReadOnlyOperations
from lingcore.log import get_logger
from lingcore.retry import RetryPolicy
from pcache import CacheConfig, PCacheFileSystem

log = get_logger(__name__)


@dataclass(frozen=True)
class MountSpec:
    """What to mount where.

    Attributes:
        protocol: fsspec protocol of the source (``s3``, ``file``, ...).
        path: Source path without the protocol (``bucket/prefix``).
        mountpoint: Absolute path of an empty directory.
        storage_options: fsspec options of the origin (credentials stay in memory only).
    """

    protocol: str
    path: str
    mountpoint: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)


class Mount:
    """One mounted source: the pcache filesystem, the inode table and the FUSE session.

    Args:
        spec: Source and mountpoint.
        config: Mount settings.
        cache: pcache settings (``cache_dir`` is shared with every other process on the node).
    """

    def __init__(self, spec: MountSpec, config: MountConfig, cache: CacheConfig) -> None:
        self.spec, self.config, self.cache = spec, config, cache
        self.pfs = PCacheFileSystem(target_protocol=spec.protocol, target_options=spec.storage_options,
                                    skip_instance_cache=True, **vars(cache))
        self.root = self.pfs.origin_path(spec.path).rstrip("/") if spec.path.strip("/") else ""
        self.policy = RetryPolicy(attempts=cache.retry_attempts, base_delay=cache.retry_base_delay)
        self.ns = Namespace()
        self.ops = ReadOnlyOperations(self.ns, self.pfs, self.root, config)
        self._stop_requested = False

    @property
    def source_url(self) -> str:
        return self.pfs.origin.url(self.root) if self.root else f"{self.spec.protocol}://"

    def relist(self) -> Changes:
        """List the origin and apply it to the inode table (inode numbers are kept)."""
        t0 = time.monotonic()
        if self.config.foreground and sys.stderr.isatty() and not self.ns.total_bytes:
            # The first listing of a large bucket takes a while: show it (foreground on a terminal only).
            from rich.progress import Progress

            with Progress(transient=True) as bar:
                task = bar.add_task(f"listing {self.source_url}", total=None)
                listing = list_origin(self.pfs.fs, self.root, self.config.list_workers, self.policy,
                                      self.pfs.origin.url, lambda done, total: bar.update(task, completed=done,
                                                                                          total=total))
        else:
            listing = list_origin(self.pfs.fs, self.root, self.config.list_workers, self.policy,
                                  self.pfs.origin.url)
        changes = self.ns.apply(listing)
        metrics.INODES.set(len(self.ns.nodes))
        metrics.BYTES.set(self.ns.total_bytes)
        log.info("listed %d objects under %s in %.2f s (%d new, %d changed, %d removed)", len(listing),
                 self.source_url, time.monotonic() - t0, changes.added, len(changes.changed), len(changes.removed),
                 extra={"url": self.source_url, "objects": len(listing)})
        return changes

    def options(self) -> set[str]:
        fsname = (self.config.fsname or self.source_url).replace(",", "_")
        # No max_read option: libfuse negotiates the largest request the kernel allows (max_pages,
        # 1 MiB with libfuse 3's buffer) and refuses a max_read that differs from its own.
        opts = set(pyfuse3.default_options) | {"ro", f"fsname={fsname}", "subtype=fusefs"}
        if self.config.allow_other:
            opts.add("allow_other")
        return opts

    def serve(self, ready: Callable[[str | None], None]) -> int:
        """List, mount, serve; return the exit code. ``ready`` is told once the mount works (or why not)."""
        try:
            check_mountpoint(self.spec.mountpoint)
        except MountError as exc:
            ready(str(exc))
            return 2
        try:
            self.relist()
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which exits non-zero
            ready(f"cannot mount {self.source_url}: listing failed: {exc}")
            return 2 if isinstance(exc, FileNotFoundError) else 1
        # A SIGTERM between the kernel mount and the trio loop must still unmount cleanly.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._early_signal)
        if self.config.metrics_port:  # before the kernel mount: a busy port must not leave a dead mount
            try:
                metrics.serve_metrics(self.config.metrics_port)
            except OSError as exc:
                ready(f"cannot serve metrics on 127.0.0.1:{self.config.metrics_port}: {exc}")
                return 1
        try:
            pyfuse3.init(self.ops, self.spec.mountpoint, self.options())
        except RuntimeError as exc:
            ready(f"cannot mount {self.spec.mountpoint}: {exc} (is /dev/fuse available?)")
            return 1
        log.info("mounted %s at %s", self.source_url, self.spec.mountpoint,
                 extra={"url": self.source_url, "mountpoint": self.spec.mountpoint})
        try:
            trio.run(self._main, ready)
        finally:
            pyfuse3.close(unmount=True)  # also after a crash: never leave a dead mount behind
        log.info("unmounted %s", self.spec.mountpoint, extra={"mountpoint": self.spec.mountpoint})
        return 0

    def _early_signal(self, signum: int, frame: Any) -> None:
        self._stop_requested = True

    async def _main(self, ready: Callable[[str | None], None]) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._signals)
            if self.config.refresh > 0:
                nursery.start_soon(self._refresh_loop)
            nursery.start_soon(self._announce, ready)
            await pyfuse3.main(min_tasks=4, max_tasks=64)
            nursery.cancel_scope.cancel()

    async def _announce(self, ready: Callable[[str | None], None]) -> None:
        """Report ready once the kernel has finished FUSE INIT and answered a request through us."""
        await trio.to_thread.run_sync(os.stat, self.spec.mountpoint)
        # After INIT: the kernel sets the BDI readahead from the INIT reply, overwriting earlier values.
        set_read_ahead(self.spec.mountpoint, self.config.read_ahead_bytes)
        ready(None)
        if self._stop_requested:
            pyfuse3.terminate()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as receiver:
            async for signum in receiver:
                log.info("signal %s: unmounting %s", signal.Signals(signum).name, self.spec.mountpoint)
                pyfuse3.terminate()
                return

    async def _refresh_loop(self) -> None:
        while True:
            await trio.sleep(self.config.refresh)
            try:
                changes = await trio.to_thread.run_sync(self._list_only)
            except Exception as exc:  # keep serving the last listing while the origin is down
                metrics.REFRESHES.labels("error").inc()
                log.warning("refresh of %s failed, keeping the previous listing: %s", self.source_url, exc,
                            extra={"url": self.source_url})
                continue
            metrics.REFRESHES.labels("ok").inc()
            if changes.changed or changes.removed:
                try:
                    await trio.to_thread.run_sync(self._invalidate, changes)
                except Exception as exc:  # a stale kernel cache entry expires by itself; never end the mount
                    log.warning("invalidating kernel caches after a refresh failed: %r", exc)

    def _list_only(self) -> Changes:
        # Listing runs in a worker thread; apply() swaps the table's dicts in one step.
        return self.relist()

    def _invalidate(self, changes: Changes) -> None:
        """Tell the kernel to drop pages and attributes of changed files and names that went away."""
        for ino in changes.changed:
            try:
                pyfuse3.invalidate_inode(ino, attr_only=False)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOSYS):
                    log.warning("could not invalidate inode %d: %s", ino, exc)
        for parent, name in changes.removed:
            try:
                pyfuse3.invalidate_entry(parent, os.fsencode(name))
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOSYS):
                    log.warning("could not invalidate %s in inode %d: %s", name, parent, exc)
