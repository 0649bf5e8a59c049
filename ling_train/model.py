"""The Ling (Bailing) MoE decoder: RMSNorm, RoPE, GQA attention via SDPA, SwiGLU, MoE, NormHead."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ling_train.config import ModelConfig
from ling_train.moe import MoE, RouterStats, SwiGLU

NORM_HEAD_EPS = 1e-7


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[seq_len, head_dim]`` for rotate-half RoPE with base ``theta``."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, heads, L, D]`` by the RoPE angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def norm_head_weight(weight: torch.Tensor) -> torch.Tensor:
    """Ling's NormHead: ``W / (||W||_2 over dim 0 + 1e-7)``, the norm detached.

    ``W`` is ``[vocab, hidden]``: each hidden column is normalized across the vocabulary, as in
    ``modeling_bailing_moe.py`` (Baichuan's NormHead normalizes each vocabulary row instead).
    """
    return weight / (torch.norm(weight, p=2, dim=0, keepdim=True) + NORM_HEAD_EPS).detach()


class Attention(nn.Module):
    """Grouped-query attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d, hd = config.hidden_size, config.head_dim
        self.q = nn.Linear(d, config.num_heads * hd, bias=False)
        self.k = nn.Linear(d, config.num_kv_heads * hd, bias=False)
        self.v = nn.Linear(d, config.num_kv_heads * hd, bias=False)
        self.o = nn.Linear(config.num_heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        b, seq, _ = x.shape
        c = self.config
        q = self.q(x).view(b, seq, c.num_heads, c.head_dim).transpose(1, 2)
        k = self.k(x).view(b, seq, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v(x).view(b, seq, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if c.num_kv_heads != c.num_heads:
            rep = c.num_heads // c.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(out.transpose(1, 2).reshape(b, seq, -1))


class Block(nn.Module):
    """Pre-norm decoder block; the MLP is dense or MoE."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.mlp: nn.Module = (SwiGLU(config.hidden_size, config.intermediate_size)
                               if layer < config.first_k_dense_replace else MoE(config))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))


class LingModel(nn.Module):
    """Decoder-only Ling MoE language model.

    ``forward(tokens, doc_ids=None, cu_seqlens=None)`` returns logits ``[B, L, vocab]``; with ``doc_ids``, or
    ``cu_seqlens`` over the flattened ``B * L`` tokens (FlashAttention's varlen layout, every row starting a
    segment), attention is block-diagonal per document (causal within each). :meth:`moe_layers` gives the
    MoE modules, whose ``last`` router statistics hold the balance and z losses of the last forward.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The release's init (``BailingMoePreTrainedModel._init_weights``): every Linear, experts included,
        and the embedding ``N(0, initializer_range)``; the padding row zero; routers see :meth:`MoE.reset_parameters`."""
        std = self.config.initializer_range
        routers = {id(m.gate) for m in self.modules() if isinstance(m, MoE)}
        for module in self.modules():
            if isinstance(module, MoE):
                module.reset_parameters()
            elif isinstance(module, (nn.Linear, nn.Embedding)) and id(module) not in routers:
                nn.init.normal_(module.weight, mean=0.0, std=std)
        if self.config.pad_token_id is not None:
            with torch.no_grad():
                self.embed.weight[self.config.pad_token_id].zero_()

    def moe_layers(self) -> list[MoE]:
        """The MoE modules, in layer order."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def set_step(self, step: int) -> None:
        """Tell the routers the optimizer step (for the stochastic routing warmup)."""
        for m in self.moe_layers():
            m.step = step

    def router_stats(self) -> list[RouterStats]:
        """Statistics of each MoE layer's last forward."""
        return [m.last for m in self.moe_layers() if m.last is not None]

    def aux_loss(self) -> torch.Tensor:
        """Sum of the balance and z losses of the last forward."""
        stats = self.router_stats()
        if not stats:
            return torch.zeros((), device=self.embed.weight.device)
        return torch.stack([s.balance_loss + s.z_loss for s in stats]).sum()

    def forward(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        seq = tokens.shape[1]
        cos, sin = rope_tables(seq, self.config.head_dim, self.config.rope_theta, tokens.device)
        mask = None
        if cu_seqlens is not None and cu_seqlens.numel() > tokens.shape[0] + 1:  # a row holds several documents
            # segment of each flattened position: how many boundaries are at or before it, less one
            starts = cu_seqlens.to(device=tokens.device, dtype=torch.int64)
            flat = torch.arange(tokens.numel(), device=tokens.device)
            doc_ids = (torch.searchsorted(starts, flat, right=True) - 1).view_as(tokens)
        if doc_ids is not None and bool((doc_ids[:, -1] != doc_ids[:, 0]).any()):
            causal = torch.ones(seq, seq, dtype=torch.bool, device=tokens.device).tril()
            mask = (doc_ids[:, None, :, None] == doc_ids[:, None, None, :]) & causal
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        x = self.norm(x)
        weight = norm_head_weight(self.lm_head.weight) if self.config.norm_head else self.lm_head.weight
        return F.linear(x, weight)


def count_params(config: ModelConfig) -> tuple[int, int]:
    """(total, active-per-token) parameters, from the module shapes on the meta device.

    Active counts every non-expert parameter plus ``top_k`` of each MoE layer's routed experts.
    """
    with torch.device("meta"):
        model = LingModel(config)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for moe in model.moe_layers():
        routed = moe.w1.numel() + moe.w3.numel() + moe.w2.numel()
        inactive += routed * (config.num_experts - config.top_k) // config.num_experts
    return total, total - inactive
