"""The training loop: data from ``loaders.TokenDataset``, AdamW + WSD, DDP or FSDP2, async checkpoints.

Run in-process with :func:`train` (one rank) or under ``torchrun`` (gloo on CPU, nccl on GPU); every rank
calls :func:`train` and :func:`setup_distributed` picks the process group up from the environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ling_train.anomaly import AnomalyGuard, SpikeConfig
from ling_train.checkpoint import CheckpointManager, SaveStats
from ling_train.config import TrainConfig, preset
from ling_train.metrics import MetricsLog, flops_per_token, peak_flops
from ling_train.model import LingModel, count_params
from lingcore.log import get_logger
from lingcore.storage import url_storage_options
from loaders import InvalidParameterError, TokenDataset, TokenLoader, trim_cu_seqlens

log = get_logger(__name__)

LossHook = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class TrainResult:
    """What a run did (rank-local)."""

    losses: dict[int, float] = field(default_factory=dict)  # step -> cross-entropy (accepted or not)
    statuses: dict[int, str] = field(default_factory=dict)
    start_step: int = 0
    final_step: int = 0
    tokens_per_s: float = 0.0
    step_times: list[float] = field(default_factory=list)
    step_ends: list[float] = field(default_factory=list)  # perf_counter at the end of each step
    saves: list[SaveStats] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    load_max_over_mean: list[float] = field(default_factory=list)  # last step, per MoE layer
    router_z: list[float] = field(default_factory=list)  # last step, per MoE layer


def setup_distributed() -> tuple[int, int, torch.device]:
    """Join the torchrun process group if there is one; return (rank, world size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warmup-stable-decay: linear warmup, constant, then a linear decay over the last ``decay_frac``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = int(cfg.steps * cfg.decay_frac)
    decay_start = cfg.steps - decay_steps
    if decay_steps and step >= decay_start:
        frac = (step - decay_start) / decay_steps
        return cfg.lr * (1 - (1 - cfg.min_lr_ratio) * frac)
    return cfg.lr


def data_options(url: str, cfg: TrainConfig) -> dict[str, Any]:
    """fsspec options for a data URL: the pcache cache directory and S3 endpoint where they apply."""
    opts = url_storage_options(url, cfg.endpoint_url or None)
    if url.startswith("pcache::"):
        opts["pcache"] = {"cache_dir": cfg.cache_dir} if cfg.cache_dir else {}
    return opts


def model_vocab(cfg: TrainConfig, corpus_vocab: int | None) -> int:
    """The embedding rows of this run: ``--vocab-size``, else the corpus's, else the preset's.

    Raises:
        InvalidParameterError: when the corpus's ids can exceed the chosen vocabulary (one line naming it).
    """
    chosen = cfg.vocab_size or corpus_vocab or preset(cfg.preset).vocab_size
    if corpus_vocab is not None and corpus_vocab > chosen:
        raise InvalidParameterError("vocab_size", f"{', '.join(cfg.data)} has token ids up to {corpus_vocab - 1} "
                                                  f"(vocab_size {corpus_vocab} in its index.json), more than the "
                                                  f"model's vocabulary of {chosen}")
    return chosen


def build_model(cfg: TrainConfig, device: torch.device, world: int) -> tuple[LingModel, nn.Module]:
    """(the bare model, the module to call: DDP- or FSDP2-wrapped when distributed)."""
    torch.manual_seed(cfg.seed)
    model = LingModel(cfg.model_config()).to(device)
    if world == 1:
        return model, model
    if cfg.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model, model
    from torch.nn.parallel import DistributedDataParallel

    return model, DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95, eps 1e-8); weight decay on matrices only, not on norm scales."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _load_sharded_optimizer(opt: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load an optimizer state saved as local shards back into DTensor-shaped state (FSDP2)."""
    opt.load_state_dict(saved)
    for group in opt.param_groups:
        for p in group["params"]:
            if not hasattr(p, "to_local"):
                continue
            from torch.distributed.tensor import DTensor

            state = opt.state.get(p, {})
            for key, value in list(state.items()):
                if isinstance(value, torch.Tensor) and value.ndim > 0 and not isinstance(value, DTensor):
                    state[key] = DTensor.from_local(value.to(p.device), p.device_mesh, p.placements,
                                                    shape=p.shape, stride=p.stride())


def _load_model(model: LingModel, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in model.state_dict().items():
            target = value.to_local() if hasattr(value, "to_local") else value
            target.copy_(saved[name])


class Trainer:
    """One rank's training state; :meth:`run` trains up to ``cfg.steps``."""

    def __init__(self, cfg: TrainConfig, loss_hook: LossHook | None = None,
                 ckpt_options: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.rank, self.world, self.device = setup_distributed()
        if not cfg.data:
            raise ValueError("no --data given: a corpus URL or path is needed to train")
        # cu_seqlens: document boundaries as a few integers per row instead of an int32 label per token
        self.dataset = TokenDataset(list(cfg.data), cfg.seq_len, seed=cfg.seed, batch_size=cfg.batch_size,
                                    rank=self.rank, world_size=self.world, boundaries="cu_seqlens",
                                    storage_options=data_options(cfg.data[0], cfg))
        self.cfg = cfg = dataclasses.replace(cfg, vocab_size=model_vocab(cfg, self.dataset.vocab_size))
        self.model, self.module = build_model(cfg, self.device, self.world)
        self.sharded = self.world > 1 and cfg.parallel == "fsdp"
        self.opt = build_optimizer(self.model, cfg)
        self.loader = TokenLoader(self.dataset)  # whole batches packed at once; it tracks its own position
        self.guard = AnomalyGuard(SpikeConfig(cfg.spike_window, cfg.spike_k, cfg.spike_patience,
                                              cfg.spike_lr_factor, cfg.reinject_after))
        self.loss_hook = loss_hook
        self.step = 0
        self.ckpt: CheckpointManager | None = None
        if cfg.ckpt:
            store = dist.distributed_c10d._get_default_store() if self.world > 1 else None
            self.ckpt = CheckpointManager(cfg.ckpt, rank=self.rank, world_size=self.world, keep_last=cfg.keep_last,
                                          cache_dir=cfg.cache_dir, endpoint_url=cfg.endpoint_url, store=store,
                                          timeout=cfg.commit_timeout, storage_options=ckpt_options)
        mc = cfg.model_config()
        self.active_params = count_params(mc)[1]
        self.flops_per_token = flops_per_token(mc, self.active_params, cfg.seq_len)
        self.peak = peak_flops(cfg.peak_tflops)

    # -- state ---------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """This rank's checkpoint content (rank 0 holds model and optimizer unless sharded)."""
        state: dict[str, Any] = {"step": self.step, "world_size": self.world, "rng": _rng_state(),
                                 "guard": self.guard.state_dict(),
                                 "loader": self.loader.state_dict()}
        if self.rank == 0 or self.sharded:
            state["model"] = self.model.state_dict()
            state["optim"] = self.opt.state_dict()
        return state

    def restore(self, step: int) -> None:
        """Load committed ``step``: model and optimizer, loader position, RNG, spike state."""
        assert self.ckpt is not None
        own = self.ckpt.load(step)
        if own.get("world_size") != self.world and self.sharded:
            raise ValueError(f"checkpoint step {step} was saved by {own.get('world_size')} FSDP ranks; "
                             f"this run has {self.world}")
        full = own if (self.rank == 0 or self.sharded) else self.ckpt.load(step, rank=0)
        _load_model(self.model, full["model"])
        if self.sharded:
            _load_sharded_optimizer(self.opt, full["optim"])
        else:
            self.opt.load_state_dict(full["optim"])
        self.loader.load_state_dict(own["loader"])
        self.guard.load_state_dict(own["guard"])
        _set_rng_state(own["rng"])
        self.step = int(own["step"])
        log.info("resumed from committed step %d of %s", step, self.cfg.ckpt)

    # -- loop ------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train up to ``cfg.stop_at`` (or ``cfg.steps``), checkpointing every ``ckpt_every`` steps and at the end."""
        cfg = self.cfg
        if cfg.resume and self.ckpt is not None:
            latest = self.ckpt.latest_step()
            if latest is not None:
                self.restore(latest)
        result = TrainResult(start_step=self.step)
        metrics = MetricsLog(cfg.log_file, cfg.log_every, enabled=self.rank == 0)
        batches = iter(self.loader)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    else contextlib.nullcontext())
        tokens_per_step = cfg.batch_size * cfg.seq_len * self.world
        end = min(cfg.stop_at or cfg.steps, cfg.steps)
        run_t0 = time.perf_counter()
        try:
            while self.step < end:
                t0 = time.perf_counter()
                batch = self.guard.due(self.step) or next(batches)
                record = self._step(batch, autocast)
                self.step += 1
                stall = None
                if self.ckpt is not None and cfg.ckpt_every and self.step % cfg.ckpt_every == 0 \
                        and self.step < end:
                    stall = self.ckpt.save(self.step, self.state()).stall
                dt = time.perf_counter() - t0
                result.step_times.append(dt)
                result.step_ends.append(t0 + dt)
                result.losses[self.step] = record["loss"]
                result.statuses[self.step] = record["status"]
                tps = tokens_per_step / dt
                mfu = tps * self.flops_per_token / self.peak if self.peak else None
                metrics.write({**record, "step": self.step, "tokens_per_s": tps, "mfu": mfu, "step_s": dt,
                               "ckpt_stall_s": stall, **{f"count_{k}": v for k, v in self.guard.counts.items()}},
                              cfg.steps)
                result.load_max_over_mean = record["load_max_over_mean"]
                result.router_z = record["router_z"]
            if self.ckpt is not None and result.start_step < self.step:
                self.ckpt.save_sync(self.step, self.state())
            if self.ckpt is not None:
                self.ckpt.wait()
        finally:
            metrics.close()
        elapsed = time.perf_counter() - run_t0
        result.final_step = self.step
        result.tokens_per_s = tokens_per_step * (self.step - result.start_step) / elapsed if elapsed else 0.0
        result.saves = list(self.ckpt.history) if self.ckpt else []
        result.counts = dict(self.guard.counts)
        return result

    def _step(self, batch: dict[str, torch.Tensor], autocast: Any) -> dict[str, Any]:
        top = int(batch["tokens"].max())  # on the host batch: no device sync
        if top >= self.cfg.vocab_size:  # foreign data records no vocabulary: catch it before the embedding does
            raise InvalidParameterError("vocab_size", f"{', '.join(self.cfg.data)} holds token id {top}, beyond the "
                                        f"model's vocabulary of {self.cfg.vocab_size}; pass --vocab-size")
        tokens = batch["tokens"].to(self.device)
        width = tokens.shape[1]
        if "cu_seqlens" in batch:  # the boundaries of the inputs, tokens[:, :-1] of each window
            cu = torch.from_numpy(trim_cu_seqlens(batch["cu_seqlens"].numpy(), width, width - 1)).to(self.device)
            inputs: dict[str, torch.Tensor] = {"cu_seqlens": cu}
        else:  # a batch queued for reinjection by a checkpoint of an older version
            inputs = {"doc_ids": batch["doc_ids"].to(self.device)[:, :-1]}
        self.model.set_step(self.step)
        self.module.train()
        with autocast:
            logits = self.module(tokens[:, :-1], **inputs)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        if self.loss_hook is not None:
            ce = self.loss_hook(self.step, ce)
        aux = self.model.aux_loss()
        (ce + aux).backward()
        loss = ce.detach().clone()
        if self.world > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)  # every rank must take the same decision
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        status = self.guard.check(self.step, float(loss), float(norm), batch)
        lr = lr_at(self.step, self.cfg) * self.guard.lr_scale
        if status == "ok":
            for group in self.opt.param_groups:
                group["lr"] = lr
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        stats = self.model.router_stats()
        return {"loss": float(loss), "aux": float(aux.detach()), "lr": lr, "grad_norm": float(norm), "status": status,
                "load_max_over_mean": [float(s.load.max() / s.load.mean()) for s in stats],
                "router_entropy": float(sum(float(s.entropy) for s in stats) / max(1, len(stats))),
                "router_z": [float(s.router_z) for s in stats]}


def train(cfg: TrainConfig, loss_hook: LossHook | None = None,
          ckpt_options: dict[str, Any] | None = None) -> TrainResult:
    """Train with ``cfg`` on this rank; see :class:`Trainer`."""
    return Trainer(cfg, loss_hook, ckpt_options).run()
