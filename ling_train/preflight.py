"""Preflight: before step 1, every data source must answer and the checkpoint root must take a write.

Without it, a stopped endpoint or a wrong secret surfaced as "no corpus found ... expected index.json"
(the corpus opener's ``exists()`` swallows the cause), and a bad checkpoint endpoint only failed at the
first save, after minutes of training, leaving a staged file behind. Each check is bounded
(:mod:`lingcore.probe`: short botocore timeouts, two attempts, a hard deadline), and all of them share
one deadline, so the run is refused within :data:`PREFLIGHT_TIMEOUT` seconds with one line naming the
URL and the case: unreachable, forbidden or not found.
"""

from __future__ import annotations

import time
from typing import Any

from ling_train.config import TrainConfig
from ling_train.parts import data_options
from lingcore.errors import StoreUnreachableError
from lingcore.probe import check_writable
from loaders import probe_corpus

#: Seconds all checks together may take (well inside the 30 s a refusal must come within).
PREFLIGHT_TIMEOUT = 20.0


def preflight(cfg: TrainConfig, ckpt_options: dict[str, Any] | None = None,
              timeout: float = PREFLIGHT_TIMEOUT) -> None:
    """Check the data sources and the checkpoint root of ``cfg``.

    Reads (a HEAD of) each source's ``index.json`` (a source without one must at least exist: foreign
    shards or a Megatron prefix are judged later by the corpus opener), then writes and deletes a small
    probe object under ``cfg.ckpt`` at the origin (not through the write-back, so nothing stays staged).

    Args:
        cfg: The run's settings.
        ckpt_options: Extra origin options of the checkpoint root (credentials in tests and demos).
        timeout: Seconds for all checks together.

    Raises:
        StoreAccessError: the first failure: ``<url>: unreachable|forbidden|not found|bad endpoint: ...``.
    """
    deadline = time.monotonic() + timeout
    endpoint = cfg.endpoint_url or None

    def left(url: str) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise StoreUnreachableError(url, f"preflight checks took longer than {timeout:.0f} s")
        return remaining

    for url in cfg.data:
        probe_corpus(url, storage_options=data_options(url, cfg), endpoint_url=endpoint, timeout=left(url))
    if cfg.ckpt:
        check_writable(cfg.ckpt, ckpt_options, endpoint, timeout=left(cfg.ckpt))
