"""Memory snapshots of ling-train (``--snapshot-every``, ling_train.shmsnap): kill -9 then a restart resumes
from shared memory; a corrupt, truncated or foreign segment is ignored with a log line and the restart takes
the committed step; SIGTERM and an exception persist the newest snapshot; a clean exit and
``ling-train ckpt clean-shm`` remove the segments. Real CLI subprocesses, real /dev/shm segments (each test
has its own job id and removes what it created)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_ling_interrupt import Run

from ling_train import CheckpointManager, TrainConfig
from ling_train.cli import main
from ling_train.corpus import sample_texts, write_text_corpus
from ling_train.shmsnap import HEADER, Segment, job_hash, job_segments, remove_segments
from ling_train.trainer import train

ARGS = ["--batch-size", "2", "--seq-len", "32", "--threads", "1", "--log-every", "1", "--seed", "3"]
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("ling-shm") / "corpus")
    write_text_corpus(path, sample_texts(300, seed=4))
    return path


@pytest.fixture
def job() -> Iterator[str]:
    """A job id of this test alone; its segments are removed afterwards."""
    name = f"test-shm-{uuid.uuid4().hex[:12]}"
    yield name
    remove_segments(job_segments(job_hash("", name)))


def _args(corpus: str, tmp_path: Path, job: str, *extra: str) -> list[str]:
    return ["--data", corpus, "--ckpt", f"pcache::file://{tmp_path / 'ckpt'}", "--cache-dir", str(tmp_path / "cache"),
            "--job-id", job, "--resume-if-exists", *ARGS, *extra]


def _kill9_after(args: list[str], step: int) -> None:
    """Run the CLI until it printed ``step`` (its snapshot of that step is being written), then kill -9 it."""
    run = Run(args, ENV)
    run.wait_for(rf"^step\s+{step}/")
    os.kill(run.proc.pid, signal.SIGKILL)
    run.finish()


def test_kill9_then_restart_resumes_from_memory_and_the_losses_continue(corpus: str, tmp_path: Path,
                                                                        job: str) -> None:
    steps, log = 14, tmp_path / "restart.jsonl"
    args = _args(corpus, tmp_path, job, "--steps", str(steps), "--snapshot-every", "1", "--ckpt-every", "1000")
    _kill9_after(args, 5)
    segment = Segment(job_hash("", job), 0, 1)
    snap = max(segment.scan())  # no commit happened (only at the end): memory is all there is
    assert snap >= 3 and CheckpointManager(args[3], cache_dir=str(tmp_path / "cache")).latest_step() is None

    code, err = Run([*args, "--log-file", str(log)], ENV).finish()
    assert code == 0, err
    assert f"resumed from memory snapshot at step {snap} " in err
    losses = {r["step"]: r["loss"] for r in map(json.loads, log.read_text().splitlines())}
    assert min(losses) == snap + 1
    cfg = TrainConfig.load(data=(corpus,), steps=steps, batch_size=2, seq_len=32, threads=1, seed=3, log_every=1000)
    reference = train(cfg).losses
    assert [losses[s] for s in range(snap + 1, steps + 1)] == pytest.approx(
        [reference[s] for s in range(snap + 1, steps + 1)], rel=1e-5)
    assert not os.path.exists(segment.path)  # a clean exit removes the segment


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_a_damaged_segment_is_ignored_and_the_restart_takes_the_committed_step(corpus: str, tmp_path: Path,
                                                                               job: str, damage: str) -> None:
    args = _args(corpus, tmp_path, job, "--steps", "1000", "--snapshot-every", "1", "--ckpt-every", "3")
    _kill9_after(args, 7)
    committed = CheckpointManager(args[3], cache_dir=str(tmp_path / "cache")).latest_step()
    segment = Segment(job_hash("", job), 0, 1)
    assert committed is not None and max(segment.scan()) > committed  # memory would win, were it intact
    size = os.path.getsize(segment.path)
    if damage == "corrupt":  # one byte inside each slot's payload
        capacity = (size - 2 * HEADER) // 2
        with open(segment.path, "r+b") as f:
            for slot in (0, 1):
                f.seek(2 * HEADER + slot * capacity + 1000)
                byte = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte[0] ^ 0x01]))
    else:
        os.truncate(segment.path, size // 2)
    run = Run(args, ENV)
    line = run.wait_for(rf"memory snapshot {segment.path} slot \d ignored: ")
    assert ("corrupt (checksum mismatch" if damage == "corrupt" else "truncated (") in line
    run.wait_for(rf"resumed from committed step {committed} ")
    run.proc.kill()
    _, err = run.finish()
    assert "resumed from memory snapshot" not in err


def test_a_segment_of_another_job_is_never_loaded(corpus: str, tmp_path: Path, job: str) -> None:
    args = _args(corpus, tmp_path, job, "--steps", "1000", "--snapshot-every", "1", "--ckpt-every", "1000")
    _kill9_after(args, 3)
    other = f"{job}-other"
    theirs = Segment(job_hash("", other), 0, 1).path
    try:
        shutil.copyfile(Segment(job_hash("", job), 0, 1).path, theirs)  # a stale file under the other job's name
        run = Run([a if a != job else other for a in args], ENV)
        line = run.wait_for(rf"memory snapshot {theirs} slot \d ignored: ")
        assert "other job" in line
        run.wait_for(r"^step\s+1/")  # started from scratch: nothing committed, nothing of its own in memory
        run.proc.kill()
        _, err = run.finish()
        assert "resumed from" not in err
    finally:
        remove_segments([theirs])


def test_sigterm_persists_the_newest_snapshot_and_removes_the_segment(corpus: str, tmp_path: Path, job: str) -> None:
    args = _args(corpus, tmp_path, job, "--steps", "1000", "--snapshot-every", "4", "--ckpt-every", "1000")
    run = Run(args, ENV)
    run.wait_for(r"^step\s+5/")
    run.proc.send_signal(signal.SIGTERM)
    code, err = run.finish()
    assert code == 143, err
    stopped = int(err.split("stopped by SIGTERM after step ")[1].split()[0])
    assert f"persisted memory snapshot at step {stopped}: committed" in err
    assert f"last committed checkpoint: step {stopped} " in err
    manager = CheckpointManager(args[3], cache_dir=str(tmp_path / "cache"))
    assert manager.committed_steps() == [stopped] and manager.load(stopped)["step"] == stopped
    assert not os.path.exists(Segment(job_hash("", job), 0, 1).path)


def test_an_exception_in_the_loop_persists_the_newest_snapshot(corpus: str, tmp_path: Path, job: str) -> None:
    cfg = TrainConfig.load(data=(corpus,), steps=20, batch_size=2, seq_len=32, threads=1, ckpt_every=1000,
                           snapshot_every=3, job_id=job, ckpt=f"pcache::file://{tmp_path / 'ckpt'}",
                           cache_dir=str(tmp_path / "cache"))

    def hook(step: int, loss: torch.Tensor) -> torch.Tensor:
        if step == 7:  # mid-step 8: the live state is half-updated, snapshot 6 is the newest whole one
            raise RuntimeError("injected failure")
        return loss

    with pytest.raises(RuntimeError, match="injected failure"):
        train(cfg, loss_hook=hook)
    manager = CheckpointManager(cfg.ckpt, cache_dir=cfg.cache_dir)
    assert manager.committed_steps() == [6] and manager.load(6)["step"] == 6
    assert job_segments(job_hash("", job)) == []


def test_an_interrupted_write_leaves_the_previous_snapshot(job: str, monkeypatch: pytest.MonkeyPatch) -> None:
    segment = Segment(job_hash("", job), 0, 1)
    state = {"step": 1, "w": torch.arange(300_000, dtype=torch.float32)}
    segment.write(1, state)
    segment.write(2, {**state, "step": 2})
    assert sorted(segment.scan()) == [1, 2]

    def dies(self: object, data: object) -> int:
        raise SystemExit("killed mid-write")

    monkeypatch.setattr("ling_train.shmsnap._SlotWriter.write", dies)
    with pytest.raises(SystemExit):
        segment.write(3, {**state, "step": 3})  # overwrites step 1's slot, killed before its header
    monkeypatch.undo()
    assert sorted(segment.scan()) == [2]
    assert torch.equal(segment.load(2)["w"], state["w"])  # type: ignore[index]
    assert Segment(segment.job, 0, 2).scan() == {}  # another world size: never loaded


def test_ckpt_clean_shm_removes_a_jobs_segments(job: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"pcache::s3://user:secret@bucket/{job}"
    for rank in (0, 1):
        Segment(job_hash("", job), rank, 2).write(1, {"step": 1})
        Segment(job_hash(url), rank, 2).write(1, {"step": 1})
    assert all("secret" not in p and "bucket" not in p for p in job_segments(job_hash(url)))
    assert job_hash(url) == job_hash(f"pcache::s3://bucket/{job}/")  # credentials do not change the job
    assert main(["ckpt", "clean-shm", "--job-id", job]) == 0
    assert job_segments(job_hash("", job)) == [] and len(job_segments(job_hash(url))) == 2
    assert main(["ckpt", "clean-shm", url]) == 0
    assert job_segments(job_hash(url)) == []
    assert "2 memory snapshot segment(s) removed" in capsys.readouterr().out
    assert main(["ckpt", "clean-shm"]) == 2  # which job? refused
    monkeypatch.setenv("LING_SHM_DIR", str(tmp_path))  # --all, on a directory of this test's own
    Segment(job_hash("", job), 0, 1).write(1, {"step": 1})
    (tmp_path / "unrelated").write_bytes(b"x")
    assert main(["ckpt", "clean-shm", "--all"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unrelated"]


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _torchrun(cmd: list[str], env: dict[str, str], until: str) -> tuple[subprocess.Popen[str], str]:
    """Start torchrun; return it and its stderr up to the first line matching ``until``."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        if re.match(until, line):
            break
    return proc, "".join(lines)


def _kill_all(proc: subprocess.Popen[str]) -> None:
    """kill -9 torchrun's workers (each in its own session) and torchrun."""
    for child in _children(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    proc.kill()
    proc.wait(30)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_kill9_of_one_rank_then_restart_resumes_both_from_memory_at_the_common_step(corpus: str, tmp_path: Path,
                                                                                    job: str, parallel: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ling_train.cli", *_args(corpus, tmp_path, job, "--steps", "1000", "--snapshot-every", "2",
                                            "--ckpt-every", "1000", "--parallel", parallel)]
    env = {**os.environ, **ENV}
    proc, _ = _torchrun(cmd, env, r"^step\s+5/")
    try:
        os.kill(_children(proc.pid)[-1], signal.SIGKILL)  # one rank; torchrun then stops the other
        proc.communicate(timeout=120)
    finally:
        _kill_all(proc)
    job_id = job_hash("", job)
    common = max(set(Segment(job_id, 0, 2).scan()) & set(Segment(job_id, 1, 2).scan()))
    assert common >= 2
    restart, err = _torchrun(cmd, env, rf"^step\s+{common + 2}/")
    _kill_all(restart)
    assert err.count(f"resumed from memory snapshot at step {common} ") == 2, err[-3000:]
