"""Mixture-of-experts layer: softmax-top-k router, dropless sort-based dispatch, balance and z losses.

Dispatch never loops over tokens in Python: the ``T * k`` (token, expert) assignments are sorted by expert
id, so every expert's tokens are one contiguous slice. On GPUs with grouped GEMM support (Hopper and
later, bf16) the slices run through ``torch._grouped_mm``; elsewhere they are scattered into a padded
``[experts, max_tokens, hidden]`` batch and run through ``torch.bmm`` (one batched matmul per projection,
still no loop). Every expert weight takes part in the graph in both paths, so DDP sees a gradient for each
parameter every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ling_train.config import ModelConfig


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``, no biases."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, inner, bias=False)
        self.w3 = nn.Linear(hidden, inner, bias=False)
        self.w2 = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@dataclass
class RouterStats:
    """What one MoE layer's last forward routed (for losses and logging)."""

    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    load: torch.Tensor  # tokens per expert, float [E]
    entropy: torch.Tensor  # mean router entropy (nats)
    router_z: torch.Tensor  # mean |logsumexp(logits)|: the logit scale the z-loss penalizes


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """True where ``torch._grouped_mm`` runs: CUDA tensors in bf16 on compute capability >= 9.0."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")):
        return False
    return torch.cuda.get_device_capability(x.device) >= (9, 0)


class MoE(nn.Module):
    """Fine-grained routed experts plus shared experts: ``o' = routed(h) + shared(h)``.

    Args:
        config: The model config (experts, top-k, widths, loss coefficients, routing warmup).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        hidden, inner, n = config.hidden_size, config.moe_intermediate_size, config.num_experts
        self.gate = nn.Linear(hidden, n, bias=False)
        # Stacked expert weights [E, in, out]: the layout both grouped_mm and bmm take directly.
        self.w1 = nn.Parameter(torch.empty(n, hidden, inner))
        self.w3 = nn.Parameter(torch.empty(n, hidden, inner))
        self.w2 = nn.Parameter(torch.empty(n, inner, hidden))
        self.shared = SwiGLU(hidden, inner * config.num_shared_experts) if config.num_shared_experts else None
        # Running mean and std of the router logits, for the stochastic routing warmup.
        self.logit_mean: torch.Tensor
        self.logit_std: torch.Tensor
        self.register_buffer("logit_mean", torch.zeros(()))
        self.register_buffer("logit_std", torch.ones(()))
        self.step = 0  # set by the trainer before each forward
        self.last: RouterStats | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The release's init: experts ``N(0, initializer_range)`` (in the release each expert is a
        ``nn.Linear``, which its ``_init_weights`` draws so); the router kaiming-uniform, as the release's
        ``BailingMoeGate`` (a bare parameter that ``_init_weights`` does not touch) and ``nn.Linear``'s own."""
        for w in (self.w1, self.w3, self.w2):
            nn.init.normal_(w, mean=0.0, std=self.config.initializer_range)
        self.gate.reset_parameters()

    def _warmup_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``s' = a*s + (1-a)*(mu + sigma*eps)``, ``a = min(step/W, 1)``; updates the running stats."""
        warmup = self.config.routing_warmup_steps
        if not self.training or warmup <= 0:
            return logits
        with torch.no_grad():
            m = self.config.routing_stats_momentum
            self.logit_mean.mul_(1 - m).add_(m * logits.detach().float().mean())
            self.logit_std.mul_(1 - m).add_(m * logits.detach().float().std())
        alpha = min(self.step / warmup, 1.0)
        if alpha >= 1.0:
            return logits
        noise = self.logit_mean + self.logit_std * torch.randn_like(logits)
        return alpha * logits + (1 - alpha) * noise.to(logits.dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        tokens, n, k = x.shape[0], self.config.num_experts, self.config.top_k
        logits = self._warmup_logits(self.gate(x).float())
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(k, dim=-1)
        if k > 1 and self.config.norm_topk_prob:  # as the release: one expert keeps its softmax probability
            weights = weights / weights.sum(dim=-1, keepdim=True)
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)  # sort (token, slot) pairs by expert id
        counts = torch.bincount(flat, minlength=n)
        token_of = order // k
        x_sorted = x[token_of]
        if grouped_mm_supported(x):
            out = self._grouped(x_sorted, counts)
        else:
            out = self._batched(x_sorted, flat[order], counts)
        out = out * weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
        y = torch.zeros_like(x).index_add_(0, token_of, out.to(x.dtype))
        if self.shared is not None:
            y = y + self.shared(x)
        self.last = self._stats(logits, probs, counts, tokens)
        return y.reshape(shape)

    def _grouped(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = counts.cumsum(0).to(torch.int32)
        w1, w3, w2 = (w.to(x_sorted.dtype) for w in (self.w1, self.w3, self.w2))
        a = torch._grouped_mm(x_sorted, w1, offs=offs)
        b = torch._grouped_mm(x_sorted, w3, offs=offs)
        return torch._grouped_mm(F.silu(a) * b, w2, offs=offs)

    def _batched(self, x_sorted: torch.Tensor, expert_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        n, hidden = self.config.num_experts, x_sorted.shape[-1]
        starts = counts.cumsum(0) - counts
        slot = torch.arange(len(expert_sorted), device=x_sorted.device) - starts[expert_sorted]
        cap = int(counts.max())
        padded = x_sorted.new_zeros(n, cap, hidden).index_put((expert_sorted, slot), x_sorted)
        a = torch.bmm(padded, self.w1.to(x_sorted.dtype))
        b = torch.bmm(padded, self.w3.to(x_sorted.dtype))
        out = torch.bmm(F.silu(a) * b, self.w2.to(x_sorted.dtype))
        return out[expert_sorted, slot]

    def _stats(self, logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor, tokens: int) -> RouterStats:
        n, k = self.config.num_experts, self.config.top_k
        load = counts.float()
        f = load / (tokens * k)  # fraction of assignments per expert (no gradient, as in Switch)
        p = probs.mean(dim=0)
        balance = self.config.balance_coef * n * (f * p).sum()
        lse = torch.logsumexp(logits, dim=-1)
        z = self.config.z_coef * lse.square().mean()
        entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean()
        return RouterStats(balance, z, load, entropy.detach(), lse.detach().abs().mean())
