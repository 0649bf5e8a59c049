"""ling_train benchmarks: what asynchronous checkpoints through pcache cost the training loop.

All on CPU, preset ``small`` (about 19M parameters; model + AdamW state about 220 MB), batch 4 x 128 tokens,
data from a local generated corpus, checkpoints to ``pcache::s3://`` on the benchmark's SeaweedFS server.

Rows (values are 1/seconds, so every ratio is baseline_seconds / our_seconds and "at most X times" targets
become "ratio at least 1/X"):

``stall``
    Training-thread stall per checkpoint (waiting for the previous persist + the host snapshot) against a
    synchronous ``torch.save`` of the same state to the same destination (a pcache write-back file, then
    ``flush`` until durable at the origin: what a synchronous checkpoint must wait for). Target <= 0.02x.
``step_while_persisting``
    Per persist: median time of the steps that ran while it was in flight, against the median time of the
    same steps (same batches) in a run without checkpointing. Target <= 1.1x.
``durable``
    Snapshot end until this rank's file is durable at the origin (serialize, stage with fsync, upload),
    measured with no step running, against a raw ``s3fs.pipe_file`` of the same bytes to the same bucket.
    Target <= 1.2x. ``durable_while_training`` (informational) is the same for the periodic checkpoints,
    taken while the steps go on.
``restart_from_memory``
    Restart to the first step from the memory snapshot against a restart from the committed step at the
    origin (bench/_ling_restart.py). Target <= 0.3x.

Groups ``ling_spread`` (writes spread over 2 DDP ranks) and ``ling_dcp_vs_async`` (against DCP's
``async_save`` plus a raw upload) live in :mod:`bench.ling_dcp_bench`.

``commit`` (group ``ling_commit``, :mod:`bench._ling_commit`)
    Snapshot end -> committed at the origin for a 512 MiB file through pcache with streaming upload,
    against a raw ``s3fs.pipe_file`` of the same bytes (target <= 1.1x); ``commit_no_stream`` is the same
    with ``stream_uploads=false``.

No GPU is used here: GPU tokens/s and MFU in bf16 are not measured by this module.
"""

from __future__ import annotations

import io
import os
import statistics
import time
from pathlib import Path
from typing import Any

import s3fs
import torch

from bench import ling_dcp_bench
from bench._common import env_int, log, make_row, repeats, run_groups, settle
from bench._ling_commit import commit_rows
from bench._ling_restart import restart_rows
from ling_train.config import TrainConfig
from ling_train.corpus import sample_texts, write_text_corpus
from ling_train.trainer import Trainer, TrainResult
from pcache.testing import SeaweedServer

NAME = "ling"
TARGETS = {"stall": 1 / 0.02, "step": 1 / 1.1, "durable": 1 / 1.2}


def _cfg(corpus: str, workdir: Path, steps: int, ckpt: str, every: int) -> TrainConfig:
    return TrainConfig.load(preset="small", data=(corpus,), steps=steps, batch_size=4, seq_len=128, threads=1,
                            log_every=10_000, ckpt=ckpt, ckpt_every=every, keep_last=2, warmup_steps=2,
                            cache_dir=str(workdir / "cache"))


def _persisting_steps(result: TrainResult) -> list[list[int]]:
    """Per save: indices of the steps that started after the save returned and ended before its persist did."""
    out = []
    for save in result.saves:
        idx = [i for i, end in enumerate(result.step_ends)
               if end - result.step_times[i] >= save.started_at and end <= save.finished_at]
        if idx:
            out.append(idx)
    return out


def run(server: SeaweedServer, workdir: Path) -> list[dict[str, Any]]:
    """This module's groups: ``ling_commit`` (streaming upload to committed), ``ling`` (below) and the DCP
    ones of :mod:`bench.ling_dcp_bench`."""
    rows = run_groups(NAME, [("ling_commit", lambda: commit_rows(server, workdir))])
    rows += run_groups(NAME, [("ling", lambda: _async_rows(server, workdir))])
    return rows + ling_dcp_bench.groups(server, workdir)


def _async_rows(server: SeaweedServer, workdir: Path) -> list[dict[str, Any]]:
    """Measure stall, step time under persist, and time to durable (see the module docstring)."""
    bucket = server.make_bucket("bench-ling")
    corpus = str(workdir / "corpus")
    write_text_corpus(corpus, sample_texts(3000, seed=3))
    os.environ.setdefault("AWS_ACCESS_KEY_ID", server.access_key)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", server.secret_key)
    ckpt_root = f"pcache::s3://{bucket}/run"
    every = env_int("BENCH_LING_CKPT_EVERY", 8)
    saves = max(3, repeats())
    steps = every * (saves + 1)
    opts = server.storage_options()

    log(f"ling: {steps} steps without checkpoints")
    settle()
    plain = Trainer(_cfg(corpus, workdir, steps, "", 0)).run()
    log(f"ling: {steps} steps with a checkpoint every {every}")
    settle()
    trainer = Trainer(_cfg(corpus, workdir, steps, ckpt_root, every), ckpt_options=opts)
    withck = trainer.run()
    periodic = [s for s in withck.saves if s.step < steps]
    stalls = [s.stall for s in periodic]
    durable = [s.durable for s in periodic]
    nbytes = periodic[0].nbytes

    log("ling: synchronous torch.save baselines and raw uploads")
    sync_s, raw_s, idle_durable = [], [], []
    s3 = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    assert trainer.ckpt is not None
    for i in range(len(periodic)):
        settle()
        seconds, _ = trainer.ckpt.save_synchronously(f"sync-baseline-{i}", trainer.state())
        sync_s.append(seconds)
        settle()
        save = trainer.ckpt.save(20_000 + i, trainer.state())  # the same pipeline with no step running
        trainer.ckpt.wait()
        idle_durable.append(save.durable)
        log(f"ling: idle save staged in {save.staged:.2f}s, durable {save.durable:.2f}s")
        buf = io.BytesIO()
        torch.save(trainer.state(), buf)
        payload = buf.getvalue()
        settle()
        t0 = time.perf_counter()
        s3.pipe_file(f"{bucket}/raw-upload/{i}.pt", payload)
        raw_s.append(time.perf_counter() - t0)

    # Paired by step index: the same steps (same batches, same compute) of the run without checkpoints.
    windows = _persisting_steps(withck)
    during = [statistics.median(withck.step_times[i] for i in idx) for idx in windows]
    base_steps = [statistics.median(plain.step_times[i] for i in idx) for idx in windows]
    med_plain = statistics.median(plain.step_times[2:])
    extra = {"state_bytes": nbytes, "stall_s": stalls, "snapshot_s": [s.snapshot for s in periodic],
             "durable_s": durable, "staged_s": [s.staged for s in periodic], "committed_s": [s.committed for s in periodic],
             "steps_during_persist": sum(len(w) for w in windows), "step_s_no_ckpt_median": med_plain}
    log(f"ling: stalls {stalls} sync {sync_s} durable {durable} idle durable {idle_durable} raw {raw_s} "
        f"during {during} base {base_steps}")
    rows = [
        make_row(module=NAME, key="stall", measure="training stall per checkpoint (async snapshot)", unit="1/s",
                 values=[1 / s for s in stalls], seconds=stalls,
                 baseline="synchronous torch.save of the same state to the same pcache destination, until durable",
                 baseline_values=[1 / s for s in sync_s], baseline_seconds=sync_s, target=TARGETS["stall"],
                 nbytes=nbytes, notes="ratio = sync seconds / stall seconds; target <= 0.02x means ratio >= 50",
                 extra=extra),
        make_row(module=NAME, key="step_while_persisting", measure="step time while a persist runs (CPU, small)",
                 unit="1/s", values=[1 / s for s in during], seconds=during,
                 baseline="the same steps without checkpointing (median per persist window)", baseline_values=[1 / s for s in base_steps],
                 baseline_seconds=base_steps, target=TARGETS["step"],
                 notes="ratio = no-ckpt median / during-persist median; target <= 1.1x means ratio >= 0.909. "
                       "2 shared cores: the persist thread and the uploader process compete with the step",
                 extra=extra),
        make_row(module=NAME, key="durable", measure="snapshot end -> file durable at the origin (no step running)",
                 unit="1/s", values=[1 / s for s in idle_durable], seconds=idle_durable,
                 baseline="raw s3fs pipe_file of the same bytes", baseline_values=[1 / s for s in raw_s],
                 baseline_seconds=raw_s, target=TARGETS["durable"], nbytes=nbytes,
                 notes="ours includes torch.save serialization, local fsync and the background upload; "
                       "target <= 1.2x means ratio >= 0.833", extra=extra),
        make_row(module=NAME, key="durable_while_training",
                 measure="snapshot end -> file durable at the origin, while training continues", unit="1/s",
                 values=[1 / s for s in durable], seconds=durable,
                 baseline="raw s3fs pipe_file of the same bytes", baseline_values=[1 / s for s in raw_s],
                 baseline_seconds=raw_s, target=None, nbytes=nbytes,
                 notes="informational: the persist thread and the niced uploader yield the CPU to the steps",
                 extra=extra),
    ]
    rows += run_groups(NAME, [("ling_restart", lambda: restart_rows(NAME, _cfg(corpus, workdir, steps, ckpt_root, every),
                                                                     workdir, opts))], filtered=False)
    server.delete_bucket(bucket)
    return rows
