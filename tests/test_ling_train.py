"""ling_train trainer on CPU: loss falls, balance and z losses act, spikes and NaNs are skipped, resume is
bit-exact, the config loads from TOML, and a 2-process torchrun (gloo) run trains and commits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ling_train import CheckpointManager, TrainConfig, train
from ling_train.cli import main
from ling_train.corpus import sample_texts, write_text_corpus
from pcache.errors import ConfigError

SMALL = {"batch_size": 4, "seq_len": 64, "threads": 1, "log_every": 1000, "warmup_steps": 5}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("ling-corpus") / "corpus")
    write_text_corpus(path, sample_texts(1500, seed=1))
    return path


def _cfg(corpus: str, **kw: Any) -> TrainConfig:
    return TrainConfig.load(data=(corpus,), **{**SMALL, **kw})


def test_loss_decreases_on_a_tiny_run(corpus: str, tmp_path: Path) -> None:
    log_file = tmp_path / "m.jsonl"
    result = train(_cfg(corpus, steps=40, lr=3e-3, log_file=str(log_file)))
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert len(records) == 40
    assert {"loss", "tokens_per_s", "mfu", "load_max_over_mean", "router_entropy", "lr"} <= set(records[0])
    assert len(records[0]["load_max_over_mean"]) == 3  # tiny: 4 layers, the first dense


def _mean_imbalance(result: Any) -> float:
    return sum(result.load_max_over_mean) / len(result.load_max_over_mean)


def test_balance_loss_improves_expert_load_balance(corpus: str) -> None:
    without = train(_cfg(corpus, steps=30, balance_coef=0.0, z_coef=0.0))
    with_balance = train(_cfg(corpus, steps=30, balance_coef=0.1, z_coef=0.0))
    assert _mean_imbalance(with_balance) < _mean_imbalance(without)


def test_z_loss_lowers_router_logit_magnitude(corpus: str) -> None:
    without = train(_cfg(corpus, steps=30, z_coef=0.0))
    with_z = train(_cfg(corpus, steps=30, z_coef=0.1))
    # The z-loss penalizes logsumexp(logits)^2: the log-partition, i.e. the logits' overall scale.
    assert sum(with_z.router_z) < 0.5 * sum(without.router_z)


def test_spike_is_skipped_and_reinjected_nan_is_skipped(corpus: str) -> None:
    params: dict[int, list[torch.Tensor]] = {}
    trainer_ref: list[Any] = []

    def hook(step: int, loss: torch.Tensor) -> torch.Tensor:
        from ling_train.trainer import Trainer  # noqa: F401 - the hook sees the live model below

        if trainer_ref:
            params[step] = [p.detach().clone() for p in trainer_ref[0].model.parameters()]
        if step == 25:
            return loss * 50  # injected spike
        if step == 28:
            return loss * float("nan")
        return loss

    from ling_train.trainer import Trainer

    trainer = Trainer(_cfg(corpus, steps=32, spike_window=10, spike_k=3.0, reinject_after=2), loss_hook=hook)
    trainer_ref.append(trainer)
    result = trainer.run()
    assert result.statuses[26] == "spike" and result.statuses[29] == "nonfinite_loss"
    assert result.counts["spikes"] == 1 and result.counts["nonfinite_loss"] == 1
    assert result.counts["reinjected"] == 1
    # Skipped steps leave the weights untouched; a normal step changes them.
    assert all(torch.equal(a, b) for a, b in zip(params[25], params[26], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(params[28], params[29], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(params[24], params[25], strict=True))


def test_repeated_spikes_cut_the_lr(corpus: str) -> None:
    result = train(_cfg(corpus, steps=20, spike_window=5, spike_k=2.0, spike_patience=2, spike_lr_factor=0.5),
                   loss_hook=lambda step, loss: loss * 100 if step in (12, 14) else loss)
    assert result.counts["spikes"] == 2 and result.counts["lr_cuts"] == 1


def test_resumed_run_reproduces_the_next_losses_bit_exactly(corpus: str, tmp_path: Path) -> None:
    base = {"steps": 16, "routing_warmup_steps": 20, "cache_dir": str(tmp_path / "cache")}
    full = train(_cfg(corpus, **base, ckpt=f"pcache::file://{tmp_path}/a", ckpt_every=8))
    # The interrupted job: same settings (same LR schedule), stopped after its step-8 checkpoint.
    train(_cfg(corpus, **base, stop_at=8, ckpt=f"pcache::file://{tmp_path}/b", ckpt_every=8))
    resumed = train(_cfg(corpus, **base, ckpt=f"pcache::file://{tmp_path}/b", ckpt_every=8, resume=True))
    assert resumed.start_step == 8
    assert [resumed.losses[s] for s in range(9, 17)] == [full.losses[s] for s in range(9, 17)]
    a = CheckpointManager(f"pcache::file://{tmp_path}/a", cache_dir=str(tmp_path / "cache"))
    b = CheckpointManager(f"pcache::file://{tmp_path}/b", cache_dir=str(tmp_path / "cache"))
    sa, sb = a.load(16), b.load(16)
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    assert sa["meta"]["loader"]["position"] == sb["meta"]["loader"]["position"] == 16 * 4


def test_config_from_toml_env_and_flags(corpus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "train.toml"
    toml.write_text(f'[ling_train]\ndata = ["{corpus}"]\nsteps = 7\nbatch_size = 2\n')
    monkeypatch.setenv("LING_TRAIN_STEPS", "9")
    cfg = TrainConfig.load(str(toml), batch_size=3)
    assert (cfg.data, cfg.steps, cfg.batch_size) == ((corpus,), 9, 3)
    toml.write_text("[ling_train]\nstepz = 1\n")
    with pytest.raises(ConfigError, match="stepz"):
        TrainConfig.load(str(toml))
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert main(["--data", str(tmp_path / "no-such-corpus"), "--steps", "1"]) == 2


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_torchrun_gloo_trains_and_commits(corpus: str, tmp_path: Path, parallel: str) -> None:
    ckpt = f"pcache::file://{tmp_path}/ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ling_train.cli", "--data", corpus, "--steps", "6", "--batch-size", "2", "--seq-len", "32",
           "--threads", "1", "--ckpt", ckpt, "--ckpt-every", "3", "--cache-dir", str(tmp_path / "cache"),
           "--log-every", "1", "--parallel", parallel]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step      6/6" in proc.stderr
    mgr = CheckpointManager(ckpt, cache_dir=str(tmp_path / "cache"))
    assert mgr.committed_steps() == [3, 6]
    marker = json.loads((tmp_path / "ckpt" / "step_000006" / "_COMMITTED").read_text())
    # A DCP directory; both ranks write data (DDP: each about half of the replicated state).
    assert sorted(f["path"] for f in marker["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    state = mgr.load(6)
    assert state["meta"]["loader"]["position"] == 6 * 2 * 2 and state["meta"]["world_size"] == 2
    assert {"local.rank00000", "local.rank00001"} <= {f"local.{k}" for k in state["local"]}
