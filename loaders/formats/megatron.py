"""Megatron-LM ``MMIDIDX`` v1 indexed datasets (``NAME.bin`` + ``NAME.idx``), read and written.

Layout of ``NAME.idx``, all little-endian, byte-compatible with Megatron-LM's ``indexed_dataset.py``:

====================  ======================================================================
bytes                 field
====================  ======================================================================
9                     magic ``b"MMIDIDX\\x00\\x00"``
8 (u64)               version, always 1
1 (u8)                dtype code: 1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 6 f64, 7 f32, 8 u16
8 (u64)               sequence count N
8 (u64)               document-index count M
4 * N (i32)           sequence lengths, in tokens
8 * N (i64)           byte offset of each sequence in ``NAME.bin``
8 * M (i64)           document indices: 0, then the sequence index where each document ends
N (i8), optional      sequence modes (multimodal Megatron only; ignored here)
====================  ======================================================================

``NAME.bin`` is the sequences' tokens back to back. We write one sequence per document (document
indices ``0..N``); a foreign file that groups several sequences into one document is read one sequence
per document, which is what Megatron's own ``GPTDataset`` does.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
import uuid
from typing import Any

import numpy as np

from loaders.errors import (
    CorruptIndexError,
    EmptyShardError,
    InvalidParameterError,
    LegacyFormatError,
    TruncatedDataError,
    TruncatedIndexError,
    UnknownDtypeError,
    UnsupportedVersionError,
)
from loaders.formats._io import CachedHandleMixin, Location, RangeReader

MAGIC = b"MMIDIDX\x00\x00"
LEGACY_MAGIC = b"TNTIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8
DTYPE_CODES: dict[int, np.dtype[Any]] = {
    1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16), 4: np.dtype(np.int32),
    5: np.dtype(np.int64), 6: np.dtype(np.float64), 7: np.dtype(np.float32), 8: np.dtype(np.uint16),
}
CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}
_MAX_LENGTH = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class MegatronIndex:
    """A parsed ``.idx``: arrays are views of the file's buffer (an mmap for local files)."""

    dtype: np.dtype[Any]
    lengths: np.ndarray  # int32 tokens per sequence
    pointers: np.ndarray  # int64 byte offset of each sequence in the .bin
    document_indices: np.ndarray  # int64, M entries


def dtype_code(dtype: Any) -> int:
    """Return Megatron's code for ``dtype``.

    Raises:
        UnknownDtypeError: for a dtype Megatron has no code for (uint32, for one).
    """
    dt = np.dtype(dtype).newbyteorder("=")
    if dt not in CODE_OF_DTYPE:
        raise UnknownDtypeError("dtype", f"{dt} has no Megatron dtype code (use uint16 or int32 tokens)")
    return CODE_OF_DTYPE[dt]


def parse_index(buf: Any, url: str, *, bin_size: int | None = None, bin_url: str | None = None,
                full: bool = True) -> MegatronIndex:
    """Parse and check a Megatron ``.idx`` held in ``buf`` (bytes, mmap or memoryview).

    Never reads outside ``buf`` and does work linear in its size at most, so arbitrary bytes give a
    typed error, never a crash or a hang.

    Args:
        buf: The whole ``.idx`` file.
        url: The ``.idx`` URL, named in errors.
        bin_size: Size of the matching ``.bin``; when given, pointers and lengths must tile it exactly.
        bin_url: The ``.bin`` URL, named in errors about it.
        full: Also run the O(N) checks (lengths >= 0, contiguous pointers, document indices). Readers run
            them once per shard and skip them when re-opening an evicted handle.

    Raises:
        EmptyShardError: zero-byte file or no sequences.
        LegacyFormatError: a ``TNTIDX`` index.
        CorruptIndexError: wrong magic, sizes that disagree, inconsistent arrays.
        TruncatedIndexError: the file ends before what its header announces.
        UnsupportedVersionError: version other than 1.
        UnknownDtypeError: unknown dtype code.
        TruncatedDataError: the ``.bin`` is shorter than the index says.
    """
    view = memoryview(buf).cast("B")
    size = len(view)
    if size == 0:
        raise EmptyShardError(url, "empty .idx file")
    head = bytes(view[:HEADER_BYTES])
    if head.startswith(LEGACY_MAGIC[:6]):
        raise LegacyFormatError(url)
    if not head.startswith(MAGIC[:min(size, len(MAGIC))]):
        raise CorruptIndexError(url, f"not a Megatron MMIDIDX index (starts with {head[:9]!r})")
    if size < HEADER_BYTES:
        raise TruncatedIndexError(url, f"{size} bytes is shorter than the {HEADER_BYTES}-byte header")
    version, code, count, doc_count = struct.unpack_from("<QBQQ", head, len(MAGIC))
    if version != VERSION:
        raise UnsupportedVersionError(url, version, VERSION)
    if code not in DTYPE_CODES:
        raise UnknownDtypeError(url, f"unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
    dtype = DTYPE_CODES[code]
    expected = HEADER_BYTES + 12 * count + 8 * doc_count  # Python ints: huge counts cannot overflow
    if expected > size:
        raise TruncatedIndexError(url, f"header announces {count} sequences and {doc_count} document "
                                       f"indices ({expected} bytes) but the file has {size} bytes")
    if size not in (expected, expected + count):  # + count: Megatron's multimodal sequence modes
        raise CorruptIndexError(url, f"file has {size} bytes but its header accounts for {expected}")
    if count == 0:
        raise EmptyShardError(url, "index lists no sequences")
    lengths = np.frombuffer(view, dtype="<i4", count=count, offset=HEADER_BYTES)
    pointers = np.frombuffer(view, dtype="<i8", count=count, offset=HEADER_BYTES + 4 * count)
    doc_idx = np.frombuffer(view, dtype="<i8", count=doc_count, offset=HEADER_BYTES + 12 * count)
    index = MegatronIndex(dtype, lengths, pointers, doc_idx)
    if full:
        _check_arrays(index, url)
    if bin_size is not None:
        _check_bin_size(index, url, bin_size, bin_url or url)
    return index


def _check_arrays(index: MegatronIndex, url: str) -> None:
    lengths, pointers, doc_idx = index.lengths, index.pointers, index.document_indices
    if int(lengths.min()) < 0:
        bad = int(np.argmax(lengths < 0))
        raise CorruptIndexError(url, f"sequence {bad} has negative length {int(lengths[bad])}")
    if int(pointers[0]) != 0:
        raise CorruptIndexError(url, f"first sequence starts at byte {int(pointers[0])}, not 0")
    # Megatron writes sequences back to back; anything else means a damaged index. int64 wrap-around on
    # absurd values only makes the comparison fail, which is the right answer.
    ends = pointers[:-1] + lengths[:-1].astype(np.int64) * index.dtype.itemsize
    mismatch = np.flatnonzero(pointers[1:] != ends)
    if mismatch.size:
        i = int(mismatch[0]) + 1
        raise CorruptIndexError(url, f"sequence {i} starts at byte {int(pointers[i])} but the previous one "
                                     f"ends at byte {int(ends[i - 1])}")
    if doc_idx.size == 0 or int(doc_idx[0]) != 0 or int(doc_idx[-1]) != lengths.size:
        first = int(doc_idx[0]) if doc_idx.size else None
        last = int(doc_idx[-1]) if doc_idx.size else None
        raise CorruptIndexError(url, f"document indices must run from 0 to {lengths.size}, "
                                     f"got {first} .. {last}")
    if doc_idx.size > 1 and bool(np.any(doc_idx[1:] < doc_idx[:-1])):
        raise CorruptIndexError(url, "document indices are not sorted")


def _check_bin_size(index: MegatronIndex, url: str, bin_size: int, bin_url: str) -> None:
    end = int(index.pointers[-1]) + int(index.lengths[-1]) * index.dtype.itemsize
    if end > bin_size:
        raise TruncatedDataError(bin_url, f"{bin_size} bytes, but {url} says its sequences end at byte {end} "
                                          "(truncated .bin?)")
    if end < bin_size:
        raise CorruptIndexError(url, f"sequences end at byte {end} but {bin_url} has {bin_size} bytes "
                                     "(.idx and .bin do not belong together)")


def encode_index(lengths: np.ndarray, dtype: Any) -> bytes:
    """Return the bytes of a Megatron ``.idx`` for documents of ``lengths`` tokens, one sequence each."""
    dt = np.dtype(dtype)
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and int(lengths.max()) > _MAX_LENGTH:
        raise InvalidParameterError("lengths", f"a document of {int(lengths.max())} tokens does not fit "
                                               "Megatron's int32 lengths")
    count = int(lengths.size)
    pointers = np.zeros(count, dtype="<i8")
    np.cumsum(lengths[:-1] * dt.itemsize, out=pointers[1:])
    header = MAGIC + struct.pack("<QBQQ", VERSION, dtype_code(dt), count, count + 1)
    return b"".join([header, lengths.astype("<i4").tobytes(), pointers.tobytes(),
                     np.arange(count + 1, dtype="<i8").tobytes()])


class MegatronShardWriter:
    """Writes ``NAME.bin`` as documents arrive and ``NAME.idx`` on close, in a local directory."""

    format = "megatron"

    def __init__(self, directory: str, name: str, dtype: Any) -> None:
        self.dtype = np.dtype(dtype).newbyteorder("<")
        dtype_code(self.dtype)  # fail before writing anything
        self.name = name
        self._dir = directory
        # written under temporary names and renamed on close: a reader that has the old shard mapped keeps
        # its (unlinked) file instead of seeing it truncated under the mapping (SIGBUS)
        self._bin = open(os.path.join(directory, name + ".bin.tmp"), "wb")  # noqa: SIM115 - closed in close()
        self._lengths: list[np.ndarray] = []
        self.documents = 0
        self.tokens = 0
        self.nbytes = 0

    def add_batch(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as concatenated tokens and their lengths."""
        data = np.ascontiguousarray(flat, dtype=self.dtype)
        self._bin.write(data.data)
        self._lengths.append(np.asarray(lengths, dtype=np.int64))
        self.documents += len(lengths)
        self.tokens += int(data.size)
        self.nbytes += data.nbytes

    def close(self) -> dict[str, str]:
        """Finish the shard; return its files by role (``bin``, ``idx``), relative to the directory."""
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        base = os.path.join(self._dir, self.name)
        with open(base + ".idx.tmp", "wb") as fh:
            fh.write(encode_index(lengths, self.dtype))
        os.replace(base + ".bin.tmp", base + ".bin")
        os.replace(base + ".idx.tmp", base + ".idx")
        return {"bin": self.name + ".bin", "idx": self.name + ".idx"}


class _Handle:
    """An open Megatron shard: the parsed index plus the ``.bin`` (an mmap, or a ranged reader)."""

    def __init__(self, index: MegatronIndex, data: Any, local: bool) -> None:
        self.index = index
        self.data = data
        self.local = local
        self.closed = False

    def close(self) -> None:
        # Mappings are dropped, not closed: arrays handed out (or a read in flight on another thread)
        # may still view them, and the last reference releases the mapping.
        self.closed = True
        if not self.local:
            self.data.close()
        # data first: a concurrent read that still sees the index then sees data None and reopens
        self.data = None
        self.index = None  # type: ignore[assignment]


def _map(path: str, url: str) -> mmap.mmap:
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise EmptyShardError(url, "empty file")
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)


class MegatronShard(CachedHandleMixin):
    """Reads one ``.bin/.idx`` pair; opens lazily, per process, through the shared handle cache.

    Args:
        prefix: The shard's location without extension.
        dtype: Token dtype recorded in ``index.json`` (checked against the ``.idx``), if known.
        sizes: Expected byte sizes by role (``bin``, ``idx``) from ``index.json``, if known.
    """

    format = "megatron"

    def __init__(self, prefix: Location, *, dtype: Any = None,
                 sizes: dict[str, int] | None = None) -> None:
        self.url = prefix.url
        self.idx = prefix.sibling(".idx")
        self.bin = prefix.sibling(".bin")
        self._dtype = None if dtype is None else np.dtype(dtype)
        self._sizes = sizes or {}
        self._lengths: np.ndarray | None = None
        self._validated = False
        self._token = uuid.uuid4().hex  # handles are per reader: a re-opened corpus never sees stale maps
        self.skipped = 0

    @property
    def dtype(self) -> np.dtype[Any]:
        if self._dtype is None:
            self._dtype = self._handle().index.dtype
        return self._dtype

    @property
    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            self._lengths = self._handle().index.lengths.astype(np.int64)
        return self._lengths

    def read(self, doc: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Return tokens ``[start:stop]`` of document ``doc`` (a view of the mmap for local files)."""
        handle = self._handle()
        index, data = handle.index, handle.data
        if data is None:  # evicted by another thread between the two lines above
            handle = self._handle()
            index, data = handle.index, handle.data
        lengths = index.lengths
        if not 0 <= doc < lengths.shape[0]:
            raise IndexError(f"{self.url}: document {doc} out of range [0, {lengths.shape[0]})")
        length = int(lengths[doc])
        if start == 0 and (stop is None or stop >= length):
            lo, n = 0, length
        else:
            lo, hi, _ = slice(start, stop).indices(length)
            n = max(0, hi - lo)
        dtype = index.dtype
        offset = int(index.pointers[doc]) + lo * dtype.itemsize
        if handle.local:
            return np.frombuffer(data, dtype=dtype, count=n, offset=offset)
        # A copy, so that a document held by the caller does not pin a whole read-ahead range.
        return np.frombuffer(data.read(offset, n * dtype.itemsize), dtype=dtype).copy()

    def gather(self, docs: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> list[Any]:
        """Return buffers holding tokens ``[starts[i]:stops[i]]`` of documents ``docs[i]``, in order.

        The packer's fast path: for a local file the pieces are memoryview slices of the mmap computed
        with array arithmetic, so a window costs one small Python object per document and one copy
        (``bytes.join``). Ranges are clipped to the documents' lengths; a remote file reads each piece.
        """
        handle = self._handle()
        index, data = handle.index, handle.data
        if data is None:  # evicted by another thread between the two lines above
            handle = self._handle()
            index, data = handle.index, handle.data
        if not handle.local:
            return [self.read(int(d), int(a), int(b)) for d, a, b in zip(docs, starts, stops, strict=True)]
        lengths = index.lengths[docs]  # raises IndexError for a document past the end
        size = index.dtype.itemsize
        base = index.pointers[docs]
        lo = base + np.minimum(starts, lengths) * size
        hi = base + np.minimum(stops, lengths) * size
        view = memoryview(data)
        return [view[a:b] for a, b in zip(lo.tolist(), hi.tolist(), strict=True)]

    def verify(self) -> None:
        """Run every consistency check (the full index checks included) on this shard."""
        self._validated = False
        self.close()
        self._handle()

    @property
    def _key(self) -> str:
        return f"megatron:{self.url}#{self._token}"

    def _handle(self) -> _Handle:
        handle: _Handle = self._get_handle()
        return handle

    def _open(self) -> _Handle:
        idx_buf: Any
        if self.idx.local:
            idx_buf = _map(self.idx.path, self.idx.url)
            bin_size = os.stat(self.bin.path).st_size
        else:
            idx_buf = self.idx.read_bytes()
            bin_size = self.bin.size()
        self._check_size("idx", len(idx_buf), self.idx.url)
        self._check_size("bin", bin_size, self.bin.url)
        index = parse_index(idx_buf, self.idx.url, bin_size=bin_size, bin_url=self.bin.url,
                            full=not self._validated)
        self._validated = True
        if self._dtype is not None and index.dtype != self._dtype:
            raise CorruptIndexError(self.idx.url, f"dtype {index.dtype} differs from the corpus dtype "
                                                  f"{self._dtype}")
        data: Any = _map(self.bin.path, self.bin.url) if self.bin.local else RangeReader(self.bin, bin_size)
        return _Handle(index, data, self.bin.local)

    def _check_size(self, role: str, actual: int, url: str) -> None:
        expected = self._sizes.get(role)
        if expected is not None and actual != expected:
            error = TruncatedDataError if actual < expected else CorruptIndexError
            raise error(url, f"{actual} bytes, index.json records {expected}")
