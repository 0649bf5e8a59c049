"""TokenDataset guarantees: determinism, exact and elastic resume, mixing, shuffling, bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from loaders import TokenDataset
from loaders.errors import InvalidParameterError
from loaders.formats import write_corpus

SEQ = 32
BATCH = 4


def make_corpus(path, n_docs: int, seed: int, fmt: str = "megatron", shard_size: str = "8KiB",
                base: int = 0) -> str:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(base, base + 1000, size=int(rng.integers(1, 90)), dtype=np.uint16) for _ in range(n_docs)]
    write_corpus(str(path), docs, format=fmt, shard_size=shard_size)
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return make_corpus(tmp_path_factory.mktemp("c") / "a", 600, seed=1)


@pytest.fixture(scope="module")
def corpus_b(tmp_path_factory) -> str:
    return make_corpus(tmp_path_factory.mktemp("c") / "b", 300, seed=2, base=2000)


def batches(ds: TokenDataset, n: int, num_workers: int = 0) -> list[torch.Tensor]:
    loader = DataLoader(ds, batch_size=BATCH, num_workers=num_workers)
    return [batch["tokens"] for batch in itertools.islice(loader, n)]  # never pulls batch n+1


def test_windows_are_packed_documents_with_boundaries(tmp_path) -> None:
    docs = [np.arange(10, dtype=np.uint16) + 100 * d for d in range(20)]
    write_corpus(str(tmp_path / "c"), docs, format="megatron")
    ds = TokenDataset([str(tmp_path / "c")], seq_len=15, shuffle=False)
    stream = np.concatenate(docs).astype(np.int64)
    for k in range(5):
        item = ds.sample(k)
        assert item["tokens"].dtype == torch.int64 and item["tokens"].shape == (16,)
        assert np.array_equal(item["tokens"].numpy(), stream[k * 15: k * 15 + 16])
        ids = item["doc_ids"].numpy()
        assert ids[0] == 0 and np.all(np.diff(ids) >= 0)
        # a new document starts exactly where the token's document (tokens // 100) changes
        assert np.array_equal(np.diff(ids) == 1, np.diff(item["tokens"].numpy() // 100) != 0)


def test_order_is_deterministic_and_independent_of_num_workers(corpus, corpus_b) -> None:
    runs = [batches(TokenDataset([corpus, corpus_b], SEQ, weights=[0.7, 0.3], seed=5, batch_size=BATCH), 12, w)
            for w in (0, 1, 2, 3)]
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other, strict=True))
    reseeded = batches(TokenDataset([corpus, corpus_b], SEQ, weights=[0.7, 0.3], seed=6, batch_size=BATCH), 12)
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], reseeded, strict=True))


@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("n", [0, 1, 17, "mid-epoch", "epoch-boundary"])
def test_exact_resume(corpus, corpus_b, num_workers: int, n) -> None:
    def fresh() -> TokenDataset:
        return TokenDataset([corpus, corpus_b], SEQ, weights=[0.6, 0.4], seed=3, batch_size=BATCH)

    per_epoch = fresh().samples_per_epoch
    steps = {"mid-epoch": per_epoch // BATCH // 2, "epoch-boundary": per_epoch // BATCH}.get(n, n)
    assert isinstance(steps, int)
    reference = batches(fresh(), steps + 5)
    ds = fresh()
    batches(ds, steps, num_workers)
    state = ds.state_dict(samples_consumed=steps * BATCH) if num_workers else ds.state_dict()
    if num_workers == 0:  # the in-process iterator counted by itself
        assert state["position"] == steps * BATCH or steps == 0
    resumed = fresh()
    resumed.load_state_dict(state)
    after = batches(resumed, 5, num_workers)
    assert all(torch.equal(a, b) for a, b in zip(reference[steps:], after, strict=True))


def test_elastic_resume_from_2_ranks_x_2_workers_to_1_rank(corpus) -> None:
    steps = 9
    ranks = [TokenDataset([corpus], SEQ, seed=1, rank=r, world_size=2, batch_size=BATCH) for r in range(2)]
    seen = [batches(ds, steps, num_workers=2) for ds in ranks]
    state = ranks[0].state_dict(samples_consumed=steps * BATCH)
    assert state == ranks[1].state_dict(samples_consumed=steps * BATCH)  # the state is global
    single = TokenDataset([corpus], SEQ, seed=1, batch_size=BATCH)
    reference = batches(single, 2 * steps + 6)
    flat = torch.cat(reference)
    consumed = torch.cat([torch.cat(s) for s in seen])
    # the two ranks together consumed exactly the first 2*steps*BATCH global samples
    assert sorted(map(tuple, consumed.tolist())) == sorted(map(tuple, flat[: 2 * steps * BATCH].tolist()))
    resumed = TokenDataset([corpus], SEQ, seed=1, batch_size=BATCH)
    resumed.load_state_dict(state)
    after = torch.cat(batches(resumed, 6))
    assert torch.equal(after, flat[2 * steps * BATCH: 2 * steps * BATCH + 6 * BATCH])


def test_stateful_dataloader_resumes_exactly(corpus) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader() -> StatefulDataLoader:
        return StatefulDataLoader(TokenDataset([corpus], SEQ, seed=2, batch_size=BATCH), batch_size=BATCH,
                                  num_workers=2)

    reference = []
    for batch in loader():
        reference.append(batch["tokens"])
        if len(reference) == 12:
            break
    first = loader()
    it = iter(first)
    for _ in range(7):
        next(it)
    state = first.state_dict()
    second = loader()
    second.load_state_dict(state)
    after = []
    for batch in second:
        after.append(batch["tokens"])
        if len(after) == 5:
            break
    assert all(torch.equal(a, b) for a, b in zip(reference[7:], after, strict=True))


def test_mixing_share_is_within_1_percent_in_every_100_batches(corpus, corpus_b) -> None:
    weights = [0.7, 0.3]
    ds = TokenDataset([corpus, corpus_b], SEQ, weights=weights, seed=0, batch_size=8)
    sources = np.array([ds.schedule.source_of(k) for k in range(8 * 100 * 5)])
    for start in range(0, len(sources) - 800 + 1, 80):
        share = np.bincount(sources[start:start + 800], minlength=2) / 800
        assert np.all(np.abs(share - weights) <= 0.01 * np.array(weights)), (start, share)
    # and the tokens themselves: source b's tokens are >= 2000
    tokens = torch.stack([ds.sample(k)["tokens"] for k in range(800)])
    share_b = float((tokens >= 2000).float().mean())
    assert abs(share_b - 0.3) < 0.3 * 0.05  # windows straddle no sources: share is exact up to rounding


def test_shuffle_decorrelates_storage_order(tmp_path) -> None:
    docs = [np.full(8, d % 60000, dtype=np.uint16) for d in range(20000)]
    write_corpus(str(tmp_path / "c"), docs, format="megatron", shard_size="1KiB")  # 312 shards
    ds = TokenDataset([str(tmp_path / "c")], seq_len=7, seed=0, shuffle_window=512)
    emitted = [int(ds.sample(k)["tokens"][0]) for k in range(len(docs) - 1)]
    rho = spearman(np.arange(len(emitted)), np.array(emitted))
    assert abs(rho) < 0.1, rho
    plain = TokenDataset([str(tmp_path / "c")], seq_len=7, shuffle=False)
    assert spearman(np.arange(200), np.array([int(plain.sample(k)["tokens"][0]) for k in range(200)])) > 0.99


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.mark.parametrize("kwargs, field", [
    ({"seq_len": 0}, "seq_len"), ({"seq_len": -3}, "seq_len"),
    ({"seq_len": 8, "weights": [1.0, -1.0]}, "weights"), ({"seq_len": 8, "weights": [1.0]}, "weights"),
    ({"seq_len": 8, "weights": [0.0, 0.0]}, "weights"), ({"seq_len": 10 ** 9}, "seq_len"),
])
def test_bad_parameters_name_the_parameter(corpus, corpus_b, kwargs, field) -> None:
    with pytest.raises(InvalidParameterError, match=field):
        TokenDataset([corpus, corpus_b], **kwargs)


def test_state_of_other_data_is_refused(corpus, corpus_b) -> None:
    state = TokenDataset([corpus], SEQ).state_dict()
    with pytest.raises(InvalidParameterError, match="fingerprints"):
        TokenDataset([corpus_b], SEQ).load_state_dict(state)
    with pytest.raises(InvalidParameterError, match="seq_len"):
        TokenDataset([corpus], SEQ + 1).load_state_dict(state)


def test_state_after_worker_iteration_needs_samples_consumed(corpus) -> None:
    ds = TokenDataset([corpus], SEQ, batch_size=BATCH)
    batches(ds, 2, num_workers=1)
    with pytest.raises(InvalidParameterError, match="samples_consumed"):
        ds.state_dict()
    assert ds.state_dict(samples_consumed=2 * BATCH)["position"] == 2 * BATCH
    with pytest.raises(InvalidParameterError, match="shuffle_window"):
        TokenDataset([corpus], SEQ, batch_size=BATCH, shuffle_window=7).load_state_dict(ds.state_dict(8))
