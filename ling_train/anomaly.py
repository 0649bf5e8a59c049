"""Loss-spike and NaN handling (Ling report, section 3.4.4).

* A loss above ``mean + k * std`` of the last ``window`` accepted losses is a spike: the update is skipped
  and the batch is fed again ``reinject_after`` steps later (once; a batch that spikes again is dropped).
* ``patience`` spikes within ``window`` steps multiply the LR scale by ``lr_factor``.
* A NaN or Inf loss or gradient norm skips the step.

Everything is counted; the state (window, counters, queued batches, LR scale) is part of the checkpoint,
so a resumed run makes the same decisions as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class SpikeConfig:
    """Detector settings (see the module docstring)."""

    window: int = 20
    k: float = 4.0
    patience: int = 3
    lr_factor: float = 0.5
    reinject_after: int = 5


class AnomalyGuard:
    """Decides, per step, whether the optimizer may apply the update."""

    def __init__(self, config: SpikeConfig) -> None:
        self.config = config
        self.losses: deque[float] = deque(maxlen=config.window)
        self.spike_steps: list[int] = []
        self.queue: list[tuple[int, dict[str, torch.Tensor]]] = []  # (due step, batch)
        self.lr_scale = 1.0
        self.counts = {"spikes": 0, "nonfinite_loss": 0, "nonfinite_grad": 0, "lr_cuts": 0, "reinjected": 0,
                       "dropped": 0}

    def due(self, step: int) -> dict[str, torch.Tensor] | None:
        """A skipped batch to feed again at ``step``, if one is due (marked so it is not requeued)."""
        for i, (when, batch) in enumerate(self.queue):
            if when <= step:
                self.queue.pop(i)
                self.counts["reinjected"] += 1
                return {**batch, "reinjected": torch.ones(())}
        return None

    def check(self, step: int, loss: float, grad_norm: float, batch: dict[str, torch.Tensor]) -> str:
        """Return ``"ok"``, ``"spike"``, ``"nonfinite_loss"`` or ``"nonfinite_grad"``; record accepted losses."""
        if not math.isfinite(loss):
            self.counts["nonfinite_loss"] += 1
            return "nonfinite_loss"
        if not math.isfinite(grad_norm):
            self.counts["nonfinite_grad"] += 1
            return "nonfinite_grad"
        c = self.config
        if len(self.losses) == c.window:
            mean = sum(self.losses) / len(self.losses)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / len(self.losses))
            if loss > mean + c.k * std:
                self._spike(step, batch)
                return "spike"
        self.losses.append(loss)
        return "ok"

    def _spike(self, step: int, batch: dict[str, torch.Tensor]) -> None:
        c = self.config
        self.counts["spikes"] += 1
        if "reinjected" in batch:
            self.counts["dropped"] += 1  # spiked twice: feeding it a third time would not help
        else:
            self.queue.append((step + c.reinject_after, {k: v.clone() for k, v in batch.items()}))
        self.spike_steps = [s for s in self.spike_steps if s > step - c.window] + [step]
        if len(self.spike_steps) >= c.patience:
            self.lr_scale *= c.lr_factor
            self.counts["lr_cuts"] += 1
            self.spike_steps = []

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to make the same decisions after a resume."""
        return {"losses": list(self.losses), "spike_steps": list(self.spike_steps), "lr_scale": self.lr_scale,
                "counts": dict(self.counts), "queue": [{"due": d, "batch": b} for d, b in self.queue]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.losses = deque((float(x) for x in state["losses"]), maxlen=self.config.window)
        self.spike_steps = [int(s) for s in state["spike_steps"]]
        self.lr_scale = float(state["lr_scale"])
        self.counts.update({k: int(v) for k, v in state["counts"].items()})
        self.queue = [(int(q["due"]), dict(q["batch"])) for q in state["queue"]]
