"""Frozen configs: the model presets (``tiny``, ``ling-lite``, ``ling-plus``) and the trainer's settings.

The trainer's settings load through the project's one config loader (defaults < TOML ``[ling_train]`` <
``LING_TRAIN_*`` env < flags), so errors name the field and where it came from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lingcore.config import load_config
from lingcore.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """Shape and routing settings of a Ling (Bailing) MoE decoder.

    Attributes:
        vocab_size: Embedding and lm_head rows.
        hidden_size: Model width.
        num_layers: Decoder blocks.
        num_heads: Query heads.
        num_kv_heads: Key/value heads (GQA); must divide ``num_heads``.
        head_dim: Per-head width (``hidden_size // num_heads`` when 0).
        intermediate_size: SwiGLU width of the dense layers.
        moe_intermediate_size: SwiGLU width of one routed expert.
        num_experts: Routed experts per MoE layer.
        top_k: Experts per token.
        num_shared_experts: Shared experts; they form one SwiGLU of width ``moe_intermediate_size * n``.
        first_k_dense_replace: The first k layers are dense (no experts).
        rope_theta: RoPE base.
        rms_eps: RMSNorm epsilon (the release's ``rms_norm_eps``: 1e-5 in the Ling-lite base config).
        tie_embeddings: Share the embedding matrix with the lm_head.
        norm_head: Normalize the lm_head weight as Ling's ``modeling_bailing_moe.py`` does.
        initializer_range: Std of the normal init of every Linear layer (experts included) and the
            embedding, as the release's ``_init_weights``; the router keeps ``nn.Linear``'s kaiming-uniform
            init, as the release's ``BailingMoeGate`` (a bare parameter, not a Linear) does.
        pad_token_id: The embedding's padding index (its row starts at zero and gets no gradient), the
            release's ``pad_token_id``; None: no padding index.
        norm_topk_prob: Renormalise the top-k routing weights to sum to 1 (only when ``top_k > 1``, as
            the release does; with one expert per token the weight stays the softmax probability).
        balance_coef: Switch load-balance loss coefficient (alpha).
        z_coef: Router z-loss coefficient.
        routing_warmup_steps: W of the stochastic routing warmup (0 disables it).
        routing_stats_momentum: EMA momentum of the router logits' running mean and std.
    """

    vocab_size: int = 259
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0
    intermediate_size: int = 512
    moe_intermediate_size: int = 128
    num_experts: int = 8
    top_k: int = 2
    num_shared_experts: int = 1
    first_k_dense_replace: int = 1
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    tie_embeddings: bool = False
    norm_head: bool = True
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    norm_topk_prob: bool = True
    balance_coef: float = 0.015
    z_coef: float = 1e-4
    routing_warmup_steps: int = 0
    routing_stats_momentum: float = 0.01

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("num_kv_heads", f"{self.num_kv_heads} does not divide num_heads={self.num_heads}")
        if not 0 < self.top_k <= self.num_experts:
            raise ConfigError("top_k", f"must be in 1..num_experts={self.num_experts}, got {self.top_k}")
        if self.head_dim % 2:
            raise ConfigError("head_dim", f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError("pad_token_id", f"must be within 0..vocab_size-1={self.vocab_size - 1}, "
                                              f"got {self.pad_token_id}")
        if not self.initializer_range > 0:
            raise ConfigError("initializer_range", f"must be > 0, got {self.initializer_range}")

    def replace(self, **changes: Any) -> ModelConfig:
        """Return a copy with ``changes`` (None values ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        """Plain fields (what a checkpoint records, so its weights can be read without the preset)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; fields this version does not know are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in known})

    def architecture(self) -> ModelConfig:
        """This config with the training-only knobs at their defaults: what the weights mean."""
        defaults: dict[str, Any] = {name: ModelConfig.__dataclass_fields__[name].default for name in TRAINING_KNOBS}
        return dataclasses.replace(self, **defaults)

    def differences(self, other: ModelConfig) -> dict[str, tuple[Any, Any]]:
        """Architecture fields that differ: ``{name: (self's, other's)}``."""
        a, b = self.architecture().to_dict(), other.architecture().to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


# Settings of the training losses and the routing warmup: they do not change what the weights compute.
TRAINING_KNOBS = ("balance_coef", "z_coef", "routing_warmup_steps", "routing_stats_momentum")


PRESETS: dict[str, ModelConfig] = {
    # A few million parameters: CPU tests and the demo (byte tokenizer, vocab 259).
    "tiny": ModelConfig(),
    # ~15M parameters (about 180 MB of model + AdamW state): benchmarks of checkpointing on CPU.
    "small": ModelConfig(hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=4, intermediate_size=1024,
                         moe_intermediate_size=256, num_experts=16, top_k=2),
    # Ling-lite (inclusionAI/Ling-lite config.json): every layer is MoE.
    # rms_eps 1e-5 as in the base config (the chat config has 1e-6: import-hf keeps a checkpoint's own);
    # initializer_range 0.006 and pad_token_id 126081 as released.
    "ling-lite": ModelConfig(vocab_size=126464, hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=4,
                             intermediate_size=5632, moe_intermediate_size=1408, num_experts=64, top_k=6,
                             num_shared_experts=2, first_k_dense_replace=0, rope_theta=600000.0, rms_eps=1e-5,
                             initializer_range=0.006, pad_token_id=126081),
    # Ling-plus, as released (inclusionAI's BailingMoeForCausalLM config): 56 query heads and 8 KV heads of
    # head_dim 96 (q width = hidden 5376), every layer MoE. 290.6B total, 29.0B active (the report rounds
    # to 290B / 28.8B). A 42/6 x 128 split has the same weight shapes but computes different attention,
    # so released weights would give wrong outputs under it. rms_eps 1e-6 (base and chat configs alike).
    "ling-plus": ModelConfig(vocab_size=126464, hidden_size=5376, num_layers=88, num_heads=56, num_kv_heads=8,
                             head_dim=96, intermediate_size=12288, moe_intermediate_size=3072, num_experts=64,
                             top_k=4, num_shared_experts=1, first_k_dense_replace=0, rope_theta=600000.0,
                             rms_eps=1e-6, initializer_range=0.006, pad_token_id=126081),
}


def preset(name: str) -> ModelConfig:
    """Return the named preset.

    Raises:
        ConfigError: naming ``preset`` and the valid names.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError("preset", f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (TOML table ``[ling_train]``, env ``LING_TRAIN_*``, or flags).

    Attributes:
        preset: Model preset name.
        vocab_size: Embedding rows (0: the corpus's ``vocab_size`` from its ``index.json``, else the preset's).
        data: Corpus URLs or paths (comma-separated in env/flags): local, FUSE, ``pcache::s3://...``.
        ckpt: Checkpoint root URL (``pcache::s3://bucket/run`` or ``pcache::file:///dir``); empty: none.
        steps: Optimizer steps of the whole run (the LR schedule spans them); a resumed run continues.
        stop_at: Stop this job at this step (0: at ``steps``), checkpointing there; resume later.
        ckpt_every: Save every K steps (0: only at the end).
        keep_last: Committed checkpoints kept at the origin.
        resume: Continue from the newest committed checkpoint under ``ckpt``; refused when there is none.
        resume_if_exists: Like ``resume``, but start from step 0 when nothing is committed under ``ckpt``.
        batch_size: Sequences per rank per step.
        seq_len: Tokens per sequence.
        lr: Peak learning rate.
        min_lr_ratio: LR at the end of the decay, relative to ``lr``.
        warmup_steps: Linear warmup steps of the WSD schedule.
        decay_frac: Fraction of ``steps`` spent in the final linear decay.
        weight_decay: AdamW weight decay.
        grad_clip: Global gradient-norm clip.
        seed: Seed of the model init, data order and routing noise.
        parallel: ``ddp`` or ``fsdp`` (FSDP2 ``fully_shard``) when launched by torchrun.
        log_every: Console log interval in steps (JSONL gets every step).
        log_file: JSONL metrics file (empty: none).
        spike_window: Losses in the running window of the spike detector.
        spike_k: A loss above mean + k * std of the window is a spike.
        spike_patience: This many spikes within ``spike_window`` steps multiply the LR by ``spike_lr_factor``.
        spike_lr_factor: LR multiplier applied after repeated spikes.
        reinject_after: Steps after which a skipped batch is fed again.
        routing_warmup_steps: Stochastic routing warmup W (overrides the preset when >= 0).
        balance_coef: Balance-loss alpha (overrides the preset when >= 0).
        z_coef: z-loss coefficient (overrides the preset when >= 0).
        cache_dir: pcache directory for checkpoint write-back and data reads (empty: pcache default).
        endpoint_url: S3 endpoint (default: ``$AWS_ENDPOINT_URL``).
        threads: torch intra-op threads (0: torch default).
        peak_tflops: Accelerator peak for the MFU estimate (0: known GPUs only).
        commit_timeout: Seconds a background persist may wait for durability before it fails.
        snapshot_every: Keep the newest state of each rank in shared memory every K steps (0: off); a
            restart with ``--resume-if-exists`` resumes from it when newer than the committed step.
        job_id: Names the job's memory snapshots (default: derived from ``ckpt`` without its credentials).
    """

    preset: str = "tiny"
    vocab_size: int = 0
    data: tuple[str, ...] = ()
    ckpt: str = ""
    steps: int = 100
    stop_at: int = 0
    ckpt_every: int = 0
    keep_last: int = 3
    resume: bool = False
    resume_if_exists: bool = False
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    decay_frac: float = 0.2
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    parallel: str = "ddp"
    log_every: int = 10
    log_file: str = ""
    spike_window: int = 20
    spike_k: float = 4.0
    spike_patience: int = 3
    spike_lr_factor: float = 0.5
    reinject_after: int = 5
    routing_warmup_steps: int = -1
    balance_coef: float = -1.0
    z_coef: float = -1.0
    cache_dir: str = ""
    endpoint_url: str = ""
    threads: int = 0
    peak_tflops: float = 0.0
    commit_timeout: float = 600.0
    snapshot_every: int = 0
    job_id: str = ""

    def __post_init__(self) -> None:
        preset(self.preset)
        object.__setattr__(self, "data", tuple(self.data))
        for name in ("steps", "batch_size", "seq_len", "keep_last", "spike_window", "spike_patience"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("ckpt_every", "warmup_steps", "threads", "reinject_after", "stop_at", "vocab_size",
                     "snapshot_every"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError("parallel", f"must be 'ddp' or 'fsdp', got {self.parallel!r}")
        if not 0 <= self.decay_frac <= 1:
            raise ConfigError("decay_frac", f"must be within [0, 1], got {self.decay_frac}")
        if self.resume and not self.ckpt:
            raise ConfigError("resume", "--resume needs --ckpt")
        if self.resume_if_exists and not self.ckpt:
            raise ConfigError("resume_if_exists", "--resume-if-exists needs --ckpt")
        if self.snapshot_every and not self.ckpt:
            raise ConfigError("snapshot_every", "--snapshot-every needs --ckpt (where a breakpoint persists it)")

    def model_config(self) -> ModelConfig:
        """The preset with this run's vocabulary and routing overrides applied.

        Another vocabulary means another tokenizer, whose padding id the preset cannot know: the
        padding index is then dropped (the preset's id would name an unrelated token, or none).
        """
        base = preset(self.preset)
        if self.vocab_size and self.vocab_size != base.vocab_size:
            base = dataclasses.replace(base, vocab_size=self.vocab_size, pad_token_id=None)
        overrides = {"routing_warmup_steps": self.routing_warmup_steps if self.routing_warmup_steps >= 0 else None,
                     "balance_coef": self.balance_coef if self.balance_coef >= 0 else None,
                     "z_coef": self.z_coef if self.z_coef >= 0 else None}
        return base.replace(**overrides)

    @classmethod
    def load(cls, toml_path: str | None = None, **overrides: Any) -> TrainConfig:
        """Defaults < ``toml_path`` ``[ling_train]`` < ``LING_TRAIN_*`` env < ``overrides``."""
        return load_config(cls, toml_path=toml_path, section="ling_train", env_prefix="LING_TRAIN_",
                           overrides=overrides)
