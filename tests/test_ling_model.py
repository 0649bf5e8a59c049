"""ling_train model: NormHead, parameter counts, routing and dispatch, losses, presets and config errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ling_train import LingModel, ModelConfig, count_params, norm_head_weight, preset
from ling_train.cli import main
from ling_train.config import TrainConfig
from ling_train.moe import MoE
from pcache.errors import ConfigError


def test_norm_head_matches_reference_formula() -> None:
    torch.manual_seed(0)
    w = torch.randn(259, 32, requires_grad=True)
    ref = w / (w.detach().pow(2).sum(dim=0, keepdim=True).sqrt() + 1e-7)  # L2 over the vocab axis
    out = norm_head_weight(w)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # Each hidden column has unit norm across the vocabulary (Ling), not each vocab row (Baichuan).
    torch.testing.assert_close(out.norm(dim=0), torch.ones(32), rtol=0, atol=1e-5)
    assert not torch.allclose(out.norm(dim=1), torch.ones(259), atol=1e-3)
    # The norm is detached: the gradient is that of W scaled by a constant.
    out.sum().backward()
    grad = w.grad
    assert grad is not None
    torch.testing.assert_close(grad, (1 / (w.detach().norm(dim=0, keepdim=True) + 1e-7)).expand_as(w))


def test_model_uses_norm_head_for_logits() -> None:
    cfg = preset("tiny")
    model = LingModel(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    hidden: list[torch.Tensor] = []
    model.norm.register_forward_hook(lambda m, i, o: hidden.append(o))
    logits = model(tokens)
    expected = F.linear(hidden[0], norm_head_weight(model.lm_head.weight))
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize(("name", "total", "active", "tolerance"),
                         [("ling-lite", 16.8e9, 2.75e9, 0.02), ("ling-plus", 290e9, 28.8e9, 0.03)])
def test_param_counts_match_published(name: str, total: float, active: float, tolerance: float) -> None:
    got_total, got_active = count_params(preset(name))
    assert abs(got_total - total) / total <= tolerance
    assert abs(got_active - active) / active <= tolerance


def test_presets_carry_the_released_shapes_and_counts() -> None:
    plus = preset("ling-plus")
    assert (plus.num_heads, plus.num_kv_heads, plus.head_dim, plus.first_k_dense_replace) == (56, 8, 96, 0)
    assert plus.num_heads * plus.head_dim == plus.hidden_size == 5376
    total, active = count_params(plus)
    assert (round(total / 1e9, 1), round(active / 1e9, 1)) == (290.6, 29.0)
    total, active = count_params(preset("ling-lite"))
    assert (round(total / 1e9, 1), round(active / 1e9, 2)) == (16.8, 2.75)


def test_params_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["params", "--preset", "ling-lite", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total"] == count_params(preset("ling-lite"))[0]
    assert main(["params", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


def _naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Reference: a Python loop over tokens and their top-k experts."""
    probs = moe.gate(x).float().softmax(-1)
    w, idx = probs.topk(moe.config.top_k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(moe.config.top_k):
            e = int(idx[t, j])
            h = F.silu(x[t] @ moe.w1[e]) * (x[t] @ moe.w3[e])
            out[t] += w[t, j] * (h @ moe.w2[e])
    assert moe.shared is not None
    return out + moe.shared(x)


def test_sorted_dispatch_matches_a_token_loop() -> None:
    torch.manual_seed(1)
    moe = MoE(ModelConfig(hidden_size=32, moe_intermediate_size=16, num_experts=6, top_k=3))
    x = torch.randn(40, 32)
    torch.testing.assert_close(moe(x), _naive_moe(moe, x), rtol=1e-5, atol=1e-5)
    assert moe.last is not None and int(moe.last.load.sum()) == 40 * 3
    # Every expert weight gets a gradient (DDP needs no find_unused_parameters).
    moe(x).sum().backward()
    assert all(p.grad is not None for p in moe.parameters())


def test_balance_and_z_loss_formulas() -> None:
    torch.manual_seed(2)
    cfg = ModelConfig(hidden_size=16, moe_intermediate_size=8, num_experts=4, top_k=2)
    moe = MoE(cfg)
    x = torch.randn(64, 16)
    moe(x)
    logits = moe.gate(x).float()
    probs = logits.softmax(-1)
    idx = probs.topk(2, dim=-1).indices
    f = torch.bincount(idx.reshape(-1), minlength=4).float() / (64 * 2)
    assert moe.last is not None
    torch.testing.assert_close(moe.last.balance_loss, 0.015 * 4 * (f * probs.mean(0)).sum())
    torch.testing.assert_close(moe.last.z_loss, 1e-4 * torch.logsumexp(logits, -1).square().mean())


def test_routing_warmup_mixes_noise_until_w() -> None:
    torch.manual_seed(3)
    moe = MoE(ModelConfig(hidden_size=16, moe_intermediate_size=8, num_experts=4, top_k=2, routing_warmup_steps=10))
    logits = torch.randn(32, 4)
    moe.train()
    moe.step = 0
    early = moe._warmup_logits(logits)
    assert not torch.allclose(early, logits)
    assert float(moe.logit_std) != 1.0  # running stats moved
    moe.step = 10
    assert torch.equal(moe._warmup_logits(logits), logits)
    moe.eval()
    moe.step = 0
    assert torch.equal(moe._warmup_logits(logits), logits)


def test_bad_config_raises_typed_errors_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ConfigError, match="preset"):
        TrainConfig.load(preset="huge")
    with pytest.raises(ConfigError, match="parallel"):
        TrainConfig.load(parallel="tp")
    with pytest.raises(ConfigError, match="resume"):
        TrainConfig.load(resume=True)


def test_presets_carry_the_released_hyper_parameters() -> None:
    lite, plus = preset("ling-lite"), preset("ling-plus")
    # Ling-lite base config.json: rms_norm_eps 1e-5; Ling-plus: 1e-6; both initializer_range 0.006, pad 126081.
    assert (lite.rms_eps, lite.initializer_range, lite.pad_token_id) == (1e-5, 0.006, 126081)
    assert (plus.rms_eps, plus.initializer_range, plus.pad_token_id) == (1e-6, 0.006, 126081)
    assert lite.norm_topk_prob and plus.norm_topk_prob
    # Another vocabulary is another tokenizer: the release's padding id means nothing there.
    assert TrainConfig.load(preset="ling-lite", vocab_size=8192).model_config().pad_token_id is None
    assert TrainConfig.load(preset="ling-lite", vocab_size=126464).model_config().pad_token_id == 126081
    with pytest.raises(ConfigError, match="pad_token_id"):
        ModelConfig(vocab_size=10, pad_token_id=10)


def test_init_is_the_releases_experts_included_and_the_padding_row_is_zero_and_frozen() -> None:
    torch.manual_seed(4)
    cfg = ModelConfig(hidden_size=256, moe_intermediate_size=192, num_experts=8, intermediate_size=320,
                      initializer_range=0.006, pad_token_id=5)
    model = LingModel(cfg)
    moe = model.layers[1].mlp
    assert isinstance(moe, MoE)
    for name, w in [("q", model.layers[0].attn.q.weight), ("dense w1", model.layers[0].mlp.w1.weight),
                    ("expert w1", moe.w1), ("expert w2", moe.w2), ("shared", moe.shared.w2.weight),
                    ("lm_head", model.lm_head.weight), ("embed", model.embed.weight[6:])]:
        assert abs(float(w.detach().std()) - 0.006) < 0.0005, name
    # The router is the release's bare parameter with kaiming-uniform init, which _init_weights skips.
    bound = 1 / 256 ** 0.5
    gate = moe.gate.weight.detach()
    assert float(gate.abs().max()) <= bound and float(gate.std()) > 0.5 * bound
    assert torch.equal(model.embed.weight[5], torch.zeros(256))
    tokens = torch.tensor([[5, 7, 5, 9]])
    F.cross_entropy(model(tokens)[0], torch.tensor([7, 5, 9, 1])).backward()
    assert model.embed.weight.grad is not None and torch.equal(model.embed.weight.grad[5], torch.zeros(256))


def test_top_k_weights_are_renormalised_only_when_top_k_is_above_one() -> None:
    torch.manual_seed(5)
    moe = MoE(ModelConfig(hidden_size=16, moe_intermediate_size=8, num_experts=4, top_k=1, num_shared_experts=0))
    x = torch.randn(10, 16)
    probs = moe.gate(x).float().softmax(-1)
    p, idx = probs.max(-1)
    expected = torch.stack([p[t] * ((F.silu(x[t] @ moe.w1[e]) * (x[t] @ moe.w3[e])) @ moe.w2[e])
                            for t, e in enumerate(idx.tolist())])
    torch.testing.assert_close(moe(x), expected, rtol=1e-5, atol=1e-6)
    off = MoE(ModelConfig(hidden_size=16, moe_intermediate_size=8, num_experts=4, top_k=2, norm_topk_prob=False))
    off.load_state_dict(MoE(ModelConfig(hidden_size=16, moe_intermediate_size=8, num_experts=4, top_k=2)).state_dict())
    assert not torch.allclose(off(x), _naive_moe(off, x))  # the naive reference renormalises
