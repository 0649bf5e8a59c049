"""Token corpus formats: Megatron ``.bin/.idx``, WebDataset tar shards and LMDB, read and written.

Readers give random access to documents (``shard.read(doc, start, stop)``) with lazily opened,
per-process, LRU-bounded handles; :func:`open_corpus` finds the shards, from ``index.json`` or from a
foreign layout. :class:`CorpusWriter` / :func:`write_corpus` write shards plus ``index.json``.
"""

from loaders.errors import (
    ChecksumMismatchError,
    CorpusNotFoundError,
    CorruptIndexError,
    CorruptMemberError,
    EmptyShardError,
    FormatError,
    LegacyFormatError,
    TruncatedDataError,
    TruncatedIndexError,
    UnknownDtypeError,
    UnsupportedVersionError,
)
from loaders.formats.corpus import FORMATS, Corpus, ShardReader, load_index, open_corpus, probe_corpus
from loaders.formats.lmdbfmt import LmdbShard, LmdbShardWriter
from loaders.formats.megatron import (
    MegatronIndex,
    MegatronShard,
    MegatronShardWriter,
    encode_index,
    parse_index,
)
from loaders.formats.wds import WdsShard, WdsShardWriter
from loaders.formats.writer import CorpusWriter, token_dtype, write_corpus

__all__ = [
    "FORMATS",
    "ChecksumMismatchError",
    "Corpus",
    "CorpusNotFoundError",
    "CorpusWriter",
    "CorruptIndexError",
    "CorruptMemberError",
    "EmptyShardError",
    "FormatError",
    "LegacyFormatError",
    "LmdbShard",
    "LmdbShardWriter",
    "MegatronIndex",
    "MegatronShard",
    "MegatronShardWriter",
    "ShardReader",
    "TruncatedDataError",
    "TruncatedIndexError",
    "UnknownDtypeError",
    "UnsupportedVersionError",
    "WdsShard",
    "WdsShardWriter",
    "encode_index",
    "load_index",
    "open_corpus",
    "probe_corpus",
    "parse_index",
    "token_dtype",
    "write_corpus",
]
