"""Hypothesis fuzzer for the corpus readers (run by tests/test_loaders_fuzz.py in a child process).

``python tests/loaders_fuzz.py FORMAT EXAMPLES`` writes a small corpus of FORMAT, then for each example
damages one of its files (bit flips, truncation, a zeroed run, or a huge count written over a field), with
``index.json`` kept or removed (a foreign corpus), and reads everything: open, lengths, every document,
``verify``, ``inspect``, and ``TokenDataset`` batches with both boundary kinds. The only exceptions
allowed are the typed ones: ``FormatError`` or ``FileNotFoundError`` (``CorpusNotFoundError``, or a file
that a damaged ``index.json`` names) naming a file of the corpus, and ``InvalidParameterError``. A crash kills this process, which the parent reports with the signal; a hang
runs into the parent's timeout. Exit status 0: no example failed.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loaders import FormatError, InvalidParameterError, TokenDataset, open_corpus, write_corpus
from loaders.formats.inspect import inspect_corpus

HUGE = [2**31 - 1, 2**31, 2**32 - 1, 2**40, 2**63 - 1, 2**64 - 1]


def make_template(fmt: str, root: Path) -> list[str]:
    """Write the undamaged corpus (several shards, an empty document); return its files, relative."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 600, size=int(rng.integers(0 if i == 5 else 1, 40)), dtype=np.uint16) for i in range(40)]
    write_corpus(str(root), docs, format=fmt, shard_size="384B")
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def mutate(data: bytes, draw: st.DrawFn) -> bytes:
    """Apply one drawn kind of damage to ``data``."""
    size = len(data)
    if size == 0:
        return data
    kind = draw(st.sampled_from(["flip", "truncate", "zero", "huge"]))
    buf = bytearray(data)
    if kind == "flip":
        for pos, bit in draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 7)), min_size=1, max_size=8)):
            buf[pos] ^= 1 << bit
    elif kind == "truncate":
        del buf[draw(st.integers(0, size - 1)):]
    elif kind == "zero":
        start = draw(st.integers(0, size - 1))
        length = draw(st.integers(1, min(4096, size - start)))
        buf[start:start + length] = bytes(length)
    else:
        pos = draw(st.integers(0, size - 1))
        width = draw(st.sampled_from([2, 4, 8]))
        value = draw(st.sampled_from(HUGE)) & ((1 << (8 * width)) - 1)
        raw = value.to_bytes(width, "little")[:size - pos]
        buf[pos:pos + len(raw)] = raw
    return bytes(buf)


def exercise(root: Path) -> None:
    """Everything a reader does; only typed errors that name a corpus file may come out."""
    try:
        with open_corpus(str(root)) as corpus:
            for shard in corpus.shards:
                for doc in range(len(shard.lengths)):
                    shard.read(doc)
                shard.verify()
        for boundaries in ("doc_ids", "cu_seqlens"):
            ds = TokenDataset([str(root)], seq_len=8, batch_size=2, shuffle_window=4, boundaries=boundaries)
            for b in range(3):
                ds.batch(b)
            ds.sample(5)
        inspect_corpus(str(root))
    except (FormatError, FileNotFoundError) as exc:  # FileNotFoundError: index.json names a file that is not there
        if str(root) not in str(exc):
            raise AssertionError(f"error does not name a file of the corpus: {exc!r}") from exc
    except InvalidParameterError:
        pass  # e.g. a damaged corpus left with too few tokens for one window: typed, names the source


def main(fmt: str, examples: int) -> None:
    scratch = Path(tempfile.mkdtemp(prefix=f"loaders-fuzz-{fmt}-"))
    os.environ["LOADERS_CACHE_DIR"] = str(scratch / "cache")
    template = scratch / "template"
    files = make_template(fmt, template)
    exercise(template)  # the undamaged corpus must read

    @settings(max_examples=examples, deadline=None, database=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        root = Path(tempfile.mkdtemp(dir=scratch))
        try:
            shutil.copytree(template, root, dirs_exist_ok=True)
            target = data.draw(st.sampled_from(files), label="file")
            path = root / target
            path.write_bytes(mutate(path.read_bytes(), data.draw))
            if target != "index.json" and data.draw(st.booleans(), label="drop index.json"):
                (root / "index.json").unlink()
            exercise(root)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    try:
        fuzz()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
