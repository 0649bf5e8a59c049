"""Clean interrupts of ling-train: SIGINT during training and during a checkpoint persist, SIGTERM after a
resume, --resume with nothing to resume, ``ckpt list`` and the metrics' run id. Each subprocess run is the
real CLI (``python -m ling_train.cli``); checkpoints go to local files or, through a slow proxy, to the real
SeaweedFS, so a persist is reliably in flight when the signal lands."""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ling_train import CheckpointManager
from ling_train.cli import main
from ling_train.corpus import sample_texts, write_text_corpus
from pcache import CacheConfig
from pcache.admin import pending_uploads
from pcache.s3server import REGION
from pcache.testing import SeaweedServer

ARGS = ["--steps", "1000", "--batch-size", "2", "--seq-len", "32", "--threads", "1", "--log-every", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("ling-interrupt") / "corpus")
    write_text_corpus(path, sample_texts(300, seed=7))
    return path


class Run:
    """A ``python -m ling_train.cli`` process whose stderr lines arrive on a queue."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "ling_train.cli", *args], stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 120) -> str:
        """The first new line matching ``pattern``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if re.search(pattern, line):
                return line
        self.proc.kill()
        raise AssertionError(f"no line matching {pattern!r}; stderr so far:\n{''.join(self.lines)}")

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        """Wait for the exit; (exit code, the whole stderr)."""
        try:
            code = self.proc.wait(timeout)
        finally:
            self.proc.kill()
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return code, "".join(self.lines)


def _step_line(step: int) -> str:
    return rf"^step\s+{step}/"


def _committed_all_load(root: str, cache: Path) -> list[int]:
    """Every step that looks committed loads and matches its marker; return them."""
    manager = CheckpointManager(root, cache_dir=str(cache))
    steps = manager.committed_steps()
    for step in steps:
        assert manager.load(step)["step"] == step
    return steps


def test_sigint_during_training_stops_at_a_step_boundary_and_sigterm_after_resume(corpus: str,
                                                                                  tmp_path: Path) -> None:
    root, cache, log = f"pcache::file://{tmp_path / 'ckpt'}", tmp_path / "cache", tmp_path / "m.jsonl"
    args = ["--data", corpus, "--ckpt", root, "--ckpt-every", "2", "--cache-dir", str(cache),
            "--log-file", str(log), *ARGS]
    run = Run(args)
    run.wait_for(_step_line(5))
    run.proc.send_signal(signal.SIGINT)
    code, err = run.finish()
    assert code == 130 and "Traceback" not in err, err
    stopped = int(re.search(r"stopped by SIGINT after step (\d+)", err).group(1))  # type: ignore[union-attr]
    last = int(re.search(r"last committed checkpoint: step (\d+) under " + re.escape(root), err).group(1))  # type: ignore[union-attr]
    assert 5 <= stopped <= 7 and last == stopped - stopped % 2  # the in-flight save was finished, not dropped
    assert _committed_all_load(root, cache)[-1] == last
    command = re.search(r"resume with: (.*)$", err, re.M).group(1)  # type: ignore[union-attr]
    assert shlex.split(command) == ["ling-train", *args, "--resume"]

    resumed = Run(shlex.split(command)[1:])
    resumed.wait_for(rf"resumed from committed step {last} ")
    resumed.wait_for(_step_line(last + 2))
    resumed.proc.send_signal(signal.SIGTERM)
    code, err = resumed.finish()
    assert code == 143 and "Traceback" not in err and "stopped by SIGTERM" in err, err
    steps = _committed_all_load(root, cache)
    assert f"last committed checkpoint: step {steps[-1]} " in err
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(r["run_id"] and r["time"] > 0 for r in records)
    assert len({r["run_id"] for r in records}) == 2  # one id per run, both runs in the same file


@pytest.fixture
def slow_s3(s3_server: SeaweedServer, bucket: str, chaos_proxy: object) -> tuple[dict[str, str], object, str]:
    """(environment for the CLI through a slow proxy, the proxy, the checkpoint root in ``bucket``)."""
    proxy = chaos_proxy(latency_s=0.3)  # type: ignore[operator]
    env = {"AWS_ENDPOINT_URL": proxy.endpoint_url, "AWS_ACCESS_KEY_ID": s3_server.access_key,
           "AWS_SECRET_ACCESS_KEY": s3_server.secret_key, "AWS_REGION": REGION}
    return env, proxy, f"pcache::s3://{bucket}/run"


def _manager_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_sigint_during_a_checkpoint_persist_finishes_and_commits_it(corpus: str, tmp_path: Path, slow_s3: tuple,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    env, _, root = slow_s3
    cache = tmp_path / "cache"
    run = Run(["--data", corpus, "--ckpt", root, "--ckpt-every", "3", "--cache-dir", str(cache), *ARGS], env)
    run.wait_for(_step_line(3))  # printed once save() returned: the persist of step 3 has just started
    run.proc.send_signal(signal.SIGINT)
    code, err = run.finish()
    assert code == 130 and "Traceback" not in err, err
    assert "checkpoint step 3 was in flight: finished and committed before exiting" in err
    assert f"last committed checkpoint: step 3 under {root}" in err
    _manager_env(monkeypatch, env)
    assert _committed_all_load(root, cache) == [3]


def test_second_sigint_abandons_a_persist_that_is_not_durable(corpus: str, tmp_path: Path, slow_s3: tuple,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    env, proxy, root = slow_s3
    cache = tmp_path / "cache"
    run = Run(["--data", corpus, "--ckpt", root, "--ckpt-every", "3", "--cache-dir", str(cache), *ARGS], env)
    run.wait_for(_step_line(1))
    proxy.latency_s = 3.0  # every request of the upload waits: step 3 cannot be durable for a while
    run.wait_for(_step_line(3))
    run.proc.send_signal(signal.SIGINT)
    run.wait_for("signal again to abandon it")
    config = CacheConfig.load(cache_dir=str(cache))
    deadline = time.monotonic() + 60
    while not pending_uploads(config) and time.monotonic() < deadline:  # staged, not durable: the slow upload
        time.sleep(0.05)
    run.proc.send_signal(signal.SIGINT)
    code, err = run.finish()
    assert code == 130 and "Traceback" not in err, err
    assert "checkpoint step 3 abandoned: never committed" in err
    assert f"no checkpoint committed under {root} by this run" in err and "--resume-if-exists" in err
    # The staged file is delivered by pcache's uploader once the store is fast again, and stays uncommitted.
    proxy.latency_s = 0.0
    deadline = time.monotonic() + 90
    while pending_uploads(config) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pending_uploads(config) == []
    _manager_env(monkeypatch, env)
    assert _committed_all_load(root, cache) == []
    assert main(["ckpt", "list", root, "--cache-dir", str(cache), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["steps"] == [] and listed["uncommitted"] == [3] and listed["resume_step"] is None


def test_resume_with_nothing_to_resume_exits_2_unless_if_exists(corpus: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "typo")
    common = ["--data", corpus, "--ckpt", root, "--steps", "2", "--batch-size", "2", "--seq-len", "32",
              "--threads", "1", "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"ling-train: --resume: nothing to resume under {root}: no committed checkpoint there "
                           "(mistyped --ckpt?); pass --resume-if-exists to start from step 0 when there is none")
    assert main([*common, "--resume-if-exists"]) == 0
    assert CheckpointManager(root, cache_dir=str(tmp_path / "cache")).committed_steps() == [2]


def test_ckpt_list_shows_committed_steps_sizes_and_latest(corpus: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    root, cache = str(tmp_path / "ckpt"), str(tmp_path / "cache")
    assert main(["--data", corpus, "--ckpt", root, "--steps", "4", "--ckpt-every", "2", "--batch-size", "2",
                 "--seq-len", "32", "--threads", "1", "--cache-dir", cache]) == 0
    (tmp_path / "ckpt" / "step_000006").mkdir()
    (tmp_path / "ckpt" / "step_000006" / "rank00000.pt").write_bytes(b"torn")  # a save that never committed
    capsys.readouterr()
    assert main(["ckpt", "list", root, "--cache-dir", cache]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s+2\s+\d+\.\d MiB$", out, re.M), out
    assert re.search(r"^\s+4\s+\d+\.\d MiB  <- latest$", out, re.M), out
    assert re.search(r"^\s+6\s+not committed", out, re.M), out
    assert main(["ckpt", "list", root, "--cache-dir", cache, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    manager = CheckpointManager(root, cache_dir=cache)
    assert [s["step"] for s in data["steps"]] == [2, 4] and data["latest"] == data["resume_step"] == 4
    assert data["steps"][1]["bytes"] == manager.bytes_at_origin(4) > 0
    assert main(["ckpt", "list", str(tmp_path / "nothing-here")]) == 2
    assert "not found" in capsys.readouterr().err
