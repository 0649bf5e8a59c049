"""The pyfuse3 request handlers: a read-only view of the inode table, with reads served by pcache."""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import Any

import pyfuse3
import trio

from fusefs import metrics
from fusefs.config import MountConfig
from fusefs.namespace import Namespace, Node
from lingcore.log import get_logger
from pcache import PCacheFile, PCacheFileSystem

log = get_logger(__name__)

XATTR_URL = b"user.pcache.url"
XATTR_ETAG = b"user.pcache.etag"
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_BLOCK = 1024 * 1024  # st_blksize: tells tools to read in large chunks


def _fail(code: int) -> pyfuse3.FUSEError:
    metrics.ERRORS.labels(errno.errorcode.get(code, str(code))).inc()
    return pyfuse3.FUSEError(code)


class Handle:
    """An open file: one pinned version, read through a :class:`PCacheFile` (which drives readahead).

    Reads use ``PCacheFile.pread``: the kernel sends concurrent requests on one handle (its readahead),
    and they fetch in parallel.
    """

    def __init__(self, file: PCacheFile, url: str, node: Node) -> None:
        self.file, self.url, self.node = file, url, node

    def in_memory(self, offset: int, size: int) -> bool:
        """True when every block of the range is in the memory tier: the read cannot block on I/O."""
        return self.file.fs.in_memory(self.file.ref, offset, offset + size)

    def read(self, offset: int, size: int) -> bytes:
        return self.file.pread(offset, size)


class ReadOnlyOperations(pyfuse3.Operations):
    """Handlers for lookup, getattr, readdir, open, read, release, statfs and xattrs; writes give EROFS.

    Args:
        ns: The inode table (replaced in place by refreshes).
        pfs: The pcache filesystem that serves reads.
        root: Origin path of the mounted prefix.
        config: Mount settings (timeouts).
    """

    supports_dot_lookup = False  # the kernel resolves "." and ".." itself (no NFS export)
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, ns: Namespace, pfs: PCacheFileSystem, root: str, config: MountConfig) -> None:
        super().__init__()
        self.ns, self.pfs, self.root, self.config = ns, pfs, root.rstrip("/"), config
        self._uid, self._gid = os.getuid(), os.getgid()
        self._handles: dict[int, Handle] = {}
        self._dirs: dict[int, list[tuple[bytes, int]]] = {}
        self._next_fh = 1
        self._started_ns = time.time_ns()  # directories have no mtime at the origin: use the mount's

    # -- helpers -----------------------------------------------------------------------------------
    def target(self, node: Node) -> str:
        """Origin path of ``node``."""
        return f"{self.root}/{node.path}" if self.root else node.path

    def url(self, node: Node) -> str:
        """User-facing origin URL of ``node`` (``s3://bucket/key``)."""
        return self.pfs.origin.url(self.target(node))

    def _node(self, ino: int) -> Node:
        node = self.ns.get(ino)
        if node is None:
            # A refresh removed it (or replaced its version) while a handle is still open: fstat and
            # mmap on that fd keep working with the version the handle reads.
            node = next((h.node for h in self._handles.values() if h.node.ino == ino), None)
        if node is None:
            raise _fail(errno.ENOENT)
        return node

    def attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        """Kernel attributes of ``node``: read-only modes, size and mtime from the listing."""
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.ino
        attr.generation = 0
        attr.entry_timeout = self.config.entry_timeout
        attr.attr_timeout = self.config.attr_timeout
        attr.st_uid, attr.st_gid = self._uid, self._gid
        attr.st_blksize = _BLOCK
        if node.entry is None:
            attr.st_mode = stat.S_IFDIR | 0o555
            attr.st_nlink = 2
            attr.st_size = 0
            mtime = self._started_ns
        else:
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_nlink = 1
            attr.st_size = node.entry.size
            attr.st_blocks = (node.entry.size + 511) // 512
            mtime = node.entry.mtime_ns
        attr.st_mtime_ns = attr.st_ctime_ns = attr.st_atime_ns = mtime
        return attr

    # -- namespace ---------------------------------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        node = self.ns.child(parent_inode, os.fsdecode(name))
        if node is None:
            raise _fail(errno.ENOENT)
        return self.attrs(node)

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self.attrs(self._node(inode))

    async def forget(self, inode_list: Any) -> None:
        return None  # inodes live as long as the mount: nothing to drop

    async def opendir(self, inode: int, ctx: Any) -> int:
        node = self._node(inode)
        if not node.is_dir:
            raise _fail(errno.ENOTDIR)
        fh = self._next_fh
        self._next_fh += 1
        # A snapshot, so a refresh during a long readdir neither repeats nor skips entries.
        self._dirs[fh] = sorted((os.fsencode(name), ino) for name, ino in node.children.items())
        return fh

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = self._dirs.get(fh, [])
        for index in range(start_id, len(entries)):
            name, ino = entries[index]
            node = self.ns.get(ino)
            if node is None:
                continue
            if not pyfuse3.readdir_reply(token, name, self.attrs(node), index + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_blocks = (self.ns.total_bytes + 4095) // 4096
        st.f_bfree = st.f_bavail = 0
        st.f_files = len(self.ns.nodes)
        st.f_ffree = st.f_favail = 0
        st.f_namemax = 1024
        return st

    # -- data --------------------------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise _fail(errno.EROFS)
        node = self._node(inode)
        if node.entry is None:
            raise _fail(errno.EISDIR)
        target = self.target(node)
        # The listing's version, not a HEAD: the inode is that version (a new version gets a new inode).
        ref = self.pfs.ref_for(target, node.entry.version, node.entry.size)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(PCacheFile(self.pfs, target, ref), self.url(node), node)
        metrics.OPENS.inc()
        # An inode is one version (a new version gets a new inode), so the kernel may keep its pages.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handles.get(fh)
        if handle is None:
            raise _fail(errno.EBADF)
        try:
            if handle.in_memory(off, size):
                # A memory copy: cheaper than the hop to a worker thread. (Should a block be evicted right
                # after the check, this one read blocks the loop on a disk read; it is still correct.)
                data = handle.read(off, size)
            else:
                data = await trio.to_thread.run_sync(handle.read, off, size)
        except OSError as exc:
            code = exc.errno if exc.errno and exc.errno != errno.ENOENT else errno.EIO
            log.error("read of %s at offset %d failed: %s", handle.url, off, exc,
                      extra={"url": handle.url, "offset": off, "errno": code})
            raise _fail(code) from None
        except Exception as exc:  # never answer with bytes we are not sure of
            log.exception("read of %s at offset %d failed", handle.url, off, extra={"url": handle.url})
            raise _fail(errno.EIO) from exc
        metrics.READS.inc()
        metrics.READ_BYTES.inc(len(data))
        return data

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None:
            handle.file.close()

    async def flush(self, fh: int) -> None:
        return None

    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        if mode & os.W_OK:
            raise _fail(errno.EROFS)
        return True

    # -- extended attributes ------------------------------------------------------------------------
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        node = self._node(inode)
        if name == XATTR_URL:
            return self.url(node).encode()
        if name == XATTR_ETAG and node.entry is not None:
            return node.entry.version.encode()
        raise _fail(pyfuse3.ENOATTR)

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        node = self._node(inode)
        return [XATTR_URL] if node.is_dir else [XATTR_URL, XATTR_ETAG]

    # -- everything that would change the tree: read-only, always -----------------------------------
    async def _erofs(self, *args: Any, **kwargs: Any) -> Any:
        raise _fail(errno.EROFS)

    setattr = create = write = mknod = mkdir = unlink = rmdir = symlink = rename = link = _erofs
    setxattr = removexattr = _erofs

    async def fsync(self, fh: int, datasync: bool) -> None:
        return None  # nothing is ever dirty; tools fsync read-only files too

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None
