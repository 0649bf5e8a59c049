"""The ``restart_from_memory`` row of the ling module: restart to the first step from the memory snapshot
(``--snapshot-every``, /dev/shm) against a restart from the committed step at the origin (SeaweedFS).

One crashed run: preset ``small`` trains with a commit every 4 steps and a memory snapshot every step,
and dies mid-step 7 (an exception that skips the persist at breakpoint, as kill -9 would), leaving step 4
committed and step 6 in memory. Each repeat then times, in this process, from ``Trainer(cfg)`` (the
restarted process's setup: corpus, model, checkpoint root) to the start of the first step: once with the
snapshot (it loads step 6 from memory), once with ``snapshot_every=0`` (it loads committed step 4 from the
origin), until the first step starts. Both use a fresh pcache directory, as a process restarted on a
replacement node would: nothing of the checkpoint is in a local cache. The interpreter's start and imports,
and the first step's compute (the same for both: about 1.4 s for its cold first forward here), are out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from bench._common import log, make_row, repeats, settle
from ling_train.config import TrainConfig
from ling_train.shmsnap import job_hash, job_segments, remove_segments
from ling_train.trainer import Trainer

TARGET = 1 / 0.3


class _Crash(BaseException):
    """Ends a run the way kill -9 does for this purpose: no persist at breakpoint, the segment stays."""


class _FirstStep(Trainer):
    """Records when the first step starts (the restart is over: training goes on), then ends the run."""

    reached: float = 0.0

    def _step(self, batch: dict[str, torch.Tensor], autocast: Any) -> dict[str, Any]:
        self.reached = time.perf_counter()
        raise _Crash


def _first_step(cfg: TrainConfig, options: dict[str, Any]) -> tuple[float, float, int]:
    """Restart with ``cfg``: (seconds until the first step starts, of which Trainer setup, the resumed step)."""
    t0 = time.perf_counter()
    trainer = _FirstStep(cfg, ckpt_options=options)
    setup = time.perf_counter() - t0
    with contextlib.suppress(_Crash):
        trainer.run()
    return trainer.reached - t0, setup, trainer.step


def restart_rows(module: str, base: TrainConfig, workdir: Path, options: dict[str, Any]) -> list[dict[str, Any]]:
    """Measure the row (see the module docstring); ``base`` is the module's config with its checkpoint root,
    ``options`` the origin's storage options."""
    job = f"bench-{uuid.uuid4().hex[:12]}"
    cfg = dataclasses.replace(base, ckpt=base.ckpt.rstrip("/") + "-restart", ckpt_every=4, steps=1000,
                              snapshot_every=1, job_id=job, resume_if_exists=True)

    def crash(step: int, loss: torch.Tensor) -> torch.Tensor:
        if step == 6:
            raise _Crash
        return loss

    try:
        trainer = Trainer(cfg, loss_hook=crash, ckpt_options=options)
        with contextlib.suppress(_Crash):
            trainer.run()
        assert trainer.ckpt is not None and trainer.snapshots is not None
        trainer.ckpt.wait()
        trainer.snapshots.wait()
        committed = trainer.ckpt.latest_step()
        snapshot_s, stall_s = trainer.snapshots.seconds, trainer.snapshots.stalls
        log(f"ling: crashed run: committed step {committed}, memory snapshot step {trainer.snapshots.newest}, "
            f"snapshot stalls {[round(s, 3) for s in stall_s]} s, background writes "
            f"{[round(s, 3) for s in snapshot_s]} s")
        del trainer
        memory_s, origin_s, setups = [], [], {"memory": [], "origin": []}  # type: dict[str, list[float]]
        for i in range(repeats()):
            for name, c, out in (("memory", cfg, memory_s),
                                 ("origin", dataclasses.replace(cfg, snapshot_every=0), origin_s)):
                cache = workdir / f"restart-cache-{name}-{i}"
                settle()
                seconds, setup, step = _first_step(dataclasses.replace(c, cache_dir=str(cache)), options)
                expected = 6 if name == "memory" else committed
                assert step == expected, f"{name} restart resumed at step {step}, expected {expected}"
                out.append(seconds)
                setups[name].append(setup)
                log(f"ling: restart from {name}: first step after {seconds:.2f}s (setup {setup:.2f}s)")
    finally:
        remove_segments(job_segments(job_hash("", job)))
        for cache in workdir.glob("restart-cache-*"):  # at the end: an abandoned run's threads may still use them
            shutil.rmtree(cache, ignore_errors=True)
    load_memory = [t - s for t, s in zip(memory_s, setups["memory"], strict=True)]
    load_origin = [t - s for t, s in zip(origin_s, setups["origin"], strict=True)]
    extra = {"setup_s": setups, "snapshot_stall_s": stall_s, "snapshot_write_s": snapshot_s, "committed_step": committed, "snapshot_step": 6}
    return [
        make_row(module=module, key="restart_from_memory", measure="restart to the first step, from the memory snapshot",
                 unit="1/s", values=[1 / s for s in memory_s], seconds=memory_s,
                 baseline="restart from the committed step at the origin (SeaweedFS, fresh pcache directory)",
                 baseline_values=[1 / s for s in origin_s], baseline_seconds=origin_s, target=TARGET,
                 notes="from Trainer(cfg) to the start of the first step, interpreter start excluded; ratio = "
                       "origin seconds / memory seconds; target <= 0.3x means ratio >= 3.33. The setup both "
                       "pay (corpus, model init, listing the origin's commits) is in extra.setup_s",
                 extra=extra),
        make_row(module=module, key="restore_from_memory",
                 measure="the state load of a restart (choose + verify + load), from the memory snapshot",
                 unit="1/s", values=[1 / s for s in load_memory], seconds=load_memory,
                 baseline="the same, from the committed step at the origin", baseline_values=[1 / s for s in load_origin],
                 baseline_seconds=load_origin, target=None,
                 notes="informational: restart_from_memory less its setup", extra=extra),
    ]
