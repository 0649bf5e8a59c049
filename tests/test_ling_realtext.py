"""ling_train.realtext: real English from what is installed, the same every time, and a BPE tokenizer on it
that ``loaders pack`` takes as it is (EOS found by name)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ling_train.realtext import EOS_TOKEN, offline_texts, train_bpe
from loaders.formats.tokenize import load_tokenizer


def test_texts_are_prose_deduplicated_and_deterministic() -> None:
    texts = offline_texts(300_000)
    assert sum(len(t.encode()) for t in texts) >= 300_000
    assert len(set(texts)) == len(texts) and all(len(t) >= 200 for t in texts)
    words = " ".join(texts).split()
    assert sum(w.lower() in ("the", "of", "and", "to") for w in words) / len(words) > 0.03  # English prose
    assert offline_texts(300_000) == texts


def test_bpe_tokenizer_is_what_loaders_pack_takes(tmp_path: Path) -> None:
    texts = offline_texts(100_000)
    path = train_bpe(texts, str(tmp_path / "tokenizer.json"), vocab_size=512)
    spec = load_tokenizer(path)
    assert spec.kind == "hf" and spec.vocab_size == 512
    from tokenizers import Tokenizer

    assert spec.eos_id == Tokenizer.from_file(path).token_to_id(EOS_TOKEN)


def test_cli_writes_jsonl(tmp_path: Path) -> None:
    out = tmp_path / "docs.jsonl"
    proc = subprocess.run([sys.executable, "-m", "ling_train.realtext", "--out", str(out), "--max-mb", "0.1"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    docs = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert docs and f"wrote {len(docs):,} documents" in proc.stderr
