"""Per-step metrics: human-readable console lines and JSONL, plus the MFU estimate."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, Any

import torch

from ling_train.config import ModelConfig

# bf16 dense peaks (TFLOP/s) of accelerators we can name; anything else needs --peak-tflops.
_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def peak_flops(configured_tflops: float) -> float | None:
    """Peak FLOP/s for the MFU estimate: the configured value, a known GPU's, else None (unknown)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in _PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def flops_per_token(config: ModelConfig, active_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active parameters plus attention (PaLM appendix B)."""
    attn = 12 * config.num_layers * config.num_heads * config.head_dim * seq_len
    return 6.0 * active_params + attn


class MetricsLog:
    """Writes every step to a JSONL file and every ``every`` steps to the console (rank 0 only).

    Each JSONL line starts with ``run_id`` (one per process run: a resumed run appends lines with a new
    id to the same file) and ``time`` (Unix seconds when the step ended).
    """

    def __init__(self, path: str, every: int, enabled: bool, stream: IO[str] | None = None,
                 run_id: str = "") -> None:
        self.every, self.enabled, self.run_id = every, enabled, run_id
        self.stream = stream or sys.stderr
        self._fh: IO[str] | None = None
        if enabled and path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any], total_steps: int) -> None:
        """Record one step."""
        if not self.enabled:
            return
        if self._fh is not None:
            self._fh.write(json.dumps({"run_id": self.run_id, "time": round(time.time(), 3), **record}) + "\n")
            self._fh.flush()
        step = record["step"]
        if step % self.every == 0 or step == total_steps or record["status"] != "ok":
            mfu = f"{record['mfu'] * 100:.1f}%" if record.get("mfu") is not None else "n/a"
            loads = " ".join(f"{x:.2f}" for x in record["load_max_over_mean"])
            line = (f"step {step:>6}/{total_steps} loss {record['loss']:.4f} aux {record['aux']:.4f} "
                    f"lr {record['lr']:.2e} tok/s {record['tokens_per_s']:,.0f} mfu {mfu} "
                    f"load max/mean [{loads}] H {record['router_entropy']:.3f}")
            if record["status"] != "ok":
                line += f" SKIPPED ({record['status']})"
            if record.get("ckpt_stall_s") is not None:
                line += f" ckpt stall {record['ckpt_stall_s'] * 1000:.1f}ms"
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """Close the JSONL file."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
