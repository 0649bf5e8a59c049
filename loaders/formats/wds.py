"""WebDataset tar shards: one sample per document, its tokens in a ``KEY.npy`` member.

``KEY`` is the document's index in the whole corpus, zero-padded to 12 digits, so keys are unique across
shards and sort in storage order; tokens are a 1-D ``.npy`` (uint16 when the vocabulary fits, else
uint32). Plain ``webdataset.WebDataset(urls).decode()`` reads the shards.

Random access needs the byte offset of every member. The writer records them in a sidecar
``NAME.members.npy`` (int64 rows: tar header offset, ``.npy`` payload offset, token data offset, token
count) listed in ``index.json``; for foreign tars the reader scans the headers once instead. Every read
re-checks the member's tar header checksum and ``.npy`` header, so a corrupt member gives a
:class:`~loaders.errors.CorruptMemberError` naming the shard and member rather than wrong tokens.
"""

from __future__ import annotations

import io
import mmap
import os
import tarfile
import uuid
from typing import Any

import numpy as np

from loaders.errors import CorruptIndexError, CorruptMemberError, EmptyShardError, TruncatedDataError
from loaders.formats._io import CachedHandleMixin, HeaderDtypeMixin, Location, RangeReader
from loaders.formats._tar import (
    BLOCK,
    MAX_NPY_HEADER,
    header_ok,
    member_name_of,
    parse_npy_header,
    rows_array,
    scan_tar,
)

KEY_DIGITS = 12


def member_name(doc: int) -> str:
    """Return the tar member name of corpus document ``doc``."""
    return f"{doc:0{KEY_DIGITS}d}.npy"


def npy_bytes(tokens: np.ndarray) -> tuple[bytes, int]:
    """Return the ``.npy`` encoding of a 1-D token array and the length of its header."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(tokens), version=(1, 0), allow_pickle=False)
    data = buf.getvalue()
    return data, len(data) - tokens.nbytes


class WdsShardWriter:
    """Writes one tar shard (and its member table) in a local directory."""

    format = "wds"

    def __init__(self, directory: str, name: str, dtype: Any, first_document: int) -> None:
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.name = name
        self._dir = directory
        # temporary name, renamed on close (see MegatronShardWriter)
        self._tar = open(os.path.join(directory, name + ".tar.tmp"), "wb")  # noqa: SIM115 - closed in close()
        self._rows: list[tuple[int, int, int, int]] = []
        self._offset = 0
        self._next_doc = first_document
        self.documents = 0
        self.tokens = 0
        self.nbytes = 0

    def add_batch(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as concatenated tokens and their lengths."""
        flat = np.ascontiguousarray(flat, dtype=self.dtype)
        pos = 0
        for n in np.asarray(lengths, dtype=np.int64).tolist():
            payload, hlen = npy_bytes(flat[pos:pos + n])
            pos += n
            # mtime 0 and no owner: identical input gives byte-identical shards (and checksums)
            info = tarfile.TarInfo(member_name(self._next_doc))
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
            pad = -len(payload) % BLOCK
            self._tar.write(header + payload + bytes(pad))
            data = self._offset + len(header)
            self._rows.append((self._offset, data, data + hlen, n))
            self._offset = data + len(payload) + pad
            self._next_doc += 1
            self.documents += 1
            self.tokens += n
            self.nbytes += n * self.dtype.itemsize

    def close(self) -> dict[str, str]:
        """Finish the shard; return its files by role (``tar``, ``members``)."""
        self._tar.write(bytes(2 * BLOCK))  # end-of-archive marker
        self._tar.close()
        base = os.path.join(self._dir, self.name)
        with open(base + ".members.npy.tmp", "wb") as fh:
            np.save(fh, rows_array(self._rows).astype("<i8"))
        os.replace(base + ".tar.tmp", base + ".tar")
        os.replace(base + ".members.npy.tmp", base + ".members.npy")
        return {"tar": self.name + ".tar", "members": self.name + ".members.npy"}


def _load_members(raw: bytes, url: str) -> np.ndarray:
    """Parse a member table ``.npy``, checking its header against its size before building the array.

    ``np.load`` would allocate what a damaged header asks for and raise whatever its header parser does.
    """
    try:
        fp = io.BytesIO(raw)
        version = np.lib.format.read_magic(fp)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f".npy version {version}")
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fp)
        count = 1
        for n in shape:
            count *= int(n)
        if dtype.hasobject or len(raw) - fp.tell() != count * dtype.itemsize:
            raise ValueError(f"{shape} {dtype} does not fill the {len(raw) - fp.tell()} bytes after the header")
        return np.frombuffer(raw, dtype, count, fp.tell()).reshape(shape, order="F" if fortran else "C")
    except Exception as exc:  # numpy's header parser raises ValueError, SyntaxError, TokenError, ...
        raise CorruptIndexError(url, f"unreadable member table: {exc}") from None


class _Handle:
    """An open tar: an mmap (local) or a :class:`RangeReader` (remote), and its size."""

    def __init__(self, data: Any, size: int, url: str) -> None:
        self.data = data
        self.size = size
        self.url = url
        self.closed = False

    def read(self, offset: int, length: int) -> Any:
        """Return bytes ``[offset, offset + length)`` (a memoryview of the mmap for local tars)."""
        data = self.data
        if isinstance(data, RangeReader):
            return data.read(offset, length)
        if offset < 0 or length < 0 or offset + length > self.size:
            raise TruncatedDataError(self.url, f"bytes [{offset}, {offset + length}) past the end of the "
                                               f"{self.size}-byte tar")
        return memoryview(data)[offset:offset + length]

    def close(self) -> None:
        # The mmap is dropped, not closed: arrays handed out may still view it.
        self.closed = True
        if isinstance(self.data, RangeReader):
            self.data.close()
        self.data = None


class WdsShard(HeaderDtypeMixin, CachedHandleMixin):
    """Reads one tar shard with random access; opens lazily, per process, through the handle cache.

    Args:
        loc: The tar.
        dtype: Token dtype from ``index.json``, if known.
        members: The member-table sidecar from ``index.json``; without it the tar is scanned.
        sizes: Expected byte sizes by role (``tar``, ``members``) from ``index.json``.
        on_error: ``"skip"`` leaves corrupt members out of a scan (counted in ``skipped``); reads of a
            corrupt member always raise, since the document's length is already known to the caller.
    """

    format = "wds"

    def __init__(self, loc: Location, *, dtype: Any = None, members: Location | None = None,
                 sizes: dict[str, int] | None = None, on_error: str = "raise") -> None:
        self.url = loc.url
        self.loc = loc
        self._members = members
        self._dtype = None if dtype is None else np.dtype(dtype)
        self._sizes = sizes or {}
        self._on_error = on_error
        self._table: np.ndarray | None = None
        self._lengths: np.ndarray | None = None
        # members whose tar and .npy headers this process has already checked: each is checked once
        self._checked: np.ndarray | None = None
        self._token = uuid.uuid4().hex  # handles are per reader: a re-opened corpus never sees stale maps
        self.skipped = 0

    @property
    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            self._handle()
            assert self._table is not None
            self._lengths = np.ascontiguousarray(self._table[:, 3])
        return self._lengths

    @property
    def table(self) -> np.ndarray:
        """Rows of (tar header offset, payload offset, token offset, token count), one per document."""
        self._handle()
        assert self._table is not None
        return self._table

    def read(self, doc: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Return tokens ``[start:stop]`` of document ``doc`` (a view of the mmap for local tars)."""
        handle = self._handle()
        data = handle.data
        if data is None:  # evicted by another thread meanwhile
            handle = self._handle()
            data = handle.data
        table, checked = self._table, self._checked
        assert table is not None and checked is not None
        if not 0 <= doc < table.shape[0]:
            raise IndexError(f"{self.url}: document {doc} out of range [0, {table.shape[0]})")
        row = table[doc]
        token_off, count = int(row[2]), int(row[3])
        if not checked[doc]:
            self._check_member(handle, int(row[0]), int(row[1]), token_off, count)
            checked[doc] = True
        if start == 0 and (stop is None or stop >= count):
            lo, n = 0, count
        else:
            lo, hi, _ = slice(start, stop).indices(count)
            n = max(0, hi - lo)
        dtype = self.dtype
        offset = token_off + lo * dtype.itemsize
        if isinstance(data, RangeReader):
            # a copy, so that a held document does not pin a whole read-ahead range
            return np.frombuffer(data.read(offset, n * dtype.itemsize), dtype=dtype).copy()
        return np.frombuffer(data, dtype=dtype, count=n, offset=offset)

    def _check_member(self, handle: _Handle, hdr_off: int, payload: int, token_off: int, count: int) -> None:
        hdr = bytes(handle.read(hdr_off, BLOCK))
        name = member_name_of(hdr)
        if not header_ok(hdr):
            raise CorruptMemberError(self.url, name or f"<header at byte {hdr_off}>", "bad tar header checksum")
        try:
            dtype, n, hlen = parse_npy_header(bytes(handle.read(payload, token_off - payload)))
        except ValueError as exc:
            raise CorruptMemberError(self.url, name, str(exc)) from None
        if n != count or dtype != self.dtype or payload + hlen != token_off:
            raise CorruptMemberError(self.url, name, f".npy header says {n} tokens of {dtype}, the member "
                                                     f"table {count} tokens of {self.dtype}")

    def verify(self) -> None:
        """Check every member's tar and ``.npy`` headers (and rescan when there is a member table)."""
        handle = self._handle()
        assert self._table is not None
        if self._members is not None:
            size = self._size()
            rows, _, _ = scan_tar(handle.read, size, self.url, "raise")
            if not np.array_equal(rows, self._table):
                raise CorruptIndexError(self._members.url, f"member table disagrees with the tar {self.url}")
        for hdr_off, payload, token_off, count in self._table.tolist():
            self._check_member(handle, hdr_off, payload, token_off, count)

    @property
    def _key(self) -> str:
        return f"wds:{self.url}#{self._token}"

    def _size(self) -> int:
        size = self.loc.size()
        expected = self._sizes.get("tar")
        if expected is not None and size != expected:
            error = TruncatedDataError if size < expected else CorruptIndexError
            raise error(self.url, f"{size} bytes, index.json records {expected}")
        return size

    def _handle(self) -> _Handle:
        handle: _Handle = self._get_handle()
        if self._table is None:  # per reader, outside the cache: scans are expensive, and survive eviction
            self._table = self._load_table(handle, handle.size)
            self._checked = np.zeros(self._table.shape[0], dtype=bool)
        return handle

    def _open(self) -> _Handle:
        size = self._size()
        if size == 0:
            raise EmptyShardError(self.url, "empty tar file")
        data: Any
        if self.loc.local:
            with open(self.loc.path, "rb") as fh:
                data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        else:
            data = RangeReader(self.loc, size)
        return _Handle(data, size, self.url)

    def _load_table(self, handle: _Handle, size: int) -> np.ndarray:
        if self._members is not None:
            table = _load_members(self._members.read_bytes(), self._members.url)
            if table.ndim != 2 or table.shape[1] != 4 or table.dtype.kind != "i":
                raise CorruptIndexError(self._members.url, f"member table has shape {table.shape}, "
                                                           "expected (documents, 4) integers")
            table = table.astype(np.int64)
            header = table[:, 2] - table[:, 1]
            if table.size and (int(table.min()) < 0 or int(table[:, 2].max()) > size
                               or bool(np.any(table[:, 1] - table[:, 0] < BLOCK))
                               or bool(np.any((header < 10) | (header > MAX_NPY_HEADER + 12)))):
                raise CorruptIndexError(self._members.url, f"member offsets do not fit the tar {self.url}")
            if self._dtype is None:
                raise CorruptIndexError(self._members.url, "a member table needs the dtype from index.json")
        else:
            table, dtype, self.skipped = scan_tar(handle.read, size, self.url, self._on_error)
            if dtype is not None and self._dtype is not None and dtype != self._dtype:
                raise CorruptIndexError(self.url, f"dtype {dtype} differs from the corpus dtype {self._dtype}")
            self._dtype = self._dtype or dtype
        if table.shape[0] == 0:
            extra = f" ({self.skipped} corrupt members skipped)" if self.skipped else ""
            raise EmptyShardError(self.url, "no .npy members" + extra)
        ends = table[:, 2] + table[:, 3] * self.dtype.itemsize
        if int(ends.max()) > size:
            raise TruncatedDataError(self.url, f"members end at byte {int(ends.max())} but the tar has {size}")
        return table
