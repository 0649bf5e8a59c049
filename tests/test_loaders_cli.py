"""``loaders pack`` and ``loaders inspect`` end to end, on local files."""

from __future__ import annotations

import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loaders.cli import main
from loaders.errors import MissingDependencyError
from loaders.formats import open_corpus
from loaders.formats.tokenize import BYTE_OFFSET, EOS_ID, load_tokenizer


def byte_ids(text: str) -> list[int]:
    return [b + BYTE_OFFSET for b in text.encode()] + [EOS_ID]


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[list[str], list[str]]:
    """A JSONL file, a gzipped JSONL file and two .txt files; returns (paths, expected documents)."""
    src = tmp_path / "in"
    src.mkdir()
    texts = [f"document {i} " + "héllo wörld " * (i % 23) for i in range(400)]
    with open(src / "a.jsonl", "w") as fh:
        for text in texts[:300]:
            fh.write(json.dumps({"text": text, "id": 1}) + "\n")
        fh.write("\n")
    with gzip.open(src / "b.jsonl.gz", "wt") as fh:
        for text in texts[300:]:
            fh.write(json.dumps({"text": text}) + "\n")
    (src / "c.txt").write_text("first paragraph\n\nsecond one\n")
    (src / "d.txt").write_text("x")
    expected = texts + ["first paragraph\n\nsecond one\n", "x"]
    return [str(src / "a.jsonl"), str(src / "b.jsonl.gz"), str(src / "c.txt"), str(src / "d.txt")], expected


@pytest.mark.parametrize(("fmt", "workers"), [("megatron", 2), ("wds", 1), ("lmdb", 1)])
def test_pack_and_inspect(tmp_path: Path, inputs: tuple[list[str], list[str]], fmt: str, workers: int,
                          capsys: pytest.CaptureFixture[str]) -> None:
    paths, expected = inputs
    out = tmp_path / "out"
    assert main(["pack", *paths, "--out", str(out), "--format", fmt, "--shard-size", "4KiB",
                 "--workers", str(workers), "--quiet"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["documents"] == len(expected) and len(index["shards"]) > 1
    assert index["eos_id"] == EOS_ID and index["tokenizer"]["kind"] == "bytes" and index["dtype"] == "uint16"
    with open_corpus(str(out)) as corpus:
        got = [s.read(d).tolist() for s in corpus.shards for d in range(len(s.lengths))]
    assert got == [byte_ids(t) for t in expected]
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"documents    {len(expected):,}" in text and "verified     OK" in text and "[" in text
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["documents"] == len(expected) and sum(c for _, _, c in report["histogram"]) == len(expected)


def test_pack_is_deterministic_across_worker_counts(tmp_path: Path, inputs: tuple[list[str], list[str]]) -> None:
    paths, _ = inputs
    for workers in (1, 2):
        assert main(["pack", *paths, "--out", str(tmp_path / f"w{workers}"), "--format", "wds",
                     "--shard-size", "8KiB", "--workers", str(workers), "--quiet"]) == 0
    one, two = (json.loads((tmp_path / f"w{w}" / "index.json").read_text()) for w in (1, 2))
    assert one == two


@pytest.mark.parametrize(("fmt", "victim"), [("megatron", "shard-00001.bin"), ("wds", "shard-00001.tar"),
                                             ("lmdb", "shard-00001.lmdb/data.mdb")])
def test_inspect_detects_a_flipped_byte(tmp_path: Path, inputs: tuple[list[str], list[str]], fmt: str,
                                        victim: str, capsys: pytest.CaptureFixture[str]) -> None:
    paths, _ = inputs
    out = tmp_path / "out"
    assert main(["pack", *paths, "--out", str(out), "--format", fmt, "--shard-size", "4KiB", "--workers", "1",
                 "--quiet"]) == 0
    path = out / victim
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0x10
    path.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 1
    err = capsys.readouterr().err
    assert victim in err and "xxh3-128" in err
    assert main(["inspect", str(out), "--no-verify"]) == 0


def test_inspect_names_bad_pointer_in_foreign_data(tmp_path: Path, inputs: tuple[list[str], list[str]],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    paths, _ = inputs
    out = tmp_path / "out"
    assert main(["pack", *paths, "--out", str(out), "--format", "megatron", "--workers", "1", "--quiet"]) == 0
    (out / "index.json").unlink()
    (out / "shard-00000.bin").write_bytes((out / "shard-00000.bin").read_bytes()[:-2])
    capsys.readouterr()
    assert main(["inspect", str(out / "shard-00000")]) == 1
    assert "shard-00000.bin" in capsys.readouterr().err


def test_pack_txt_paragraphs_and_directories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "books"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "one.txt").write_text("alpha\n\n\n beta \n  \ngamma")
    (src / "ignored.bin").write_bytes(b"\x00")
    assert main(["pack", str(src), "--out", str(tmp_path / "o"), "--format", "megatron", "--txt-mode",
                 "paragraph", "--workers", "1", "--quiet"]) == 0
    with open_corpus(str(tmp_path / "o")) as corpus:
        assert [corpus.shards[0].read(d).tolist() for d in range(3)] == [byte_ids(t) for t in
                                                                          ("alpha", "beta", "gamma")]


def test_pack_errors_name_the_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    assert main(["pack", str(bad), "--out", str(tmp_path / "o"), "--format", "wds", "--quiet"]) == 1
    assert "bad.jsonl:2" in capsys.readouterr().err and not (tmp_path / "o" / "index.json").exists()
    assert main(["pack", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o"), "--format", "wds"]) == 1
    assert "nope.jsonl" in capsys.readouterr().err
    assert main(["pack", str(bad), "--out", str(tmp_path / "o"), "--format", "wds", "--shard-size", "lots"]) == 1
    assert "shard_size" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    assert "missing" in capsys.readouterr().err


def test_pack_to_fsspec_url(tmp_path: Path, inputs: tuple[list[str], list[str]]) -> None:
    paths, expected = inputs
    url = (tmp_path / "remote").as_uri()
    assert main(["pack", *paths, "--out", url, "--format", "megatron", "--shard-size", "8KiB", "--workers", "1",
                 "--quiet"]) == 0
    assert main(["inspect", url]) == 0
    with open_corpus(url) as corpus:
        assert sum(len(s.lengths) for s in corpus.shards) == len(expected)


@pytest.mark.skipif(importlib.util.find_spec("tokenizers") is not None, reason="tokenizers is installed")
def test_hf_tokenizer_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MissingDependencyError, match="tokenizers"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


@pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None, reason="tokenizers is not installed")
def test_hf_tokenizer(tmp_path: Path, inputs: tuple[list[str], list[str]]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "</s>": 1, "document": 2, "x": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    paths, expected = inputs
    assert main(["pack", *paths, "--out", str(tmp_path / "o"), "--format", "megatron", "--tokenizer",
                 str(tmp_path / "tokenizer.json"), "--workers", "2", "--quiet"]) == 0
    with open_corpus(str(tmp_path / "o")) as corpus:
        assert corpus.index is not None and corpus.index["eos_id"] == 1
        last = corpus.shards[-1]
        assert last.read(len(last.lengths) - 1).tolist() == [3, 1]  # "x" then EOS
        first = corpus.shards[0].read(0)
        assert first[0] == 2 and first[-1] == 1 and first.dtype == np.uint16


def test_module_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "loaders", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "pack" in done.stdout and "inspect" in done.stdout


@pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None, reason="tokenizers is not installed")
def test_bpe_pack_keeps_document_order_across_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks encode two at a time on the tokenizer's threads: the corpus is still every document's own
    ``Tokenizer.encode`` ids plus EOS, in input order (small chunks: many in flight at once)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    import loaders.formats.pack as pack_module

    texts = [f"Document {i}: " + " ".join(f"word{(i * j) % 97} and more text" for j in range(1 + (i * 37) % 200))
             for i in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    with open(tmp_path / "in.jsonl", "w") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}) + "\n")
    monkeypatch.setattr(pack_module, "CHUNK_CHARS", 3000)
    assert main(["pack", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o"), "--format", "megatron",
                 "--tokenizer", str(tmp_path / "tokenizer.json"), "--quiet"]) == 0
    eos = tok.token_to_id("<|endoftext|>")
    expected = [tok.encode(text, add_special_tokens=False).ids + [eos] for text in texts]
    with open_corpus(str(tmp_path / "o")) as corpus:
        got = [shard.read(i).tolist() for shard in corpus.shards for i in range(len(shard.lengths))]
    assert got == expected


def test_the_cli_and_the_corpus_readers_do_not_import_torch() -> None:
    # torch takes seconds to import; `loaders pack --help` and corpus reads must not pay for it.
    code = "import sys, loaders.cli, loaders; loaders.open_corpus; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
