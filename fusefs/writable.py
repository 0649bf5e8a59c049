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
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from fusefs import metrics
from fusefs.config import MountConfig
from fusefs.namespace import FileEntry, Namespace, Node
from fusefs.ops import ReadOnlyOperations, _fail
from lingcore.log import get_logger
from lingcore.marker import MARKER_NAME
from pcache import (
    CacheFullError,
    PCacheFileSystem,
    StagedWrite,
    can_copy_server_side,
    drop_staged,
    is_pending,
    move_staged,
)

log = get_logger(__name__)

XATTR_STATE = b"user.fusefs.state"
XATTR_CONTROL = b"user.fusefs.control"
_WRITE = os.O_WRONLY | os.O_RDWR
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


@dataclass
class Writer:
    """The open-for-write state of one local file, shared by all its write handles."""

    staged: StagedWrite
    handles: int = 0
    failed: OSError | None = None  # a write failed (ENOSPC): the file must never be published
    fresh: bool = False  # made by create() and never published: nothing of it exists anywhere else
    orphaned: bool = False  # unlinked or replaced while open: its bytes go nowhere


class LocalHandle:
    """An open local file: reads come from its staged bytes, else through pcache (staged copy or origin)."""

    def __init__(self, node: Node, url: str, writer: Writer | None, reader: Any = None) -> None:
        self.node, self.url, self.writer, self.reader = node, url, writer, reader

    def in_memory(self, offset: int, size: int) -> bool:
        return False

    def read(self, offset: int, size: int) -> bytes:
        if self.writer is not None:
            return self.writer.staged.pread(size, offset)
        if hasattr(self.reader, "pread"):
            return bytes(self.reader.pread(offset, size))
        return os.pread(self.reader.fileno(), size, offset)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


class WritableOperations(ReadOnlyOperations):
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
        self._writers: dict[int, Writer] = {}
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

    def _check_name(self, name: bytes) -> str:
        text = os.fsdecode(name)
        if text == MARKER_NAME:
            log.warning("refused to write %s through the mount: `fusefs commit` writes the marker", MARKER_NAME)
            raise _fail(errno.EPERM)
        return text

    def _dir(self, ino: int) -> Node:
        node = self._node(ino)
        if not node.is_dir:
            raise _fail(errno.ENOTDIR)
        return node

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
            handle = LocalHandle(node, self.url(node), self._writers[node.ino])
        else:
            target = self.target(node)
            reader = await trio.to_thread.run_sync(lambda: self.pfs.open(target, "rb"))
            handle = LocalHandle(node, self.url(node), None, reader)
        metrics.OPENS.inc()
        return pyfuse3.FileInfo(fh=self._new_handle(handle), keep_cache=False)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._local.get(fh)
        if handle is None or handle.writer is None:
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
        if writer is None or writer.orphaned:
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
        if writer is None:
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

    # -- the tree --------------------------------------------------------------------------------------
    def _unpublished(self, node: Node) -> bool:
        """True when nothing of ``node`` was ever journaled or uploaded (a file still being first written)."""
        writer = self._writers.get(node.ino)
        return writer is not None and writer.fresh and writer.staged.published_id is None

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        text = self._check_name(name)
        if text in self._dir(parent_inode).children:
            raise _fail(errno.EEXIST)
        return self.attrs(self.ns.add(parent_inode, text, None))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        text = os.fsdecode(name)
        node = self.ns.child(parent_inode, text)
        if node is None:
            raise _fail(errno.ENOENT)
        if not node.is_dir:
            raise _fail(errno.ENOTDIR)
        if node.children:
            raise _fail(errno.ENOTEMPTY)
        if not node.local:
            raise _fail(errno.EPERM)
        self.ns.remove(parent_inode, text)

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        text = os.fsdecode(name)
        node = self.ns.child(parent_inode, text)
        if node is None:
            raise _fail(errno.ENOENT)
        if node.is_dir:
            raise _fail(errno.EISDIR)
        if not node.local:
            raise _fail(errno.EPERM)
        unpublished = self._unpublished(node)
        writer = self._writers.get(node.ino)
        if writer is not None:
            writer.orphaned = True  # still open: its handles keep working, its bytes go nowhere
        if not unpublished:
            await trio.to_thread.run_sync(drop_staged, self.pfs, self.target(node))
        self.ns.remove(parent_inode, text)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: Any) -> None:
        if flags & _RENAME_EXCHANGE:
            raise _fail(errno.EINVAL)
        new_text, old_text = self._check_name(name_new), os.fsdecode(name_old)
        self._dir(parent_inode_new)
        node = self.ns.child(parent_inode_old, old_text)
        if node is None:
            raise _fail(errno.ENOENT)
        if not node.local:
            raise _fail(errno.EPERM)  # an origin object: never moved through the mount
        existing = self.ns.child(parent_inode_new, new_text)
        if existing is node:
            return
        if existing is not None:
            if flags & _RENAME_NOREPLACE:
                raise _fail(errno.EEXIST)
            if not existing.local:
                raise _fail(errno.EPERM)
            if existing.is_dir and not node.is_dir:
                raise _fail(errno.EISDIR)
            if node.is_dir and not existing.is_dir:
                raise _fail(errno.ENOTDIR)
            if existing.is_dir and existing.children:
                raise _fail(errno.ENOTEMPTY)
        if node.is_dir:
            if node.children:
                raise _fail(errno.EXDEV)  # files below would each need a rename: mv falls back to copying
        else:
            await self._move_file(node, existing, self.ns.path_of(parent_inode_new, new_text))
        if existing is not None:
            writer = self._writers.get(existing.ino)
            if writer is not None:
                writer.orphaned = True
            self.ns.remove(parent_inode_new, new_text)
        self.ns.move(parent_inode_old, old_text, parent_inode_new, new_text)

    async def _move_file(self, node: Node, existing: Node | None, new_path: str) -> None:
        src = self.target(node)
        dst = f"{self.root}/{new_path}" if self.root else new_path
        unpublished = self._unpublished(node)
        replaces = existing is not None and not self._unpublished(existing)

        def work() -> None:
            if unpublished:  # only in this daemon so far: the rename is the namespace's alone
                if replaces:
                    drop_staged(self.pfs, dst)
                return
            try:
                move_staged(self.pfs, src, dst)
            except FileNotFoundError:
                if replaces:
                    drop_staged(self.pfs, dst)

        try:
            await trio.to_thread.run_sync(work)
        except TimeoutError as exc:
            log.error("rename of %s refused: %s", self.url(node), exc)
            raise _fail(errno.EBUSY) from None
        except OSError as exc:
            log.error("rename of %s to %s failed: %s", self.url(node), dst, exc, extra={"url": self.url(node)})
            raise _fail(exc.errno if exc.errno == errno.EXDEV else errno.EIO) from None
        writer = self._writers.get(node.ino)
        if writer is not None:
            writer.staged.retarget(dst)

    async def _eperm(self, *args: Any, **kwargs: Any) -> Any:
        raise _fail(errno.EPERM)

    symlink = link = mknod = setxattr = removexattr = _eperm

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
