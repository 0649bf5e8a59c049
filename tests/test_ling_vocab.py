"""The model's vocabulary comes from the data: a corpus packed with a real BPE tokenizer trains, ids the
model cannot embed are refused at start with one line naming the corpus, and mixed tokenizers are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ling_train import TrainConfig, train
from ling_train.corpus import sample_texts, write_jsonl, write_text_corpus
from loaders import InvalidParameterError
from loaders.cli import main as loaders_main

SMALL = {"batch_size": 2, "seq_len": 32, "threads": 1, "log_every": 1000, "warmup_steps": 1}


@pytest.fixture(scope="module")
def bpe_corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A corpus packed by ``loaders pack`` with a byte-level BPE tokenizer of 600 ids trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("bpe")
    texts = sample_texts(400, seed=3)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(root / "tokenizer.json"))
    write_jsonl(str(root / "docs.jsonl"), texts)
    out = str(root / "corpus")
    assert loaders_main(["pack", str(root / "docs.jsonl"), "--out", out, "--format", "megatron", "--tokenizer",
                         str(root / "tokenizer.json"), "--workers", "1", "--quiet"]) == 0
    return out


def test_index_records_vocabulary_and_tokenizer_hash(bpe_corpus: str) -> None:
    index = json.loads((Path(bpe_corpus) / "index.json").read_text())
    assert index["vocab_size"] == index["tokenizer"]["vocab_size"] > 259  # more than the byte vocabulary
    assert len(index["tokenizer"]["xxh3_128"]) == 32 and index["dtype"] == "uint16"


def test_a_bpe_corpus_trains_with_the_vocabulary_of_its_index(bpe_corpus: str) -> None:
    result = train(TrainConfig.load(data=(bpe_corpus,), steps=3, **SMALL))
    assert result.final_step == 3 and all(loss == loss for loss in result.losses.values())


def test_ids_beyond_the_vocabulary_are_refused_at_start(bpe_corpus: str) -> None:
    with pytest.raises(InvalidParameterError, match=f"{bpe_corpus}.*more than the model's vocabulary of 259"):
        train(TrainConfig.load(data=(bpe_corpus,), steps=3, vocab_size=259, **SMALL))
    proc = subprocess.run([sys.executable, "-m", "ling_train.cli", "--data", bpe_corpus, "--vocab-size", "259",
                           "--steps", "2", "--threads", "1"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and bpe_corpus in lines[0] and "Traceback" not in proc.stderr


def test_mixed_tokenizers_are_refused(bpe_corpus: str, tmp_path: Path) -> None:
    byte_corpus = str(tmp_path / "bytes")
    write_text_corpus(byte_corpus, sample_texts(50, seed=1))
    with pytest.raises(InvalidParameterError, match="tokenized with"):
        train(TrainConfig.load(data=(bpe_corpus, byte_corpus), steps=1, **SMALL))
