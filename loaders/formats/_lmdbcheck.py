"""Check an LMDB ``data.mdb`` before LMDB maps it, so damage is a :class:`FormatError`, never SIGBUS or SIGSEGV.

LMDB trusts its file: it maps it and follows page numbers and in-page offsets without comparing them to the
file's size. A truncated file whose meta page still names its last page, or one flipped bit in a node offset
or an overflow page number near the end of the file, makes it touch mapped memory past the end of the file,
and the kernel kills the process with SIGBUS. So before ``lmdb.open`` we read the file ourselves (a mapping of
exactly its size: every access below is bounds-checked first):

1. both meta pages (magic, version, page size) and the newer one's last page, which must lie inside the file;
2. every page reachable from the main database's root: page number, type, node offsets and key sizes inside
   the page, inline values inside the page, overflow values inside their overflow pages, which must lie
   inside the file, branch children inside the file, each page visited once, depth as recorded.

LMDB itself then only follows what was checked. The walk is linear in the number of pages (a few hundred
pages per megabyte of small documents, far fewer for large ones); it runs once per shard and reader. A
subprocess probe was the alternative: it costs a process start per shard and still leaves the parent to map
a file that could be damaged after the probe, so the walk, which needs neither, is what readers do.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct

import numpy as np

from loaders.errors import CorruptIndexError, EmptyShardError, FormatError, TruncatedDataError

PAGE_HEADER = 16  # pgno u64, pad u16, flags u16, lower u16, upper u16 (pages count u32 on overflow pages)
NODE_HEADER = 8  # lo u16, hi u16, flags u16, ksize u16
P_BRANCH, P_LEAF, P_OVERFLOW, P_META, P_LEAF2 = 0x01, 0x02, 0x04, 0x08, 0x20
F_BIGDATA, F_SUBDATA, F_DUPDATA = 0x01, 0x02, 0x04
MAGIC, DATA_VERSION = 0xBEEFC0DE, 1
P_INVALID = (1 << 64) - 1
MAX_DEPTH = 32  # LMDB's cursor stack
# MDB_meta after the page header: magic u32, version u32, address u64, mapsize u64, two MDB_db of 48 bytes
# (pad/psize u32, flags u16, depth u16, branch, leaf, overflow pages, entries, root: u64 each), last_pg u64,
# txnid u64
_META = struct.Struct("<IIQQ" + "IHHQQQQQ" * 2 + "QQ")


class _Meta:
    def __init__(self, fields: tuple[int, ...]) -> None:
        self.magic, self.version = fields[0], fields[1]
        self.psize = fields[4]  # the free DB's md_pad holds the page size
        self.depth, self.root = fields[14], fields[19]  # the main DB's depth and root
        self.last_pg, self.txnid = fields[20], fields[21]


def check_environment(path: str, url: str) -> None:
    """Raise a :class:`FormatError` naming ``url`` unless LMDB can map the ``data.mdb`` at ``path`` safely.

    Raises:
        EmptyShardError: an empty file.
        TruncatedDataError: the file is shorter than its meta page's last page says.
        CorruptIndexError: bad meta pages or a damaged B-tree page of the main database.
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise EmptyShardError(url, "empty data.mdb")
        if size < 2 * (PAGE_HEADER + _META.size):
            raise TruncatedDataError(url, f"{size} bytes cannot hold LMDB's two meta pages")
        mm = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ)
    error: Exception | None = None
    try:
        _Walk(np.frombuffer(mm, dtype=np.uint8), size, url).run()
    except FormatError as exc:
        error = exc.with_traceback(None)  # its frames would keep views of the mapping alive
    except (IndexError, OverflowError) as exc:  # numpy's own bounds checks: still damage, still typed
        error = CorruptIndexError(url, f"damaged LMDB file: {exc}")
    with contextlib.suppress(BufferError):  # a view still alive: the mapping goes with it instead
        mm.close()
    if error is not None:
        raise error


class _Walk:
    def __init__(self, buf: np.ndarray, size: int, url: str) -> None:
        self.buf, self.size, self.url = buf, size, url

    def fail(self, message: str) -> CorruptIndexError:
        return CorruptIndexError(self.url, f"damaged LMDB file: {message}")

    def meta(self, offset: int) -> _Meta:
        if offset + PAGE_HEADER + _META.size > self.size:
            raise TruncatedDataError(self.url, f"{self.size} bytes end inside the meta page at byte {offset}")
        flags = int(self.buf[offset + 10]) | int(self.buf[offset + 11]) << 8
        meta = _Meta(_META.unpack_from(self.buf.data, offset + PAGE_HEADER))
        if not flags & P_META or meta.magic != MAGIC:
            raise self.fail(f"no LMDB meta page at byte {offset}")
        if meta.version != DATA_VERSION:
            raise self.fail(f"LMDB data version {meta.version}, expected {DATA_VERSION}")
        return meta

    def run(self) -> None:
        first = self.meta(0)
        psize = first.psize
        if psize < 512 or psize > 1 << 16 or psize & (psize - 1):
            raise self.fail(f"page size {psize} is not a power of two in [512, 65536]")
        second = self.meta(psize)
        meta = second if second.txnid > first.txnid else first  # what LMDB picks
        need = (meta.last_pg + 1) * psize  # Python ints: a huge page number cannot wrap
        if need > self.size:
            raise TruncatedDataError(self.url, f"{self.size} bytes, but its meta page says the data runs to page "
                                               f"{meta.last_pg} ({need} bytes): truncated copy?")
        self.psize, self.last = psize, meta.last_pg
        if meta.root == P_INVALID:
            return  # an empty main database
        if meta.depth < 1 or meta.depth > MAX_DEPTH:
            raise self.fail(f"main database depth {meta.depth}")
        self.tree(meta.root, meta.depth)

    def tree(self, root: int, depth: int) -> None:
        """Check the main database's pages level by level (each level in a few numpy calls, not per page)."""
        ps = self.psize
        seen = np.zeros(self.last + 1, dtype=bool)
        pages = np.array([root], dtype=np.uint64)
        for level in range(1, depth + 1):
            if pages.size == 0:
                raise self.fail(f"level {level} of {depth} has no pages")
            if int(pages.min()) < 2 or int(pages.max()) > self.last:
                raise self.fail(f"page number outside 2..{self.last} at level {level}")
            pg = pages.astype(np.int64)
            if np.unique(pg).size != pg.size or seen[pg].any():
                raise self.fail(f"a page is reached twice (level {level})")
            seen[pg] = True
            off = pg * ps
            leaf = level == depth
            flags = self.gather(off + 10, 2, "<u2").astype(np.int64)
            lower = self.gather(off + 12, 2, "<u2").astype(np.int64)
            upper = self.gather(off + 14, 2, "<u2").astype(np.int64)
            kind = P_LEAF if leaf else P_BRANCH
            bad = ((self.gather(off, 8, "<u8") != pages) | (flags & (P_LEAF2 | P_OVERFLOW | P_META) != 0)
                   | (flags & (P_BRANCH | P_LEAF) != kind) | (lower < PAGE_HEADER) | (lower > upper) | (upper > ps)
                   | ((lower - PAGE_HEADER) % 2 != 0) | ((lower == PAGE_HEADER) & (not leaf)))
            if bad.any():
                i = int(np.argmax(bad))
                raise self.fail(f"page {int(pg[i])} (flags {int(flags[i]):#x}, free space {int(lower[i])}.."
                                f"{int(upper[i])}) is not a valid {'leaf' if leaf else 'branch'} page")
            count = (lower - PAGE_HEADER) // 2
            owner = np.repeat(np.arange(pg.size), count)  # the page of each node
            index = np.arange(owner.size) - np.repeat(np.cumsum(count) - count, count)
            ptrs = self.gather(off[owner] + PAGE_HEADER + 2 * index, 2, "<u2").astype(np.int64)
            if ptrs.size and bool(np.any((ptrs < upper[owner]) | (ptrs + NODE_HEADER > ps))):
                raise self.fail(f"a node lies outside its page's data area (level {level})")
            node = off[owner] + ptrs
            fields = self.gather(node, NODE_HEADER, "<u2").reshape(-1, 4).astype(np.int64)
            data = ptrs + NODE_HEADER + fields[:, 3]  # after the key
            if data.size and int(data.max()) > ps:
                raise self.fail(f"a key runs past its page (level {level})")
            if leaf:  # (lo, hi) hold the value's size, flags say whether it is on overflow pages
                self.values(off[owner] + data, data, fields[:, 0] | fields[:, 1] << 16, fields[:, 2])
            else:  # (lo, hi, flags) hold the child's 48-bit page number
                pages = (fields[:, 0] | fields[:, 1] << 16 | fields[:, 2] << 32).astype(np.uint64)

    def values(self, at: np.ndarray, data: np.ndarray, dsize: np.ndarray, nflags: np.ndarray) -> None:
        """Check leaf values: inline ones inside their page, overflow ones inside their overflow pages."""
        ps = self.psize
        if bool(np.any(nflags & (F_SUBDATA | F_DUPDATA))):
            raise self.fail("named or duplicate-key databases, which loaders' shards never use")
        big = (nflags & F_BIGDATA) != 0
        if int(np.where(big, data + 8, data + dsize).max(initial=0)) > ps:
            raise self.fail("a value runs past its page")
        if not big.any():
            return
        first = self.gather(at[big], 8, "<u8")
        length = dsize[big]
        if int(first.min()) < 2 or int(first.max()) > self.last:
            raise self.fail(f"an overflow value points outside pages 2..{self.last}")
        start = first.astype(np.int64) * ps
        flags = self.gather(start + 10, 2, "<u2").astype(np.int64)
        pages = self.gather(start + 12, 4, "<u4").astype(np.int64)
        bad = ((self.gather(start, 8, "<u8") != first) | (flags & P_OVERFLOW == 0) | (pages < 1)
               | (first.astype(np.int64) + pages - 1 > self.last) | (length > pages * ps - PAGE_HEADER))
        if bad.any():
            i = int(np.argmax(bad))
            raise self.fail(f"overflow value at page {int(first[i])} ({int(pages[i])} pages, {int(length[i])} "
                            "bytes) does not fit")

    def gather(self, at: np.ndarray, width: int, dtype: str) -> np.ndarray:
        """The ``width``-byte little-endian integers at byte offsets ``at`` (all checked to lie in the file)."""
        return self.buf[at[:, None] + np.arange(width)].reshape(-1).view(dtype)
