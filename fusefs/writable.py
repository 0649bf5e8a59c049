"""The handlers of ``fusefs mount --writable``: new files go through pcache write-back, origin objects stay read-only.

What a writer sees:

- Objects listed at the origin are read-only: opening one for writing, truncating, unlinking or renaming
  it fails with ``EPERM`` and the origin is untouched. So does any write of a file named ``_COMMITTED``
  (the commit marker is written by ``fusefs commit`` only).
- A new file is staged in the cache directory (:class:`pcache.StagedWrite`). ``close()`` (FUSE flush)
  and ``fsync()`` return once it is fsynced locally and journaled; it then uploads in the background.
- Staged files can be read, stat'ed (the written size), truncated, unlinked and renamed, also over
  another staged file (``os.replace``). A rename before the upload starts re-targets the pending
  upload; once uploaded, the origin copies server-side and deletes the old name (see
  :func:`pcache.move_staged`): no object is left under a temporary name.
- Directories can be created; empty ones created here can be removed or renamed. A non-empty
  directory rename gets ``EXDEV`` (``mv`` then copies file by file).
- A write that finds the disk tier full of dirty data gets ``ENOSPC``; that file is never published.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
import time
from typing import Any

import pyfuse3
import trio

from fusefs import metrics
from fusefs.config import MountConfig
from fusefs.namespace import FileEntry, Namespace, Node
from fusefs.ops import _fail
from fusefs.tree import TreeOperations, Writer
from lingcore.log import get_logger
from pcache import (
    CacheFullError,
    PCacheFileSystem,
    StagedWrite,
    can_copy_server_side,
    is_pending,
)

log = get_logger(__name__)

XATTR_STATE = b"user.fusefs.state"
XATTR_CONTROL = b"user.fusefs.control"
_WRITE = os.O_WRONLY | os.O_RDWR
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2

class LocalHandle:
    """An open local file: reads come from its staged bytes, else through pcache (staged copy or origin).

    ``writes`` is False for a read-only open of a file that is being written: it reads the writer's
    bytes, but neither publishes them nor counts as one of the writer's handles.
    """

    def __init__(self, node: Node, url: str, writer: Writer | None, reader: Any = None, writes: bool = True,
                 opener: Any = None) -> None:
        self.node, self.url, self.writer, self.reader, self.writes = node, url, writer, reader, writes
        self.opener = opener  # opens the file through pcache once the writer has closed it

    def in_memory(self, offset: int, size: int) -> bool:
        return False

    def read(self, offset: int, size: int) -> bytes:
        if self.writer is not None and not (self.writer.staged.closed and self.opener is not None):
            return self.writer.staged.pread(size, offset)
        if self.reader is None:
            self.reader = self.opener()
        if hasattr(self.reader, "pread"):
            return bytes(self.reader.pread(offset, size))
        return os.pread(self.reader.fileno(), size, offset)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


class WritableOperations(TreeOperations):
    """:class:`ReadOnlyOperations` plus create, write, flush/fsync, truncate, unlink, rename, mkdir, rmdir.

    Args:
        ns: The inode table.
        pfs: The pcache filesystem (reads and write-back).
        root: Origin path of the mounted prefix.
        config: Mount settings.
        control_path: The daemon's control socket, shown as the ``user.fusefs.control`` xattr of the root.
    """

    def __init__(self, ns: Namespace, pfs: PCacheFileSystem, root: str, config: MountConfig,
                 control_path: str = "") -> None:
        super().__init__(ns, pfs, root, config)
        self.control_path = control_path
        self._local: dict[int, LocalHandle] = {}
        self.published: dict[str, int] = {}  # journal entry id -> bytes, until uploaded (metrics)

    # -- attributes ------------------------------------------------------------------------------------
    def attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = super().attrs(node)
        if node.entry is None:
            attr.st_mode = stat.S_IFDIR | 0o755  # new files can be made in any directory
        elif node.local:
            attr.st_mode = stat.S_IFREG | 0o644
            attr.attr_timeout = 0  # its size changes as it is written
        return attr

    def state(self, node: Node) -> str:
        """``origin``, ``writing``, ``staged`` (durable locally, upload pending) or ``uploaded``."""
        if not node.local or node.entry is None:
            return "origin" if node.entry is not None else "directory"
        if node.ino in self._writers:
            return "writing"
        return "staged" if is_pending(self.pfs, self.target(node)) else "uploaded"
    def _new_handle(self, handle: LocalHandle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._local[fh] = handle
        self._handles[fh] = handle  # type: ignore[assignment]  # ReadOnlyOperations._node looks here too
        return fh

    def _writer(self, node: Node, truncate: bool) -> Writer:
        writer = self._writers.get(node.ino)
        if writer is None:
            initial = None
            if not truncate:  # keep the staged bytes; an uploaded file is an origin object now
                initial = self.pfs.writeback.staged_path(self.url(node))
                if initial is None and node.entry is not None and node.entry.size:
                    raise _fail(errno.EPERM)
            writer = Writer(StagedWrite(self.pfs, self.target(node), initial))
            self._writers[node.ino] = writer
        if truncate and writer.staged.size:
            writer.staged.truncate(0)
            self.ns.resize(node, 0, time.time_ns())
        writer.handles += 1
        return writer

    # -- data ------------------------------------------------------------------------------------------
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        text = self._check_name(name)
        parent = self._dir(parent_inode)
        if text in parent.children:
            raise _fail(errno.EEXIST)
        path = self.ns.path_of(parent_inode, text)
        target = f"{self.root}/{path}" if self.root else path
        staged = await trio.to_thread.run_sync(StagedWrite, self.pfs, target)
        if text in parent.children:  # created meanwhile by another request
            staged.close()
            raise _fail(errno.EEXIST)
        node = self.ns.add(parent_inode, text, FileEntry(0, time.time_ns(), f"local:{staged.upload_id}"))
        writer = self._writers[node.ino] = Writer(staged, handles=1, fresh=True)
        fh = self._new_handle(LocalHandle(node, self.url(node), writer))
        metrics.OPENS.inc()
        return pyfuse3.FileInfo(fh=fh, keep_cache=False), self.attrs(node)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if not (node.local and node.entry is not None):
            if flags & (_WRITE | os.O_TRUNC | os.O_APPEND) and node.entry is not None:
                raise _fail(errno.EPERM)  # an origin object: read-only, the origin stays untouched
            return await super().open(inode, flags & ~os.O_CREAT, ctx)
        if flags & _WRITE:
            writer = await trio.to_thread.run_sync(self._writer, node, bool(flags & os.O_TRUNC))
            handle = LocalHandle(node, self.url(node), writer)
        elif node.ino in self._writers:
            target = self.target(node)
            handle = LocalHandle(node, self.url(node), self._writers[node.ino], writes=False,
                                 opener=lambda: self.pfs.open(target, "rb"))
        else:
            target = self.target(node)
            reader = await trio.to_thread.run_sync(lambda: self.pfs.open(target, "rb"))
            handle = LocalHandle(node, self.url(node), None, reader)
        metrics.OPENS.inc()
        return pyfuse3.FileInfo(fh=self._new_handle(handle), keep_cache=False)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._local.get(fh)
        if handle is None or handle.writer is None or not handle.writes:
            raise _fail(errno.EBADF)
        writer = handle.writer
        if writer.failed is not None:
            raise _fail(writer.failed.errno or errno.EIO)
        try:
            # Queued for the file's writer thread: the kernel gets its answer at once and sends the next
            # request while the bytes go into the page cache. Errors come back at flush/fsync (close).
            written = writer.staged.write_behind(buf, off)
        except OSError as exc:
            writer.failed = exc
            log.error("write of %s failed, the file will not be published: %s", handle.url, exc,
                      extra={"url": handle.url})
            raise _fail(errno.ENOSPC if isinstance(exc, CacheFullError) else (exc.errno or errno.EIO)) from None
        metrics.STAGED_BYTES.inc(written)
        if handle.node.entry is not None and off + written > handle.node.entry.size:
            self.ns.resize(handle.node, off + written, time.time_ns())
        return written

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._local.get(fh)
        if handle is None:
            return await super().read(fh, off, size)
        try:
            data = await trio.to_thread.run_sync(handle.read, off, size)
        except OSError as exc:
            log.error("read of %s at offset %d failed: %s", handle.url, off, exc, extra={"url": handle.url})
            raise _fail(errno.EIO) from None
        metrics.READS.inc()
        metrics.READ_BYTES.inc(len(data))
        return data

    async def _publish(self, handle: LocalHandle) -> None:
        writer = handle.writer
        if writer is None or writer.orphaned or not handle.writes:
            return
        if writer.failed is not None:
            if writer.staged.published_id is None:
                self._drop_failed(handle.node)
            raise _fail(errno.ENOSPC if isinstance(writer.failed, CacheFullError) else errno.EIO)
        try:
            await trio.to_thread.run_sync(self._publish_now, writer)
        except OSError as exc:
            writer.failed = exc
            log.error("could not stage %s durably: %s", handle.url, exc, extra={"url": handle.url})
            raise _fail(errno.ENOSPC if exc.errno in (errno.ENOSPC, errno.EDQUOT) else errno.EIO) from None

    def _publish_now(self, writer: Writer) -> None:
        dirty = writer.staged.dirty
        entry_id = writer.staged.publish()
        if dirty and entry_id is not None:
            self.published[entry_id] = writer.staged.size

    def unflushed_under(self, rel: str) -> list[str]:
        """Paths under ``rel`` open for writing with bytes not yet flushed (a commit must not miss them)."""
        prefix = rel.strip("/") + "/" if rel.strip("/") else ""
        out = []
        for ino, writer in self._writers.items():
            node = self.ns.get(ino)
            if (node is not None and node.path.startswith(prefix) and not writer.orphaned
                    and writer.failed is None and writer.staged.dirty):
                out.append(node.path)
        return sorted(out)

    async def flush(self, fh: int) -> None:
        handle = self._local.get(fh)
        if handle is not None:
            await self._publish(handle)  # close() returns once the file is durable on local disk

    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._local.get(fh)
        if handle is not None:
            await self._publish(handle)

    async def release(self, fh: int) -> None:
        handle = self._local.pop(fh, None)
        if handle is None:
            return await super().release(fh)
        self._handles.pop(fh, None)
        writer = handle.writer
        if writer is None or not handle.writes:
            await trio.to_thread.run_sync(handle.close)
            return
        writer.handles -= 1
        if writer.handles > 0:
            return
        if self._writers.get(handle.node.ino) is writer:
            del self._writers[handle.node.ino]
        if writer.failed is None and not writer.orphaned and writer.staged.dirty:
            try:  # bytes written after the last flush (mmap, a dup'd descriptor)
                await trio.to_thread.run_sync(self._publish_now, writer)
            except OSError as exc:
                writer.failed = exc
        await trio.to_thread.run_sync(writer.staged.close)
        if writer.failed is not None and writer.staged.published_id is None and not writer.orphaned:
            self._drop_failed(handle.node)

    def _drop_failed(self, node: Node) -> None:
        """Nothing half-published: a file whose write failed disappears instead of becoming a short object."""
        parent = self.ns.lookup(posixpath.dirname(node.path))
        name = posixpath.basename(node.path)
        if parent is not None and parent.children.get(name) == node.ino:
            self.ns.remove(parent.ino, name)
            # The kernel caches names for entry_timeout; async: a handler must not wait for the kernel.
            pyfuse3.invalidate_entry_async(parent.ino, os.fsencode(name), ignore_enoent=True)

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if not node.local:
            raise _fail(errno.EPERM)
        if fields.update_size and node.entry is not None:
            size = attr.st_size
            writer = self._writers.get(node.ino)
            if writer is not None:
                await trio.to_thread.run_sync(writer.staged.truncate, size)
            else:  # truncate(2) of a closed staged file: a new version of it
                def rewrite() -> None:
                    w = self._writer(node, truncate=size == 0)
                    try:
                        w.staged.truncate(size)
                        w.staged.publish()
                    finally:
                        w.handles -= 1
                        self._writers.pop(node.ino, None)
                        w.staged.close()

                await trio.to_thread.run_sync(rewrite)
            self.ns.resize(node, size, time.time_ns())
        return self.attrs(node)  # modes, owners and times of local files are the mount's

    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        node = self._node(inode)
        if mode & os.W_OK and not node.is_dir and not node.local:
            raise _fail(errno.EACCES)
        return True

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = await super().statfs(ctx)
        try:
            local = os.statvfs(self.pfs.config.cache_dir)
        except OSError:
            return st
        st.f_bsize, st.f_frsize = local.f_bsize, local.f_frsize
        st.f_blocks, st.f_bfree, st.f_bavail = local.f_blocks, local.f_bfree, local.f_bavail
        st.f_ffree = st.f_favail = local.f_ffree
        return st

    # -- extended attributes ---------------------------------------------------------------------------
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        node = self._node(inode)
        if name == XATTR_STATE:
            return self.state(node).encode()
        if name == XATTR_CONTROL and node.ino == 1 and self.control_path:
            return self.control_path.encode()
        return await super().getxattr(inode, name, ctx)

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        names = await super().listxattr(inode, ctx)
        return [*names, XATTR_STATE, *([XATTR_CONTROL] if inode == 1 and self.control_path else [])]

    def can_copy(self) -> bool:
        """Whether renames of uploaded files work (the origin copies server-side)."""
        return can_copy_server_side(self.pfs)
