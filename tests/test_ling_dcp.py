"""ling_train DCP checkpoints: resharding on resume (2 -> 1 and 1 -> 2 DDP ranks, 2 FSDP2 -> 1), writes spread
over ranks, a stock ``torch.distributed.checkpoint`` reader without this project, shapes and commits checked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ling_train import CheckpointError, CheckpointManager, LingModel
from ling_train.config import preset
from ling_train.corpus import sample_texts, write_text_corpus

# One worker for every run: resume (when asked), record the restored full state, then train.
WORKER = r'''
import copy, json, sys, torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from ling_train import TrainConfig
from ling_train.trainer import Trainer

args = json.loads(sys.argv[1])
trainer = Trainer(TrainConfig.load(**args["cfg"]))
restored = None
if trainer.resume_step is not None:
    trainer.restore(trainer.resume_step)
    trainer.resume_step = None
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # deepcopy: without sharding these are the live parameters, which the run below goes on training
    restored = copy.deepcopy({"model": get_model_state_dict(trainer.model, options=full),
                "optim": get_optimizer_state_dict(trainer.model, trainer.opt, options=full),
                "position": trainer.loader.state_dict()["position"], "step": trainer.step})
result = trainer.run()
if trainer.rank == 0:
    torch.save({"restored": restored, "losses": result.losses,
                "rank_bytes": [s.rank_bytes for s in result.saves]}, args["out"])
if dist.is_initialized():
    dist.destroy_process_group()
'''

# No load-balance loss: it is computed on each rank's micro-batch (a product of batch statistics, not a mean
# over tokens), so its gradient depends on the world size (docs/ling_train.md, resharding limits).
BASE = {"steps": 9, "batch_size": 2, "seq_len": 32, "threads": 1, "log_every": 1000, "ckpt_every": 3, "seed": 3,
        "balance_coef": 0.0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("ling-dcp-corpus") / "corpus")
    write_text_corpus(path, sample_texts(400, seed=4))
    return path


def _run(tmp_path: Path, name: str, ranks: int, **cfg: Any) -> dict[str, Any]:
    """One training run (``ranks`` processes under torchrun, gloo); what rank 0 recorded."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"{name}.pt"
    arg = json.dumps({"cfg": cfg, "out": str(out)})
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
           if ranks > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PCACHE_UPLOADER_IDLE_EXIT": "1"}
    proc = subprocess.run([*cmd, str(script), arg], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


def _copy_step(tmp_path: Path, src: str, step: int, dst: str) -> str:
    """A fresh root holding only committed ``step`` of root ``src`` (so ``--resume`` takes it)."""
    name = f"step_{step:06d}"
    shutil.copytree(tmp_path / src / name, tmp_path / dst / name)
    return f"pcache::file://{tmp_path}/{dst}"


def _assert_same(restored: dict[str, Any], saved: dict[str, Any]) -> None:
    """The state a run restored equals the checkpoint's whole state, tensor for tensor."""
    assert restored["model"].keys() == saved["model"].keys()
    for k, v in saved["model"].items():
        assert torch.equal(restored["model"][k], v), k
    assert restored["optim"]["state"].keys() == saved["optim"]["state"].keys()
    for fqn, per in saved["optim"]["state"].items():
        for key, v in per.items():
            assert torch.equal(torch.as_tensor(restored["optim"]["state"][fqn][key]), torch.as_tensor(v)), (fqn, key)


def _close(a: dict[int, float], b: dict[int, float], steps: range) -> None:
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=1e-4, abs=1e-5), (s, a[s], b[s])


def test_resharding_resume_spread_writes_and_a_stock_reader(corpus: str, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    common = {**BASE, "data": [corpus], "cache_dir": cache}
    # Uninterrupted 2-rank runs (DDP and FSDP2): the references, and their step-3 checkpoints.
    ddp = _run(tmp_path, "ddp2", 2, **common, ckpt=f"pcache::file://{tmp_path}/ddp2", parallel="ddp")
    fsdp = _run(tmp_path, "fsdp2", 2, **common, ckpt=f"pcache::file://{tmp_path}/fsdp2", parallel="fsdp")
    # Writes spread: both ranks wrote about half of DDP's replicated state (rank 0 alone wrote all of it before).
    for per_rank in ddp["rank_bytes"]:
        assert len(per_rank) == 2 and max(per_rank) <= 1.25 * min(per_rank), per_rank

    # 2 -> 1, from DDP and from FSDP2: one rank with the same global batch (2 ranks x 2 = 1 rank x 4 rows).
    ones = {}
    for name, ref in (("ddp2", ddp), ("fsdp2", fsdp)):
        root = _copy_step(tmp_path, name, 3, f"{name}-to-1")
        one = _run(tmp_path, f"{name}-to-1", 1, **{**common, "batch_size": 4}, ckpt=root, resume=True)
        saved = CheckpointManager(f"pcache::file://{tmp_path}/{name}", cache_dir=cache).load(3)
        _assert_same(one["restored"], saved)
        assert one["restored"]["position"] == 3 * 4 and one["restored"]["step"] == 3  # the same global sample
        _close(one["losses"], ref["losses"], range(4, 10))
        ones[name] = one
    # 1 -> 2: the 1-rank run's own step-6 checkpoint resumed by 2 DDP ranks; losses as its steps 7..9.
    root = _copy_step(tmp_path, "ddp2-to-1", 6, "one-to-2")
    two = _run(tmp_path, "one-to-2", 2, **common, ckpt=root, resume=True, parallel="ddp")
    _assert_same(two["restored"], CheckpointManager(root, cache_dir=cache).load(6))
    assert two["restored"]["position"] == 6 * 4
    _close(two["losses"], ones["ddp2"]["losses"], range(7, 10))

    # A third party: stock torch only (no import of this project possible), FileSystemReader on the directory.
    step_dir = tmp_path / "ddp2" / "step_000009"
    stock = (
        "import sys, torch\n"
        "from torch.distributed.checkpoint.format_utils import dcp_to_torch_save\n"
        f"dcp_to_torch_save({str(step_dir)!r}, {str(tmp_path / 'stock.pt')!r})\n"
        "assert not any(m.split('.')[0] in ('ling_train', 'pcache', 'lingcore', 'loaders') for m in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-c", stock], capture_output=True, text=True, timeout=120,
                          env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(tmp_path / "stock.pt", weights_only=False)
    ours = CheckpointManager(f"pcache::file://{tmp_path}/ddp2", cache_dir=cache).load(9)
    assert theirs["step"] == 9 and theirs["meta"]["loader"]["position"] == 9 * 4
    assert theirs["model"].keys() == ours["model"].keys()
    assert all(torch.equal(theirs["model"][k], ours["model"][k]) for k in ours["model"])


TINY = preset("tiny")


def test_a_checkpoint_of_another_shape_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    mgr = CheckpointManager(f"pcache::file://{tmp_path}/ckpt", cache_dir=str(tmp_path / "cache"))
    mgr.save_sync(1, {"model": LingModel(TINY).state_dict()})
    wider = LingModel(TINY.replace(vocab_size=TINY.vocab_size + 16)).state_dict()
    v, h = TINY.vocab_size, TINY.hidden_size
    with pytest.raises(CheckpointError, match=rf"model\.embed\.weight has shape \({v}, {h}\) in the checkpoint, "
                                              rf"\({v + 16}, {h}\) in this model"):
        mgr.load_into(1, {"model": wider})
    with pytest.raises(CheckpointError, match="holds no model.extra"):
        mgr.load_into(1, {"model": {**LingModel(TINY).state_dict(), "extra": torch.zeros(1)}})


def test_an_uncommitted_step_is_never_loaded(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    mgr = CheckpointManager(f"pcache::file://{root}", cache_dir=str(tmp_path / "cache"))
    mgr.save_sync(1, {"w": torch.ones(4)})
    mgr.save_sync(2, {"w": torch.full((4,), 2.0)})
    (root / "step_000002" / "_COMMITTED").unlink()  # data and .metadata complete, but never committed
    assert (root / "step_000002" / ".metadata").exists()
    assert mgr.committed_steps() == [1] and mgr.latest_step() == 1
    for load in (lambda: mgr.load(2), lambda: mgr.load_into(2, {"w": torch.zeros(4)}), lambda: mgr.metadata(2)):
        with pytest.raises(CheckpointError, match="step_000002: not committed"):
            load()
    target = {"w": torch.zeros(4)}
    mgr.load_into(1, target)
    assert torch.equal(target["w"], torch.ones(4))


def test_stock_fsspec_reader_reads_a_committed_step_on_s3(tmp_path: Path, bucket: str, s3_options: dict[str, Any]) -> None:
    """A third party with torch and s3fs only reads the S3 origin with DCP's FsspecReader."""
    root = f"pcache::s3://{bucket}/run"
    mgr = CheckpointManager(root, cache_dir=str(tmp_path / "cache"), storage_options=s3_options)
    model = LingModel(TINY).state_dict()
    mgr.save_sync(4, {"step": 4, "model": model, "meta": {"note": "hello"}})
    stock = (
        "import json, sys, torch\n"
        "import torch.distributed.checkpoint as dcp\n"
        "from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader\n"
        "args = json.loads(sys.argv[1])\n"
        "sd = {'step': 0, 'model': {k: torch.empty(s) for k, s in args['shapes'].items()}, 'meta': {'note': ''}}\n"
        "dcp.load(sd, storage_reader=FsspecReader(args['url'], **args['opts']))\n"
        "assert not any(m.split('.')[0] in ('ling_train', 'pcache', 'lingcore', 'loaders') for m in sys.modules)\n"
        "torch.save(sd, args['out'])\n")
    arg = json.dumps({"url": f"s3://{bucket}/run/step_000004", "opts": s3_options, "out": str(tmp_path / "s3.pt"),
                      "shapes": {k: list(v.shape) for k, v in model.items()}})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-c", stock, arg], capture_output=True, text=True, timeout=120,
                          env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(tmp_path / "s3.pt", weights_only=False)
    assert theirs["step"] == 4 and theirs["meta"]["note"] == "hello"
    assert all(torch.equal(theirs["model"][k], v) for k, v in model.items())


def test_metadata_is_written_only_after_the_data_is_durable_at_the_origin(tmp_path: Path) -> None:
    """Our writer's finish sees every data file complete at the origin and no .metadata yet; it then writes
    .metadata under its final name (no temporary file renamed over)."""
    import torch.distributed.checkpoint as dcp

    from ling_train.ckptlayout import open_pcache
    from ling_train.dcpio import PCacheWriter

    fs, path = open_pcache(f"pcache::file://{tmp_path}/origin", str(tmp_path / "cache"))
    step = tmp_path / "origin" / "step_000001"
    seen: list[dict[str, int]] = []

    def at_finish(per_rank: list[int]) -> None:
        seen.append({p.name: p.stat().st_size for p in step.iterdir()})
        assert per_rank == [sum(seen[-1].values())]

    writer = PCacheWriter(fs, f"{path}/step_000001", timeout=60, on_finish=at_finish)
    dcp.save({"w": torch.arange(100_000, dtype=torch.float32)}, storage_writer=writer, no_dist=True)
    assert list(seen[0]) == ["__0_0.distcp"] and seen[0]["__0_0.distcp"] > 400_000  # durable, no metadata yet
    fs.flush(path, timeout=60)
    assert sorted(p.name for p in step.iterdir()) == [".metadata", "__0_0.distcp"]
