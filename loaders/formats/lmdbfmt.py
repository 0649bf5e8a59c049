"""LMDB shards: one environment directory ``NAME.lmdb/`` (just ``data.mdb``) per shard.

* **Key** of document ``i`` (its index within the shard): 8 bytes, big-endian unsigned, so LMDB's byte
  order is document order and a cursor walks the shard in storage order.
* **Value**: an 8-byte header, then the tokens little-endian. Header = ``b"LT"``, u8 format version (1),
  u8 dtype code (Megatron's codes, plus 9 for uint32), u32 token count, little-endian. The count lets a
  reader tell a truncated value from a short document.
* **Metadata** keys, outside the 8-byte key space: ``__loaders__/meta`` (JSON: version, dtype, documents,
  tokens) and ``__loaders__/lengths`` (int64 little-endian token counts, so opening a shard does not
  touch every value).

LMDB needs a memory map, so a remote shard (any URL with a protocol) is **copied once** into a local
cache directory (``$LOADERS_CACHE_DIR``, default ``~/.cache/loaders``), keyed by URL and object
version (ETag or size and mtime), and opened from there; a changed object gets a new copy. Readers open
environments read-only with ``lock=False`` and never across a fork.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
import threading
import weakref
from typing import Any

import lmdb
import numpy as np

from lingcore.checksum import content_hash
from lingcore.log import get_logger
from lingcore.versions import object_version
from loaders.errors import (
    CorruptIndexError,
    CorruptMemberError,
    EmptyShardError,
    TruncatedDataError,
    UnknownDtypeError,
)
from loaders.formats._io import CachedHandleMixin, HeaderDtypeMixin, Location
from loaders.formats._lmdbcheck import check_environment
from loaders.formats.megatron import DTYPE_CODES

log = get_logger(__name__)

VALUE_HEADER = struct.Struct("<2sBBI")
VALUE_MAGIC = b"LT"
VALUE_VERSION = 1
META_KEY = b"__loaders__/meta"
LENGTHS_KEY = b"__loaders__/lengths"
LMDB_DTYPES: dict[int, np.dtype[Any]] = {**DTYPE_CODES, 9: np.dtype(np.uint32)}
_CODE_OF = {dtype: code for code, dtype in LMDB_DTYPES.items()}
_INITIAL_MAP = 64 << 20
_COMMIT_DOCS = 4096


def doc_key(doc: int) -> bytes:
    """Return the LMDB key of document ``doc`` of a shard."""
    return struct.pack(">Q", doc)


def encode_value(tokens: np.ndarray) -> bytes:
    """Return the LMDB value (header + little-endian tokens) of one document."""
    dtype = tokens.dtype.newbyteorder("=")
    if dtype not in _CODE_OF:
        raise UnknownDtypeError("dtype", f"{tokens.dtype} is not a supported LMDB token dtype")
    header = VALUE_HEADER.pack(VALUE_MAGIC, VALUE_VERSION, _CODE_OF[dtype], tokens.size)
    return header + tokens.astype(tokens.dtype.newbyteorder("<"), copy=False).tobytes()


def decode_header(value: Any, url: str, member: str) -> tuple[np.dtype[Any], int]:
    """Return ``(dtype, token count)`` of a value, checking it against the value's size."""
    if len(value) < VALUE_HEADER.size:
        raise CorruptMemberError(url, member, f"value of {len(value)} bytes is shorter than its header")
    magic, version, code, count = VALUE_HEADER.unpack_from(value)
    if magic != VALUE_MAGIC or version != VALUE_VERSION:
        raise CorruptMemberError(url, member, f"bad value header {bytes(value[:8])!r}")
    if code not in LMDB_DTYPES:
        raise CorruptMemberError(url, member, f"unknown dtype code {code}")
    dtype = LMDB_DTYPES[code]
    if len(value) != VALUE_HEADER.size + count * dtype.itemsize:
        raise CorruptMemberError(url, member, f"header says {count} tokens of {dtype} but the value has "
                                              f"{len(value) - VALUE_HEADER.size} payload bytes")
    return dtype, count


class LmdbShardWriter:
    """Writes one LMDB shard in a local directory, growing the map as needed."""

    format = "lmdb"

    def __init__(self, directory: str, name: str, dtype: Any) -> None:
        self.dtype = np.dtype(dtype).newbyteorder("=")
        if self.dtype not in _CODE_OF:
            raise UnknownDtypeError("dtype", f"{self.dtype} is not a supported LMDB token dtype")
        self.name = name
        self.path = os.path.join(directory, name + ".lmdb")
        # a fresh temporary directory, renamed on close: lmdb.open would append to an old shard of the
        # same name, and a reader may have the old one open
        self._tmp_path = self.path + ".tmp"
        if os.path.exists(self._tmp_path):
            shutil.rmtree(self._tmp_path)
        # lock=False: one writer, and no lock.mdb to upload; sync happens once, in close(). meminit=True
        # (zeroed page buffers) and commits every _COMMIT_DOCS documents, whatever batches they came in,
        # make the file a function of the documents alone: both pack engines write byte-identical shards.
        self._env = lmdb.open(self._tmp_path, map_size=_INITIAL_MAP, subdir=True, lock=False, sync=False,
                              meminit=True)
        self._items: list[tuple[bytes, bytes]] = []
        self._lengths: list[np.ndarray] = []
        self.documents = 0
        self.tokens = 0
        self.nbytes = 0

    def add_batch(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as concatenated tokens and their lengths."""
        flat = np.ascontiguousarray(flat, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        items = []
        pos = 0
        for i, n in enumerate(lengths.tolist()):
            items.append((doc_key(self.documents + i), encode_value(flat[pos:pos + n])))
            pos += n
        self._items.extend(items)
        while len(self._items) >= _COMMIT_DOCS:
            self._put(self._items[:_COMMIT_DOCS])
            del self._items[:_COMMIT_DOCS]
        self._lengths.append(lengths)
        self.documents += len(lengths)
        self.tokens += int(flat.size)
        self.nbytes += flat.nbytes

    def _put(self, items: list[tuple[bytes, bytes]]) -> None:
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for key, value in items:
                        txn.put(key, value, append=True)  # keys arrive sorted: append is cheaper
                return
            except lmdb.MapFullError:
                self._env.set_mapsize(self._env.info()["map_size"] * 2)

    def close(self) -> dict[str, str]:
        """Write the metadata keys and finish the shard; return its files by role (``data``)."""
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        if self._items:
            self._put(self._items)
            self._items = []
        meta = {"version": VALUE_VERSION, "dtype": self.dtype.name, "documents": self.documents,
                "tokens": self.tokens}
        self._put([(LENGTHS_KEY, lengths.astype("<i8").tobytes()),
                   (META_KEY, json.dumps(meta, sort_keys=True).encode())])
        self._env.sync(True)
        self._env.close()
        if os.path.exists(self.path):
            shutil.rmtree(self.path)
        os.replace(self._tmp_path, self.path)
        return {"data": self.name + ".lmdb/data.mdb"}


class _Handle:
    def __init__(self, env: Any, identity: tuple[int, ...]) -> None:
        self.env = env
        # one long-lived read transaction: the environment is read-only, so its snapshot never goes stale,
        # and a begin() per document would cost more than the lookup
        self.txn = env.begin(buffers=True)
        self.identity = identity
        self.closed = False
        # close() from another thread's eviction must not unmap the environment under a running read
        self.lock = threading.Lock()
        _LIVE.add(self)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.txn.abort()
            self.env.close()


# Every open environment, so that a forked child can close its inherited copies: a reader still holding
# one would otherwise make py-lmdb refuse the child's own open of the same path ("already open").
_LIVE: weakref.WeakSet[_Handle] = weakref.WeakSet()


def _close_inherited() -> None:
    for handle in list(_LIVE):
        handle.lock = threading.Lock()  # the parent's may have been held by another thread at fork time
        handle.closed = True
        with contextlib.suppress(lmdb.Error):
            handle.env.close()  # also ends its transaction  # readonly and lock=False: only the child's mapping and descriptor go
    _LIVE.clear()


os.register_at_fork(after_in_child=_close_inherited)


def cache_dir() -> str:
    """Return the directory that holds local copies of remote LMDB shards."""
    return os.environ.get("LOADERS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "loaders")


def local_copy(data: Location) -> str:
    """Copy a remote ``data.mdb`` into the cache once; return the local environment directory."""
    tag = object_version(data.info())
    target = os.path.join(cache_dir(), "lmdb", content_hash(f"{data.url}\n{tag}".encode())[:32])
    final = os.path.join(target, "data.mdb")
    if os.path.exists(final):
        return target
    os.makedirs(target, exist_ok=True)
    log.info("copying remote LMDB shard to the local cache", extra={"url": data.url, "path": target})
    fd, tmp = tempfile.mkstemp(dir=target, prefix=".data.mdb.")
    try:
        with os.fdopen(fd, "wb") as out:
            data.fs.get_file(data.path, out)
        os.replace(tmp, final)  # atomic: concurrent copiers race harmlessly
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


class LmdbShard(HeaderDtypeMixin, CachedHandleMixin):
    """Reads one LMDB shard; opens lazily, per process, through the handle cache.

    Args:
        loc: The ``NAME.lmdb`` environment directory.
        dtype: Token dtype from ``index.json``, if known.
        sizes: Expected byte sizes by role (``data``) from ``index.json``.
    """

    format = "lmdb"

    def __init__(self, loc: Location, *, dtype: Any = None, sizes: dict[str, int] | None = None) -> None:
        self.url = loc.url
        self.loc = loc
        self._dtype = None if dtype is None else np.dtype(dtype)
        self._sizes = sizes or {}
        self._lengths: np.ndarray | None = None
        self._checked = False
        self._safe: tuple[int, ...] | None = None  # identity of the data.mdb that check_environment passed
        self.skipped = 0

    @property
    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            self._handle()
        assert self._lengths is not None
        return self._lengths

    def read(self, doc: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Return tokens ``[start:stop]`` of document ``doc`` (a copy: LMDB buffers die with the txn)."""
        lengths = self.lengths
        if not 0 <= doc < lengths.shape[0]:
            raise IndexError(f"{self.url}: document {doc} out of range [0, {lengths.shape[0]})")
        handle = self._handle()
        with handle.lock:
            if handle.closed:  # evicted by another thread meanwhile
                return self.read(doc, start, stop)
            return self._read_locked(handle, doc, start, stop, int(lengths[doc]))

    def _read_locked(self, handle: _Handle, doc: int, start: int, stop: int | None, expected: int) -> np.ndarray:
        # The caller holds handle.lock. The buffer is only valid until the transaction's next use: copy.
        member = f"key {doc}"
        try:
            value = handle.txn.get(doc_key(doc))
        except lmdb.Error as exc:  # CorruptedError, PageNotFoundError, ...: damage LMDB noticed itself
            raise CorruptMemberError(self.url, member, f"LMDB: {exc}") from None
        if value is None:
            raise CorruptMemberError(self.url, member, "document missing")
        dtype, count = decode_header(value, self.url, member)
        if dtype != self.dtype or count != expected:
            raise CorruptMemberError(self.url, member, f"{count} tokens of {dtype}, the shard's length table "
                                                       f"says {expected} of {self.dtype}")
        lo, hi, _ = slice(start, stop).indices(count)
        n = max(0, hi - lo)
        return np.frombuffer(value, dtype=dtype, count=n, offset=VALUE_HEADER.size + lo * dtype.itemsize).copy()

    def verify(self) -> None:
        """Read every document's value header; check keys, lengths and metadata agree."""
        self.close()
        self._lengths = None
        for doc in range(self.lengths.shape[0]):
            self.read(doc, 0, 0)

    @property
    def _key(self) -> str:
        # Keyed by path, not per reader: py-lmdb refuses to open one environment twice in a process.
        return f"lmdb:{self.loc.path if self.loc.local else self.url}"

    def _identity(self) -> tuple[int, ...]:
        if not self.loc.local:
            return ()  # the local copy is keyed by the object's version already
        st = os.stat(os.path.join(self.loc.path, "data.mdb"))
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _handle(self) -> _Handle:
        handle: _Handle = self._get_handle()
        if not self._checked:
            # another reader opened this path earlier; reopen if the shard was rewritten since
            self._checked = True
            try:
                stale = handle.identity != self._identity()
            except FileNotFoundError:
                stale = True
            if stale:
                self.close()
                handle = self._get_handle()
        if self._lengths is None:
            self._load_meta(handle.env, self.loc.child("data.mdb").url)
        return handle

    def _open(self) -> _Handle:
        data = self.loc.child("data.mdb")
        if not data.exists():
            raise EmptyShardError(data.url, "no data.mdb in the LMDB shard")
        size = data.size()
        expected = self._sizes.get("data")
        if expected is not None and size != expected:
            error = TruncatedDataError if size < expected else CorruptIndexError
            raise error(data.url, f"{size} bytes, index.json records {expected}")
        path = self.loc.path if self.loc.local else local_copy(data)
        identity = self._identity()
        if self._safe != identity:  # LMDB maps the file and trusts it: check it first (once per file version)
            check_environment(os.path.join(path, "data.mdb"), data.url)
            self._safe = identity
        try:
            env = lmdb.open(path, readonly=True, lock=False, subdir=True, readahead=False)
        except lmdb.Error as exc:
            raise CorruptIndexError(data.url, f"not a readable LMDB environment: {exc}") from None
        return _Handle(env, identity)

    def _load_meta(self, env: Any, url: str) -> None:
        try:
            self._load_meta_txn(env, url)
        except lmdb.Error as exc:  # CorruptedError, PageNotFoundError, ...: damage LMDB noticed itself
            raise CorruptIndexError(url, f"LMDB: {exc}") from None

    def _load_meta_txn(self, env: Any, url: str) -> None:
        with env.begin() as txn:
            raw_meta = txn.get(META_KEY)
            raw_lengths = txn.get(LENGTHS_KEY)
            if raw_meta is None or raw_lengths is None:
                lengths, dtype = self._scan(txn, url)
            else:
                try:
                    meta = json.loads(raw_meta)
                    dtype = np.dtype(meta["dtype"])
                    documents = int(meta["documents"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise CorruptIndexError(url, f"bad {META_KEY.decode()} metadata: {exc}") from None
                if len(raw_lengths) != 8 * documents:
                    raise CorruptIndexError(url, f"length table has {len(raw_lengths)} bytes for {documents} "
                                                 "documents")
                lengths = np.frombuffer(raw_lengths, dtype="<i8").astype(np.int64)
        if lengths.size == 0:
            raise EmptyShardError(url, "LMDB shard has no documents")
        if self._dtype is not None and dtype != self._dtype:
            raise CorruptIndexError(url, f"dtype {dtype} differs from the corpus dtype {self._dtype}")
        self._dtype, self._lengths = dtype, lengths

    def _scan(self, txn: Any, url: str) -> tuple[np.ndarray, np.dtype[Any] | None]:
        # A shard without our metadata: walk the 8-byte keys, which must be 0..N-1.
        lengths: list[int] = []
        dtype: np.dtype[Any] | None = None
        for key, value in txn.cursor():
            if len(key) != 8:
                continue
            doc = struct.unpack(">Q", key)[0]
            if doc != len(lengths):
                raise CorruptIndexError(url, f"key {doc} found where key {len(lengths)} was expected")
            value_dtype, count = decode_header(value, url, f"key {doc}")
            if dtype is not None and value_dtype != dtype:
                raise CorruptMemberError(url, f"key {doc}", f"dtype {value_dtype} differs from {dtype}")
            dtype = value_dtype
            lengths.append(count)
        return np.array(lengths, dtype=np.int64), dtype
