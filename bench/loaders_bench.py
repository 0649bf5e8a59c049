"""loaders benchmarks: token loaders against their peers on the same corpus, packing bandwidth, resume cost.

One synthetic corpus (seeded; lognormal document lengths, mean about 1000 tokens, at least 16; uint16 ids
below 50257) of ``BENCH_LOADERS_MTOKENS`` million tokens (default 64) is converted, untimed, to each
system's own format in the module's scratch directory:

``ours``
    ``loaders.CorpusWriter`` Megatron ``.bin/.idx`` shards, read by ``TokenDataset`` (documents shuffled,
    packed into 2049-token windows at read time, with per-token ``doc_ids``) and ``loaders.TokenLoader``.
``mds``
    mosaicml-streaming ``MDSWriter``, one sample per 2049-token window (stride 2048, storage order), the
    llm-foundry ``concat_tokens`` layout: packing is done at conversion time. ``streaming.StreamingDataset``
    (shuffle on, default ``py1e``) and ``streaming.StreamingDataLoader``.
``litdata``
    ``litdata.optimize(..., item_loader=TokensLoader())`` over the documents, read with
    ``StreamingDataset(item_loader=TokensLoader(block_size=2049), shuffle=True, drop_last=True)`` and
    ``StreamingDataLoader``.
``wds``
    The same tar shards ``loaders`` writes (one ``.npy`` per document, readable by ``webdataset``), read by a
    plain ``webdataset.WebDataset`` pipeline: shard shuffle, a 1000-document sample shuffle, ``.decode()``,
    then packing into 2049-token windows in Python and a torch ``DataLoader``.

Every loader uses seq_len 2048 (2049-token windows), batch 8, shuffle on, ``num_workers`` 0 and 2 (same
DataLoader settings for all: no pinned memory, no persistent workers, prefetch_factor 2), and delivers an
int64 ``[8, 2049]`` batch; every system hands the batch over from its workers in uint16 and widens it in
the main process. All reads
are local files, warm in the page cache (every file is read once before timing). Throughput is timed from
after some warm-up batches for about :data:`DURATION_S` seconds; loader start-up is recorded separately.
Each repeat measures every system once, in rotated order, so every ratio pairs timings from the same
repeat. The first and last batch of every measurement are checked against the corpus (see
:func:`check_rows`), every batch's shape and dtype are checked.

Rows: tokens/s against each peer at each ``num_workers``; packing bandwidth of ``TokenDataset.batch``
reading the mmapped ``.bin`` (source bytes per second, ``cu_seqlens`` path; the ``doc_ids`` path as an
informational row) against a numpy copy of as many bytes from the same files; time to the first batch when
resuming at sample 10^6 against a fresh start; tokens/s of the same loader with ``boundaries="cu_seqlens"``
against ``doc_ids`` (``varlen``); ``loaders pack --engine ray`` against the local engine (``pack``, see
:mod:`bench._loaders_pack`).

Groups (``BENCH_ONLY``): ``loaders`` runs all; ``loaders_throughput``, ``loaders_packing``,
``loaders_resume``, ``loaders_varlen``, ``loaders_pack`` run one each. ``BENCH_LOADERS_SMOKE=1`` is a smoke
run (4M tokens unless ``BENCH_LOADERS_MTOKENS`` says otherwise, 0.5 s timing windows, 1 repeat unless
``BENCH_REPEAT`` says otherwise, a 4 MiB pack input): it checks every measure works, its figures are noisy.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from bench._common import (
    MB,
    MiB,
    env_int,
    error_row,
    log,
    make_row,
    mbps,
    median,
    repeats,
    selected,
    settle,
)
from loaders import CorpusWriter, TokenDataset, TokenLoader
from pcache.testing import SeaweedServer

NAME = "loaders"
SEQ_LEN = 2048
WINDOW = SEQ_LEN + 1
BATCH = 8
WORKERS = (0, 2)
VOCAB = 50257
SHARD_BYTES = 16 * MiB
SMOKE = os.environ.get("BENCH_LOADERS_SMOKE", "") == "1"
DURATION_S = 0.5 if SMOKE else 2.0
RESUME_AT = 10**6
PACK_WINDOWS = 2048 if SMOKE else 16384
PEERS = ("mds", "litdata", "wds")
SYSTEMS = ("ours", *PEERS)
LOADER_OPTS: dict[str, Any] = {"pin_memory": False, "persistent_workers": False}
TARGETS = {"mds": 2.0, "litdata": 1.5, "wds": 1.5, "packing": 0.5, "resume": 1 / 1.5, "varlen": 1.0}
GROUPS = ("throughput", "packing", "resume", "varlen", "pack")
PEER_SHORT = {"mds": "mosaicml-streaming (MDS)", "litdata": "litdata TokensLoader", "wds": "plain webdataset"}
PEER_LABEL = {
    "mds": "mosaicml-streaming MDS (StreamingDataset, pre-packed 2049-token samples)",
    "litdata": "litdata StreamingDataset + TokensLoader(block_size=2049)",
    "wds": "webdataset pipeline (.npy docs, Python packing)",
}


# -- corpus -----------------------------------------------------------------------------------------
@dataclass
class Corpus:
    """The synthetic corpus and where each system's copy lives.

    Attributes:
        flat: All tokens, documents concatenated in storage order.
        lengths: Tokens per document.
        starts: Offset of each document in ``flat``.
        dirs: Output directory of each system's format.
        anchor_keys: Sorted keys (three consecutive tokens) of every document's anchors: offsets 0, 256,
            512, ... and its last three tokens (for :func:`check_rows`).
        anchor_docs: Document of each anchor.
        anchor_offsets: Offset of each anchor in its document.
    """

    flat: np.ndarray
    lengths: np.ndarray
    starts: np.ndarray
    dirs: dict[str, Path] = field(default_factory=dict)
    anchor_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    anchor_docs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    anchor_offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def tokens(self) -> int:
        return int(self.flat.size)


ANCHOR_STEP = 256


def _key3(tokens: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Key of the three tokens starting at each position ``at`` of ``tokens``."""
    t = tokens.astype(np.int64, copy=False)
    return (t[at] << 32) | (t[at + 1] << 16) | t[at + 2]


def make_corpus(mtokens: int, seed: int = 20240501) -> Corpus:
    """Generate about ``mtokens`` million tokens of seeded random documents and their anchors."""
    rng = np.random.default_rng(seed)
    target = mtokens * 1_000_000
    sigma = 1.0
    mu = np.log(1000.0) - sigma**2 / 2  # mean of the lognormal: 1000 tokens
    lengths = np.maximum(16, rng.lognormal(mu, sigma, size=int(target / 900) + 64).astype(np.int64))
    lengths = lengths[:int(np.searchsorted(np.cumsum(lengths), target)) + 1]
    flat = rng.integers(0, VOCAB, size=int(lengths.sum()), dtype=np.uint16)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    per_doc = (lengths - 3) // ANCHOR_STEP + 2  # offsets 0, 256, ... <= len - 3, plus len - 3
    docs = np.repeat(np.arange(len(lengths)), per_doc)
    first = np.concatenate([[0], np.cumsum(per_doc)[:-1]])
    offsets = (np.arange(docs.size) - first[docs]) * ANCHOR_STEP
    last = first + per_doc - 1
    offsets[last] = lengths - 3
    keys = _key3(flat, starts[docs] + offsets)
    order = np.argsort(keys, kind="stable")
    return Corpus(flat=flat, lengths=lengths, starts=starts, anchor_keys=keys[order], anchor_docs=docs[order],
                  anchor_offsets=offsets[order])


def check_rows(corpus: Corpus, rows: np.ndarray, what: str) -> float:
    """Check that token windows are pieces of corpus documents; return the share of tokens verified.

    Every piece of a document in a row holds one of its anchors (its start, its last three tokens, or an
    offset that is a multiple of 256), found by the anchor's three tokens; the piece around the anchor must
    equal the document there. Random 16-bit tokens make chance matches negligible; garbage verifies nothing.

    Raises:
        AssertionError: rows repeat within the batch, or under 99% of the tokens match the corpus.
    """
    if len({r.tobytes() for r in rows}) != len(rows):
        raise AssertionError(f"{what}: repeated windows in one batch")
    flat, keys = corpus.flat, corpus.anchor_keys
    verified = 0
    for row in rows:
        n = row.size
        row_keys = _key3(row, np.arange(n - 2))
        idx = np.minimum(np.searchsorted(keys, row_keys), keys.size - 1)
        ok = np.zeros(n, dtype=bool)
        for p in np.flatnonzero(keys[idx] == row_keys).tolist():
            d, o = int(corpus.anchor_docs[idx[p]]), int(corpus.anchor_offsets[idx[p]])
            s = p - o  # where the document starts, in row coordinates
            lo, hi = max(0, s), min(n, s + int(corpus.lengths[d]))
            base = int(corpus.starts[d]) - s
            if np.array_equal(row[lo:hi], flat[base + lo:base + hi]):
                ok[lo:hi] = True
        verified += int(ok.sum())
    share = verified / rows.size
    if share < 0.99:
        raise AssertionError(f"{what}: only {share:.1%} of the tokens match corpus documents")
    return share


def write_formats(corpus: Corpus, workdir: Path, peers: bool = True) -> dict[str, float]:
    """Write the corpus in every system's format (untimed for the results); return seconds per format.

    ``peers=False`` writes only ours (Megatron) and the tar shards, for the groups that read nothing else.
    """
    seconds: dict[str, float] = {}
    for name, fmt in (("ours", "megatron"), ("wds", "wds")):
        t0 = time.perf_counter()
        out = workdir / name
        with CorpusWriter(str(out), format=fmt, shard_size=SHARD_BYTES) as writer:
            writer.add_batch(corpus.flat, corpus.lengths)
            index = writer.close()
        if index["tokens"] != corpus.tokens or index["documents"] != len(corpus.lengths):
            raise AssertionError(f"{name}: wrote {index['tokens']} tokens, expected {corpus.tokens}")
        corpus.dirs[name] = out
        seconds[name] = time.perf_counter() - t0
    if not peers:
        return seconds
    t0 = time.perf_counter()
    corpus.dirs["mds"] = write_mds(corpus, workdir / "mds")
    seconds["mds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    corpus.dirs["litdata"] = write_litdata(corpus, workdir / "litdata")
    seconds["litdata"] = time.perf_counter() - t0
    check_conversions(corpus)
    return seconds


def check_conversions(corpus: Corpus) -> None:
    """Check the peers' indexes: every window in MDS, every token in litdata's chunks."""
    mds = json.loads((corpus.dirs["mds"] / "index.json").read_text())
    samples = sum(int(shard["samples"]) for shard in mds["shards"])
    if samples != (corpus.tokens - 1) // SEQ_LEN:
        raise AssertionError(f"mds: {samples} samples, expected {(corpus.tokens - 1) // SEQ_LEN}")
    lit = json.loads((corpus.dirs["litdata"] / "index.json").read_text())
    tokens = sum(int(chunk["dim"]) for chunk in lit["chunks"])
    if tokens != corpus.tokens:
        raise AssertionError(f"litdata: {tokens} tokens in its chunks, expected {corpus.tokens}")


def import_streaming() -> Any:
    """Import mosaicml-streaming without ``streaming.vision`` (torchvision is not needed for tokens).

    ``import streaming`` imports its vision datasets, hence torchvision, which fails when the installed
    torchvision does not match torch; the text path never uses it.
    """
    if "streaming" not in sys.modules:
        stub = types.ModuleType("streaming.vision")
        stub.__doc__ = "stub installed by bench.loaders_bench: torchvision is not needed"
        sys.modules.setdefault("streaming.vision", stub)
    import streaming

    return streaming


def write_mds(corpus: Corpus, out: Path) -> Path:
    """One MDS sample per window ``[j*2048, j*2048 + 2049)`` of the storage-order token stream."""
    streaming = import_streaming()
    windows = (corpus.tokens - 1) // SEQ_LEN
    with streaming.MDSWriter(out=str(out), columns={"tokens": f"ndarray:uint16:{WINDOW}"}, compression=None,
                             size_limit=SHARD_BYTES) as writer:
        for j in range(windows):
            writer.write({"tokens": corpus.flat[j * SEQ_LEN:j * SEQ_LEN + WINDOW]})
    return out


def _litdata_docs(flat_path: str, starts_path: str, span: tuple[int, int]) -> Iterator[torch.Tensor]:
    """litdata ``optimize`` function: yield documents ``span`` as uint16 tensors (run in its workers)."""
    flat = np.load(flat_path, mmap_mode="r")
    bounds = np.load(starts_path)
    for d in range(*span):
        yield torch.from_numpy(np.array(flat[bounds[d]:bounds[d + 1]]))


def write_litdata(corpus: Corpus, out: Path) -> Path:
    """``litdata.optimize`` over the documents with ``TokensLoader`` (about 16 MiB chunks)."""
    import litdata
    from litdata import TokensLoader

    scratch = out.parent / "litdata-src"
    scratch.mkdir()
    flat_path, starts_path = str(scratch / "flat.npy"), str(scratch / "bounds.npy")
    np.save(flat_path, corpus.flat)
    np.save(starts_path, np.concatenate([corpus.starts, [corpus.tokens]]))
    n = len(corpus.lengths)
    step = -(-n // 32)
    spans = [(lo, min(n, lo + step)) for lo in range(0, n, step)]
    # litdata stages through $TMPDIR/chunks and $TMPDIR/data unless told otherwise: keep it in the workdir
    folders = {"DATA_OPTIMIZER_CACHE_FOLDER": str(scratch / "cache"),
               "DATA_OPTIMIZER_DATA_CACHE_FOLDER": str(scratch / "data")}
    saved = {k: os.environ.get(k) for k in folders}
    os.environ.update(folders)
    try:
        litdata.optimize(fn=partial(_litdata_docs, flat_path, starts_path), inputs=spans, output_dir=str(out),
                         chunk_size=WINDOW * (SHARD_BYTES // 2 // WINDOW), item_loader=TokensLoader(),
                         num_workers=min(2, os.cpu_count() or 1), start_method="fork", verbose=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    shutil.rmtree(scratch)
    return out


def warm_page_cache(root: Path) -> int:
    """Read every file under ``root`` once; return the bytes read."""
    total = 0
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                while chunk := fh.read(16 * MiB):
                    total += len(chunk)
    return total


# -- loaders ----------------------------------------------------------------------------------------
# Every system hands its batch from the worker in the corpus' uint16 and widens it to int64 in the
# training process (``widen``), as TokenLoader does: the same bytes cross the process boundary.
def _stack_mds(samples: list[dict[str, np.ndarray]]) -> torch.Tensor:
    return torch.from_numpy(np.stack([s["tokens"] for s in samples]))


def _stack_tensors(samples: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(samples)


def widen(batch: torch.Tensor) -> torch.Tensor:
    return batch.to(torch.int64)


def _pack_windows(source: Iterator[tuple[np.ndarray]]) -> Iterator[torch.Tensor]:
    """Pack decoded documents into 2049-token windows, stride 2048, as a webdataset user would."""
    pending: list[np.ndarray] = []
    have = 0
    for (doc,) in source:
        pending.append(doc)
        have += doc.size
        if have < WINDOW:
            continue
        buf = np.concatenate(pending)
        start = 0
        while start + WINDOW <= buf.size:
            yield torch.from_numpy(buf[start:start + WINDOW].copy())
            start += SEQ_LEN
        pending, have = [buf[start:]], buf.size - start


def make_loader(system: str, corpus: Corpus, workers: int, seed: int) -> tuple[Any, Callable[[Any], torch.Tensor]]:
    """Build ``system``'s shuffled dataset and loader; return it and a function giving a batch's tokens."""
    opts = dict(LOADER_OPTS, batch_size=BATCH, num_workers=workers)
    if system in ("ours", "ours_cu"):
        boundaries = "cu_seqlens" if system == "ours_cu" else "doc_ids"
        ds = TokenDataset([str(corpus.dirs["ours"])], seq_len=SEQ_LEN, seed=seed, shuffle=True, batch_size=BATCH,
                          boundaries=boundaries)
        return TokenLoader(ds, num_workers=workers), lambda b: b["tokens"]
    if system == "mds":
        streaming = import_streaming()
        mds = streaming.StreamingDataset(local=str(corpus.dirs["mds"]), shuffle=True, shuffle_seed=seed,
                                         batch_size=BATCH)
        return streaming.StreamingDataLoader(mds, collate_fn=_stack_mds, **opts), widen
    if system == "litdata":
        import litdata
        from litdata import TokensLoader

        lit = litdata.StreamingDataset(str(corpus.dirs["litdata"]), item_loader=TokensLoader(block_size=WINDOW),
                                       shuffle=True, drop_last=True, seed=seed)
        return litdata.StreamingDataLoader(lit, collate_fn=_stack_tensors, **opts), widen
    if system == "wds":
        import webdataset as wds

        urls = sorted(str(p) for p in corpus.dirs["wds"].glob("*.tar"))
        pipeline = (wds.WebDataset(urls, shardshuffle=len(urls), seed=seed, empty_check=False)
                    .shuffle(1000).decode().to_tuple("npy").compose(_pack_windows))
        return DataLoader(pipeline, **opts), widen
    raise ValueError(system)


@dataclass
class Measurement:
    """One timed run of one loader."""

    tokens: int
    seconds: float
    startup_s: float
    batches: int
    restarts: int
    verified: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def measure(system: str, corpus: Corpus, workers: int, seed: int) -> Measurement:
    """Time ``system``'s loader: start-up to the first batch, then tokens/s over about DURATION_S seconds.

    The clock runs only in steady state: after ``warmup`` batches of each iterator. A loader whose epoch
    ends first is iterated again (its next epoch), untimed until it is past its warm-up batches again.
    """
    settle()
    warmup = 4 + 4 * workers
    t0 = time.perf_counter()
    loader, tokens_of = make_loader(system, corpus, workers, seed)
    it: Any = iter(loader)
    total = batches = restarts = 0
    timed = 0.0
    try:
        first = tokens_of(next(it))
        startup = time.perf_counter() - t0
        check_shape(first, system)
        verified = [check_rows(corpus, first.numpy(), f"{system} first batch")]
        last = first
        while True:
            for _ in range(warmup):
                check_shape(tokens_of(next(it)), system)
            ended = False
            t1 = time.perf_counter()
            while time.perf_counter() - t1 + timed < DURATION_S:
                try:
                    batch = next(it)
                except StopIteration:
                    ended = True
                    break
                last = tokens_of(batch)
                check_shape(last, system)
                total += last.numel()
                batches += 1
            timed += time.perf_counter() - t1
            if not ended or timed >= DURATION_S:
                break
            it = None  # shut the finished iterator's workers down before starting the next epoch's
            it = iter(loader)
            restarts += 1
    finally:
        it = loader = None
        gc.collect()
    if batches < 10:
        raise AssertionError(f"{system}: only {batches} batches in the timed window")
    verified.append(check_rows(corpus, last.numpy(), f"{system} last batch"))
    return Measurement(tokens=total, seconds=timed, startup_s=startup, batches=batches, restarts=restarts,
                       verified=min(verified))


def check_shape(batch: torch.Tensor, system: str) -> None:
    """Raise unless ``batch`` is an int64 ``[<=8, 2049]`` tensor (a short batch only at an epoch's end)."""
    if batch.dtype != torch.int64 or batch.dim() != 2 or batch.shape[1] != WINDOW or not 0 < batch.shape[0] <= BATCH:
        raise AssertionError(f"{system}: batch {tuple(batch.shape)} {batch.dtype}, expected ({BATCH}, {WINDOW}) int64")


# -- groups -----------------------------------------------------------------------------------------
def bench_throughput(corpus: Corpus, repeat: int) -> list[dict[str, Any]]:
    """tokens/s of ours against each peer, at num_workers 0 and 2, interleaved per repeat."""
    rows: list[dict[str, Any]] = []
    for workers in WORKERS:
        results: dict[str, list[Measurement]] = {s: [] for s in SYSTEMS}
        failed: dict[str, str] = {}
        for r in range(repeat):
            order = SYSTEMS[r % len(SYSTEMS):] + SYSTEMS[:r % len(SYSTEMS)]
            for system in order:
                if system in failed:
                    continue
                try:
                    m = measure(system, corpus, workers, seed=r)
                except Exception:
                    failed[system] = traceback.format_exc()
                    log(f"loaders/{system}/w{workers}: FAILED\n{failed[system]}")
                    continue
                results[system].append(m)
                log(f"loaders/w{workers}/{r}: {system:8s} {m.tokens_per_s / 1e6:7.2f} Mtok/s "
                    f"({m.batches} batches in {m.seconds:.2f}s, start-up {m.startup_s:.2f}s, "
                    f"{m.restarts} epoch restarts, verified {m.verified:.1%})")
        for peer in PEERS:
            key, measure_name = f"tokens_per_s_vs_{peer}_w{workers}", f"tokens/s vs {peer}, num_workers={workers}"
            if "ours" in failed or peer in failed:
                rows.append(error_row(NAME, key, measure_name, failed.get("ours") or failed[peer]))
                continue
            ours, base = results["ours"], results[peer]
            rows.append(make_row(
                module=NAME, key=key, measure=f"tokens/s vs {PEER_SHORT[peer]}, seq_len {SEQ_LEN}, batch {BATCH}, "
                                              f"shuffle, num_workers={workers}",
                unit="Mtok/s", values=[m.tokens_per_s / 1e6 for m in ours], seconds=[m.seconds for m in ours],
                baseline=f"{PEER_LABEL[peer]}, same settings",
                baseline_values=[m.tokens_per_s / 1e6 for m in base], baseline_seconds=[m.seconds for m in base],
                target=TARGETS[peer],
                notes=throughput_note(peer, workers),
                extra={"tokens": [m.tokens for m in ours], "baseline_tokens": [m.tokens for m in base],
                       "batches": [m.batches for m in ours], "baseline_batches": [m.batches for m in base],
                       "startup_s": [m.startup_s for m in ours],
                       "baseline_startup_s": [m.startup_s for m in base],
                       "epoch_restarts": [m.restarts for m in ours],
                       "baseline_epoch_restarts": [m.restarts for m in base],
                       "verified_share": [m.verified for m in ours],
                       "baseline_verified_share": [m.verified for m in base]},
            ))
    return rows


def throughput_note(peer: str, workers: int) -> str:
    """The notes of a tokens/s row."""
    common = (f"same synthetic corpus converted to each format (conversion untimed), local files, page cache warm "
              f"(all files read once first); timed for ~{DURATION_S:g}s after {4 + 4 * workers} warm-up batches, "
              "start-up (construct to first batch) in extra; a loader whose epoch ends is iterated again, its "
              "restart and warm-up untimed; every batch int64 [8, 2049], handed from the worker in uint16 "
              "and widened in the main process by every system (ours: TokenLoader, workers pack whole batches; "
              "peers: collate stacks uint16, the loop widens); first and last batch checked against the corpus documents; ours also "
              "yields per-token doc_ids, peers do not")
    specific = {
        "mds": "MDS samples are pre-packed 2049-token windows (llm-foundry concat_tokens layout), so MDS does "
               "no packing at read time; StreamingDataset(shuffle=True, py1e, batch_size=8) + StreamingDataLoader",
        "litdata": "litdata.optimize(item_loader=TokensLoader()) concatenates documents at conversion; "
                   "StreamingDataset(TokensLoader(block_size=2049), shuffle=True, drop_last=True) + "
                   "StreamingDataLoader",
        "wds": "WebDataset(shardshuffle=#shards).shuffle(1000).decode().to_tuple('npy') then a Python generator "
               "packing documents into 2049-token windows (np.concatenate per window's worth of documents)",
    }
    return f"{specific[peer]}; {common}"


def bench_packing(corpus: Corpus, repeat: int) -> list[dict[str, Any]]:
    """Packing bandwidth of ``TokenDataset.batch`` from the mmapped ``.bin`` vs a numpy copy of as many bytes.

    The headline row is the ``cu_seqlens`` path (no per-token labels); the ``doc_ids`` path is a row of its own.
    """
    src = [str(corpus.dirs["ours"])]
    ds = TokenDataset(src, seq_len=SEQ_LEN, seed=0, shuffle=True, batch_size=BATCH, boundaries="cu_seqlens")
    ds_ids = TokenDataset(src, seq_len=SEQ_LEN, seed=0, shuffle=True, batch_size=BATCH)
    count = min(PACK_WINDOWS, corpus.tokens // WINDOW) // BATCH * BATCH  # the copy needs count * 2049 tokens
    nbytes = count * WINDOW * corpus.flat.itemsize
    view = ds_ids.sources[0]
    bins = [np.memmap(p, dtype=np.uint16, mode="r") for p in sorted(corpus.dirs["ours"].glob("*.bin"))]
    dst = np.ones(nbytes // 2, dtype=np.uint16)  # touched, so no page faults in the timed copies
    out = np.empty((BATCH, WINDOW), dtype=np.uint16)
    doc_ids = np.empty((BATCH, WINDOW), dtype=np.int32)

    def batches(dataset: TokenDataset) -> float:
        t0 = time.perf_counter()
        for b in range(count // BATCH):
            dataset.batch(b)
        return time.perf_counter() - t0

    def packer_only() -> float:
        t0 = time.perf_counter()
        for c in range(0, count, BATCH):
            view.windows(c, out, doc_ids, "raise")
        return time.perf_counter() - t0

    def per_sample() -> float:
        t0 = time.perf_counter()
        for k in range(count):
            ds_ids.sample(k)
        return time.perf_counter() - t0

    def memcpy() -> float:
        t0 = time.perf_counter()
        done = 0
        for mm in bins:
            n = min(mm.size, dst.size - done)
            np.copyto(dst[done:done + n], mm[:n])
            done += n
            if done == dst.size:
                break
        if done != dst.size:
            raise AssertionError(f"memcpy baseline copied {done} of {dst.size} tokens")
        return time.perf_counter() - t0

    # untimed: page cache, epoch stream, handles; and check what the packer produces
    rows = np.concatenate([ds.batch(b)["tokens"] for b in range(8)]).astype(np.int64)
    verified = check_rows(corpus, rows, "packing")
    same = np.concatenate([ds_ids.batch(b)["tokens"] for b in range(8)]).astype(np.int64)
    if not np.array_equal(rows, same) or not np.array_equal(
            rows[:BATCH], np.stack([ds.sample(k)["tokens"].numpy() for k in range(BATCH)])):
        raise AssertionError("TokenDataset.batch(0..7) differs between paths or from samples 0..63")
    batches(ds)
    batches(ds_ids)
    memcpy()
    base_s, cu_s, ids_s, pack_s, sample_s = [], [], [], [], []
    for _ in range(repeat):
        settle()
        base_s.append(memcpy())
        cu_s.append(batches(ds))
        ids_s.append(batches(ds_ids))
        pack_s.append(packer_only())
        sample_s.append(per_sample())
    log(f"loaders/packing: batch() cu_seqlens {mbps(nbytes, median(cu_s)):.0f} MB/s, doc_ids "
        f"{mbps(nbytes, median(ids_s)):.0f} MB/s, windows() {mbps(nbytes, median(pack_s)):.0f} MB/s, "
        f"sample() {mbps(nbytes, median(sample_s)):.0f} MB/s, memcpy {mbps(nbytes, median(base_s)):.0f} MB/s")
    baseline = "numpy copy (np.copyto) of as many bytes from np.memmap of the same .bin files"
    common = (f"{count} consecutive global samples (shuffled documents) in batches of {BATCH}, as a TokenLoader "
              "worker asks for them (batch() packs sequential batches ahead in blocks of up to 2^20 tokens); "
              "bytes = 2049 uint16 source tokens per window; page cache warm")
    return [make_row(
        module=NAME, key="packing_bandwidth", measure=f"packing bandwidth, TokenDataset.batch() x{count // BATCH} "
                                                       "from the mmapped .bin, cu_seqlens (source bytes)",
        unit="MB/s", nbytes=nbytes, values=[mbps(nbytes, s) for s in cu_s], seconds=cu_s, baseline=baseline,
        baseline_values=[mbps(nbytes, s) for s in base_s], baseline_seconds=base_s, target=TARGETS["packing"],
        notes=f"{common}; boundaries='cu_seqlens': tokens are a read-only view of the one packed copy, plus a "
              "few int32 boundaries per row; extra: the packer alone with doc_ids (SourceView.windows into "
              "reused buffers) and TokenDataset.sample() one window at a time widened to int64 (the plain "
              "DataLoader path)",
        extra={"packer_only_mbps": [mbps(nbytes, s) for s in pack_s],
               "sample_int64_mbps": [mbps(nbytes, s) for s in sample_s],
               "windows": count, "verified_share": verified,
               "us_per_batch": [s / (count // BATCH) * 1e6 for s in cu_s]},
    ), make_row(
        module=NAME, key="packing_bandwidth_doc_ids", measure="packing bandwidth, TokenDataset.batch() with "
                                                              "per-token doc_ids (source bytes)",
        unit="MB/s", nbytes=nbytes, values=[mbps(nbytes, s) for s in ids_s], seconds=ids_s, baseline=baseline,
        baseline_values=[mbps(nbytes, s) for s in base_s], baseline_seconds=base_s, target=None,
        notes=f"{common}; boundaries='doc_ids': windows copied into a fresh uint16 array plus int32 doc_ids "
              "(3x the bytes written)",
        extra={"us_per_batch": [s / (count // BATCH) * 1e6 for s in ids_s]},
    )]


def bench_varlen(corpus: Corpus, repeat: int) -> list[dict[str, Any]]:
    """tokens/s of TokenLoader with boundaries="cu_seqlens" against the same loader with doc_ids."""
    rows: list[dict[str, Any]] = []
    for workers in WORKERS:
        results: dict[str, list[Measurement]] = {"ours_cu": [], "ours": []}
        for r in range(repeat):
            for system in (("ours_cu", "ours") if r % 2 == 0 else ("ours", "ours_cu")):
                m = measure(system, corpus, workers, seed=r)
                results[system].append(m)
                log(f"loaders/varlen/w{workers}/{r}: {system:8s} {m.tokens_per_s / 1e6:7.2f} Mtok/s "
                    f"({m.batches} batches, verified {m.verified:.1%})")
        cu, ids = results["ours_cu"], results["ours"]
        rows.append(make_row(
            module=NAME, key=f"tokens_per_s_cu_seqlens_vs_doc_ids_w{workers}",
            measure=f"tokens/s with cu_seqlens, seq_len {SEQ_LEN}, batch {BATCH}, shuffle, num_workers={workers}",
            unit="Mtok/s", values=[m.tokens_per_s / 1e6 for m in cu], seconds=[m.seconds for m in cu],
            baseline="the same TokenLoader with per-token doc_ids", baseline_values=[m.tokens_per_s / 1e6 for m in ids],
            baseline_seconds=[m.seconds for m in ids], target=TARGETS["varlen"],
            notes=f"TokenLoader(TokenDataset(..., boundaries=...)), timed as the peer rows (~{DURATION_S:g}s after "
                  "warm-up, int64 tokens widened in the main process, first and last batch checked against the "
                  "corpus); cu_seqlens hands over int32 boundaries per row instead of an int32 per token",
            extra={"batches": [m.batches for m in cu], "baseline_batches": [m.batches for m in ids]},
        ))
    return rows


def bench_resume(corpus: Corpus, repeat: int) -> list[dict[str, Any]]:
    """Time to the first batch resuming at sample 10^6 against a fresh start (construct to first batch)."""
    src = [str(corpus.dirs["ours"])]
    probe = TokenDataset(src, seq_len=SEQ_LEN, seed=0, shuffle=True, batch_size=BATCH)
    state = probe.state_dict(samples_consumed=RESUME_AT)
    expected = torch.stack([probe.sample(RESUME_AT + i)["tokens"] for i in range(BATCH)])
    first_fresh = torch.stack([probe.sample(i)["tokens"] for i in range(BATCH)])
    epochs = RESUME_AT / probe.samples_per_epoch
    del probe

    def first_batch(workers: int, resume: bool) -> float:
        settle()
        t0 = time.perf_counter()
        ds = TokenDataset(src, seq_len=SEQ_LEN, seed=0, shuffle=True, batch_size=BATCH)
        if resume:
            ds.load_state_dict(state)
        it = iter(TokenLoader(ds, num_workers=workers))
        batch = next(it)
        seconds = time.perf_counter() - t0
        del it
        if not torch.equal(batch["tokens"], expected if resume else first_fresh):
            raise AssertionError(f"resume={resume}: first batch differs from the uninterrupted dataset's samples")
        return seconds

    rows: list[dict[str, Any]] = []
    for workers in WORKERS:
        first_batch(workers, True)  # untimed: page cache, imports
        fresh, resumed = [], []
        for r in range(repeat):
            for resume in ((False, True) if r % 2 == 0 else (True, False)):
                (resumed if resume else fresh).append(first_batch(workers, resume))
        log(f"loaders/resume/w{workers}: fresh {median(fresh) * 1e3:.0f} ms, resumed at 10^6 "
            f"{median(resumed) * 1e3:.0f} ms")
        rows.append(make_row(
            module=NAME, key=f"resume_first_batch_w{workers}",
            measure=f"first batches/s resuming at sample 10^6, num_workers={workers} (ratio = fresh s / resumed s)",
            unit="1/s", values=[1 / s for s in resumed], seconds=resumed,
            baseline="fresh start (sample 0), same settings", baseline_values=[1 / s for s in fresh],
            baseline_seconds=fresh, target=TARGETS["resume"],
            notes=f"time from constructing TokenDataset (+load_state_dict) and TokenLoader to the first batch; "
                  f"values are 1/seconds so ratio = fresh/resumed and the issue's 'resumed <= 1.5x fresh' is "
                  f"ratio >= 1/1.5 = 0.667; the corpus has {corpus.tokens / 1e6:.0f}M tokens, so sample 10^6 lies "
                  f"in epoch {int(epochs)} (epochs continue with a new shuffle): the resume cost does not depend "
                  "on the position; resumed batch checked bit-identical to samples 10^6..10^6+7",
            extra={"epochs_at_resume": epochs},
        ))
    return rows


# -- entry point ------------------------------------------------------------------------------------
def _wanted(group: str) -> bool:
    return selected("loaders") or selected(f"loaders_{group}")


def run(server: SeaweedServer, workdir: Path) -> list[dict[str, Any]]:
    """Run the loaders measures; see the module docstring. ``server`` is unused (all reads are local)."""
    del server
    groups = [g for g in GROUPS if _wanted(g)]
    if not groups:
        return []
    repeat = env_int("BENCH_REPEAT", 1) if SMOKE else repeats()
    rows: list[dict[str, Any]] = []
    convert_s: dict[str, float] = {}
    corpus: Corpus | None = None
    if [g for g in groups if g != "pack"]:
        mtokens = env_int("BENCH_LOADERS_MTOKENS", 4 if SMOKE else 64)
        t0 = time.monotonic()
        corpus = make_corpus(mtokens)
        log(f"loaders: {corpus.tokens / 1e6:.1f}M tokens in {len(corpus.lengths)} documents "
            f"({time.monotonic() - t0:.1f}s); converting to every format")
        convert_s = write_formats(corpus, workdir, peers="throughput" in groups)
        warmed = sum(warm_page_cache(d) for d in corpus.dirs.values())
        log(f"loaders: converted in {', '.join(f'{k} {v:.1f}s' for k, v in convert_s.items())}; "
            f"{warmed / MB:.0f} MB read to warm the page cache")
    table = {"throughput": bench_throughput, "packing": bench_packing, "resume": bench_resume,
             "varlen": bench_varlen}
    for name in groups:
        t1 = time.monotonic()
        try:
            if name == "pack":
                from bench._loaders_pack import bench_pack

                rows += bench_pack(workdir, repeat, SMOKE)
            else:
                assert corpus is not None
                rows += table[name](corpus, repeat)
        except Exception:
            tb = traceback.format_exc()
            log(f"loaders: {name} FAILED:\n{tb}")
            rows.append(error_row(NAME, name, f"{name} benchmarks", tb))
        log(f"loaders: {name} took {time.monotonic() - t1:.1f}s")
    for row in rows:
        if corpus is not None:
            row.setdefault("extra", {})["corpus"] = {"tokens": corpus.tokens, "documents": len(corpus.lengths),
                                                     "convert_s": convert_s}
        row.setdefault("extra", {})["smoke"] = SMOKE
    with contextlib.suppress(Exception):
        import streaming.base.util as sutil

        sutil.clean_stale_shared_memory()
    return rows


__all__ = ["NAME", "run"]
