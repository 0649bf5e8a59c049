"""Hugging Face BailingMoe weights in and out: the released names and shapes, import -> train -> export,
a bit-exact round trip, refusals of what the model cannot compute, and (opt-in) logits equal to the
released modeling code's."""

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
from safetensors import safe_open
from safetensors.torch import save_file

from ling_train import CheckpointManager, LingModel, ModelConfig, TrainConfig
from ling_train.cli import main
from ling_train.corpus import sample_texts, write_text_corpus
from ling_train.hf import from_hf, hf_config, to_hf
from ling_train.hf_io import export_hf, import_hf, write_hf_dir
from ling_train.trainer import Trainer

# Small, but every feature of the layout: a dense first layer, GQA with head_dim != hidden / heads,
# several experts, two shared experts, a padding index.
SMALL = ModelConfig(vocab_size=259, hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=16,
                    intermediate_size=80, moe_intermediate_size=24, num_experts=5, top_k=2, num_shared_experts=2,
                    first_k_dense_replace=1, rope_theta=600000.0, rms_eps=1e-5, initializer_range=0.006,
                    pad_token_id=0)
TRAIN = {"batch_size": 4, "seq_len": 32, "threads": 1, "log_every": 1000, "warmup_steps": 2}


def reference_layout(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of ``BailingMoeForCausalLM``'s parameters, written out from the module tree of
    inclusionAI's modeling_bailing_moe.py: model.word_embeddings, model.layers[i].{input_layernorm,
    attention.{query_key_value,dense}, post_attention_layernorm, mlp}, model.norm, lm_head; the mlp is a
    BailingMoeMLP (gate_proj, up_proj, down_proj) below first_k_dense_replace, else a sparse block with
    gate.weight, experts[e] (BailingMoeMLP of moe_intermediate_size) and shared_experts (width
    moe_intermediate_size * num_shared_experts). nn.Linear weights are [out, in]."""
    h, hd, v = c.hidden_size, c.head_dim, c.vocab_size
    names: dict[str, tuple[int, ...]] = {"model.word_embeddings.weight": (v, h), "model.norm.weight": (h,),
                                         "lm_head.weight": (v, h)}

    def mlp(prefix: str, inner: int) -> None:
        names.update({f"{prefix}.gate_proj.weight": (inner, h), f"{prefix}.up_proj.weight": (inner, h),
                      f"{prefix}.down_proj.weight": (h, inner)})

    for i in range(c.num_layers):
        p = f"model.layers.{i}"
        names[f"{p}.input_layernorm.weight"] = (h,)
        names[f"{p}.post_attention_layernorm.weight"] = (h,)
        names[f"{p}.attention.query_key_value.weight"] = ((c.num_heads + 2 * c.num_kv_heads) * hd, h)
        names[f"{p}.attention.dense.weight"] = (h, c.num_heads * hd)
        if i < c.first_k_dense_replace:
            mlp(f"{p}.mlp", c.intermediate_size)
            continue
        names[f"{p}.mlp.gate.weight"] = (c.num_experts, h)
        for e in range(c.num_experts):
            mlp(f"{p}.mlp.experts.{e}", c.moe_intermediate_size)
        mlp(f"{p}.mlp.shared_experts", c.moe_intermediate_size * c.num_shared_experts)
    return names


def synthetic_hf_dir(path: Path, c: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """A BailingMoe directory written straight from the reference layout (not by our exporter)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: (torch.randn(shape, generator=gen) * (1.0 if len(shape) == 1 else 0.05)).to(dtype)
               for name, shape in reference_layout(c).items()}
    if c.pad_token_id is not None:
        tensors["model.word_embeddings.weight"][c.pad_token_id] = 0  # as the release's init leaves it
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    doc = {"architectures": ["BailingMoeForCausalLM"], "model_type": "bailing_moe", "vocab_size": c.vocab_size,
           "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
           "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
           "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
           "use_qkv_bias": False, "use_bias": False, "rms_norm_eps": c.rms_eps, "norm_head": True,
           "tie_word_embeddings": False, "initializer_range": c.initializer_range, "rope_theta": c.rope_theta,
           "rope_scaling": None, "pad_token_id": c.pad_token_id, "eos_token_id": 1, "num_experts": c.num_experts,
           "num_shared_experts": c.num_shared_experts, "num_experts_per_tok": c.top_k, "norm_topk_prob": True,
           "moe_intermediate_size": c.moe_intermediate_size, "first_k_dense_replace": c.first_k_dense_replace,
           "max_position_embeddings": 4096, "torch_dtype": str(dtype).removeprefix("torch.")}
    (path / "config.json").write_text(json.dumps(doc))
    return tensors


def read_dir(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return json.loads((path / "config.json").read_text()), tensors


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("hf-corpus") / "corpus")
    write_text_corpus(path, sample_texts(300, seed=2))
    return path


def test_export_has_the_released_names_shapes_and_config() -> None:
    torch.manual_seed(0)
    model = LingModel(SMALL)
    tensors = to_hf(model.state_dict(), SMALL)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == reference_layout(SMALL)
    doc = hf_config(SMALL, torch.float32)
    assert doc["architectures"] == ["BailingMoeForCausalLM"] and doc["model_type"] == "bailing_moe"
    assert doc["auto_map"]["AutoModelForCausalLM"] == "modeling_bailing_moe.BailingMoeForCausalLM"
    assert (doc["num_attention_heads"], doc["num_key_value_heads"], doc["head_dim"]) == (6, 2, 16)
    assert (doc["num_experts"], doc["num_experts_per_tok"], doc["num_shared_experts"]) == (5, 2, 2)
    assert (doc["rms_norm_eps"], doc["initializer_range"], doc["pad_token_id"]) == (1e-5, 0.006, 0)
    assert doc["norm_head"] is True and doc["use_bias"] is False and doc["torch_dtype"] == "float32"
    # No shared experts: null, since the release builds a (zero-width) shared MLP for any number.
    assert hf_config(SMALL.replace(num_shared_experts=0), torch.float32)["num_shared_experts"] is None


def test_fused_qkv_and_expert_weights_compute_what_the_release_computes() -> None:
    torch.manual_seed(1)
    model = LingModel(SMALL)
    hf = to_hf(model.state_dict(), SMALL)
    x = torch.randn(7, SMALL.hidden_size)
    attn = model.layers[1].attn
    # The release: qkv viewed as [..., heads + 2*kv_heads, head_dim], split [heads, kv, kv] along the heads.
    qkv = (x @ hf["model.layers.1.attention.query_key_value.weight"].t()).view(7, 6 + 2 * 2, 16)
    q, k, v = qkv.split([6, 2, 2], dim=1)
    torch.testing.assert_close(q.reshape(7, -1), attn.q(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(k.reshape(7, -1), attn.k(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(v.reshape(7, -1), attn.v(x), rtol=0, atol=1e-6)
    moe = model.layers[2].mlp
    e = 3
    ref = (torch.nn.functional.silu(x @ hf[f"model.layers.2.mlp.experts.{e}.gate_proj.weight"].t())
           * (x @ hf[f"model.layers.2.mlp.experts.{e}.up_proj.weight"].t())) \
        @ hf[f"model.layers.2.mlp.experts.{e}.down_proj.weight"].t()
    ours = (torch.nn.functional.silu(x @ moe.w1[e]) * (x @ moe.w3[e])) @ moe.w2[e]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_import_then_training_resumes_then_export(corpus: str, tmp_path: Path) -> None:
    src = tmp_path / "released"
    released = synthetic_hf_dir(src, SMALL)
    ckpt = f"pcache::file://{tmp_path}/ckpt"
    cache = str(tmp_path / "cache")
    assert main(["import-hf", str(src), "--ckpt", ckpt, "--cache-dir", cache]) == 0
    assert CheckpointManager(ckpt, cache_dir=cache).committed_steps() == [0]
    # The preset (tiny) differs from the checkpoint's model: the checkpoint's architecture is trained.
    cfg = TrainConfig.load(data=(corpus,), ckpt=ckpt, cache_dir=cache, resume=True, steps=4, ckpt_every=2, **TRAIN)
    trainer = Trainer(cfg)
    trainer.restore(0)
    assert trainer.model.config.differences(SMALL) == {}
    loaded = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for name, value in from_hf(released, SMALL, str(src)).items():
        assert torch.equal(loaded[name], value.float()), name
    result = trainer.run()
    assert (result.start_step, result.final_step) == (0, 4)
    state = CheckpointManager(ckpt, cache_dir=cache).load(4)
    assert not torch.equal(state["model"]["layers.1.attn.q.weight"], loaded["layers.1.attn.q.weight"])
    # The padding row gets no gradient (and, zero, no weight decay): it stays as released.
    assert torch.equal(state["model"]["embed.weight"][0], torch.zeros(SMALL.hidden_size))
    out = tmp_path / "exported"
    assert main(["export-hf", "--ckpt", ckpt, "--out", str(out), "--cache-dir", cache]) == 0
    doc, tensors = read_dir(out)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == reference_layout(SMALL)
    assert doc["eos_token_id"] == 1 and doc["max_position_embeddings"] == 4096  # kept from the import
    expected = to_hf(state["model"], SMALL)
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    # Step 0 exports the released tensors unchanged (bf16 in, bf16 out).
    assert main(["export-hf", "--ckpt", ckpt, "--step", "0", "--out", str(tmp_path / "s0"), "--cache-dir", cache]) == 0
    _, again = read_dir(tmp_path / "s0")
    assert again.keys() == released.keys() and all(torch.equal(again[k], released[k]) for k in released)


@pytest.mark.parametrize("dtype", ["keep", "bfloat16"])
def test_export_import_export_is_bit_exact(corpus: str, tmp_path: Path, dtype: str) -> None:
    cache = str(tmp_path / "cache")
    a, b = f"pcache::file://{tmp_path}/a", f"pcache::file://{tmp_path}/b"
    cfg = TrainConfig.load(data=(corpus,), ckpt=a, cache_dir=cache, steps=2, **TRAIN)
    Trainer(cfg).run()
    export_hf(a, str(tmp_path / "one"), dtype=dtype, cache_dir=cache)
    import_hf(str(tmp_path / "one"), b, cache_dir=cache)
    export_hf(b, str(tmp_path / "two"), cache_dir=cache)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_resume_from_an_import(corpus: str, tmp_path: Path, parallel: str) -> None:
    """Every rank reads its part of the imported (one-process) DCP step (FSDP2: its dim-0 chunk); with lr 0
    the weights stay, so the step-1 export (FSDP2: shards joined by DCP) equals the released tensors exactly."""
    src = tmp_path / "released"
    released = synthetic_hf_dir(src, SMALL, dtype=torch.float32)
    ckpt, cache = f"pcache::file://{tmp_path}/ckpt", str(tmp_path / "cache")
    import_hf(str(src), ckpt, cache_dir=cache)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ling_train.cli", "--data", corpus, "--steps", "1", "--batch-size", "2", "--seq-len", "32",
           "--threads", "1", "--ckpt", ckpt, "--cache-dir", cache, "--resume", "--lr", "0", "--parallel", parallel]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    mgr = CheckpointManager(ckpt, cache_dir=cache)
    assert mgr.committed_steps() == [0, 1] and mgr.ranks(1) == 2
    export_hf(ckpt, str(tmp_path / "out"), step=1, cache_dir=cache)
    _, tensors = read_dir(tmp_path / "out")
    assert tensors.keys() == released.keys() and all(torch.equal(tensors[k], released[k]) for k in released)


@pytest.mark.parametrize(("change", "message"), [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"use_bias": True}, "use_bias"),
    ({"num_key_value_heads": None}, "num_key_value_heads"),
    ({"pad_token_id": 500}, "pad_token_id"),
    ({"head_dim": 8}, "query_key_value.weight has shape"),
])
def test_import_refuses_what_the_model_cannot_compute(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      change: dict[str, Any], message: str) -> None:
    src = tmp_path / "src"
    synthetic_hf_dir(src, SMALL)
    doc = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**doc, **change}))
    ckpt = f"pcache::file://{tmp_path}/ckpt"
    assert main(["import-hf", str(src), "--ckpt", ckpt, "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and str(src) in err


def test_import_refuses_a_root_with_committed_steps_and_export_an_empty_one(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    synthetic_hf_dir(src, SMALL)
    ckpt, cache = f"pcache::file://{tmp_path}/ckpt", str(tmp_path / "c")
    assert main(["export-hf", "--ckpt", ckpt, "--out", str(tmp_path / "o"), "--cache-dir", cache]) == 2
    assert "no committed checkpoint" in capsys.readouterr().err
    assert main(["import-hf", str(src), "--ckpt", ckpt, "--cache-dir", cache]) == 0
    assert main(["import-hf", str(src), "--ckpt", ckpt, "--cache-dir", cache]) == 2
    assert "already holds committed step(s) 0" in capsys.readouterr().err
    assert main(["import-hf", str(tmp_path / "nothing"), "--ckpt", ckpt]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_import_reads_a_sharded_directory(tmp_path: Path) -> None:
    src = tmp_path / "one"
    tensors = synthetic_hf_dir(src, SMALL, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(src / "config.json", sharded / "config.json")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({k: tensors[k] for k in part}, str(sharded / file), metadata={"format": "pt"})
    weight_map = {k: file for file, part in halves.items() for k in part}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    cache = str(tmp_path / "c")
    import_hf(str(sharded), f"pcache::file://{tmp_path}/ckpt", cache_dir=cache)
    export_hf(f"pcache::file://{tmp_path}/ckpt", str(tmp_path / "out"), cache_dir=cache)
    _, again = read_dir(tmp_path / "out")
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)


RELEASED = os.environ.get("LING_BAILING_MODELING_DIR", "")


@pytest.mark.skipif(not RELEASED, reason="set LING_BAILING_MODELING_DIR to a directory holding the release's "
                                         "modeling_bailing_moe.py and configuration_bailing_moe.py")
@pytest.mark.parametrize("change", [{}, {"top_k": 1}, {"num_shared_experts": 0, "tie_embeddings": True}])
def test_released_modeling_code_gives_our_logits(tmp_path: Path, change: dict[str, Any]) -> None:
    transformers = pytest.importorskip("transformers")
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a torchvision built for another torch: transformers must not import it
        import transformers.utils.import_utils as import_utils

        import_utils._torchvision_available = False
    config = SMALL.replace(**change)
    torch.manual_seed(3)
    model = LingModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # norms away from 1, so a swapped norm would show
            elif p.ndim > 1:
                p.normal_(0.0, 0.05)
    write_hf_dir(str(tmp_path), hf_config(config, torch.float32), to_hf(model.state_dict(), config))
    for name in ("modeling_bailing_moe.py", "configuration_bailing_moe.py"):
        shutil.copy(Path(RELEASED) / name, tmp_path / name)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True,
                                                            dtype=torch.float32, attn_implementation="eager").eval()
    tokens = torch.randint(1, config.vocab_size, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(input_ids=tokens, use_cache=False).logits, rtol=1e-5, atol=1e-5)
