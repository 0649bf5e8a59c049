"""The bulk packer and TokenLoader: same windows as the one-document-at-a-time path, exact resume, skips."""

from __future__ import annotations

import itertools
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from loaders import TokenDataset, TokenLoader
from loaders.errors import FormatError
from loaders.formats import write_corpus
from loaders.formats.lmdbfmt import doc_key

SEQ = 24
BATCH = 4


def write(path: Path, n_docs: int, fmt: str, seed: int, base: int = 0) -> str:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(base, base + 1000, size=int(rng.integers(1, 70)), dtype=np.uint16) for _ in range(n_docs)]
    write_corpus(str(path), docs, format=fmt, shard_size="2KiB")  # many shards: runs cross shard boundaries
    return str(path)


@pytest.mark.parametrize("fmt", ["megatron", "wds", "lmdb"])
def test_bulk_runs_equal_window_by_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    monkeypatch.setenv("LOADERS_CACHE_DIR", str(tmp_path / "cache"))
    ds = TokenDataset([write(tmp_path / "c", 150, fmt, seed=3)], SEQ, seed=7, shuffle_window=16)
    view = ds.sources[0]
    assert len(view.corpus.shards) > 3
    wpe = view.windows_per_epoch
    rng = np.random.default_rng(0)
    # runs inside an epoch, ending at its last window, and crossing into the next epoch
    for c, n in [(0, 1), (0, 9), (wpe - 3, 3), (wpe - 2, 6), *((int(rng.integers(0, 3 * wpe)), 7) for _ in range(12))]:
        out, ids = np.empty((n, SEQ + 1), np.int64), np.empty((n, SEQ + 1), np.int32)
        assert view.windows(c, out, ids, "raise") == 0
        for i in range(n):
            one, one_ids = np.empty(SEQ + 1, np.int64), np.empty(SEQ + 1, np.int32)
            view.window(c + i, one, one_ids, "raise")
            assert np.array_equal(out[i], one) and np.array_equal(ids[i], one_ids), (c, n, i)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_token_loader_yields_the_dataloader_batches(tmp_path: Path, num_workers: int) -> None:
    a, b = write(tmp_path / "a", 200, "megatron", 1), write(tmp_path / "b", 120, "megatron", 2, base=2000)

    def dataset() -> TokenDataset:
        return TokenDataset([a, b], SEQ, weights=[0.6, 0.4], seed=3, batch_size=BATCH)

    expected = list(itertools.islice(DataLoader(dataset(), batch_size=BATCH), 10))
    got = list(itertools.islice(TokenLoader(dataset(), num_workers=num_workers), 10))
    for want, have in zip(expected, got, strict=True):
        assert have["tokens"].dtype == torch.int64 and have["doc_ids"].dtype == torch.int32
        assert torch.equal(want["tokens"], have["tokens"]) and torch.equal(want["doc_ids"], have["doc_ids"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_token_loader_resumes_exactly(tmp_path: Path, num_workers: int) -> None:
    corpus = write(tmp_path / "a", 200, "megatron", 1)
    full = [x["tokens"] for x in itertools.islice(TokenLoader(
        TokenDataset(corpus, SEQ, seed=1, batch_size=BATCH), num_workers=num_workers), 12)]
    first = TokenLoader(TokenDataset(corpus, SEQ, seed=1, batch_size=BATCH), num_workers=num_workers)
    assert len(list(itertools.islice(first, 5))) == 5
    state = first.state_dict()
    assert state["position"] == 5 * BATCH
    resumed = TokenLoader(TokenDataset(corpus, SEQ, seed=1, batch_size=BATCH), num_workers=num_workers)
    resumed.load_state_dict(state)
    rest = [x["tokens"] for x in itertools.islice(resumed, 7)]
    assert all(torch.equal(x, y) for x, y in zip(full[5:], rest, strict=True))
    # elastic: the same state continues the global sequence on rank 1 of 2
    rank1 = TokenDataset(corpus, SEQ, seed=1, batch_size=BATCH, rank=1, world_size=2)
    rank1.load_state_dict(state)
    assert torch.equal(next(iter(TokenLoader(rank1)))["tokens"][0], full[5][1])


def corrupt_lmdb_document(corpus: str, doc: int) -> None:
    env_dir = sorted(Path(corpus).glob("*.lmdb"))[0]
    env = lmdb.open(str(env_dir), subdir=True, lock=False)
    with env.begin(write=True) as txn:
        txn.put(doc_key(doc), b"garbage!")
    env.close()
    (Path(corpus) / "index.json").unlink(missing_ok=True)  # its recorded sizes no longer hold: open by layout


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_documents_are_skipped_and_counted_across_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  num_workers: int) -> None:
    monkeypatch.setenv("LOADERS_CACHE_DIR", str(tmp_path / "cache"))
    corpus = write(tmp_path / "c", 60, "lmdb", 4)
    corrupt_lmdb_document(corpus, 2)
    with pytest.raises(FormatError, match="key 2"):
        list(itertools.islice(TokenLoader(TokenDataset(corpus, SEQ, shuffle=False, batch_size=BATCH)), 40))
    ds = TokenDataset(corpus, SEQ, shuffle=False, batch_size=BATCH, on_error="skip")
    loader = TokenLoader(ds, num_workers=num_workers)
    batches = list(itertools.islice(loader, 2 * ds.sources[0].windows_per_epoch // BATCH + 2))  # > 2 epochs
    assert all(b["tokens"].shape == (BATCH, SEQ + 1) for b in batches)
    assert ds.skipped >= 2 and loader.state_dict()["skipped"] == ds.skipped


def test_a_source_with_no_readable_document_raises_instead_of_spinning(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOADERS_CACHE_DIR", str(tmp_path / "cache"))
    corpus = write(tmp_path / "c", 12, "lmdb", 5)
    for doc in range(12):
        corrupt_lmdb_document(corpus, doc)
    ds = TokenDataset(corpus, SEQ, batch_size=BATCH, on_error="skip")
    with pytest.raises(FormatError, match="no readable document"):
        ds.sample(0)
