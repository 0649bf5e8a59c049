"""ling_train: the Ling MoE reference trainer, wired to ``loaders`` and checkpointing through pcache.

Public API:

* :class:`ModelConfig`, :data:`PRESETS`, :func:`preset` (``tiny``, ``ling-lite``, ``ling-plus``), :class:`TrainConfig`
* :class:`LingModel` and :func:`count_params`
* :func:`train` / :class:`Trainer` (one rank; under torchrun every rank calls it)
* :class:`CheckpointManager` (snapshot-then-persist, commit, resume, retention) and :class:`CheckpointError`
* :class:`AnomalyGuard` (loss spikes, NaN/Inf)
* :func:`export_hf` / :func:`import_hf`: the released BailingMoe safetensors layout to and from checkpoints
* ``ling-train``, ``ling-train params``, ``ling-train export-hf`` and ``ling-train import-hf`` on the
  command line; ``python -m ling_train.demo``
"""

from ling_train.anomaly import AnomalyGuard, SpikeConfig
from ling_train.checkpoint import CheckpointError, CheckpointManager
from ling_train.config import PRESETS, ModelConfig, TrainConfig, preset
from ling_train.hf_io import export_hf, import_hf
from ling_train.model import LingModel, count_params, norm_head_weight
from ling_train.trainer import Trainer, TrainResult, train

__all__ = ["PRESETS", "AnomalyGuard", "CheckpointError", "CheckpointManager", "LingModel", "ModelConfig",
           "SpikeConfig", "TrainConfig", "TrainResult", "Trainer", "count_params", "export_hf", "import_hf",
           "norm_head_weight", "preset", "train"]
