"""``TokenLoader``: the fast way to iterate a :class:`~loaders.TokenDataset` in batches.

A plain ``DataLoader(dataset, batch_size=B, num_workers=N)`` works, but pays twice per batch: it packs
and collates one sample at a time, and every tensor a worker returns travels through a new shared-memory
segment whose file descriptor is passed over a socket (about half a millisecond per tensor here). This
loader has workers pack whole batches (:meth:`TokenDataset.batch`: runs of windows in one copy) and
return them as numpy arrays in the corpus' own dtype, which go through the worker pipe as plain bytes
(a uint16 corpus sends a quarter of the int64 bytes); the trainer's process widens them to int64.

It also knows how many batches it has handed out, so :meth:`TokenLoader.state_dict` is exact with any
``num_workers`` without the caller counting steps, and it adds the corrupt documents the workers skipped
(``on_error="skip"``) to the dataset's count, so the state and the logs include them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from loaders.dataset import TokenDataset
from loaders.errors import InvalidParameterError


class _BatchStream(IterableDataset):
    """A rank's batches from ``first`` on; DataLoader worker ``w`` of ``N`` takes batches ``w, w + N, ...``."""

    def __init__(self, dataset: TokenDataset, first: int) -> None:
        super().__init__()
        self.dataset, self.first = dataset, first

    def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """Yield (batch, corrupt documents skipped while packing it)."""
        self.dataset._warm()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        b = self.first + worker
        while True:
            before = self.dataset.skipped
            batch = self.dataset.batch(b)
            yield batch, self.dataset.skipped - before
            b += workers


def _keep(item: Any) -> Any:
    return item  # no collation in the worker: numpy arrays pickle as bytes, tensors would need shm


def to_tensors(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Turn a packed batch into the tensors training uses: int64 ``tokens``, int32 ``doc_ids`` (or int32
    ``cu_seqlens`` and a scalar int32 ``max_seqlen``)."""
    tokens = torch.from_numpy(batch["tokens"].astype(np.int64))  # also makes a row-sharing view contiguous
    if "doc_ids" in batch:
        return {"tokens": tokens, "doc_ids": torch.from_numpy(np.ascontiguousarray(batch["doc_ids"]))}
    return {"tokens": tokens, "cu_seqlens": torch.from_numpy(np.ascontiguousarray(batch["cu_seqlens"])),
            # from_numpy of a 0-d array: a third of torch.tensor(int)'s cost, which shows at small batches
            "max_seqlen": torch.from_numpy(np.array(batch["max_seqlen"], dtype=np.int32))}


class TokenLoader:
    """Iterate a :class:`~loaders.TokenDataset` in batches of its ``batch_size``, exactly resumable.

    Yields dicts with ``tokens`` (int64 ``[batch_size, seq_len + 1]``) and ``doc_ids`` (int32, same shape) or,
    for a ``boundaries="cu_seqlens"`` dataset, ``cu_seqlens`` and ``max_seqlen`` (see :mod:`loaders.varlen`),
    the same batches, in the same order, as ``DataLoader(dataset, batch_size=dataset.batch_size)`` for any
    ``num_workers``. The stream is endless (epochs follow each other); stop after as many steps as you need.

    Args:
        dataset: The dataset; its ``batch_size`` is the loader's.
        num_workers: Worker processes packing batches (0: in this process).
        prefetch_factor: Batches each worker prepares ahead.
        pin_memory: Pin the tensors (for faster copies to a GPU).
        timeout: Seconds to wait for a worker's batch (0: forever).
        multiprocessing_context: As for ``DataLoader`` (default: the platform's, ``fork`` on Linux).
    """

    def __init__(self, dataset: TokenDataset, *, num_workers: int = 0, prefetch_factor: int | None = None,
                 pin_memory: bool = False, timeout: float = 0, multiprocessing_context: Any = None) -> None:
        if num_workers < 0:
            raise InvalidParameterError("num_workers", f"must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.pin_memory, self.timeout = pin_memory and torch.cuda.is_available(), timeout
        self.multiprocessing_context = multiprocessing_context
        self.batches = 0  # handed out since the dataset's position

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        stream = _BatchStream(self.dataset, self.batches)
        if self.num_workers == 0:
            source: Any = iter(stream)
        else:
            source = iter(DataLoader(stream, batch_size=None, collate_fn=_keep, num_workers=self.num_workers,
                                     prefetch_factor=self.prefetch_factor, timeout=self.timeout,
                                     multiprocessing_context=self.multiprocessing_context))
        for packed, skipped in source:
            if skipped and self.num_workers:  # counted in the worker's copy of the dataset: add it here
                self.dataset.skipped += skipped
            batch = to_tensors(packed)
            if self.pin_memory:
                batch = {name: t.pin_memory() for name, t in batch.items()}
            self.batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The dataset's resume state after the batches handed out so far (loadable at any world size)."""
        return self.dataset.state_dict(samples_consumed=self.batches * self.dataset.batch_size)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after ``state`` (from :meth:`state_dict` or :meth:`TokenDataset.state_dict`)."""
        self.dataset.load_state_dict(state)
        self.batches = 0
