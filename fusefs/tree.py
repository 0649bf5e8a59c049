"""The tree operations of a writable mount: mkdir, rmdir, unlink and rename of what the mount wrote.

Objects listed at the origin are never moved or removed (``EPERM``). Renames of written files go through
:func:`pcache.move_staged` (see :mod:`fusefs.writable` for the contract).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from fusefs.config import MountConfig
from fusefs.namespace import Namespace, Node
from fusefs.ops import ReadOnlyOperations, _fail
from lingcore.log import get_logger
from lingcore.marker import MARKER_NAME
from pcache import PCacheFileSystem, StagedWrite, drop_staged, move_staged

log = get_logger(__name__)

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


@dataclass
class Writer:
    """The open-for-write state of one local file, shared by all its write handles."""

    staged: StagedWrite
    handles: int = 0
    failed: OSError | None = None  # a write failed (ENOSPC): the file must never be published
    fresh: bool = False  # made by create() and never published: nothing of it exists anywhere else
    orphaned: bool = False  # unlinked or replaced while open: its bytes go nowhere


class TreeOperations(ReadOnlyOperations):
    """Directory changes of a writable mount; :class:`fusefs.writable.WritableOperations` adds the data."""

    def __init__(self, ns: Namespace, pfs: PCacheFileSystem, root: str, config: MountConfig) -> None:
        super().__init__(ns, pfs, root, config)
        self._writers: dict[int, Writer] = {}

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

