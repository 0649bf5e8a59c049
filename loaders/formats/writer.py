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
        packing = self.out.child(PACKING_NAME)
        if not packing.exists():
            return []
        try:
            state = json.loads(packing.read_bytes())
            shards = list(state["shards"]) if state.get("key") == self.resume_key and self.resume_key else None
        except (ValueError, KeyError, TypeError):
            shards = None
        if shards is None:
            if not overwrite:
                raise FileExistsError(f"{self.out.url} holds an interrupted pack of other inputs or options; "
                                      "pass overwrite=True (--force) to replace it")
            return []
        kept = []
        for shard in shards:
            try:
                intact = all(hash_file(self.out.child(f["path"])) == (f["bytes"], f["xxh3_128"])
                             for f in shard["files"].values())
            except (OSError, KeyError, TypeError):
                intact = False
            if not intact:
                break  # later shards start where this one ends: they cannot be kept without it
            kept.append(shard)
        return kept

    def _write_packing(self) -> None:
        """Record the finished shards in ``_PACKING`` (whole-or-nothing: a torn file would lose them)."""
        data = json.dumps({"key": self.resume_key, "format": self.format, "shards": self._shards}).encode()
        self._put(self.out.child(PACKING_NAME), data)

    def _put(self, target: Location, data: bytes) -> None:
        if self.out.local:
            tmp = target.path + ".tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target.path)  # readers see the old file or the complete new one
        else:
            self.out.fs.makedirs(self.out.path, exist_ok=True)  # object stores: a no-op
            self.out.fs.pipe_file(target.path, data)  # one PUT replaces an object whole

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
        name = f"shard-{len(self._shards):05d}"
        if self.format == "megatron":
            return MegatronShardWriter(self._stage, name, self.dtype)
        if self.format == "wds":
            return WdsShardWriter(self._stage, name, self.dtype, first_document=self.documents_written)
        return LmdbShardWriter(self._stage, name, self.dtype)

    @property
    def documents_written(self) -> int:
        """Documents in finished shards plus the open one."""
        done = sum(s["documents"] for s in self._shards)
        return done + (self._writer.documents if self._writer is not None else 0)

    def _finish_shard(self) -> None:
        writer, self._writer = self._writer, None
        first = sum(s["documents"] for s in self._shards)
        files: dict[str, Any] = {}
        for role, rel in writer.close().items():
            local = Location.from_url(os.path.join(self._stage, rel))
            size, digest = hash_file(local)
            files[role] = {"path": rel, "bytes": size, "xxh3_128": digest}
            if not self.out.local:
                target = self.out.child(rel)
                self.out.fs.makedirs(target.path.rsplit("/", 1)[0], exist_ok=True)
                self.out.fs.put_file(local.path, target.path)
                os.unlink(local.path)
        if self.format == "lmdb" and not self.out.local:
            shutil.rmtree(os.path.join(self._stage, writer.name + ".lmdb"), ignore_errors=True)
        self._shards.append({"name": writer.name, "first_document": first, "documents": writer.documents,
                             "tokens": writer.tokens, "files": files})
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
        index = {
            "schema": INDEX_SCHEMA, "schema_version": INDEX_VERSION, "format": self.format,
            "dtype": self.dtype.name, "tokenizer": self.tokenizer, "eos_id": self.eos_id,
            # The model's embedding needs at least this many rows (trainers take it from here).
            "vocab_size": (self.tokenizer or {}).get("vocab_size"),
            "documents": self.documents, "tokens": self.tokens, "shard_size": self.shard_size,
            "shards": self._shards,
        }
        index_bytes = (json.dumps(index, indent=1) + "\n").encode()
        self._put(self.out.child(INDEX_NAME), index_bytes)
        # The commit marker after index.json: one unit convention for every writer (pcache commits,
        # loaders pack), so babel-sync's default rule and pcache's read_commit take the corpus as it is.
        files = [{"path": f["path"], "size": f["bytes"], "xxh3_128": f["xxh3_128"]}
                 for shard in self._shards for f in shard["files"].values()]
        files.append({"path": INDEX_NAME, "size": len(index_bytes), "xxh3_128": content_hash(index_bytes)})
        self._put(self.out.child(MARKER_NAME), build_marker(self.out.url, files))
        packing = self.out.child(PACKING_NAME)
        packing.fs.rm_file(packing.path)
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
