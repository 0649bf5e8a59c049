"""The training loop: data from ``loaders.TokenDataset``, AdamW + WSD, DDP or FSDP2, async checkpoints.

Run in-process with :func:`train` (one rank) or under ``torchrun`` (gloo on CPU, nccl on GPU); every rank
calls :func:`train` and :func:`setup_distributed` picks the process group up from the environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ling_train.anomaly import AnomalyGuard, SpikeConfig
from ling_train.checkpoint import CheckpointManager
from ling_train.ckptlayout import CheckpointError, NothingToResumeError, SaveStats
from ling_train.config import TRAINING_KNOBS, ModelConfig, TrainConfig
from ling_train.hostcopy import fill_local_shards
from ling_train.interrupt import StopSignals
from ling_train.metrics import MetricsLog, flops_per_token, peak_flops
from ling_train.model import count_params
from ling_train.parts import (
    build_model,
    build_optimizer,
    data_options,
    lr_at,
    model_vocab,
    rng_state,
    set_rng_state,
    setup_distributed,
)
from ling_train.shmresume import MemorySnapshots
from lingcore.log import get_logger
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
    run_id: str = ""  # also on every line of the metrics JSONL
    stopped_by: int | None = None  # the signal that stopped the run early (SIGINT, SIGTERM), if any
    abandoned_step: int | None = None  # a checkpoint given up while stopping (never committed)
    finished_step: int | None = None  # a checkpoint in flight at the stop, finished and committed
    last_committed: int | None = None  # the newest committed step known to this rank (rank 0: exact)


class Trainer:
    """One rank's training state; :meth:`run` trains up to ``cfg.steps``."""

    # The config.json an imported checkpoint came with, carried into later checkpoints so export-hf keeps
    # what the model does not represent (token ids, context length).
    hf_config: dict[str, Any] | None = None

    def __init__(self, cfg: TrainConfig, loss_hook: LossHook | None = None,
                 ckpt_options: dict[str, Any] | None = None, stop: StopSignals | None = None) -> None:
        self.cfg = cfg
        self.stop = stop or StopSignals()  # polled at step boundaries; installed by the CLI
        self.run_id = uuid.uuid4().hex[:12]
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
            self.ckpt = CheckpointManager(cfg.ckpt, rank=self.rank, world_size=self.world, keep_last=cfg.keep_last,
                                          cache_dir=cfg.cache_dir, endpoint_url=cfg.endpoint_url,
                                          timeout=cfg.commit_timeout, storage_options=ckpt_options)
        mc = cfg.model_config()
        self.active_params = count_params(mc)[1]
        self.flops_per_token = flops_per_token(mc, self.active_params, cfg.seq_len)
        self.peak = peak_flops(cfg.peak_tflops)
        self.resume_step = self._resume_step()
        self.snapshots = MemorySnapshots.from_config(cfg, self.rank, self.world)  # --snapshot-every (shmresume)

    def _resume_step(self) -> int | None:
        """The committed step to resume from; refuses ``--resume`` with nothing there (a mistyped --ckpt
        must not silently start from step 0) unless ``--resume-if-exists`` says that is fine.

        Raises:
            NothingToResumeError: ``--resume`` and no committed checkpoint under ``--ckpt``.
        """
        cfg = self.cfg
        if not (cfg.resume or cfg.resume_if_exists) or self.ckpt is None:
            return None
        latest = self.ckpt.latest_step()
        if latest is None and not cfg.resume_if_exists:
            raise NothingToResumeError(cfg.ckpt)
        return latest

    # -- state ---------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """This rank's part of the checkpoint, in DCP's form: model and optimizer by parameter name (DDP
        replicas or FSDP2 shards: DCP writes each byte once, spread over the ranks), the world-size-free
        ``meta`` (loader position counted in global samples, model config), and this rank's ``local.rankNNNNN``
        (RNG and spike-guard state)."""
        model, optim = get_state_dict(self.model, self.opt)
        meta: dict[str, Any] = {"world_size": self.world, "parallel": self.cfg.parallel if self.world > 1 else "none",
                                "loader": self.loader.state_dict(), "model_config": self.model.config.to_dict()}
        if self.hf_config is not None:  # export-hf reads the weights without the preset
            meta["hf_config"] = self.hf_config
        return {"step": self.step, "model": model, "optim": optim, "meta": meta,
                "local": {f"rank{self.rank:05d}": {"rng": rng_state(), "guard": self.guard.state_dict()}}}

    def restore(self, step: int, source: Any = None) -> None:
        """Load committed ``step`` at this world size and wrapping, whatever the saving run's were (DCP
        reshards): model and optimizer, loader position, RNG, spike state. With ``source`` (a
        :class:`~ling_train.shmresume.MemorySnapshots`), load this rank's memory snapshot of ``step``
        instead (same world size and wrapping: it holds this rank's own ``state()``)."""
        if source is not None:
            self._restore_snapshot(step, source)
            return
        assert self.ckpt is not None
        names = self.ckpt.metadata(step).state_dict_metadata
        # RNG and spike state are per rank: a rank the saving run did not have takes rank 0's.
        local = next((key for key in (f"local.rank{self.rank:05d}", "local.rank00000")
                      if any(n.startswith(key + ".") for n in names)), None)
        head = self.ckpt.load(step, {"step", "meta", *([local] if local else [])})
        meta = head.get("meta", {})
        if "model_config" in meta:
            self._adopt_architecture(ModelConfig.from_dict(meta["model_config"]), step)
        target: dict[str, Any] = {"model": get_model_state_dict(self.model)}
        with_optim = any(n.startswith("optim.") for n in names)  # weights only (import-hf): a fresh optimizer
        if with_optim:
            target["optim"] = get_optimizer_state_dict(self.model, self.opt)
        self.ckpt.load_into(step, target)
        set_model_state_dict(self.model, target["model"])
        if with_optim:
            set_optimizer_state_dict(self.model, self.opt, target["optim"])
        self.hf_config = meta.get("hf_config")
        if "loader" in meta:  # weights only: the data starts from the beginning, the RNG as seeded
            self.loader.load_state_dict(meta["loader"])
        if local is not None:
            mine = head["local"][local.split(".", 1)[1]]
            self.guard.load_state_dict(mine["guard"])
            set_rng_state(mine["rng"])
        self.step = int(head["step"])
        saved_world = meta.get("world_size", self.world)
        log.info("resumed from committed step %d of %s%s", step, self.cfg.ckpt,
                 f" (saved by {saved_world} ranks, {meta.get('parallel')}; resharded to {self.world})"
                 if saved_world != self.world else "")

    def _restore_snapshot(self, step: int, source: Any) -> None:
        snap = source.load(step)
        meta, mine = snap["meta"], snap["local"][f"rank{self.rank:05d}"]
        # The snapshot holds this rank's local shards: copy them into the live (D)Tensors.
        model = fill_local_shards(get_model_state_dict(self.model), snap["model"])
        optim = fill_local_shards(get_optimizer_state_dict(self.model, self.opt), snap["optim"])
        set_model_state_dict(self.model, model)
        set_optimizer_state_dict(self.model, self.opt, optim)
        self.hf_config = meta.get("hf_config")
        self.loader.load_state_dict(meta["loader"])
        self.guard.load_state_dict(mine["guard"])
        set_rng_state(mine["rng"])
        self.step = int(snap["step"])
        log.info("%s", source.describe(step))

    def _adopt_architecture(self, saved: ModelConfig, step: int) -> None:
        """Build the model the checkpoint holds when it differs from the preset's (an imported release keeps
        its own rms_eps, padding id, shape); this run's loss and routing-warmup settings stay.

        Raises:
            InvalidParameterError: when the corpus's ids exceed the checkpoint's vocabulary.
        """
        current = self.model.config
        diff = saved.differences(current)
        if not diff:
            return
        corpus_vocab = self.dataset.vocab_size
        if corpus_vocab is not None and corpus_vocab > saved.vocab_size:
            raise InvalidParameterError("vocab_size", f"{', '.join(self.cfg.data)} has token ids up to "
                                        f"{corpus_vocab - 1}, more than the vocabulary of {saved.vocab_size} of "
                                        f"checkpoint step {step} of {self.cfg.ckpt}")
        log.warning("checkpoint step %d of %s holds its own model: %s (the preset %r's ignored)", step,
                    self.cfg.ckpt, ", ".join(f"{k} {a} (preset {b})" for k, (a, b) in sorted(diff.items())), self.cfg.preset)
        arch = dataclasses.replace(saved, **{k: getattr(current, k) for k in TRAINING_KNOBS})
        self.cfg = dataclasses.replace(self.cfg, vocab_size=arch.vocab_size)
        self.model, self.module = build_model(self.cfg, self.device, self.world, arch)
        self.opt = build_optimizer(self.model, self.cfg)
        self.active_params = count_params(arch)[1]
        self.flops_per_token = flops_per_token(arch, self.active_params, self.cfg.seq_len)

    # -- loop ------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train up to ``cfg.stop_at`` (or ``cfg.steps``), checkpointing every ``ckpt_every`` steps and at the end."""
        cfg = self.cfg
        memory = self._memory_step()
        if memory is not None:
            self.restore(memory, source=self.snapshots)
        elif self.resume_step is not None:
            self.restore(self.resume_step)
        result = TrainResult(start_step=self.step, run_id=self.run_id)
        metrics = MetricsLog(cfg.log_file, cfg.log_every, enabled=self.rank == 0, run_id=self.run_id)
        batches = iter(self.loader)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    else contextlib.nullcontext())
        tokens_per_step = cfg.batch_size * cfg.seq_len * self.world
        end = min(cfg.stop_at or cfg.steps, cfg.steps)
        run_t0 = time.perf_counter()
        try:
            with self.stop.deferring():
                self._loop(result, metrics, batches, end, autocast)
                self._after_loop(result)
        except Exception:
            self._persist_at_breakpoint()
            raise
        finally:
            metrics.close()
        elapsed = time.perf_counter() - run_t0
        result.final_step = self.step
        result.tokens_per_s = tokens_per_step * (self.step - result.start_step) / elapsed if elapsed else 0.0
        result.saves = list(self.ckpt.history) if self.ckpt else []
        result.counts = dict(self.guard.counts)
        result.last_committed = self.ckpt.last_committed_step if self.ckpt else None
        return result

    # -- memory snapshots (ling_train.shmresume) ------------------------------------------------------------
    def _memory_step(self) -> int | None:
        """The memory snapshot step to resume from (all ranks agree), when resuming and one is newer than
        the committed step; else None."""
        if self.snapshots is None or not (self.cfg.resume or self.cfg.resume_if_exists):
            return None
        return self.snapshots.choose(self.resume_step, self.device)

    def _after_loop(self, result: TrainResult) -> None:
        """Stopped by a signal: persist the newest snapshot (taken now, at the step boundary); finished:
        remove the segment. Either way the newest state is committed, so memory holds nothing more."""
        if self.snapshots is None:
            return
        stopped = result.stopped_by is not None
        if stopped and (self.stop.abandon.is_set()
                        or not self.snapshots.persist(self, live=True, abandon=self.stop.abandon)):
            return
        self.snapshots.remove()

    def _persist_at_breakpoint(self) -> None:
        """An exception in the loop: commit the newest memory snapshot (the live state may be mid-step).
        One rank only: with several, the others may never reach the commit; their snapshots stay."""
        if self.snapshots is None or self.ckpt is None:
            return
        if self.world > 1:
            log.error("memory snapshot %s stays for a restart (no persist at a breakpoint with %d ranks)",
                      self.snapshots.segment.path, self.world)
        elif self.snapshots.persist(self, live=False):
            self.snapshots.remove()

    def _should_stop(self) -> bool:
        """Whether a stop signal arrived (on any rank: every rank must stop at the same boundary)."""
        flag = self.stop.requested
        if self.world > 1:
            t = torch.tensor([1.0 if flag else 0.0], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def _loop(self, result: TrainResult, metrics: MetricsLog, batches: Iterator[dict[str, torch.Tensor]], end: int,
              autocast: Any) -> None:
        """Steps up to ``end`` (or a stop signal), then the last checkpoint: saved at the end, or, when
        stopped, the in-flight one finished or abandoned (:meth:`CheckpointManager.finish`)."""
        cfg = self.cfg
        tokens_per_step = cfg.batch_size * cfg.seq_len * self.world
        stopped = False
        while self.step < end:
            if self._should_stop():
                stopped = True
                break
            t0 = time.perf_counter()
            batch = self.guard.due(self.step) or next(batches)
            record = self._step(batch, autocast)
            self.step += 1
            stall = None
            if self.ckpt is not None and cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < end:
                stall = self.ckpt.save(self.step, self.state()).stall
            if self.snapshots is not None and self.step % self.snapshots.every == 0:
                self.snapshots.take(self)
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
        if not stopped and self.ckpt is not None and result.start_step < self.step:
            self.ckpt.save(self.step, self.state())
        if self.ckpt is not None:
            in_flight = self.ckpt.in_flight
            try:
                result.abandoned_step = self.ckpt.finish(self.stop.abandon)
            except CheckpointError as exc:
                if not stopped:
                    raise
                log.error("%s", exc)  # stopping anyway: report it, then what is committed
                result.abandoned_step = in_flight.step if in_flight is not None else None
            if stopped and in_flight is not None and result.abandoned_step is None:
                result.finished_step = in_flight.step
        if stopped or self.stop.requested:  # a signal during the final save still ends the run as "stopped"
            result.stopped_by = self.stop.signum or int(signal.SIGINT)

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
