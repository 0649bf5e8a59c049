"""loaders: streaming token loaders with exact resume, elastic resharding and weighted mixing.

Public API:

* :class:`TokenDataset`: packed ``seq_len + 1`` windows from Megatron ``.bin/.idx``, WebDataset tar or
  LMDB corpora at any path or fsspec URL, shuffled, mixed by weight, resumable at any position.
* :func:`open_corpus`, :func:`write_corpus`, :class:`CorpusWriter`: read and write the formats.
* ``loaders pack`` / ``loaders inspect`` on the command line.
"""

from loaders.dataset import TokenDataset
from loaders.errors import FormatError, InvalidParameterError
from loaders.formats import Corpus, CorpusWriter, open_corpus, write_corpus

__all__ = ["Corpus", "CorpusWriter", "FormatError", "InvalidParameterError", "TokenDataset", "open_corpus",
           "write_corpus"]
