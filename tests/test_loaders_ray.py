"""``loaders pack --engine ray`` on a real local Ray cluster (2 CPUs): byte-identical to ``--engine local``,
resumable after the driver is killed, and unaffected by a Ray worker killed mid-task."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loaders.formats.pack import pack

ray = pytest.importorskip("ray")

WORDS = ["".join(random.Random(i).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(2 + i % 8)) for i in range(900)]


def _doc(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + rng.choice(["", " é", " 数据", "\n\n"])


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local Ray cluster with 2 worker CPUs, shared by this module's tests; its GCS address."""
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="warning",
             log_to_driver=False, object_store_memory=256 << 20)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], str]:
    """JSONL (one file large enough to split into ranges, one gzipped), plain text, and a BPE tokenizer.json."""
    import gzip

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("ray-inputs")
    rng = random.Random(7)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([_doc(rng, 40) for _ in range(600)],
                            trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(root / "tokenizer.json"))
    with open(root / "a.jsonl", "w") as fh:
        for i in range(2500):
            fh.write(json.dumps({"text": _doc(rng, rng.randint(3, 120))}) + ("\n\n" if i % 97 == 0 else "\n"))
    with gzip.open(root / "b.jsonl.gz", "wt") as fh:
        for _ in range(300):
            fh.write(json.dumps({"text": _doc(rng, rng.randint(3, 60))}) + "\n")
    (root / "c.txt").write_text(_doc(rng, 2000))
    return [str(root / "a.jsonl"), str(root / "b.jsonl.gz"), str(root / "c.txt")], str(root / "tokenizer.json")


def _files(root: Path) -> dict[str, Any]:
    """Every file's bytes; the commit marker by its file list (its prefix and time name the run)."""
    out: dict[str, Any] = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    if "_COMMITTED" in out:
        out["_COMMITTED"] = json.loads(out["_COMMITTED"])["files"]
    return out


def _pack(inputs: tuple[list[str], str], out: Path, fmt: str, **kw: Any) -> dict[str, Any]:
    return pack(inputs[0], str(out), format=fmt, tokenizer=inputs[1], shard_size="24KiB", progress=False, **kw)


@pytest.mark.parametrize("fmt", ["megatron", "wds", "lmdb"])
def test_ray_output_is_byte_identical_to_local(cluster: str, inputs: tuple[list[str], str], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    monkeypatch.setenv("LOADERS_RAY_RANGE_BYTES", "40000")  # many ranges: lines split across range edges
    local = _pack(inputs, tmp_path / "local", fmt, workers=1)
    remote = _pack(inputs, tmp_path / "ray", fmt, engine="ray", ray_address=cluster)
    assert local == remote and len(local["shards"]) > 5
    assert _files(tmp_path / "local") == _files(tmp_path / "ray")


def test_bad_line_names_file_and_line(cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loaders import FormatError

    monkeypatch.setenv("LOADERS_RAY_RANGE_BYTES", "1000")
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": f"document {i} " * 20}) for i in range(200)]
    lines[150] = '{"text": broken'
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(FormatError, match=rf"{src}:151: not a JSON object"):
        pack([str(src)], str(tmp_path / "out"), format="megatron", engine="ray", ray_address=cluster, progress=False)


def _packing_finished(out: Path) -> int:
    try:
        state = json.loads((out / "_PACKING").read_text())
    except (FileNotFoundError, ValueError):
        return 0
    return len(state.get("shards", [])) + len(state.get("ray", {}).get("finished", []))


def test_killed_driver_rerun_redoes_only_unfinished_shards(cluster: str, inputs: tuple[list[str], str],
                                                           tmp_path: Path) -> None:
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    args = [*inputs[0], "--format", "wds", "--tokenizer", inputs[1], "--shard-size", "8KiB", "--quiet",
            "--engine", "ray", "--ray-address", cluster]
    env = {**os.environ, "LOADERS_RAY_RANGE_BYTES": "20000"}
    driver = subprocess.Popen([sys.executable, "-m", "loaders", "pack", *args, "--out", str(out)], env=env,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _packing_finished(out) < 3 and driver.poll() is None:
        time.sleep(0.005)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert not (out / "index.json").exists(), "the pack finished before its driver could be killed"
    kept = _packing_finished(out)
    assert kept >= 3
    rerun = subprocess.run([sys.executable, "-m", "loaders", "pack", *args, "--out", str(out)], env=env,
                           capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming an interrupted pack: {kept} finished shards verified and kept" in rerun.stderr
    assert f"{kept} reused from an interrupted run" in rerun.stderr
    pack(inputs[0], str(fresh), format="wds", tokenizer=inputs[1], shard_size="8KiB", progress=False)
    assert _files(out) == _files(fresh)


def _title(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().split(b"\0", 1)[0]
    except OSError:
        return b""


def _kill_first(title: str, deadline: float, killed: list[int]) -> None:
    """SIGKILL the first process titled ``title``: the Ray worker process while it runs that task."""
    workers: list[int] = []
    refreshed = 0.0
    while time.monotonic() < deadline and not killed:
        if time.monotonic() - refreshed > 0.05:  # Ray workers are titled ray::IDLE or ray::<task> while running one
            workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _title(int(p)).startswith(b"ray::")]
            refreshed = time.monotonic()
        for pid in workers:
            if _title(pid) == title.encode():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.0005)


@pytest.mark.parametrize("task", ["write_shard", "tokenize_range"])
def test_killed_worker_is_retried_and_output_is_identical(cluster: str, inputs: tuple[list[str], str],
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          task: str) -> None:
    monkeypatch.setenv("LOADERS_RAY_RANGE_BYTES", "200000")
    kw = {"shard_size": "256KiB"}  # shards of a few thousand documents: each write_shard runs for a while
    local = pack(inputs[0], str(tmp_path / "local"), format="wds", tokenizer=inputs[1], progress=False, **kw)
    killed: list[int] = []
    killer = threading.Thread(target=_kill_first, args=(f"ray::{task}", time.monotonic() + 120, killed))
    killer.start()
    try:
        remote = pack(inputs[0], str(tmp_path / "ray"), format="wds", tokenizer=inputs[1], progress=False,
                      engine="ray", ray_address=cluster, **kw)
    finally:
        killed.append(-1)  # stops the killer if it found nothing
        killer.join()
    assert killed[0] > 0, f"no ray::{task} worker was seen running"
    assert remote == local and _files(tmp_path / "local") == _files(tmp_path / "ray")


def test_ray_reads_and_writes_s3_directly(cluster: str, inputs: tuple[list[str], str], tmp_path: Path,
                                          s3_options: dict[str, Any], bucket: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec

    monkeypatch.setenv("LOADERS_RAY_RANGE_BYTES", "60000")
    fs = fsspec.filesystem("s3", **s3_options)
    fs.put_file(inputs[0][0], f"{bucket}/raw/a.jsonl")

    def options_for(url: str) -> dict[str, Any]:  # shipped to the tasks: each opens S3 itself
        return dict(s3_options) if url.startswith("s3://") else {}

    remote = pack([f"s3://{bucket}/raw/a.jsonl"], f"s3://{bucket}/corpus", format="wds", tokenizer=inputs[1],
                  shard_size="24KiB", progress=False, engine="ray", ray_address=cluster, options_for=options_for)
    local = pack([inputs[0][0]], str(tmp_path / "local"), format="wds", tokenizer=inputs[1], shard_size="24KiB",
                 progress=False)
    assert [s["files"] for s in remote["shards"]] == [s["files"] for s in local["shards"]]
    written: dict[str, Any] = {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in fs.find(f"{bucket}/corpus")}
    written["_COMMITTED"] = json.loads(written["_COMMITTED"])["files"]
    assert written == _files(tmp_path / "local") and not fs.exists(f"{bucket}/corpus/_PACKING")


def test_engine_ray_without_ray_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loaders.errors import MissingDependencyError

    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "hello"}\n')
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(MissingDependencyError, match="--engine ray needs the 'ray' package"):
        pack([str(src)], str(tmp_path / "out"), format="megatron", engine="ray", progress=False)


def test_no_documents_is_the_same_error_as_local(cluster: str, tmp_path: Path) -> None:
    from loaders import InvalidParameterError

    src = tmp_path / "in.jsonl"
    src.write_text("\n\n  \n")
    for engine in ("local", "ray"):
        with pytest.raises(InvalidParameterError, match="no documents to write"):
            pack([str(src)], str(tmp_path / engine), format="megatron", engine=engine, ray_address=cluster,
                 progress=False)
