"""Checkpoint layout and vocabulary shared by the manager and the tools: step directory names, routing
a root through pcache, the typed errors and the timings of one save."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import fsspec

from lingcore.storage import split_url, storage_options
from pcache import PCacheFileSystem

__all__ = ["CheckpointError", "NothingToResumeError", "SaveStats", "open_pcache", "pcache_url", "step_dir"]


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved, committed or loaded; names the URL."""

    def __init__(self, url: str, message: str) -> None:
        super().__init__(f"{url}: {message}")
        self.url = url


class NothingToResumeError(FileNotFoundError):
    """``--resume`` found no committed checkpoint under the root (a mistyped ``--ckpt``, say)."""

    def __init__(self, url: str) -> None:
        super().__init__(f"--resume: nothing to resume under {url}: no committed checkpoint there (mistyped "
                         "--ckpt?); pass --resume-if-exists to start from step 0 when there is none")
        self.url = url

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return type(self), (self.url,)


def step_dir(step: int) -> str:
    """Directory name of ``step`` (``step_000100``)."""
    return f"step_{step:06d}"


def pcache_url(root: str) -> str:
    """Route ``root`` through pcache: ``s3://b/r`` and local paths become ``pcache::...`` URLs."""
    if root.startswith("pcache::"):
        return root.rstrip("/")
    protocol, path = split_url(root)
    return f"pcache::{protocol}://{path}".rstrip("/")


def open_pcache(root: str, cache_dir: str = "", endpoint_url: str = "",
                extra_options: dict[str, Any] | None = None) -> tuple[PCacheFileSystem, str]:
    """Return (pcache filesystem, path of ``root`` in it)."""
    url = pcache_url(root)
    protocol = split_url(url)[0]
    opts: dict[str, Any] = {"pcache": {"cache_dir": cache_dir} if cache_dir else {}}
    target = {**storage_options(protocol, endpoint_url or None), **(extra_options or {})}
    if target:
        opts[protocol] = target
    fs, path = fsspec.core.url_to_fs(url, **opts)
    if not isinstance(fs, PCacheFileSystem):
        raise CheckpointError(root, f"expected a pcache filesystem, got {type(fs).__name__}")
    return fs, path


@dataclass
class SaveStats:
    """Timings of one checkpoint, in seconds (``durable`` and ``committed`` filled by the persist thread)."""

    step: int
    stall: float = 0.0  # training thread blocked: waiting for the previous persist + host snapshot
    snapshot: float = 0.0
    nbytes: int = 0
    staged: float = 0.0  # from the end of the snapshot until this rank's DCP file is in the local write-back
    durable: float = 0.0  # from the end of the snapshot until this rank's file is durable at the origin
    committed: float = 0.0  # from the end of the snapshot until _COMMITTED and latest exist
    started_at: float = 0.0  # perf_counter at the end of the snapshot (the persist starts)
    finished_at: float = 0.0  # perf_counter when the persist ended
    done: threading.Event = field(default_factory=threading.Event)
    rank_bytes: list[int] = field(default_factory=list)  # rank 0 only: bytes each rank wrote (DCP's results)

    @property
    def max_rank_bytes(self) -> int:
        """The most bytes one rank wrote (rank 0; elsewhere this rank's)."""
        return max(self.rank_bytes) if self.rank_bytes else self.nbytes

    @property
    def mean_rank_bytes(self) -> float:
        """Mean bytes per rank (rank 0; elsewhere this rank's)."""
        return sum(self.rank_bytes) / len(self.rank_bytes) if self.rank_bytes else float(self.nbytes)
