"""``ling-train export-hf`` and ``import-hf``: Hugging Face BailingMoe directories to and from checkpoints.

A directory is ``config.json`` plus ``model.safetensors`` (export writes one file; import also reads the
sharded ``model.safetensors.index.json`` form the hub uses). An imported directory becomes a committed
step-0 DCP checkpoint written through :class:`CheckpointManager`: the weights as stored (dtype kept), the
model's :class:`ModelConfig` and the original ``config.json`` (under ``meta``), no optimizer, data or RNG state, so a
``--resume`` run starts training from the released weights with a fresh optimizer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ling_train.checkpoint import CheckpointError, CheckpointManager
from ling_train.config import PRESETS, ModelConfig, preset
from ling_train.hf import HFLayoutError, expected_ours, from_hf, hf_config, model_config_from_hf, to_hf
from lingcore.cli import run_command
from lingcore.errors import ConfigError
from lingcore.log import get_logger, setup_logging

log = get_logger(__name__)

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Converted:
    """What one export or import did."""

    step: int
    config: ModelConfig
    tensors: int
    nbytes: int


def read_hf_dir(directory: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(``config.json``, every tensor) of a Hugging Face model directory.

    Raises:
        FileNotFoundError: no ``config.json``, or no safetensors weights (one line naming the directory).
        HFLayoutError: an index naming a file that is not there.
    """
    root = Path(directory)
    if not (root / CONFIG).is_file():
        raise FileNotFoundError(f"{root}: no {CONFIG} (not a Hugging Face model directory)")
    doc = json.loads((root / CONFIG).read_text())
    if (root / WEIGHTS).is_file():
        files = {WEIGHTS}
    elif (root / INDEX).is_file():
        files = set(json.loads((root / INDEX).read_text()).get("weight_map", {}).values())
    else:
        raise FileNotFoundError(f"{root}: no {WEIGHTS} or {INDEX} (only safetensors weights are read)")
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(files):
        if not (root / name).is_file():
            raise HFLayoutError(str(root / INDEX), f"names {name}, which is not in the directory")
        with safe_open(str(root / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[key] = f.get_tensor(key)
    return doc, tensors


def write_hf_dir(directory: str, doc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> int:
    """Write ``model.safetensors`` then ``config.json`` (each whole: a sibling renamed over); return bytes."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{WEIGHTS}.tmp-{os.getpid()}"
    # "format": "pt" is what transformers' from_pretrained requires of a safetensors file's metadata.
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, root / WEIGHTS)
    tmp = root / f".{CONFIG}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, root / CONFIG)
    return (root / WEIGHTS).stat().st_size


def _manager(url: str, cache_dir: str, endpoint_url: str, storage_options: dict[str, Any] | None) -> CheckpointManager:
    return CheckpointManager(url, cache_dir=cache_dir, endpoint_url=endpoint_url, storage_options=storage_options)


def _whole_model(url: str, step: int, model: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    """The model of ``step`` checked against its config (DCP has already joined any FSDP2 shards)."""
    want = expected_ours(config)
    bad = [k for k, s in want.items() if k not in model or tuple(model[k].shape) != tuple(s)]
    if bad:
        got = tuple(model[bad[0]].shape) if bad[0] in model else "nothing"
        raise HFLayoutError(url, f"step {step}: {bad[0]} has shape {got}, the model needs {tuple(want[bad[0]])}")
    return model


def export_hf(url: str, out: str, step: int | None = None, dtype: str = "keep", preset_name: str = "",
              cache_dir: str = "", endpoint_url: str = "",
              storage_options: dict[str, Any] | None = None) -> Converted:
    """Write committed ``step`` (default: the newest) of checkpoint root ``url`` as a BailingMoe directory.

    Raises:
        FileNotFoundError: nothing committed under ``url``, or not ``step``.
        HFLayoutError: the checkpoint holds no model, or tensors that do not fit its config.
        ConfigError: an old checkpoint without its model config and no valid ``preset_name``.
    """
    mgr = _manager(url, cache_dir, endpoint_url, storage_options)
    committed = mgr.committed_steps()
    if not committed:
        raise FileNotFoundError(f"{url}: no committed checkpoint to export")
    step = committed[-1] if step is None else step
    if step not in committed:
        raise FileNotFoundError(f"{url}: step {step} is not committed (committed: {', '.join(map(str, committed))})")
    state = mgr.load(step, {"model", "meta"})
    meta = state.get("meta", {})
    if "model" not in state:
        raise HFLayoutError(url, f"step {step} holds no model weights")
    if "model_config" in meta:
        config = ModelConfig.from_dict(meta["model_config"])
    elif preset_name:  # checkpoints written before they recorded their model: the preset, vocab from the weights
        config = preset(preset_name).replace(vocab_size=int(state["model"]["embed.weight"].shape[0]))
    else:
        raise ConfigError("preset", f"{url} step {step} does not record its model config: pass --preset")
    tensors = to_hf(_whole_model(url, step, state["model"], config), config)
    if dtype != "keep":
        tensors = {k: v.to(DTYPES[dtype]) for k, v in tensors.items()}
    stored = {v.dtype for v in tensors.values()}
    written = stored.pop() if len(stored) == 1 else torch.float32
    doc = hf_config(config, written, meta.get("hf_config"))
    nbytes = write_hf_dir(out, doc, tensors)
    log.info("exported step %d of %s to %s (%d tensors, %d bytes)", step, url, out, len(tensors), nbytes)
    return Converted(step, config, len(tensors), nbytes)


def import_hf(directory: str, url: str, cache_dir: str = "", endpoint_url: str = "",
              storage_options: dict[str, Any] | None = None) -> Converted:
    """Write the BailingMoe model in ``directory`` as committed step 0 under checkpoint root ``url``.

    Raises:
        FileNotFoundError: ``directory`` is not a model directory.
        HFLayoutError: its config or tensors are not a BailingMoe model this trainer computes.
        FileExistsError: ``url`` already holds committed steps (a resume would never reach step 0).
    """
    doc, tensors = read_hf_dir(directory)
    source = str(Path(directory) / CONFIG)
    try:
        config = model_config_from_hf(doc, source)
    except ConfigError as exc:
        raise HFLayoutError(source, str(exc)) from None
    model = from_hf(tensors, config, directory)
    del tensors  # the experts and q/k/v were copied: drop the originals before the snapshot copies again
    mgr = _manager(url, cache_dir, endpoint_url, storage_options)
    committed = mgr.committed_steps()
    if committed:
        raise FileExistsError(f"{url} already holds committed step(s) {', '.join(map(str, committed))}: "
                              f"import into an empty checkpoint root")
    # No optimizer, loader or RNG: a resumed run (any world size and wrapping) takes the weights only.
    mgr.save_sync(0, {"step": 0, "model": model, "meta": {"model_config": config.to_dict(), "hf_config": doc}})
    nbytes = sum(t.numel() * t.element_size() for t in model.values())
    log.info("imported %s as committed step 0 of %s", directory, url)
    return Converted(0, config, len(model), nbytes)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="URL", help="checkpoint root, e.g. pcache::s3://bucket/run1")
    p.add_argument("--cache-dir", default="", help="pcache directory (default: pcache's)")
    p.add_argument("--endpoint-url", default="", help="S3 endpoint (default: $AWS_ENDPOINT_URL)")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ling-train", description="Hugging Face BailingMoe weights in and out.")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export-hf", help="write a committed step as config.json + model.safetensors",
                        description="Write committed step N (default: the newest) of --ckpt as a Hugging Face "
                                    "BailingMoeForCausalLM directory: config.json and model.safetensors in the "
                                    "released names (load with trust_remote_code and the release's modeling "
                                    "files).")
    _common(ex)
    ex.add_argument("--step", type=int, default=None, help="committed step (default: the newest)")
    ex.add_argument("--out", required=True, metavar="DIR", help="output directory")
    ex.add_argument("--dtype", default="keep", choices=["keep", *DTYPES], help="tensor dtype (default: as stored)")
    ex.add_argument("--preset", default="", help=f"for checkpoints without a model config: {', '.join(PRESETS)}")
    im = sub.add_parser("import-hf", help="write a Hugging Face BailingMoe directory as committed step 0",
                        description="Write DIR (config.json + model.safetensors or its sharded index) as a "
                                    "committed step-0 checkpoint under --ckpt; train from it with --resume.")
    im.add_argument("dir", metavar="DIR", help="Hugging Face model directory")
    _common(im)
    return parser


def _export(args: argparse.Namespace) -> int:
    done = export_hf(args.ckpt, args.out, args.step, args.dtype, args.preset, args.cache_dir, args.endpoint_url)
    print(f"exported step {done.step} of {args.ckpt} to {args.out}: {done.tensors} tensors, {done.nbytes:,} bytes")
    return 0


def _import(args: argparse.Namespace) -> int:
    done = import_hf(args.dir, args.ckpt, args.cache_dir, args.endpoint_url)
    print(f"imported {args.dir} as committed step 0 of {args.ckpt} ({done.tensors} tensors); train from it with "
          f"ling-train --ckpt {args.ckpt} --resume ...")
    return 0


def _storage_errors(command: Any) -> Any:
    """A failing checkpoint store is an OSError to the one exit-code mapping (exit 1, one line)."""
    def run(args: argparse.Namespace) -> int:
        try:
            return int(command(args))
        except CheckpointError as exc:
            raise OSError(str(exc)) from exc
    return run


def hf_main(argv: Sequence[str]) -> int:
    """``ling-train export-hf ...`` / ``ling-train import-hf ...``."""
    args = _parser().parse_args(list(argv))
    setup_logging(args.log_level or "WARNING")
    return run_command("ling-train", {"export-hf": _storage_errors(_export), "import-hf": _storage_errors(_import)},
                       args, usage_errors=(HFLayoutError, ConfigError, FileNotFoundError, FileExistsError))


if __name__ == "__main__":
    sys.exit(hf_main(sys.argv[1:]))
