"""Pure functions that fix the global sample order: source mixing and document shuffling.

Everything here depends only on its arguments (seed, epoch, weights, shard sizes), never on worker
count, world size or wall time, which is what makes resume exact and elastic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import reduce

import numpy as np

from loaders.errors import InvalidParameterError

# Weights are quantized to integers summing to at most this; 1e-4 of relative resolution.
_RESOLUTION = 10_000


def normalize_weights(weights: Sequence[float] | None, n_sources: int) -> np.ndarray:
    """Validate ``weights`` against the sources and return them normalized to sum 1.

    Raises:
        InvalidParameterError: naming ``weights`` when they are negative, not finite, all zero, or not
            one per source.
    """
    if weights is None:
        return np.full(n_sources, 1.0 / n_sources)
    w = np.asarray(list(weights), dtype=np.float64)
    if w.shape != (n_sources,):
        raise InvalidParameterError("weights", f"{len(w)} weight(s) for {n_sources} source(s)")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise InvalidParameterError("weights", f"must be finite and >= 0, got {list(weights)}")
    if w.sum() <= 0:
        raise InvalidParameterError("weights", "at least one weight must be > 0")
    return w / w.sum()


def quantize(weights: np.ndarray, resolution: int = _RESOLUTION) -> np.ndarray:
    """Integer weights proportional to ``weights`` (largest remainder), reduced by their gcd."""
    scaled = weights * resolution
    ints = np.floor(scaled).astype(np.int64)
    ints[(weights > 0) & (ints == 0)] = 1  # a positive weight is never starved
    short = resolution - int(ints.sum())
    if short > 0:
        for i in np.argsort(-(scaled - np.floor(scaled)), kind="stable")[:short]:
            ints[i] += 1
    g = reduce(math.gcd, (int(v) for v in ints if v > 0))
    return ints // g


class MixSchedule:
    """Which source each global sample comes from: smooth weighted round robin over integer weights.

    The schedule is periodic with period ``sum(int_weights)``; within a period every source appears
    exactly its integer weight times, spread as evenly as possible, so every source's share of any run of
    samples is within about one sample of its weight. ``count_before`` is O(1), which is what lets a
    resumed loader start anywhere without replay.
    """

    def __init__(self, weights: np.ndarray) -> None:
        self.int_weights = quantize(weights)
        self.period = int(self.int_weights.sum())
        current = np.zeros(len(self.int_weights), dtype=np.int64)
        order = np.empty(self.period, dtype=np.int32)
        for i in range(self.period):
            current += self.int_weights
            chosen = int(np.argmax(current))  # ties go to the lowest index: deterministic
            current[chosen] -= self.period
            order[i] = chosen
        self.order = order
        # prefix[s, i] = samples of source s among the first i of a period.
        self.prefix = np.zeros((len(self.int_weights), self.period + 1), dtype=np.int64)
        for s in range(len(self.int_weights)):
            self.prefix[s, 1:] = np.cumsum(order == s)

    def source_of(self, k: int) -> int:
        """Source of global sample ``k``."""
        return int(self.order[k % self.period])

    def count_before(self, source: int, k: int) -> int:
        """How many of the global samples ``[0, k)`` come from ``source``."""
        full, rest = divmod(k, self.period)
        return full * int(self.int_weights[source]) + int(self.prefix[source, rest])


def document_order(shard_docs: Sequence[int], *, seed: int, source: int, epoch: int, shuffle: bool,
                   window: int) -> np.ndarray:
    """Global document ids of one source in the order one epoch emits them.

    Shards are visited in a seeded random order, then documents are shuffled within consecutive blocks of
    ``window`` documents (the bounded shuffle window: a reader never needs more than one block's
    documents in flight).

    Args:
        shard_docs: Number of documents in each shard, in storage order.
        seed: The dataset seed.
        source: Index of the source (different sources get independent orders).
        epoch: The source's own epoch (each pass reshuffles).
        shuffle: False keeps storage order.
        window: Documents per shuffle block.
    """
    starts = np.concatenate([[0], np.cumsum(shard_docs, dtype=np.int64)])
    total = int(starts[-1])
    if not shuffle:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng([seed, source, epoch])
    pieces = [np.arange(starts[s], starts[s + 1], dtype=np.int64) for s in rng.permutation(len(shard_docs))]
    order = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    full = (total // window) * window
    if full:
        order[:full] = rng.permuted(order[:full].reshape(-1, window), axis=1).reshape(-1)
    if total > full:
        order[full:] = rng.permutation(order[full:])
    return order
