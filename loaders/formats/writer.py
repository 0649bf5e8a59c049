"""Writing a corpus: shards of any format plus ``index.json``, at any fsspec URL.

Layout under the output URL (``NAME`` = ``shard-00000``, ``shard-00001``, …)::

    index.json                 written after every shard: a reader that finds it finds every shard complete
    _COMMITTED                 written after index.json: the commit marker (``lingcore.marker``) listing every
                               file with its size and xxh3-128, so the corpus is a complete unit for pcache
                               readers and for babel-sync's default rule
    NAME.bin, NAME.idx         format "megatron"
    NAME.tar, NAME.members.npy format "wds"
    NAME.lmdb/data.mdb         format "lmdb"

``index.json`` (schema ``loaders.corpus``, version 1)::

    {"schema": "loaders.corpus", "schema_version": 1, "format": "megatron" | "wds" | "lmdb",
     "dtype": "uint16", "tokenizer": {...} | null, "eos_id": 1 | null,
     "documents": N, "tokens": T, "shard_size": BYTES,
     "shards": [{"name": "shard-00000", "first_document": 0, "documents": n, "tokens": t,
                 "files": {ROLE: {"path": "shard-00000.bin", "bytes": b, "xxh3_128": "<32 hex>"}}}]}

Shards are filled to ``shard_size`` bytes of tokens (a document never straddles two shards, so a shard may
overshoot by one document). A local output is written in place; a remote one is staged one shard at a
time in a temporary directory and uploaded, so local disk use stays around one shard.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import numpy as np

from lingcore.checksum import content_hash
from lingcore.config import parse_size
from lingcore.log import get_logger
from lingcore.marker import MARKER_NAME, build_marker
from loaders.errors import InvalidParameterError
from loaders.formats._io import Location, hash_file
from loaders.formats.corpus import FORMATS, INDEX_NAME, INDEX_SCHEMA, INDEX_VERSION, PACKING_NAME
from loaders.formats.lmdbfmt import LmdbShardWriter
from loaders.formats.megatron import MegatronShardWriter, dtype_code
from loaders.formats.wds import WdsShardWriter

log = get_logger(__name__)

DEFAULT_SHARD_SIZE = "1GiB"
_BATCH_DOCS = 4096


def token_dtype(vocab_size: int, format: str) -> np.dtype[Any]:
    """Return the smallest token dtype for a vocabulary: uint16, else int32 (Megatron) or uint32."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    # Megatron has no uint32 code; its own preprocessing uses int32 for large vocabularies.
    return np.dtype(np.int32 if format == "megatron" else np.uint32)


class CorpusWriter:
    """Streams documents into shards and writes ``index.json`` on :meth:`close`.

    Args:
        url: Output directory (local path or fsspec URL).
        format: ``"megatron"``, ``"wds"`` or ``"lmdb"``.
        dtype: Token dtype (Megatron needs one with a dtype code: uint16, int32, …).
        shard_size: Token bytes per shard, e.g. ``"256MiB"`` or an int.
        tokenizer: Tokenizer description recorded in ``index.json``.
        eos_id: End-of-document token id recorded in ``index.json`` (documents already end with it).
        storage_options: fsspec options for ``url``.
        overwrite: Replace an existing corpus at ``url`` instead of raising ``FileExistsError``.
        resume_key: Identifies the inputs and options (``pack`` passes a hash of them). When ``url`` holds
            an interrupted write with the same key, its finished shards that still verify are kept and
            the documents they hold are skipped; None never resumes.

    Until ``index.json`` and ``_COMMITTED`` exist, a ``_PACKING`` file in ``url`` marks the directory as
    unfinished, so no reader takes the shards written so far for a (smaller) corpus. It lists the
    finished shards. Used as a context manager, an exception leaves no ``index.json`` behind.
    """

    def __init__(self, url: str, *, format: str, dtype: Any = np.uint16, shard_size: int | str = DEFAULT_SHARD_SIZE,
                 tokenizer: Mapping[str, Any] | None = None, eos_id: int | None = None,
                 storage_options: dict[str, Any] | None = None, overwrite: bool = False,
                 resume_key: str | None = None) -> None:
        if format not in FORMATS:
            raise InvalidParameterError("format", f"expected one of {FORMATS}, got {format!r}")
        self.format = format
        self.dtype = np.dtype(dtype)
        if self.dtype.kind not in "iu":
            raise InvalidParameterError("dtype", f"tokens must be integers, got {self.dtype}")
        if format == "megatron":
            dtype_code(self.dtype)
        self.shard_size = parse_size(shard_size, "shard_size")
        if self.shard_size <= 0:
            raise InvalidParameterError("shard_size", f"must be > 0, got {shard_size!r}")
        self.tokenizer = dict(tokenizer) if tokenizer is not None else None
        self.eos_id = eos_id
        self.out = Location.from_url(url, storage_options)
        index = self.out.child(INDEX_NAME)
        if index.exists() and not overwrite:
            raise FileExistsError(f"{index.url} exists; pass overwrite=True (--force) to replace the corpus")
        self.resume_key = resume_key
        kept = self._resumable(overwrite)
        marker = self.out.child(MARKER_NAME)
        if marker.exists():  # --force: unpublish first, so no reader trusts the old corpus while it changes
            marker.fs.rm_file(marker.path)
        if index.exists():  # --force: the old index must never describe the new shards
            index.fs.rm_file(index.path)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if self.out.local:
            os.makedirs(self.out.path, exist_ok=True)
            self._stage = self.out.path
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="loaders-pack-")
            self._stage = self._tmp.name
        self._writer: Any = None
        self._pending: list[np.ndarray] = []
        self._shards: list[dict[str, Any]] = kept
        self.documents = sum(s["documents"] for s in kept)
        self.tokens = sum(s["tokens"] for s in kept)
        self._skip = self.documents  # documents of kept shards: the re-run feeds them again
        self.reused = len(kept)
        self._closed = False
        self._write_packing()
        if kept:
            log.info("resuming an interrupted pack: %d finished shards verified and kept", len(kept),
                     extra={"url": self.out.url})

    def _resumable(self, overwrite: bool) -> list[dict[str, Any]]:
        """Finished shards of an interrupted write of the same inputs that still verify (a prefix)."""
        state = read_packing(self.out, self.resume_key, overwrite)
        kept = []
        for shard in (state or {}).get("shards", []):
            if not shard_intact(self.out, shard):
                break  # later shards start where this one ends: they cannot be kept without it
            kept.append(shard)
        return kept

    def _write_packing(self) -> None:
        """Record the finished shards in ``_PACKING`` (whole-or-nothing: a torn file would lose them)."""
        write_packing(self.out, {"key": self.resume_key, "format": self.format, "shards": self._shards})

    def add(self, tokens: Any) -> None:
        """Append one document (a 1-D array or sequence of token ids)."""
        self._pending.append(np.asarray(tokens).reshape(-1))
        if len(self._pending) >= _BATCH_DOCS:
            self._flush_pending()

    def add_batch(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as concatenated tokens ``flat`` and their ``lengths``."""
        self._flush_pending()
        lengths = np.asarray(lengths, dtype=np.int64)
        flat = np.asarray(flat).reshape(-1)
        if int(lengths.sum()) != flat.size or (lengths.size and int(lengths.min()) < 0):
            raise InvalidParameterError("lengths", f"{lengths.size} lengths summing to {int(lengths.sum())} "
                                                   f"for {flat.size} tokens")
        self._check_range(flat)
        if self._skip:  # documents already in kept shards of an interrupted write
            drop = min(self._skip, int(lengths.size))
            self._skip -= drop
            flat, lengths = flat[int(lengths[:drop].sum()):], lengths[drop:]
        flat = flat.astype(self.dtype, copy=False)
        nbytes = np.cumsum(lengths) * self.dtype.itemsize
        doc = tok = 0
        while doc < lengths.size:
            if self._writer is None:
                self._writer = self._new_shard()
            room = self.shard_size - self._writer.nbytes
            # take documents until the shard reaches shard_size (the last one may overshoot)
            base = int(nbytes[doc - 1]) if doc else 0
            take = int(np.searchsorted(nbytes[doc:], base + room, side="left")) + 1
            take = min(take, lengths.size - doc)
            count = int(lengths[doc:doc + take].sum())
            self._writer.add_batch(flat[tok:tok + count], lengths[doc:doc + take])
            doc += take
            tok += count
            if self._writer.nbytes >= self.shard_size:
                self._finish_shard()
        self.documents += int(lengths.size)
        self.tokens += int(flat.size)

    def _check_range(self, flat: np.ndarray) -> None:
        if flat.size == 0:
            return
        info = np.iinfo(self.dtype)
        lo, hi = int(flat.min()), int(flat.max())
        if lo < info.min or hi > info.max:
            raise InvalidParameterError("tokens", f"ids in [{lo}, {hi}] do not fit dtype {self.dtype}")

    def _flush_pending(self) -> None:
        if self._pending:
            docs, self._pending = self._pending, []
            lengths = np.array([d.size for d in docs], dtype=np.int64)
            flat = np.concatenate(docs) if docs else np.zeros(0, self.dtype)
            self.add_batch(flat, lengths)

    def _new_shard(self) -> Any:
        return new_shard_writer(self.format, self._stage, f"shard-{len(self._shards):05d}", self.dtype,
                                self.documents_written)

    @property
    def documents_written(self) -> int:
        """Documents in finished shards plus the open one."""
        done = sum(s["documents"] for s in self._shards)
        return done + (self._writer.documents if self._writer is not None else 0)

    def _finish_shard(self) -> None:
        writer, self._writer = self._writer, None
        first = sum(s["documents"] for s in self._shards)
        self._shards.append(publish_shard(self.out, self._stage, writer, first))
        self._write_packing()
        log.debug("shard written", extra={"url": self.out.url, "shard": writer.name})

    def close(self) -> dict[str, Any]:
        """Finish the last shard and write ``index.json``; return the index.

        Raises:
            InvalidParameterError: no documents were added (an empty corpus would be an empty shard).
        """
        if self._closed:
            raise InvalidParameterError("writer", "already closed")
        self._flush_pending()
        if self._writer is not None:
            self._finish_shard()
        if not self._shards:
            self.abort()
            raise InvalidParameterError("documents", f"no documents to write to {self.out.url}")
        index = index_document(format=self.format, dtype=self.dtype, tokenizer=self.tokenizer, eos_id=self.eos_id,
                               shard_size=self.shard_size, shards=self._shards)
        publish_index(self.out, index)
        self._cleanup()
        self._closed = True
        return index

    def abort(self) -> None:
        """Stop without writing ``index.json``; finished shards stay, listed in ``_PACKING`` for a re-run."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()
        self._cleanup()
        self._closed = True

    def _cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> CorpusWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None and not self._closed:
            self.abort()


ShardWriter = MegatronShardWriter | WdsShardWriter | LmdbShardWriter


def new_shard_writer(format: str, directory: str, name: str, dtype: Any, first_document: int) -> ShardWriter:
    """Return the writer of one ``format`` shard ``name`` in the local ``directory``."""
    if format == "megatron":
        return MegatronShardWriter(directory, name, dtype)
    if format == "wds":
        return WdsShardWriter(directory, name, dtype, first_document=first_document)
    return LmdbShardWriter(directory, name, dtype)


def publish_shard(out: Location, stage: str, writer: ShardWriter, first_document: int) -> dict[str, Any]:
    """Close ``writer`` (staged in ``stage``), put its files in ``out``; return the shard's index entry.

    Sizes and xxh3-128 come from the staged files. A local output gets them by rename (``stage`` may be
    ``out`` itself: nothing moves); a remote one by upload, checked by the stored size. Each file appears
    whole or not at all, and the shard counts as written only once its entry is recorded.
    """
    files: dict[str, Any] = {}
    in_place = out.local and os.path.abspath(stage) == out.path
    for role, rel in writer.close().items():
        staged = os.path.join(stage, rel)
        size, digest = hash_file(Location.from_url(staged))
        files[role] = {"path": rel, "bytes": size, "xxh3_128": digest}
        target = out.child(rel)
        if in_place:
            continue
        if out.local:
            os.makedirs(os.path.dirname(target.path), exist_ok=True)
            os.replace(staged, target.path)
            continue
        out.fs.makedirs(target.path.rsplit("/", 1)[0], exist_ok=True)
        out.fs.put_file(staged, target.path)
        os.unlink(staged)
        stored = target.size()
        if stored != size:
            raise OSError(f"{target.url}: uploaded {size} bytes but the store holds {stored}")
    if writer.format == "lmdb" and not in_place:
        shutil.rmtree(os.path.join(stage, writer.name + ".lmdb"), ignore_errors=True)
    return {"name": writer.name, "first_document": first_document, "documents": writer.documents,
            "tokens": writer.tokens, "files": files}


def shard_intact(out: Location, entry: Mapping[str, Any]) -> bool:
    """True when every file of a shard entry is in ``out`` with its recorded size and xxh3-128."""
    try:
        return all(hash_file(out.child(f["path"])) == (f["bytes"], f["xxh3_128"]) for f in entry["files"].values())
    except (OSError, KeyError, TypeError, AttributeError):
        return False


def read_packing(out: Location, resume_key: str | None, overwrite: bool) -> dict[str, Any] | None:
    """The ``_PACKING`` state of an interrupted write of the same inputs (``resume_key``), if any.

    Raises:
        FileExistsError: ``out`` holds an interrupted write of other inputs or options and not ``overwrite``.
    """
    packing = out.child(PACKING_NAME)
    if not packing.exists():
        return None
    try:
        state = json.loads(packing.read_bytes())
        same = bool(resume_key) and state.get("key") == resume_key and isinstance(state.get("shards"), list)
    except (ValueError, TypeError, AttributeError):
        same = False
    if same:
        return dict(state)
    if not overwrite:
        raise FileExistsError(f"{out.url} holds an interrupted pack of other inputs or options; "
                              "pass overwrite=True (--force) to replace it")
    return None


def write_packing(out: Location, state: Mapping[str, Any]) -> None:
    """Replace ``_PACKING`` with ``state``: ``key``, ``format``, ``shards`` (the finished prefix), extras."""
    put_small(out, PACKING_NAME, json.dumps(state).encode())


def put_small(out: Location, name: str, data: bytes) -> None:
    """Write a small file in ``out`` whole-or-nothing (readers see the old file or the complete new one)."""
    target = out.child(name)
    if out.local:
        os.makedirs(out.path, exist_ok=True)
        tmp = target.path + ".tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target.path)
    else:
        out.fs.makedirs(out.path, exist_ok=True)  # object stores: a no-op
        out.fs.pipe_file(target.path, data)  # one PUT replaces an object whole


def publish_index(out: Location, index: Mapping[str, Any]) -> None:
    """Publish a finished corpus: ``index.json``, then the commit marker, then drop ``_PACKING``.

    The marker (lingcore.marker's format, listing every shard file and ``index.json``) is the one unit
    convention of the project: babel-sync's default rule and pcache's ``read_commit`` take the corpus as
    complete once it exists, and never before. Both pack engines publish through here.
    """
    index_bytes = (json.dumps(index, indent=1) + "\n").encode()
    put_small(out, INDEX_NAME, index_bytes)
    files = [{"path": f["path"], "size": f["bytes"], "xxh3_128": f["xxh3_128"]}
             for shard in index["shards"] for f in shard["files"].values()]
    files.append({"path": INDEX_NAME, "size": len(index_bytes), "xxh3_128": content_hash(index_bytes)})
    put_small(out, MARKER_NAME, build_marker(out.url, files))
    packing = out.child(PACKING_NAME)
    packing.fs.rm_file(packing.path)


def index_document(*, format: str, dtype: Any, tokenizer: Mapping[str, Any] | None, eos_id: int | None,
                   shard_size: int, shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``index.json`` of a corpus of ``shards`` (their entries, in order)."""
    return {
        "schema": INDEX_SCHEMA, "schema_version": INDEX_VERSION, "format": format,
        "dtype": np.dtype(dtype).name, "tokenizer": dict(tokenizer) if tokenizer is not None else None,
        "eos_id": eos_id,
        # The model's embedding needs at least this many rows (trainers take it from here).
        "vocab_size": (tokenizer or {}).get("vocab_size"),
        "documents": sum(int(s["documents"]) for s in shards), "tokens": sum(int(s["tokens"]) for s in shards),
        "shard_size": shard_size, "shards": shards,
    }


def write_corpus(url: str, docs: Iterable[Any], *, format: str, dtype: Any = np.uint16,
                 shard_size: int | str = DEFAULT_SHARD_SIZE, tokenizer: Mapping[str, Any] | None = None,
                 eos_id: int | None = None, storage_options: dict[str, Any] | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
    """Write documents (token arrays, written as given) as a corpus at ``url``; return ``index.json``.

    See :class:`CorpusWriter` for the arguments.
    """
    with CorpusWriter(url, format=format, dtype=dtype, shard_size=shard_size, tokenizer=tokenizer,
                      eos_id=eos_id, storage_options=storage_options, overwrite=overwrite) as writer:
        for doc in docs:
            writer.add(doc)
        return writer.close()
