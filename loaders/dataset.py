"""``TokenDataset``: packed, shuffled, weighted token windows with exact and elastic resume.

The global sample order is a pure function of (seed, sources, weights, seq_len):

* Global sample ``k`` comes from source ``s = schedule.source_of(k)`` and is that source's
  ``c = schedule.count_before(s, k)``-th window.
* A source's token stream for its epoch ``e = c // windows_per_epoch`` is its documents in
  :func:`~loaders.order.document_order` (seeded shard order plus a bounded shuffle window), concatenated.
  Window ``j = c % windows_per_epoch`` is tokens ``[j * seq_len, j * seq_len + seq_len + 1)`` of it.
* Rank ``r`` of ``W`` takes global samples ``k = position + i * W + r`` (``i = 0, 1, ...``), and
  DataLoader worker ``w`` of ``N`` takes that rank's batches ``w, w + N, ...`` of ``batch_size`` samples,
  so the batches a DataLoader yields are in the same order for any ``num_workers``.

Resuming needs only ``position`` (global samples consumed): nothing is replayed, and finding a window
costs a binary search, so resuming at sample 10^6 costs what a fresh start does.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lingcore.log import get_logger
from loaders.errors import FormatError, InvalidParameterError
from loaders.formats import open_corpus
from loaders.order import MixSchedule, normalize_weights
from loaders.packing import SourceView
from loaders.varlen import BOUNDARIES, cu_seqlens_of

log = get_logger(__name__)

STATE_FORMAT = "loaders-state/1"
BLOCK_TOKENS = 1 << 20  # batch() packs sequential batches in blocks of up to this many tokens


class TokenDataset(IterableDataset):
    """Packed ``seq_len + 1`` token windows from weighted sources, deterministic and exactly resumable.

    Each item is a dict: ``tokens`` (int64, ``seq_len + 1``) and ``doc_ids`` (int32, which document of the
    window each token belongs to, for attention masks). Two tensors only: DataLoader workers pay per
    tensor to hand a batch over. ``global_index(i)`` tells which global sample a rank's ``i``-th is.
    With ``boundaries="cu_seqlens"`` items carry ``cu_seqlens`` (int32 segment starts plus the end, see
    :mod:`loaders.varlen`) and ``max_seqlen`` (int32 scalar) instead of ``doc_ids``: FlashAttention's varlen
    layout, no per-token labels (use :func:`loaders.collate_varlen` with a plain ``DataLoader``).

    Args:
        sources: Corpus URLs or paths (local, FUSE, or any fsspec URL such as ``pcache::s3://…``).
        seq_len: Tokens per training sequence (each window has one more, for the shifted targets).
        weights: Relative sampling weight of each source (default: equal).
        seed: Seed of the shuffle.
        shuffle: Shuffle shard order and documents within ``shuffle_window``.
        rank: This rank (default: from ``torch.distributed`` if initialized, else 0).
        world_size: Number of ranks (default: from ``torch.distributed`` if initialized, else 1).
        batch_size: The DataLoader's batch size: workers take whole batches in turn, so the order does
            not depend on ``num_workers``.
        shuffle_window: Documents per bounded shuffle block.
        storage_options: fsspec options for remote sources.
        on_error: ``"raise"`` or ``"skip"`` (corrupt documents are skipped, counted and logged).
        boundaries: ``"doc_ids"`` (per-token document numbers) or ``"cu_seqlens"`` (segment boundaries).
    """

    def __init__(self, sources: Sequence[str] | str, seq_len: int, *, weights: Sequence[float] | None = None,
                 seed: int = 0, shuffle: bool = True, rank: int | None = None, world_size: int | None = None,
                 batch_size: int = 1, shuffle_window: int = 8192, storage_options: dict[str, Any] | None = None,
                 on_error: str = "raise", boundaries: str = "doc_ids") -> None:
        super().__init__()
        sources = [sources] if isinstance(sources, str) else list(sources)
        if not sources:
            raise InvalidParameterError("sources", "at least one source is needed")
        if not isinstance(seq_len, int) or seq_len <= 0:
            raise InvalidParameterError("seq_len", f"must be a positive integer, got {seq_len!r}")
        if batch_size <= 0:
            raise InvalidParameterError("batch_size", f"must be > 0, got {batch_size}")
        if shuffle_window <= 0:
            raise InvalidParameterError("shuffle_window", f"must be > 0, got {shuffle_window}")
        if on_error not in ("raise", "skip"):
            raise InvalidParameterError("on_error", f"must be 'raise' or 'skip', got {on_error!r}")
        if boundaries not in BOUNDARIES:
            raise InvalidParameterError("boundaries", f"expected one of {BOUNDARIES}, got {boundaries!r}")
        self.boundaries = boundaries
        self.weights = normalize_weights(weights, len(sources))
        self.seq_len, self.seed, self.shuffle, self.batch_size = seq_len, seed, shuffle, batch_size
        self.shuffle_window = shuffle_window
        self.on_error = on_error
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        corpora = [open_corpus(url, storage_options=storage_options, on_error=on_error) for url in sources]
        _check_same_tokenizer(corpora)
        self.sources = [SourceView(c, i, seq_len, seed, shuffle, shuffle_window) for i, c in enumerate(corpora)]
        self.schedule = MixSchedule(self.weights)
        #: The narrowest dtype holding every source's tokens (what :meth:`fill` needs at least).
        self.token_dtype = np.dtype(np.result_type(*(view.corpus.dtype for view in self.sources)))
        self.position = 0  # global samples consumed before this dataset's first sample
        self._consumed = 0  # rank-local samples yielded by an in-process iterator (num_workers=0)
        self._worker_next: int | None = None  # set when a worker's own state is loaded (StatefulDataLoader)
        self.skipped = 0
        self._forked = False  # set when workers forked from this process may have iterated it
        self._warmed = -1
        self._block: _Block | None = None  # batches packed ahead by batch()
        self._last_batch: int | None = None
        _UNWARMED.add(self)

    @property
    def vocab_size(self) -> int | None:
        """Every token id is below this, as the sources' ``index.json`` record it; None if one does not say."""
        sizes = [view.corpus.vocab_size for view in self.sources]
        return None if any(size is None for size in sizes) else max(int(size or 0) for size in sizes)

    # -- order -------------------------------------------------------------------------------------
    @property
    def samples_per_epoch(self) -> int:
        """Global samples in one pass over every source's windows (for reporting epochs)."""
        return sum(s.windows_per_epoch for s in self.sources)

    def _warm(self) -> None:
        """Build the streams at ``position`` once (also just before a fork, so workers share them).

        Lazy, so a dataset that is resumed right away builds only the resume epoch's order.
        """
        if self._warmed == self.position:
            return
        for s, view in enumerate(self.sources):
            if self.weights[s] > 0:
                view.stream(self.schedule.count_before(s, self.position) // view.windows_per_epoch)
        self._warmed = self.position

    def global_index(self, i: int) -> int:
        """Global sample number of this rank's ``i``-th sample (counted from ``position``)."""
        return self.position + i * self.world_size + self.rank

    def sample(self, k: int) -> dict[str, torch.Tensor]:
        """Return global sample ``k`` (what any rank or worker yields for it)."""
        out = np.empty((1, self.seq_len + 1), dtype=np.int64)
        if self.boundaries == "cu_seqlens":
            cu, longest = self.fill([k], out, None)
            return {"tokens": torch.from_numpy(out[0]), "cu_seqlens": torch.from_numpy(cu),
                    "max_seqlen": torch.tensor(longest, dtype=torch.int32)}
        doc_ids = np.empty((1, self.seq_len + 1), dtype=np.int32)
        self.fill([k], out, doc_ids)
        return {"tokens": torch.from_numpy(out[0]), "doc_ids": torch.from_numpy(doc_ids[0])}

    def fill(self, samples: Sequence[int], out: np.ndarray, doc_ids: np.ndarray | None) -> tuple[np.ndarray, int]:
        """Fill ``out[i]`` (and ``doc_ids[i]``) with global sample ``samples[i]``; return its ``cu_seqlens``.

        Consecutive samples that are consecutive windows of one source (the common case: one rank, one
        source, or long runs of a heavy source) are packed as one contiguous token range.

        Args:
            samples: Global sample numbers.
            out: ``[len(samples), seq_len + 1]`` tokens, of :attr:`token_dtype` or wider.
            doc_ids: ``[len(samples), seq_len + 1]`` int32, or None (``cu_seqlens`` only).

        Returns:
            ``(cu_seqlens, max_seqlen)`` of the rows (computed only when ``doc_ids`` is None; else empty, 0).
        """
        starts: list[tuple[np.ndarray, np.ndarray]] | None = [] if doc_ids is None else None
        row = 0
        for s, c, rows in self._runs(samples):
            part: list[tuple[np.ndarray, np.ndarray]] | None = [] if starts is not None else None
            ids = None if doc_ids is None else doc_ids[row:row + rows]
            self.skipped += self.sources[s].windows(c, out[row:row + rows], ids, self.on_error, part)
            if starts is not None and part is not None:
                starts += [(r + row, o) for r, o in part]
            row += rows
        if starts is None:
            return np.zeros(0, np.int32), 0
        return cu_seqlens_of(starts, len(samples), out.shape[1])

    def _runs(self, samples: Sequence[int]) -> list[tuple[int, int, int]]:
        """Group samples into (source, first window, rows) runs of consecutive windows of one source."""
        runs: list[tuple[int, int, int]] = []
        single = len(self.sources) == 1  # then sample k is window k: no schedule lookups
        if single and len(samples) > 1:  # runs are where consecutive sample numbers are consecutive
            ks = np.asarray(samples, dtype=np.int64)
            cuts = [0, *(np.flatnonzero(np.diff(ks) != 1) + 1).tolist(), ks.size]
            return [(0, int(ks[a]), b - a) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        for k in samples:
            s = 0 if single else self.schedule.source_of(k)
            c = k if single else self.schedule.count_before(s, k)
            if runs and runs[-1][0] == s and runs[-1][1] + runs[-1][2] == c:
                runs[-1] = (s, runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((s, c, 1))
        return runs

    def batch(self, b: int) -> dict[str, Any]:
        """Return this rank's ``b``-th batch (counted from ``position``) as numpy arrays.

        ``tokens`` keeps the storage dtype (:attr:`token_dtype`), four times smaller than int64 for
        uint16 corpora, so handing it from a worker process to the trainer is cheap; :class:`TokenLoader`
        widens it. ``doc_ids`` is int32; or, with ``boundaries="cu_seqlens"``, ``cu_seqlens`` (int32) and
        ``max_seqlen`` (int), and ``tokens`` may be a read-only view whose rows share their overlapping
        token (no copy beyond the one packing makes).

        Batches asked for in a regular sequence (``b``, ``b + step``, …, as a TokenLoader worker does) are
        packed ahead in growing blocks, so the per-call cost is amortised; the batches are the same.
        """
        block = self._block
        last, self._last_batch = self._last_batch, b
        if block is not None and block.position == self.position:
            i, rem = divmod(b - block.first, block.step)
            if rem == 0 and 0 <= i < block.count:
                return block.get(i)
        count, step = 1, 1
        if block is not None and block.position == self.position and last is not None and b > last:
            step = b - last
            if block.step == step or block.count == 1:
                most = max(1, BLOCK_TOKENS // (self.batch_size * (self.seq_len + 1)))
                count = min(most, 2 * block.count)
        self._block = self._pack_block(b, step, count)
        return self._block.get(0)

    def _pack_block(self, first: int, step: int, count: int) -> _Block:
        size, width = self.batch_size, self.seq_len + 1
        rows = (np.arange(first, first + count * step, step, dtype=np.int64)[:, None] * size
                + np.arange(size, dtype=np.int64)).reshape(-1)
        samples = (self.position + rows * self.world_size + self.rank).tolist()  # global_index of each row
        n = len(samples)
        if self.boundaries == "doc_ids":
            out = np.empty((n, width), dtype=self.token_dtype)
            doc_ids = np.empty((n, width), dtype=np.int32)
            self.fill(samples, out, doc_ids)
            return _Block(self.position, first, step, count, size, width, out, doc_ids)
        runs = self._runs(samples)
        view = None
        if len(runs) == 1 and self.sources[runs[0][0]].corpus.dtype == self.token_dtype:
            try:  # the zero-copy form; on a corrupt document fill() below finds (and maybe skips) it
                view = self.sources[runs[0][0]].run_view(runs[0][1], n, width)
            except FormatError:
                view = None
        if view is not None:
            tokens, starts = view
            cu, _ = cu_seqlens_of([starts], n, width)
        else:
            tokens = np.empty((n, width), dtype=self.token_dtype)
            cu, _ = self.fill(samples, tokens, None)
        return _Block(self.position, first, step, count, size, width, tokens, None, cu)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._warm()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        b = self.batch_size
        if self._worker_next is not None:
            i = self._worker_next
        elif workers > 1:
            i = worker * b
        else:
            i = self._consumed
        while True:
            batch = i // b
            if workers > 1 and batch % workers != worker:
                i = (batch + (worker - batch) % workers) * b  # jump to this worker's next batch
            item = self.sample(self.global_index(i))
            i += 1
            if info is None:
                self._consumed = i
            else:
                self._worker_next = i
            yield item

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self, samples_consumed: int | None = None) -> dict[str, Any]:
        """Return the resume state.

        Args:
            samples_consumed: Samples this rank has consumed since the dataset's start (for example
                ``steps * batch_size``). Needed with a plain DataLoader with workers, where the main
                process cannot see the workers' progress; with ``num_workers=0`` or torchdata's
                ``StatefulDataLoader`` it is tracked automatically.

        The state from the main process is global (``position`` = samples consumed by all ranks), so it
        can be loaded at any world size and worker count. The per-worker states StatefulDataLoader
        collects (``worker_next``) resume exactly only with the same world size and ``num_workers``.

        Raises:
            InvalidParameterError: when workers forked from this process iterated it and
                ``samples_consumed`` is not given (the main process cannot know their progress).
        """
        state: dict[str, Any] = {
            "format": STATE_FORMAT, "seed": self.seed, "seq_len": self.seq_len,
            "shuffle": self.shuffle, "shuffle_window": self.shuffle_window,
            "weights": [float(w) for w in self.weights],
            "schedule": [int(w) for w in self.schedule.int_weights],
            "fingerprints": [v.corpus.fingerprint for v in self.sources], "skipped": self.skipped,
        }
        info = get_worker_info()
        if samples_consumed is None and info is not None:  # StatefulDataLoader asks each worker
            state.update(position=self.position, worker_next=self._worker_next or 0, rank=self.rank,
                         world_size=self.world_size, worker=info.id, num_workers=info.num_workers)
            return state
        if samples_consumed is None and self._forked and self._consumed == 0:
            raise InvalidParameterError(
                "samples_consumed", "this dataset was iterated in DataLoader worker processes, which the "
                "main process cannot see: pass state_dict(samples_consumed=steps * batch_size), or use "
                "torchdata's StatefulDataLoader")
        consumed = self._consumed if samples_consumed is None else samples_consumed
        state["position"] = self.position + consumed * self.world_size
        state["epoch"] = state["position"] // self.samples_per_epoch
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from any world size or worker count).

        Raises:
            ValueError: naming the field when the state belongs to other data, seed, seq_len or weights.
        """
        if state.get("format") != STATE_FORMAT:
            raise InvalidParameterError("state", f"not a {STATE_FORMAT} state: format={state.get('format')!r}")
        mine = self.state_dict(0)
        for field in ("seed", "seq_len", "shuffle", "shuffle_window", "schedule", "fingerprints"):
            if state.get(field) != mine[field]:
                raise InvalidParameterError(f"state.{field}",
                                            f"saved {state.get(field)!r}, this dataset has {mine[field]!r}")
        self.skipped = int(state.get("skipped", 0))
        self.position, self._consumed, self._worker_next = int(state["position"]), 0, None
        if "worker_next" in state and get_worker_info() is not None:
            self._worker_next = int(state["worker_next"])


class _Block:
    """``count`` batches (``first``, ``first + step``, …) packed at once; :meth:`get` hands out batch ``i``."""

    def __init__(self, position: int, first: int, step: int, count: int, size: int, width: int, tokens: np.ndarray,
                 doc_ids: np.ndarray | None, cu: np.ndarray | None = None) -> None:
        self.position, self.first, self.step, self.count, self.size = position, first, step, count, size
        self.tokens, self.doc_ids = tokens, doc_ids
        if cu is not None:
            cu64 = cu.astype(np.int64)
            # where each batch's rows begin among the block's boundaries, and each batch's longest segment
            self.edges = np.searchsorted(cu64, np.arange(count + 1, dtype=np.int64) * size * width).tolist()
            self.longest = np.maximum.reduceat(np.diff(cu64), self.edges[:-1]).tolist()
            self.cu, self.span = cu, size * width

    def get(self, i: int) -> dict[str, Any]:
        rows = slice(i * self.size, (i + 1) * self.size)
        if self.doc_ids is not None:
            return {"tokens": self.tokens[rows], "doc_ids": self.doc_ids[rows]}
        cu = self.cu[self.edges[i]:self.edges[i + 1] + 1] - np.int32(i * self.span)
        return {"tokens": self.tokens[rows], "cu_seqlens": cu, "max_seqlen": self.longest[i]}


# Datasets whose streams are not built yet: built in the parent right before a fork (DataLoader
# workers), so every worker shares one copy instead of building its own.
_UNWARMED: weakref.WeakSet[TokenDataset] = weakref.WeakSet()


def _warm_before_fork() -> None:
    for dataset in list(_UNWARMED):
        dataset._forked = True
        try:
            dataset._warm()
        except Exception:  # noqa: BLE001 - the worker builds it (and reports any error) itself
            log.debug("could not prebuild streams before fork", exc_info=True)


os.register_at_fork(before=_warm_before_fork)


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        dist = torch.distributed
        initialized = dist.is_available() and dist.is_initialized()
        rank = rank if rank is not None else (dist.get_rank() if initialized else 0)
        world_size = world_size if world_size is not None else (dist.get_world_size() if initialized else 1)
    if world_size <= 0 or not 0 <= rank < world_size:
        raise InvalidParameterError("rank", f"rank {rank} is not in a world of {world_size}")
    return rank, world_size


def _check_same_tokenizer(corpora: Sequence[Any]) -> None:
    """Mixed sources must share one tokenizer: the same id means different text in different vocabularies."""
    known = [(c.url, c.tokenizer_id) for c in corpora if c.tokenizer_id is not None]
    for url, tok in known[1:]:
        if tok != known[0][1]:
            raise InvalidParameterError("sources", f"{url} was tokenized with {tok}, but {known[0][0]} with "
                                                   f"{known[0][1]}; mix only corpora of one tokenizer")
