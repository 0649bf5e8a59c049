"""Opening a corpus: ``index.json`` when there is one, otherwise foreign data found by its layout.

:func:`open_corpus` accepts, in this order of preference:

1. a directory (any fsspec URL) with ``index.json``, as written by ``loaders pack`` / :func:`write_corpus`;
2. a directory of Megatron ``.idx/.bin`` pairs, of ``.tar`` shards, or of ``*.lmdb`` environments
   (shards taken in natural name order: ``part-2`` before ``part-10``); a directory holding
   ``data.mdb`` is one LMDB shard;
3. a Megatron prefix ``path/name`` with ``name.idx`` and ``name.bin`` beside it (``name.idx`` or
   ``name.bin`` themselves also work), or a single ``.tar``.

Opening reads ``index.json`` (or lists the directory) and, for foreign data, the first shard's header to
learn the dtype; every other shard opens lazily on first use.
"""

from __future__ import annotations

import dataclasses
import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from lingcore.checksum import content_hash
from lingcore.marker import PACKING_NAME as _PACKING_NAME
from lingcore.probe import PROBE_TIMEOUT, check_readable
from lingcore.versions import object_version
from loaders.errors import CorpusNotFoundError, CorruptIndexError, FormatError, InvalidParameterError
from loaders.formats._io import Location
from loaders.formats.lmdbfmt import LmdbShard
from loaders.formats.megatron import MegatronShard
from loaders.formats.wds import WdsShard

INDEX_NAME = "index.json"
# Present while `loaders pack` writes a corpus (and after it was interrupted); removed once index.json and the
# commit marker are written. The name is the kernel's (babel-sync never takes a directory holding it).
PACKING_NAME = _PACKING_NAME
INDEX_SCHEMA = "loaders.corpus"
INDEX_VERSION = 1
FORMATS = ("megatron", "wds", "lmdb")
ON_ERROR = ("raise", "skip")
ROLES = {"megatron": ("bin", "idx"), "wds": ("tar", "members"), "lmdb": ("data",)}


class ShardReader(Protocol):
    """One shard of a corpus, with random access to its documents.

    ``dtype`` and ``lengths`` may load lazily (first access opens the shard). Readers hold no open file
    across ``fork`` or pickling: each process opens its own handles, bounded by a per-process LRU.
    """

    url: str
    format: str
    skipped: int  # corrupt members left out when the shard was scanned with on_error="skip"

    @property
    def dtype(self) -> np.dtype[Any]: ...

    @property
    def lengths(self) -> np.ndarray: ...  # int64 tokens per document

    def read(self, doc: int, start: int = 0, stop: int | None = None) -> np.ndarray: ...

    def verify(self) -> None: ...

    def close(self) -> None: ...


@dataclasses.dataclass
class Corpus:
    """One source: its shards in storage order.

    Attributes:
        url: The URL it was opened from.
        format: ``"megatron"``, ``"wds"`` or ``"lmdb"``.
        dtype: Token dtype (the same for every shard).
        shards: Shard readers in storage order.
        fingerprint: xxh3-128 of ``index.json``, or of the shard files' names and versions (ETag, or
            size and mtime) for foreign data; it changes whenever the data does.
        index: The parsed ``index.json``, or None for foreign data.
        root: The corpus directory (where ``index.json`` paths are relative to), when there is one.
    """

    url: str
    format: str
    dtype: np.dtype[Any]
    shards: list[ShardReader]
    fingerprint: str
    index: dict[str, Any] | None = None
    root: Location | None = None

    @property
    def vocab_size(self) -> int | None:
        """Token ids are below this (from ``index.json``); None for foreign data that does not say."""
        index = self.index or {}
        value = index.get("vocab_size") or (index.get("tokenizer") or {}).get("vocab_size")
        return int(value) if value else None

    @property
    def tokenizer_id(self) -> str | None:
        """What tokenized the corpus: ``bytes``, ``hf:<xxh3-128 of tokenizer.json>``, or None (unknown)."""
        tok = (self.index or {}).get("tokenizer") or {}
        if tok.get("kind") == "hf":
            return f"hf:{tok.get('xxh3_128')}"
        return str(tok["kind"]) if tok.get("kind") else None

    @property
    def skipped(self) -> int:
        """Corrupt members skipped so far across the shards (on_error="skip")."""
        return sum(shard.skipped for shard in self.shards)

    def load_lengths(self, threads: int = 16) -> list[np.ndarray]:
        """Return every shard's lengths, opening shards in parallel (useful for remote corpora)."""
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(self.shards)))) as pool:
            return list(pool.map(lambda shard: shard.lengths, self.shards))

    def close(self) -> None:
        for shard in self.shards:
            shard.close()

    def __enter__(self) -> Corpus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_corpus(url: str, *, storage_options: dict[str, Any] | None = None, on_error: str = "raise") -> Corpus:
    """Open the corpus at ``url`` (a local path, a FUSE path or any fsspec URL such as ``pcache::s3://…``).

    Args:
        url: Directory with ``index.json``, directory of shards, Megatron prefix or single shard.
        storage_options: fsspec options for the URL's filesystem.
        on_error: ``"raise"`` (default) or ``"skip"``: skip corrupt tar members found while scanning a shard
            and count them (``Corpus.skipped``). Reads of a corrupt document always raise.

    Raises:
        InvalidParameterError: ``on_error`` is not ``"raise"`` or ``"skip"``.
        CorpusNotFoundError: nothing readable at ``url``.
        FormatError: a malformed ``index.json`` or first shard (subclasses name the file).
    """
    if on_error not in ON_ERROR:
        raise InvalidParameterError("on_error", f"expected one of {ON_ERROR}, got {on_error!r}")
    if url.rstrip("/").endswith("/" + INDEX_NAME):
        url = url.rstrip("/")[: -len(INDEX_NAME) - 1]
    loc = Location.from_url(url, storage_options)
    index_loc = loc.child(INDEX_NAME)
    if index_loc.exists():
        return _from_index(loc, index_loc, on_error)
    if loc.child(PACKING_NAME).exists():
        raise FormatError(loc.url, f"an interrupted or running `loaders pack` ({PACKING_NAME} and no {INDEX_NAME}), "
                                   "not a corpus; re-run the same `loaders pack` to finish it")
    if loc.isdir():
        return _from_directory(loc, on_error)
    for suffix in (".idx", ".bin"):
        if loc.path.endswith(suffix):
            loc = Location(loc.fs, loc.path[: -len(suffix)], loc.url[: -len(suffix)], loc.local)
    idx, bin_ = loc.sibling(".idx"), loc.sibling(".bin")
    if idx.exists() and bin_.exists():
        return _finish(loc.url, "megatron", [MegatronShard(loc)], _fingerprint([idx, bin_]))
    if loc.path.endswith(".tar") and loc.isfile():
        return _finish(loc.url, "wds", [WdsShard(loc, on_error=on_error)], _fingerprint([loc]))
    raise CorpusNotFoundError(url)


def probe_corpus(url: str, *, storage_options: dict[str, Any] | None = None, endpoint_url: str | None = None,
                 timeout: float = PROBE_TIMEOUT) -> None:
    """Check, within ``timeout`` seconds, that the store holding ``url`` answers and that something is there.

    A cheap look before :func:`open_corpus`, whose reads retry for longer and whose ``exists()`` checks
    cannot tell a refused secret or a missing bucket from a missing ``index.json``. What is there (an
    index, foreign shards, a Megatron prefix) is left for :func:`open_corpus` to judge.

    Raises:
        StoreAccessError: one line naming ``url``: unreachable, forbidden, or not found (a missing bucket
            is named as such).
    """
    if url.rstrip("/").endswith("/" + INDEX_NAME):
        url = url.rstrip("/")[: -len(INDEX_NAME) - 1]
    base = url[: -len(".bin")] if url.endswith(".bin") else url
    # A Megatron prefix NAME is no object itself: NAME.idx is.
    check_readable(base, INDEX_NAME, storage_options, endpoint_url, timeout, siblings=(".idx",),
                   missing=f"no corpus there (no {INDEX_NAME}, shards or Megatron prefix)")


def _finish(url: str, fmt: str, shards: list[ShardReader], fingerprint: str) -> Corpus:
    dtype = shards[0].dtype  # foreign data: the first shard's header says the dtype
    return Corpus(url, fmt, dtype, shards, fingerprint)


def _same_dtype(make: Any, locs: list[Location]) -> list[ShardReader]:
    # The first shard's header gives the dtype; every other shard is checked against it when it opens.
    first = make(locs[0], None)
    return [first, *(make(loc, first.dtype) for loc in locs[1:])]


def _fingerprint(locs: list[Location], listing: dict[str, dict[str, Any]] | None = None) -> str:
    lines = []
    for loc in locs:
        info = (listing or {}).get(loc.path) or loc.info()
        lines.append(f"{loc.path.rsplit('/', 1)[-1]} {object_version(info)}")
    return content_hash("\n".join(lines).encode())


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _from_directory(loc: Location, on_error: str) -> Corpus:
    entries = {e["name"].rstrip("/"): e for e in loc.listdir()}
    names = {path.rsplit("/", 1)[-1]: (path, e) for path, e in entries.items()}
    if "data.mdb" in names:
        return _finish(loc.url, "lmdb", [LmdbShard(loc)], _fingerprint([loc.child("data.mdb")]))
    idx = sorted((n for n, (_, e) in names.items() if n.endswith(".idx") and e["type"] == "file"), key=_natural)
    tars = sorted((n for n, (_, e) in names.items() if n.endswith(".tar") and e["type"] == "file"), key=_natural)
    lmdbs = sorted((n for n, (_, e) in names.items() if n.endswith(".lmdb") and e["type"] == "directory"),
                   key=_natural)
    found = [fmt for fmt, items in (("megatron", idx), ("wds", tars), ("lmdb", lmdbs)) if items]
    if not found:
        raise CorpusNotFoundError(loc.url, "the directory holds no shards")
    if len(found) > 1:
        raise FormatError(loc.url, f"directory mixes shard formats {found}; open each format's files separately")
    listing = {path: e for path, e in entries.items()}
    if idx:
        prefixes = [loc.child(name[:-4]) for name in idx]
        for prefix, name in zip(prefixes, idx, strict=True):
            if name[:-4] + ".bin" not in names:
                raise CorpusNotFoundError(prefix.url + ".bin", f"{prefix.url}.idx has no matching .bin")
        shards = _same_dtype(lambda p, dt: MegatronShard(p, dtype=dt), prefixes)
        files = [f for p in prefixes for f in (p.sibling(".idx"), p.sibling(".bin"))]
        return _finish(loc.url, "megatron", shards, _fingerprint(files, listing))
    if tars:
        locs = [loc.child(name) for name in tars]
        shards = _same_dtype(lambda t, dt: WdsShard(t, dtype=dt, on_error=on_error), locs)
        return _finish(loc.url, "wds", shards, _fingerprint(locs, listing))
    locs = [loc.child(name) for name in lmdbs]
    shards = _same_dtype(lambda x, dt: LmdbShard(x, dtype=dt), locs)
    return _finish(loc.url, "lmdb", shards, _fingerprint([x.child("data.mdb") for x in locs]))


def load_index(raw: bytes, url: str) -> dict[str, Any]:
    """Parse and check an ``index.json``.

    Raises:
        CorruptIndexError: naming the file, for invalid JSON, missing fields, wrong types, unsafe paths.
    """
    try:
        index = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptIndexError(url, f"not valid JSON: {exc}") from None

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise CorruptIndexError(url, what)

    need(isinstance(index, dict) and index.get("schema") == INDEX_SCHEMA, f"not a {INDEX_SCHEMA} index")
    need(index.get("schema_version") == INDEX_VERSION,
         f"unsupported schema_version {index.get('schema_version')!r} (expected {INDEX_VERSION})")
    need(index.get("format") in FORMATS, f"format must be one of {FORMATS}, got {index.get('format')!r}")
    try:  # np.dtype(None) is float64: a missing dtype must not pass for one
        kind = np.dtype(index["dtype"]).kind if isinstance(index.get("dtype"), str) else ""
    except TypeError:
        kind = ""
    need(kind in ("i", "u"), f"bad dtype {index.get('dtype')!r} (integer token types only)")
    need(isinstance(index.get("documents"), int) and isinstance(index.get("tokens"), int),
         "documents and tokens must be integers")
    shards = index.get("shards")
    need(isinstance(shards, list) and len(shards) > 0, "no shards listed")
    for i, shard in enumerate(shards):
        need(isinstance(shard, dict) and isinstance(shard.get("files"), dict), f"shard {i}: no files")
        need(isinstance(shard.get("documents"), int) and isinstance(shard.get("tokens"), int),
             f"shard {i}: documents and tokens must be integers")
        for role in ROLES[index["format"]]:
            entry = shard["files"].get(role)
            need(isinstance(entry, dict) and isinstance(entry.get("path"), str)
                 and isinstance(entry.get("bytes"), int) and isinstance(entry.get("xxh3_128"), str),
                 f"shard {i}: file {role!r} needs path, bytes and xxh3_128")
            path = entry["path"]
            need(not path.startswith("/") and ".." not in path.split("/") and "://" not in path,
                 f"shard {i}: path {path!r} must be relative to the corpus directory")
    return dict(index)


def _from_index(loc: Location, index_loc: Location, on_error: str) -> Corpus:
    raw = index_loc.read_bytes()
    index = load_index(raw, index_loc.url)
    fmt, dtype = index["format"], np.dtype(index["dtype"])
    shards: list[ShardReader] = []
    for shard in index["shards"]:
        files = shard["files"]
        sizes = {role: int(entry["bytes"]) for role, entry in files.items()}
        if fmt == "megatron":
            prefix = loc.child(files["idx"]["path"][: -len(".idx")])
            shards.append(MegatronShard(prefix, dtype=dtype, sizes=sizes))
        elif fmt == "wds":
            shards.append(WdsShard(loc.child(files["tar"]["path"]), dtype=dtype,
                                   members=loc.child(files["members"]["path"]), sizes=sizes, on_error=on_error))
        else:
            env_dir = files["data"]["path"].rsplit("/", 1)[0] if "/" in files["data"]["path"] else ""
            shards.append(LmdbShard(loc.child(env_dir) if env_dir else loc, dtype=dtype, sizes=sizes))
    return Corpus(loc.url, fmt, dtype, shards, content_hash(raw), index, loc)
