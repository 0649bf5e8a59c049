"""Damaged corpora never crash or hang a reader and never raise an untyped error: a Hypothesis fuzzer per
format (tests/loaders_fuzz.py), run in a child process so that a crash shows as its signal.

``LOADERS_FUZZ_EXAMPLES`` sets the examples per format (40 here; ``make soak`` runs thousands).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = int(os.environ.get("LOADERS_FUZZ_EXAMPLES", "40"))
LIMIT = 120 + 3 * EXAMPLES  # seconds, far above a healthy run: past it, something hangs


@pytest.mark.timeout(LIMIT + 60)
@pytest.mark.parametrize("fmt", ["megatron", "wds", "lmdb"])
def test_damaged_corpus_gives_only_typed_errors(fmt: str) -> None:
    script = Path(__file__).with_name("loaders_fuzz.py")
    limit = LIMIT
    try:
        proc = subprocess.run([sys.executable, str(script), fmt, str(EXAMPLES)], capture_output=True, text=True,
                              timeout=limit, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{fmt} fuzzer hung (no result in {limit} s): {(exc.stderr or b'')[-3000:]!r}")
    tail = proc.stderr[-6000:]
    if proc.returncode < 0:
        pytest.fail(f"{fmt} fuzzer crashed the process with {signal.Signals(-proc.returncode).name}:\n{tail}")
    assert proc.returncode == 0, f"{fmt} fuzzer found an untyped error:\n{tail}"


TRUNCATED_LMDB = """
import os, numpy as np
from loaders import FormatError, open_corpus, write_corpus
root = {root!r}
rng = np.random.default_rng(0)
docs = [rng.integers(0, 600, size=int(rng.integers(1, 3000)), dtype=np.uint16) for _ in range(300)]
write_corpus(root, docs, format="lmdb", shard_size="64MiB")
os.unlink(root + "/index.json")  # a foreign corpus: nothing records the file's size
path = root + "/shard-00000.lmdb/data.mdb"
os.truncate(path, os.path.getsize(path) // 2)  # a partial copy
try:
    with open_corpus(root) as corpus:
        for shard in corpus.shards:
            for doc in range(len(shard.lengths)):
                shard.read(doc)
except FormatError as exc:
    print(type(exc).__name__, exc)
"""


def test_truncated_lmdb_is_a_typed_error_not_sigbus(tmp_path: Path) -> None:
    # In a child process: before the pre-map check, LMDB touched the missing pages and SIGBUS killed it.
    proc = subprocess.run([sys.executable, "-c", TRUNCATED_LMDB.format(root=str(tmp_path / "c"))],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"rc {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.startswith("TruncatedDataError ") and "data.mdb" in proc.stdout


def test_index_without_a_dtype_is_a_corrupt_index(tmp_path: Path) -> None:
    # np.dtype(None) is float64, so a missing dtype used to pass load_index and fail later with KeyError
    import json

    import numpy as np

    from loaders import write_corpus
    from loaders.formats import CorruptIndexError, open_corpus

    write_corpus(str(tmp_path), [np.arange(1, 9, dtype=np.uint16)], format="megatron")
    index = json.loads((tmp_path / "index.json").read_text())
    for dtype in (None, "float32"):
        index.pop("dtype") if dtype is None else index.update(dtype=dtype)
        (tmp_path / "index.json").write_text(json.dumps(index))
        with pytest.raises(CorruptIndexError, match="bad dtype"):
            open_corpus(str(tmp_path))
