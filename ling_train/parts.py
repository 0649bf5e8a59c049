"""The parts a training run is built from: process group, model, optimizer, LR schedule, data options,
vocabulary, and the RNG / state-dict helpers a resume needs. :mod:`ling_train.trainer` puts them together.
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ling_train.config import ModelConfig, TrainConfig, preset
from ling_train.model import LingModel
from lingcore.storage import url_storage_options
from loaders import InvalidParameterError


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


def build_model(cfg: TrainConfig, device: torch.device, world: int,
                model_config: ModelConfig | None = None) -> tuple[LingModel, nn.Module]:
    """(the bare model, the module to call: DDP- or FSDP2-wrapped when distributed).

    ``model_config`` replaces the preset's (a checkpoint's own architecture, see :meth:`Trainer.restore`).
    """
    torch.manual_seed(cfg.seed)
    model = LingModel(model_config or cfg.model_config()).to(device)
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


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
