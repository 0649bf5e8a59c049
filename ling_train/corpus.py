"""A small generated English-like text corpus for tests, the demo and the benchmark.

The text is seeded and learnable (a handful of sentence templates over a small vocabulary), so a tiny
model's loss falls visibly within a few hundred steps. Documents are tokenized with the loaders' byte
tokenizer (vocab 259, EOS after each document) and written with :func:`loaders.write_corpus`.
"""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np

from loaders import write_corpus
from loaders.formats.tokenize import Encoder, load_tokenizer

_SUBJECTS = ["the cache", "a trainer", "the expert", "our router", "the model", "a checkpoint", "the shard",
             "each rank", "the uploader", "a reader"]
_VERBS = ["writes", "reads", "routes", "commits", "loads", "skips", "syncs", "packs", "evicts", "trains"]
_OBJECTS = ["the tokens", "every block", "a batch", "the marker", "its state", "the loss", "many bytes",
            "the origin", "one expert", "the manifest"]
_TAILS = ["quickly", "again", "in order", "at night", "without loss", "twice", "on time", "from disk"]


def sample_texts(count: int, seed: int = 0) -> list[str]:
    """``count`` short documents of a few sentences each (deterministic for a seed)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        sentences = [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."
                     for _ in range(rng.randint(2, 8))]
        docs.append(" ".join(sentences).capitalize())
    return docs


def write_text_corpus(url: str, texts: list[str], *, storage_options: dict[str, Any] | None = None,
                      shard_size: str = "64KiB") -> dict[str, Any]:
    """Tokenize ``texts`` with the byte tokenizer and write a Megatron corpus at ``url``."""
    spec = load_tokenizer("bytes")
    flat, lengths = Encoder(spec).encode(texts)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    docs = [flat[bounds[i]:bounds[i + 1]].astype(np.uint16) for i in range(len(texts))]
    return write_corpus(url, docs, format="megatron", dtype=np.uint16, shard_size=shard_size,
                        tokenizer=spec.describe(), eos_id=spec.eos_id, storage_options=storage_options,
                        overwrite=True)


def write_jsonl(path: str, texts: list[str]) -> None:
    """Write ``texts`` as JSONL (``{"text": ...}`` per line), the input of ``loaders pack``."""
    with open(path, "w", encoding="utf-8") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}) + "\n")
