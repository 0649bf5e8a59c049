"""loaders: streaming token loaders with exact resume, elastic resharding and weighted mixing.

Public API:

* :class:`TokenDataset`: packed ``seq_len + 1`` windows from Megatron ``.bin/.idx``, WebDataset tar or
  LMDB corpora at any path or fsspec URL, shuffled, mixed by weight, resumable at any position. Works
  with ``torch.utils.data.DataLoader`` and torchdata's ``StatefulDataLoader``.
* :class:`TokenLoader`: the fast batch loader for a ``TokenDataset`` (whole batches packed in workers,
  handed over compactly), with its own exact ``state_dict``.
* :func:`open_corpus`, :func:`write_corpus`, :class:`CorpusWriter`: read and write the formats;
  :func:`probe_corpus`: a bounded check that a corpus URL's store answers and something is there.
* :func:`collate_varlen`, :func:`cu_seqlens_from_doc_ids`, :func:`trim_cu_seqlens`: ``cu_seqlens`` batches
  (``TokenDataset(..., boundaries="cu_seqlens")``), the layout of FlashAttention's varlen kernels.
* ``loaders pack`` / ``loaders inspect`` on the command line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from loaders.errors import FormatError, InvalidParameterError
from loaders.formats import Corpus, CorpusWriter, open_corpus, probe_corpus, write_corpus

if TYPE_CHECKING:
    from loaders.dataset import TokenDataset
    from loaders.loader import TokenLoader
    from loaders.varlen import collate_varlen, cu_seqlens_from_doc_ids, trim_cu_seqlens

# These need torch, which takes seconds to import: loaded on first use, so `loaders pack --help` and
# the corpus readers start fast (PEP 562).
_LAZY = {"TokenDataset": "loaders.dataset", "TokenLoader": "loaders.loader", "collate_varlen": "loaders.varlen",
         "cu_seqlens_from_doc_ids": "loaders.varlen", "trim_cu_seqlens": "loaders.varlen"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loaders' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

__all__ = ["Corpus", "CorpusWriter", "FormatError", "InvalidParameterError", "TokenDataset", "TokenLoader",
           "collate_varlen", "cu_seqlens_from_doc_ids", "open_corpus", "probe_corpus", "trim_cu_seqlens",
           "write_corpus"]
