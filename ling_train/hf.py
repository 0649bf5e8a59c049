"""The released BailingMoe layout: parameter names, shapes and ``config.json``, to and from ours.

inclusionAI's ``modeling_bailing_moe.py`` (``BailingMoeForCausalLM``) holds, per decoder layer ``i``::

    model.layers.{i}.input_layernorm.weight                 [hidden]
    model.layers.{i}.attention.query_key_value.weight       [(heads + 2 * kv_heads) * head_dim, hidden]
    model.layers.{i}.attention.dense.weight                 [hidden, heads * head_dim]
    model.layers.{i}.post_attention_layernorm.weight        [hidden]
    model.layers.{i}.mlp.{gate,up,down}_proj.weight         dense layers (i < first_k_dense_replace)
    model.layers.{i}.mlp.gate.weight                        [experts, hidden]        (the router)
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight   one nn.Linear per routed expert
    model.layers.{i}.mlp.shared_experts.{gate,up,down}_proj.weight  width moe_inner * num_shared_experts

plus ``model.word_embeddings.weight``, ``model.norm.weight`` and ``lm_head.weight`` (stored raw: NormHead
normalises it on the fly). The fused projection's rows are q, then k, then v: the release views its output
as ``[..., heads + 2 * kv_heads, head_dim]`` and splits it ``[heads, kv_heads, kv_heads]``. A Linear's
weight is ``[out, in]``; our stacked experts are ``[E, in, out]``, so an expert's weight is its slice
transposed. Every conversion is a copy, a concatenation, a split or a transpose: bit-exact both ways.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ling_train.config import ModelConfig
from ling_train.model import LingModel

ARCHITECTURE = "BailingMoeForCausalLM"
MODEL_TYPE = "bailing_moe"
AUTO_MAP = {"AutoConfig": "configuration_bailing_moe.BailingMoeConfig",
            "AutoModel": "modeling_bailing_moe.BailingMoeModel",
            "AutoModelForCausalLM": "modeling_bailing_moe.BailingMoeForCausalLM"}

# Our name's tail -> the release's, for the one-to-one tensors of a layer (SwiGLU: w1 gate, w3 up, w2 down).
_LAYER_RENAMES = {"attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
                  "attn.o.weight": "attention.dense.weight", "mlp.gate.weight": "mlp.gate.weight",
                  "mlp.w1.weight": "mlp.gate_proj.weight", "mlp.w3.weight": "mlp.up_proj.weight",
                  "mlp.w2.weight": "mlp.down_proj.weight", "mlp.shared.w1.weight": "mlp.shared_experts.gate_proj.weight",
                  "mlp.shared.w3.weight": "mlp.shared_experts.up_proj.weight",
                  "mlp.shared.w2.weight": "mlp.shared_experts.down_proj.weight"}
_TOP_RENAMES = {"embed.weight": "model.word_embeddings.weight", "norm.weight": "model.norm.weight",
                "lm_head.weight": "lm_head.weight"}
_EXPERT_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
# Buffers of our own (the routing warmup's running logit statistics): not part of the release's layout.
_OURS_ONLY = ("mlp.logit_mean", "mlp.logit_std")


class HFLayoutError(ValueError):
    """A Hugging Face directory or config does not hold a BailingMoe model this trainer can represent."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source


def expected_ours(config: ModelConfig) -> dict[str, torch.Size]:
    """Our state-dict names and shapes for ``config`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = LingModel(config)
    return {name: t.shape for name, t in model.state_dict().items()}


def to_hf(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our model state dict -> the release's tensors (contiguous, ready for safetensors)."""
    out: dict[str, torch.Tensor] = {}
    for i in range(config.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        out[theirs + "attention.query_key_value.weight"] = torch.cat(
            [state[ours + f"attn.{p}.weight"] for p in ("q", "k", "v")], dim=0)
        for tail, hf_tail in _LAYER_RENAMES.items():
            if ours + tail in state:
                out[theirs + hf_tail] = state[ours + tail]
        if i >= config.first_k_dense_replace:
            for w, proj in _EXPERT_PROJ.items():
                stacked = state[ours + f"mlp.{w}"]
                for e in range(config.num_experts):
                    out[theirs + f"mlp.experts.{e}.{proj}.weight"] = stacked[e].t()
    for name, hf_name in _TOP_RENAMES.items():
        out[hf_name] = state[name]
    if config.tie_embeddings:
        del out["lm_head.weight"]  # the release ties it to the embedding (_tied_weights_keys)
    return {k: v.contiguous() for k, v in out.items()}


def from_hf(tensors: Mapping[str, torch.Tensor], config: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """The release's tensors -> our state dict (dtype kept), checked name by name and shape by shape.

    Raises:
        HFLayoutError: naming ``source`` and the first missing, unexpected or misshapen tensor.
    """
    want = expected_ours(config)
    reference = to_hf({k: torch.empty(s, device="meta") for k, s in want.items()}, config)
    extra = sorted(set(tensors) - set(reference) - _ignorable(tensors, config))
    if extra:
        raise HFLayoutError(source, f"unexpected tensor {extra[0]} ({len(extra)} in all) for this config")
    for name, ref in reference.items():
        if name not in tensors:
            raise HFLayoutError(source, f"missing tensor {name}")
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise HFLayoutError(source, f"{name} has shape {tuple(tensors[name].shape)}, "
                                        f"config.json implies {tuple(ref.shape)}")
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    out: dict[str, torch.Tensor] = {}
    for i in range(config.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        qkv = tensors[theirs + "attention.query_key_value.weight"]
        for p, part in zip("qkv", torch.split(qkv, [q, kv, kv], dim=0), strict=True):
            out[ours + f"attn.{p}.weight"] = part.clone()
        for tail, hf_tail in _LAYER_RENAMES.items():
            if ours + tail in want:
                out[ours + tail] = tensors[theirs + hf_tail]
        if i >= config.first_k_dense_replace:
            for w, proj in _EXPERT_PROJ.items():
                out[ours + f"mlp.{w}"] = torch.stack(
                    [tensors[theirs + f"mlp.experts.{e}.{proj}.weight"].t() for e in range(config.num_experts)])
            out[ours + "mlp.logit_mean"] = torch.zeros(())  # the routing warmup's statistics start afresh
            out[ours + "mlp.logit_std"] = torch.ones(())
    for name, hf_name in _TOP_RENAMES.items():
        out[name] = tensors["model.word_embeddings.weight" if config.tie_embeddings and name == "lm_head.weight"
                            else hf_name]
    missing = set(want) - set(out)
    assert not missing, f"layout table incomplete: {sorted(missing)[:3]}"
    return {k: v.contiguous() for k, v in out.items()}


def _ignorable(tensors: Mapping[str, torch.Tensor], config: ModelConfig) -> set[str]:
    """Tensors the release may hold that carry nothing: a tied lm_head, zero-width shared experts."""
    names = {"lm_head.weight"} if config.tie_embeddings else set()
    return names | {n for n, t in tensors.items() if ".shared_experts." in n and t.numel() == 0}


def hf_config(config: ModelConfig, dtype: torch.dtype, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``config.json`` of a ``BailingMoeForCausalLM`` with ``config``'s shape and hyper-parameters.

    ``base`` (the ``config.json`` an imported checkpoint came with) supplies what we do not model
    (token ids, context length, version stamps); every field that decides what the weights compute is ours.
    """
    doc = dict(base or {})
    doc.update({
        "architectures": [ARCHITECTURE], "auto_map": dict(AUTO_MAP), "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "hidden_act": "silu", "use_qkv_bias": False, "use_bias": False,
        "rms_norm_eps": config.rms_eps, "norm_head": config.norm_head,
        "tie_word_embeddings": config.tie_embeddings, "initializer_range": config.initializer_range,
        "rope_theta": config.rope_theta, "rope_scaling": None, "pad_token_id": config.pad_token_id,
        # The release builds a shared MLP whenever this is not null, even of width 0.
        "num_experts": config.num_experts, "num_shared_experts": config.num_shared_experts or None,
        "num_experts_per_tok": config.top_k, "norm_topk_prob": config.norm_topk_prob,
        "moe_intermediate_size": config.moe_intermediate_size, "first_k_dense_replace": config.first_k_dense_replace,
        "attention_dropout": 0.0, "torch_dtype": str(dtype).removeprefix("torch."),
    })
    for key, value in (("embedding_dropout", 0.0), ("output_dropout", 0.0), ("max_position_embeddings", 16384),
                       ("use_cache", True), ("output_router_logits", False)):
        doc.setdefault(key, value)
    return doc


# What the release's BailingMoeConfig assumes for a key the file leaves out.
_RELEASE_DEFAULTS = {"hidden_act": "silu", "use_qkv_bias": False, "use_bias": True, "rms_norm_eps": 1e-5,
                     "norm_head": False, "tie_word_embeddings": False, "initializer_range": 0.02,
                     "rope_theta": 10000.0, "rope_scaling": None, "pad_token_id": 126081, "num_shared_experts": 0,
                     "norm_topk_prob": True, "first_k_dense_replace": 0, "head_dim": None}
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "num_experts", "num_experts_per_tok", "moe_intermediate_size")


def model_config_from_hf(doc: Mapping[str, Any], source: str) -> ModelConfig:
    """Our :class:`ModelConfig` for a BailingMoe ``config.json`` (defaults as the release's config class).

    Raises:
        HFLayoutError: a missing key, or a feature this trainer's model does not compute (biases, another
            activation, RoPE scaling), named with ``source``.
    """
    if doc.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise HFLayoutError(source, f"model_type is {doc.get('model_type')!r}, not {MODEL_TYPE!r}")
    for key in _REQUIRED:
        if doc.get(key) is None:
            raise HFLayoutError(source, f"needs {key!r} (this trainer models BailingMoe with experts)")
    get = {**_RELEASE_DEFAULTS, **{k: v for k, v in doc.items() if k in _RELEASE_DEFAULTS}}
    unsupported = {"hidden_act": get["hidden_act"] != "silu", "use_qkv_bias": bool(get["use_qkv_bias"]),
                   "use_bias": bool(get["use_bias"]), "rope_scaling": get["rope_scaling"] is not None}
    for key, bad in unsupported.items():
        if bad:
            raise HFLayoutError(source, f"{key} {get[key]!r} is not supported by ling_train's model")
    first_dense = int(get["first_k_dense_replace"])
    if first_dense and doc.get("intermediate_size") is None:
        raise HFLayoutError(source, "needs 'intermediate_size' for its first_k_dense_replace dense layers")
    heads = int(doc["num_attention_heads"])
    return ModelConfig(
        vocab_size=int(doc["vocab_size"]), hidden_size=int(doc["hidden_size"]),
        num_layers=int(doc["num_hidden_layers"]), num_heads=heads, num_kv_heads=int(doc["num_key_value_heads"]),
        head_dim=int(get["head_dim"] or int(doc["hidden_size"]) // heads),
        intermediate_size=int(doc.get("intermediate_size") or 0), moe_intermediate_size=int(doc["moe_intermediate_size"]),
        num_experts=int(doc["num_experts"]), top_k=int(doc["num_experts_per_tok"]),
        num_shared_experts=int(get["num_shared_experts"] or 0), first_k_dense_replace=first_dense,
        rope_theta=float(get["rope_theta"]), rms_eps=float(get["rms_norm_eps"]),
        tie_embeddings=bool(get["tie_word_embeddings"]), norm_head=bool(get["norm_head"]),
        initializer_range=float(get["initializer_range"]),
        pad_token_id=None if get["pad_token_id"] is None else int(get["pad_token_id"]),
        norm_topk_prob=bool(get["norm_topk_prob"]))
