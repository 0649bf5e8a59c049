"""ling_train DCP checkpoint benchmarks (module ``ling``; groups ``ling_spread`` and ``ling_dcp_vs_async``).

``ling_spread``
    Checkpoint time (snapshot end until ``_COMMITTED``, rank 0) of a 2-rank DDP state (preset ``small``: model
    plus AdamW state, replicated on both ranks) to ``pcache::s3://``, with DCP's balancing dedup (each rank
    writes about half) against the same with the lowest rank writing every replicated tensor (rank 0 writes
    all: the old layout's behaviour). Target <= 0.65x. The per-rank bytes (max / mean) are in ``extra``.
``ling_dcp_vs_async``
    Save (snapshot end until committed) and load (committed step into the model and optimizer) through our
    writer and reader, against ``torch.distributed.checkpoint.async_save`` to a local directory followed by a
    raw ``s3fs.put`` of the directory (save) and a raw ``s3fs.get`` plus ``dcp.load`` from it (load). Report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import s3fs
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from bench._common import log, make_row, repeats, run_groups, settle
from ling_train.checkpoint import CheckpointManager
from ling_train.config import TrainConfig
from ling_train.parts import build_model, build_optimizer
from pcache.testing import SeaweedServer

NAME = "ling"
SPREAD_TARGET = 1 / 0.65

# Runs under torchrun: every rank builds the same model and AdamW state (DDP replicas) and saves it.
_WORKER = r'''
import json, sys, time, torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict
from ling_train.checkpoint import CheckpointManager
from ling_train.config import TrainConfig
from ling_train.parts import build_model, build_optimizer, setup_distributed

args = json.loads(sys.argv[1])
rank, world, device = setup_distributed()
cfg = TrainConfig.load(preset="small", threads=1)
model, module = build_model(cfg, device, world)
opt = build_optimizer(model, cfg)
module(torch.randint(0, 200, (1, 16))).float().mean().backward()
opt.step()
managers = {spread: CheckpointManager(args["root"] + ("/spread" if spread else "/rank0"), rank=rank, world_size=world,
                                     cache_dir=f"{args['cache']}/{rank}", storage_options=args["opts"], spread=spread)
            for spread in (True, False)}
out = {"spread": {"seconds": [], "rank_bytes": []}, "rank0": {"seconds": [], "rank_bytes": []}}
for i in range(args["repeats"] + 1):  # round 0 warms both up (uploader start, first plans): not counted
    for spread in ((True, False) if i % 2 else (False, True)):  # alternate which goes first
        msd, osd = get_state_dict(model, opt)
        dist.barrier()
        stats = managers[spread].save_sync(i + 1, {"model": msd, "optim": osd})
        dist.barrier()
        print(f"rank {rank} spread={spread} snapshot {stats.snapshot:.2f} staged {stats.staged:.2f} "
              f"durable {stats.durable:.2f} committed {stats.committed:.2f}", file=sys.stderr, flush=True)
        if i:
            out["spread" if spread else "rank0"]["seconds"].append(stats.committed)
            out["spread" if spread else "rank0"]["rank_bytes"].append(stats.rank_bytes)
if rank == 0:
    open(args["out"], "w").write(json.dumps(out))
dist.destroy_process_group()
'''


def _spread(server: SeaweedServer, workdir: Path, bucket: str) -> list[dict[str, Any]]:
    script, out = workdir / "spread_worker.py", workdir / "spread.json"
    script.write_text(_WORKER)
    arg = {"root": f"pcache::s3://{bucket}/spread", "cache": str(workdir / "spread-cache"),
           "opts": server.storage_options(), "repeats": max(3, repeats()), "out": str(out)}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    settle()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(script), json.dumps(arg)], check=True, timeout=1200, env=env)
    res = json.loads(out.read_text())
    ours, base = res["spread"]["seconds"], res["rank0"]["seconds"]
    per_rank = {k: [max(b) / (sum(b) / len(b)) for b in res[k]["rank_bytes"]] for k in ("spread", "rank0")}
    log(f"ling_spread: spread {ours} rank0 {base} max/mean per-rank bytes {per_rank}")
    return [make_row(module=NAME, key="ckpt_2rank_ddp_spread", unit="1/s",
                     measure="checkpoint time with 2 ranks (DDP), writes spread (snapshot end -> committed)",
                     values=[1 / s for s in ours], seconds=ours,
                     baseline="the same with rank 0 writing the replicated state (DCP dedup_save_to_lowest_rank)",
                     baseline_values=[1 / s for s in base], baseline_seconds=base, target=SPREAD_TARGET,
                     nbytes=sum(res["spread"]["rank_bytes"][0]),
                     notes="target <= 0.65x means ratio >= 1.54; 2 shared cores, local SeaweedFS",
                     extra={"rank_bytes": {k: res[k]["rank_bytes"] for k in ("spread", "rank0")},
                            "max_over_mean_rank_bytes": per_rank})]


def _versus_async(server: SeaweedServer, workdir: Path, bucket: str) -> list[dict[str, Any]]:
    cfg = TrainConfig.load(preset="small", threads=1)
    model, _ = build_model(cfg, torch.device("cpu"), 1)
    opt = build_optimizer(model, cfg)
    model(torch.randint(0, 200, (1, 16))).float().mean().backward()
    opt.step()
    opts = server.storage_options()
    s3 = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    mgr = CheckpointManager(f"pcache::s3://{bucket}/ours", cache_dir=str(workdir / "dcp-cache"), storage_options=opts)
    save_ours, load_ours, save_base, load_base = [], [], [], []
    for i in range(max(3, repeats())):
        msd, osd = get_state_dict(model, opt)
        settle()
        stats = mgr.save_sync(i + 1, {"model": msd, "optim": osd})
        save_ours.append(stats.stall + stats.committed)
        settle()
        t0 = time.perf_counter()
        mgr.load_into(i + 1, {"model": msd, "optim": osd})
        load_ours.append(time.perf_counter() - t0)
        local = workdir / f"async-{i}"
        settle()
        t0 = time.perf_counter()
        dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=str(local)).result()
        s3.put(str(local), f"{bucket}/raw/{i}", recursive=True)
        save_base.append(time.perf_counter() - t0)
        shutil.rmtree(local)
        settle()
        t0 = time.perf_counter()
        s3.get(f"{bucket}/raw/{i}", str(local), recursive=True)
        dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(local))
        load_base.append(time.perf_counter() - t0)
        shutil.rmtree(local)
    log(f"ling_dcp_vs_async: save ours {save_ours} base {save_base}; load ours {load_ours} base {load_base}")
    base = "torch.distributed.checkpoint.async_save to a local directory + raw s3fs.put (load: s3fs.get + dcp.load)"
    return [make_row(module=NAME, key=f"dcp_{what}_vs_async_save", unit="1/s", values=[1 / s for s in ours],
                     seconds=ours, measure=f"DCP checkpoint {what} through pcache (1 rank, small)",
                     baseline=base, baseline_values=[1 / s for s in theirs], baseline_seconds=theirs, target=None,
                     notes="report only; ours verifies every file against the commit marker on load")
            for what, ours, theirs in (("save", save_ours, save_base), ("load", load_ours, load_base))]


def groups(server: SeaweedServer, workdir: Path) -> list[dict[str, Any]]:
    """Run this module's groups (``BENCH_ONLY`` filters them) in a bucket of their own."""
    bucket = server.make_bucket("bench-ling-dcp")
    try:
        return run_groups(NAME, [("ling_spread", lambda: _spread(server, workdir, bucket)),
                                 ("ling_dcp_vs_async", lambda: _versus_async(server, workdir, bucket))])
    finally:
        server.delete_bucket(bucket)
