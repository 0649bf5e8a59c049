"""Document boundaries as ``cu_seqlens``: the layout of FlashAttention's varlen kernels and Megatron's "thd".

A batch of ``B`` rows of ``W`` tokens is read as one flat sequence of ``B * W`` tokens cut into segments:
``cu_seqlens`` (int32, ascending, from 0 to ``B * W``) lists where each segment starts, plus the end. Every
row starts a segment, and so does every document that starts inside a row; ``max_seqlen`` is the longest
segment. It carries what per-token ``doc_ids`` do (segment ``k`` of a row is document ``k`` of its window)
in a few integers per row instead of one per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

BOUNDARIES = ("doc_ids", "cu_seqlens")


def cu_seqlens_of(starts: Sequence[tuple[np.ndarray, np.ndarray]], rows: int, width: int) -> tuple[np.ndarray, int]:
    """``(cu_seqlens, max_seqlen)`` of ``rows`` rows of ``width`` from document starts inside them.

    Args:
        starts: ``(row indices, offsets in the row)`` arrays (offsets ``1 .. width - 1``), rows ascending
            within each pair and pairs in row order, as :meth:`loaders.packing.SourceView.windows` gives them.
        rows: Rows in the batch.
        width: Tokens per row.
    """
    inner = [r * width + o for r, o in starts if r.size]
    cu = np.arange(0, (rows + 1) * width, width, dtype=np.int64)
    if inner:
        # both parts are sorted and disjoint (an inner offset is never 0): one merge sort puts them in order
        cu = np.sort(np.concatenate([cu, *inner]), kind="stable")
    return cu.astype(np.int32), int(np.diff(cu).max()) if rows else 0


def cu_seqlens_from_doc_ids(doc_ids: Any) -> tuple[np.ndarray, int]:
    """``(cu_seqlens, max_seqlen)`` equivalent to per-token ``doc_ids`` ``[B, W]`` (a new segment where the id changes)."""
    ids = np.asarray(doc_ids)
    rows, offsets = np.nonzero(np.diff(ids, axis=1))
    return cu_seqlens_of([(rows, offsets + 1)], ids.shape[0], ids.shape[1])


def trim_cu_seqlens(cu_seqlens: Any, width: int, keep: int) -> np.ndarray:
    """Boundaries of the same rows cut to their first ``keep`` of ``width`` tokens (``tokens[:, :keep]``).

    The training inputs are ``tokens[:, :-1]`` of each ``seq_len + 1`` window: their ``cu_seqlens`` is
    ``trim_cu_seqlens(cu, seq_len + 1, seq_len)``.
    """
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    rows, offset = np.divmod(cu, width)
    return np.unique(rows * keep + np.minimum(offset, keep)).astype(np.int32)


def collate_varlen(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """``collate_fn`` for ``DataLoader`` over a ``boundaries="cu_seqlens"`` dataset: one batch dict.

    Stacks ``tokens`` and joins the samples' ``cu_seqlens`` (each shifted by its row's offset), which the
    default collate cannot do since their lengths differ; the result equals :meth:`TokenDataset.batch`'s.
    """
    tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples])
    width = tokens.shape[1]
    parts = [torch.as_tensor(s["cu_seqlens"])[:-1].to(torch.int64) + i * width for i, s in enumerate(samples)]
    cu = torch.cat([*parts, torch.tensor([len(samples) * width])]).to(torch.int32)
    longest = max(int(torch.as_tensor(s["max_seqlen"])) for s in samples)
    return {"tokens": tokens, "cu_seqlens": cu, "max_seqlen": torch.tensor(longest, dtype=torch.int32)}


__all__ = ["BOUNDARIES", "collate_varlen", "cu_seqlens_from_doc_ids", "cu_seqlens_of", "trim_cu_seqlens"]
