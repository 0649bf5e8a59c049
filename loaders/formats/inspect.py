"""``loaders inspect``: summary statistics and a full consistency check of a corpus.

Verification, in order (the first failure raises a typed error naming the file):

1. every file listed in ``index.json`` has the recorded size and xxh3-128 content hash;
2. each shard's own structure: Megatron pointers tile the ``.bin`` exactly and lengths are
   non-negative; a tar's headers agree with its member table; every LMDB value header is valid;
3. per-shard and total document and token counts agree with ``index.json``;
4. every document is read back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from loaders.errors import ChecksumMismatchError, CorruptIndexError, TruncatedDataError
from loaders.formats._io import hash_file
from loaders.formats.corpus import Corpus, open_corpus

Progress = Callable[[str], None]


def length_histogram(lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """Return ``(low, high, documents)`` buckets: ``[0, 1)`` then powers of two ``[2^k, 2^(k+1))``."""
    if lengths.size == 0:
        return []
    buckets = np.zeros(lengths.size, dtype=np.int64)
    positive = lengths > 0
    buckets[positive] = np.floor(np.log2(lengths[positive])).astype(np.int64) + 1
    counts = np.bincount(buckets)
    out = []
    for bucket, count in enumerate(counts.tolist()):
        if count:
            low, high = (0, 1) if bucket == 0 else (1 << (bucket - 1), 1 << bucket)
            out.append((low, high, int(count)))
    return out


def verify_files(corpus: Corpus, progress: Progress | None = None) -> None:
    """Check sizes and xxh3-128 hashes of every file ``index.json`` lists (step 1)."""
    if corpus.index is None or corpus.root is None:
        return
    for entry in corpus.index["shards"]:
        for info in entry["files"].values():
            loc = corpus.root.child(info["path"])
            if progress:
                progress(loc.url)
            size, digest = hash_file(loc)
            if size != info["bytes"]:
                error = TruncatedDataError if size < info["bytes"] else CorruptIndexError
                raise error(loc.url, f"{size} bytes, index.json records {info['bytes']}")
            if digest != info["xxh3_128"]:
                raise ChecksumMismatchError(loc.url, info["xxh3_128"], digest)


def inspect_corpus(url: str, *, verify: bool = True, storage_options: dict[str, Any] | None = None,
                   progress: Progress | None = None) -> dict[str, Any]:
    """Open, optionally verify, and summarise the corpus at ``url``.

    Returns:
        A JSON-able report: url, format, dtype, fingerprint, documents, tokens, per-shard counts, the
        length histogram, min/mean/max document length, tokenizer and eos id (when recorded).

    Raises:
        FormatError: (a subclass, naming the file) on any inconsistency when ``verify`` is set.
    """
    with open_corpus(url, storage_options=storage_options) as corpus:
        if verify:
            verify_files(corpus, progress)
        shards = []
        all_lengths = []
        for i, shard in enumerate(corpus.shards):
            if verify:
                if progress:
                    progress(shard.url)
                shard.verify()
            lengths = shard.lengths
            all_lengths.append(lengths)
            documents, tokens = int(lengths.size), int(lengths.sum())
            if verify and corpus.index is not None:
                entry = corpus.index["shards"][i]
                if (entry["documents"], entry["tokens"]) != (documents, tokens):
                    raise CorruptIndexError(shard.url, f"{documents} documents / {tokens} tokens, index.json "
                                                       f"records {entry['documents']} / {entry['tokens']}")
            if verify:
                for doc in range(documents):
                    shard.read(doc)
            shards.append({"url": shard.url, "documents": documents, "tokens": tokens})
        lengths = np.concatenate(all_lengths)
        report: dict[str, Any] = {
            "url": corpus.url, "format": corpus.format, "dtype": corpus.dtype.name,
            "fingerprint": corpus.fingerprint, "documents": int(lengths.size), "tokens": int(lengths.sum()),
            "shards": shards, "skipped": corpus.skipped,
            "length_min": int(lengths.min()), "length_mean": float(lengths.mean()),
            "length_max": int(lengths.max()), "histogram": length_histogram(lengths),
            "verified": verify,
        }
        if corpus.index is not None:
            report["tokenizer"] = corpus.index.get("tokenizer")
            report["eos_id"] = corpus.index.get("eos_id")
            if verify and (corpus.index["documents"], corpus.index["tokens"]) != (report["documents"],
                                                                               report["tokens"]):
                raise CorruptIndexError(f"{corpus.url}/index.json", "totals disagree with the shards")
    return report
