"""An interrupted ``loaders pack`` never looks like a corpus, and a re-run finishes it, keeping the shards
that are complete and verified."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from loaders import CorpusWriter, FormatError, TokenDataset, open_corpus
from loaders.cli import main

DOCS = [np.arange(i % 50 + 1, dtype=np.uint16) + i for i in range(600)]


def _interrupted(out: str, stop_after: int, **kw: object) -> None:
    with pytest.raises(KeyboardInterrupt), CorpusWriter(out, format="megatron", shard_size="2KiB", **kw) as writer:
        for i, doc in enumerate(DOCS):
            if i == stop_after:
                raise KeyboardInterrupt  # Ctrl-C mid-pack
            writer.add_batch(doc, np.array([doc.size]))  # one document at a time: shards finish as they go


def test_interrupted_write_is_refused_by_every_reader(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "corpus")
    _interrupted(out, 400, resume_key="k")
    assert not os.path.exists(f"{out}/index.json") and any(n.endswith(".idx") for n in os.listdir(out))
    with pytest.raises(FormatError, match="interrupted or running `loaders pack`"):
        open_corpus(out)
    with pytest.raises(FormatError, match=out):
        TokenDataset([out], seq_len=16)
    assert main(["inspect", out]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and out in err[0] and "_PACKING" in err[0]


def test_rerun_keeps_verified_shards_and_equals_a_fresh_write(tmp_path: Path) -> None:
    out, fresh = str(tmp_path / "corpus"), str(tmp_path / "fresh")
    _interrupted(out, 400, resume_key="k")
    listed = json.loads(Path(out, "_PACKING").read_text())["shards"]
    assert len(listed) >= 3
    # damage the second finished shard: it and every later one must be rewritten, the first kept
    with open(f"{out}/{listed[1]['files']['bin']['path']}", "r+b") as fh:
        fh.write(b"\xff\xff")
    kept_first = os.stat(f"{out}/{listed[0]['files']['bin']['path']}").st_mtime_ns
    with CorpusWriter(out, format="megatron", shard_size="2KiB", resume_key="k") as writer:
        assert writer.reused == 1
        for doc in DOCS:
            writer.add(doc)
        index = writer.close()
    with CorpusWriter(fresh, format="megatron", shard_size="2KiB") as writer:
        for doc in DOCS:
            writer.add(doc)
        expected = writer.close()
    assert index == expected and not os.path.exists(f"{out}/_PACKING")
    assert os.stat(f"{out}/{listed[0]['files']['bin']['path']}").st_mtime_ns == kept_first
    with open_corpus(out) as corpus:
        assert [corpus.shards[0].read(0).tolist()] == [DOCS[0].tolist()]


def test_other_inputs_do_not_resume_without_force(tmp_path: Path) -> None:
    out = str(tmp_path / "corpus")
    _interrupted(out, 100, resume_key="k")
    with pytest.raises(FileExistsError, match="interrupted pack of other inputs"):
        CorpusWriter(out, format="megatron", resume_key="other")
    CorpusWriter(out, format="megatron", resume_key="other", overwrite=True).abort()


def test_killed_pack_command_is_refused_then_finished(tmp_path: Path) -> None:
    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(f"paragraph {i} " + "lorem ipsum dolor " * (i % 40) for i in range(12000)))
    out, fresh = str(tmp_path / "corpus"), str(tmp_path / "fresh")
    args = [str(src), "--format", "megatron", "--txt-mode", "paragraph", "--shard-size", "128KiB", "--workers", "1",
            "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "loaders", "pack", *args, "--out", out])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if len(json.loads(Path(out, "_PACKING").read_text())["shards"]) >= 2:
                break
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(f"{out}/index.json"), "the pack finished before it could be killed"
    with pytest.raises(FormatError):
        open_corpus(out)
    rerun = subprocess.run([sys.executable, "-m", "loaders", "pack", *args, "--out", out], capture_output=True,
                           text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert "finished shards verified and kept" in rerun.stderr
    assert main(["pack", *args, "--out", fresh]) == 0
    assert json.loads(Path(out, "index.json").read_text()) == json.loads(Path(fresh, "index.json").read_text())
