"""``boundaries="cu_seqlens"``: the same windows as the ``doc_ids`` path, and boundaries that say exactly what
its per-token ``doc_ids`` say, for every format, every access path, and the model's attention mask."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from loaders import TokenDataset, TokenLoader, collate_varlen, cu_seqlens_from_doc_ids, trim_cu_seqlens
from loaders.formats import write_corpus

SEQ, BATCH = 24, 4


def _corpus(path: Path, fmt: str, seed: int, n: int = 140) -> str:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(3, 900, size=int(rng.integers(1, 60)), dtype=np.uint16) for _ in range(n)]
    if fmt == "megatron":
        docs[7] = docs[20] = np.zeros(0, np.uint16)  # empty documents start no segment
    write_corpus(str(path), docs, format=fmt, shard_size="1KiB")  # many shards: runs cross them
    return str(path)


def _pair(sources: list[str], **kw: object) -> tuple[TokenDataset, TokenDataset]:
    return (TokenDataset(sources, SEQ, batch_size=BATCH, shuffle_window=16, **kw),  # type: ignore[arg-type]
            TokenDataset(sources, SEQ, batch_size=BATCH, shuffle_window=16, boundaries="cu_seqlens", **kw))  # type: ignore[arg-type]


def _same(ids_batch: dict[str, np.ndarray], cu_batch: dict[str, object]) -> None:
    cu, longest = cu_seqlens_from_doc_ids(ids_batch["doc_ids"])
    tokens = np.asarray(ids_batch["tokens"])
    assert np.array_equal(tokens, np.asarray(cu_batch["tokens"]).reshape(tokens.shape))
    got = np.asarray(cu_batch["cu_seqlens"])
    assert got.dtype == np.int32 and np.array_equal(got, cu), (got, cu)
    assert int(np.asarray(cu_batch["max_seqlen"])) == longest


@pytest.mark.parametrize("fmt", ["megatron", "wds", "lmdb"])
def test_cu_seqlens_batches_equal_doc_ids_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     fmt: str) -> None:
    monkeypatch.setenv("LOADERS_CACHE_DIR", str(tmp_path / "cache"))
    one = [_corpus(tmp_path / "a", fmt, 1)]
    two = [*one, _corpus(tmp_path / "b", fmt, 2, n=60)]
    for sources, kw in ((one, {}), (two, {"weights": [0.7, 0.3]}), (one, {"rank": 1, "world_size": 3})):
        by_ids, by_cu = _pair(sources, **kw)
        epochs = 3 * by_ids.samples_per_epoch // BATCH + 2
        # sequential batches (packed ahead in blocks, crossing epochs), then random access
        for b in [*range(epochs), 5, 2, 11, 0, epochs + 7]:
            _same(by_ids.batch(b), by_cu.batch(b))
        for k in (0, 3, 50):
            ids = by_ids.sample(k)
            _same({"tokens": ids["tokens"][None].numpy(), "doc_ids": ids["doc_ids"][None].numpy()},
                  by_cu.sample(k))


def test_dataloader_and_token_loader_paths_agree(tmp_path: Path) -> None:
    sources = [_corpus(tmp_path / "a", "megatron", 3)]
    by_ids, by_cu = _pair(sources)
    collated = itertools.islice(DataLoader(by_cu, batch_size=BATCH, collate_fn=collate_varlen), 6)
    for b, batch in enumerate(collated):
        _same(by_ids.batch(b), batch)
    for workers in (0, 2):
        ids_loader = TokenLoader(_pair(sources)[0], num_workers=workers)
        cu_loader = TokenLoader(_pair(sources)[1], num_workers=workers)
        for want, have in itertools.islice(zip(ids_loader, cu_loader, strict=True), 12):
            assert have["cu_seqlens"].dtype == torch.int32 and have["max_seqlen"].dtype == torch.int32
            _same({k: v.numpy() for k, v in want.items()}, have)


def test_on_error_skip_gives_the_same_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lmdb

    from loaders.formats.lmdbfmt import doc_key

    monkeypatch.setenv("LOADERS_CACHE_DIR", str(tmp_path / "cache"))
    corpus = _corpus(tmp_path / "c", "lmdb", 4, n=60)
    env_dir = sorted(Path(corpus).glob("*.lmdb"))[0]
    env = lmdb.open(str(env_dir), subdir=True, lock=False)
    with env.begin(write=True) as txn:
        txn.put(doc_key(1), b"garbage!")
    env.close()
    (Path(corpus) / "index.json").unlink()
    by_ids, by_cu = _pair([corpus], on_error="skip")
    for b in range(2 * by_ids.samples_per_epoch // BATCH):
        _same(by_ids.batch(b), by_cu.batch(b))
    assert by_cu.skipped == by_ids.skipped > 0


def test_trim_matches_doc_ids_of_the_inputs(tmp_path: Path) -> None:
    by_ids, by_cu = _pair([_corpus(tmp_path / "a", "megatron", 5)])
    for b in range(8):
        ids, cu = by_ids.batch(b), by_cu.batch(b)
        trimmed = trim_cu_seqlens(cu["cu_seqlens"], SEQ + 1, SEQ)
        assert np.array_equal(trimmed, cu_seqlens_from_doc_ids(ids["doc_ids"][:, :-1])[0])


def test_model_mask_from_cu_seqlens_equals_doc_ids_mask(tmp_path: Path) -> None:
    from ling_train.config import TrainConfig
    from ling_train.model import LingModel

    torch.manual_seed(0)
    model = LingModel(TrainConfig.load(seq_len=SEQ, vocab_size=1000).model_config()).eval()
    by_ids, by_cu = _pair([_corpus(tmp_path / "a", "megatron", 6)])
    ids, cu = by_ids.batch(3), by_cu.batch(3)
    tokens = torch.from_numpy(ids["tokens"][:, :-1].astype(np.int64))
    inputs_cu = torch.from_numpy(trim_cu_seqlens(cu["cu_seqlens"], SEQ + 1, SEQ))
    assert inputs_cu.numel() > BATCH + 1  # some window holds several documents: a real mask
    with torch.no_grad():
        want = model(tokens, torch.from_numpy(ids["doc_ids"][:, :-1]))
        have = model(tokens, cu_seqlens=inputs_cu)
        plain = model(tokens)
    assert torch.equal(want, have) and not torch.equal(want, plain)
