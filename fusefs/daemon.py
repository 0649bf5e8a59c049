"""The mount itself: list the origin, mount with pyfuse3, serve until unmounted or signalled.

:func:`serve` runs in the foreground process or in the daemon child that ``fusefs mount`` forks; it
calls ``ready(None)`` once the kernel mount exists, or ``ready(message)`` when setting it up failed.
"""

from __future__ import annotations

import errno
import os
import posixpath
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
from fusefs.control import ControlServer, socket_path
from fusefs.errors import MountError
from fusefs.mounts import check_mountpoint, set_read_ahead
from fusefs.namespace import Changes, FileEntry, Namespace, list_origin
from fusefs.ops import ReadOnlyOperations
from fusefs.writable import WritableOperations
from lingcore.log import get_logger
from lingcore.marker import MARKER_NAME
from lingcore.retry import RetryPolicy
from pcache import (
    CacheConfig,
    PCacheFileSystem,
    pending_bytes,
    resume_uploads,
    staged_files,
    still_pending,
    upload_errors,
)

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
        self.ops: ReadOnlyOperations
        self.control: ControlServer | None = None
        if config.writable:
            self.ops = WritableOperations(self.ns, self.pfs, self.root, config,
                                          socket_path(cache.cache_dir, spec.mountpoint))
        else:
            self.ops = ReadOnlyOperations(self.ns, self.pfs, self.root, config)
        self._stop_requested = False
        self._token: Any = None

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
            try:
                listing = list_origin(self.pfs.fs, self.root, self.config.list_workers, self.policy,
                                      self.pfs.origin.url)
            except FileNotFoundError:
                if not self.config.writable:
                    raise
                # A new prefix: the mount starts empty (`fusefs mount` checked that the bucket exists).
                listing = {}
        changes = self.ns.apply(listing)
        if self.config.writable:
            self._add_staged()
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
        opts = set(pyfuse3.default_options) | {f"fsname={fsname}", "subtype=fusefs", "nosuid", "nodev"}
        if not self.config.writable:
            opts.add("ro")
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
        if isinstance(self.ops, WritableOperations):
            try:
                self.control = ControlServer(self.ops.control_path, self._control)
            except OSError as exc:
                ready(f"cannot open the control socket {self.ops.control_path}: {exc}")
                return 1
            pending = resume_uploads(self.pfs)  # what a killed mount left journaled uploads now
            if pending:
                log.info("%d staged file(s) from an earlier run are uploading", pending)
            metrics.PENDING_BYTES.set_function(lambda: pending_bytes(self.pfs))
        try:
            pyfuse3.init(self.ops, self.spec.mountpoint, self.options())
        except RuntimeError as exc:
            if self.control is not None:
                self.control.close()
            ready(f"cannot mount {self.spec.mountpoint}: {exc} (is /dev/fuse available?)")
            return 1
        log.info("mounted %s at %s", self.source_url, self.spec.mountpoint,
                 extra={"url": self.source_url, "mountpoint": self.spec.mountpoint})
        try:
            trio.run(self._main, ready)
        finally:
            pyfuse3.close(unmount=True)  # also after a crash: never leave a dead mount behind
            if self.control is not None:
                self.control.close()
        log.info("unmounted %s", self.spec.mountpoint, extra={"mountpoint": self.spec.mountpoint})
        return 0

    def _early_signal(self, signum: int, frame: Any) -> None:
        self._stop_requested = True

    async def _main(self, ready: Callable[[str | None], None]) -> None:
        self._token = trio.lowlevel.current_trio_token()
        if self.control is not None:
            self.control.start()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._signals)
            if isinstance(self.ops, WritableOperations):
                nursery.start_soon(self._upload_metrics, self.ops)
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

    # -- writable mounts -------------------------------------------------------------------------------
    def _add_staged(self) -> None:
        """Show files a killed mount of this cache left staged (they upload again; they stay writable)."""
        prefix = self.root + "/" if self.root else ""
        for path, size in staged_files(self.pfs, self.root or "/").items():
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix):]
            node = self.ns.lookup(rel)
            if node is not None and node.entry is not None:
                node.local = True
                self.ns.resize(node, size, node.entry.mtime_ns)
            elif node is None:
                parent = self.ns.ensure_dirs(posixpath.dirname(rel))
                self.ns.add(parent, posixpath.basename(rel), FileEntry(size, time.time_ns(), "staged"))

    async def _upload_metrics(self, ops: WritableOperations) -> None:
        while True:
            await trio.sleep(1.0)
            if ops.published:
                ids = list(ops.published)
                left = await trio.to_thread.run_sync(still_pending, self.pfs, ids)
                for entry_id in ids:
                    if entry_id not in left:
                        metrics.UPLOADED_BYTES.inc(ops.published.pop(entry_id, 0))

    def _in_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        """Serve ``fusefs commit`` / ``fusefs flush`` (runs in a control thread, may block for long)."""
        op, rel, timeout = request.get("op"), str(request.get("path") or "").strip("/"), request.get("timeout")
        target = (f"{self.root}/{rel}" if self.root else rel) if rel else self.root
        url = self.pfs.origin.url(target) if target else self.source_url
        node = self._in_loop(self.ns.lookup, rel)
        if node is None:
            raise FileNotFoundError(f"{url} does not exist in the mount {self.spec.mountpoint}")
        if op == "flush":
            self.pfs.flush(target or None, timeout)
            return {"ok": True, "url": url}
        if op != "commit":
            raise ValueError(f"unknown control request {op!r}")
        if not node.is_dir:
            raise NotADirectoryError(f"cannot commit {url}: a commit is of a directory")
        assert isinstance(self.ops, WritableOperations)
        busy = self._in_loop(self.ops.unflushed_under, rel)
        if busy:
            raise OSError(f"cannot commit {url}: {len(busy)} file(s) under it are open with unflushed writes, "
                          f"e.g. {busy[0]}; close them first")
        try:
            marker = self.pfs.commit(target, timeout)
        except TimeoutError as exc:
            metrics.COMMITS.labels("error").inc()
            errors = upload_errors(self.pfs, target)
            if errors:  # say why the uploads are stuck, not only that they are
                failed, why = next(iter(errors.items()))
                raise TimeoutError(f"{exc}; no marker written; upload of {failed} keeps failing: {why}") from None
            raise
        except Exception:
            metrics.COMMITS.labels("error").inc()
            raise
        metrics.COMMITS.labels("ok").inc()
        marker_path = f"{target}/{MARKER_NAME}"
        info = self.pfs.fs.info(marker_path)
        self._in_loop(self._show_marker, rel, int(info.get("size") or 0), str(info.get("ETag") or "marker"))
        return {"ok": True, "url": marker}

    def _show_marker(self, rel: str, size: int, version: str) -> None:
        parent = self.ns.lookup(rel)
        if parent is None or MARKER_NAME in parent.children:
            return
        node = self.ns.add(parent.ino, MARKER_NAME, FileEntry(size, time.time_ns(), version))
        node.local = False  # the marker is an origin object: read-only through the mount
