"""PyTorch DCP storage through pcache: a ``StorageWriter`` and a ``StorageReader`` for checkpoint directories.

A step directory is a stock DCP checkpoint (``.metadata`` plus ``__<rank>_<n>.distcp``), so
``torch.distributed.checkpoint.load`` with its own ``FileSystemReader`` (a local copy) or ``FsspecReader``
(the origin) reads it without this project. What differs from torch's ``FileSystemWriter``:

- every file is written through pcache write-back (``open("wb")``), and ``write_data`` returns only once
  this rank's files are durable at the origin (``flush``); DCP gathers every rank's results to the
  coordinator after ``write_data``, so when the coordinator runs ``finish`` every data file of the step is
  durable;
- ``finish`` writes ``.metadata`` under its final name (no temporary file renamed over: an object store has
  no atomic rename), so a reader never sees metadata that points to missing data;
- the reader reads each file whole through pcache and checks it against the step's ``_COMMITTED`` marker
  (size, and xxh3-128 where the marker has one) before DCP deserializes anything from it.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemBase
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from ling_train.ckptlayout import CheckpointError
from lingcore.marker import MARKER_NAME
from pcache import PCacheFileSystem

__all__ = ["METADATA", "PCacheReader", "PCacheWriter", "as_checkpoint_error", "check_entries", "dcp_errors", "rank_bytes"]

METADATA = ".metadata"  # DCP's metadata file name (what stock readers open)
_DCP_VERSION = "1.0.0"  # torch's CURRENT_DCP_VERSION of the FileSystemWriter format written here


class _Coalescing:
    """Gathers the many small writes ``torch.save`` makes per tensor into large ones: every write to a
    write-back file costs a call into pcache (about 3x the serialization time for a small model otherwise)."""

    def __init__(self, raw: Any, size: int = 8 << 20) -> None:
        self.raw, self.size = raw, size
        self.parts: list[bytes] = []
        self.pending = 0
        self.written = 0

    def write(self, data: Any) -> int:
        view = bytes(data)
        self.parts.append(view)
        self.pending += len(view)
        if self.pending >= self.size:
            self.flush()
        return len(view)

    def tell(self) -> int:
        return self.written + self.pending

    def flush(self) -> None:
        if self.parts:
            self.raw.write(b"".join(self.parts))
            self.written += self.pending
            self.parts, self.pending = [], 0

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        """Flush only: the pcache file is closed (staged) by ``create_stream`` around it."""
        self.flush()


class _PCacheFiles(FileSystemBase):
    """DCP's file-system seam over pcache: writes go through write-back, reads are checked against a marker."""

    def __init__(self, fs: PCacheFileSystem, prefix: str, marker: dict[str, Any] | None = None) -> None:
        self.fs, self.prefix, self.marker = fs, prefix.rstrip("/"), marker

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        path = os.fspath(path)
        if "r" in mode:
            name = path[len(self.prefix):].lstrip("/")
            yield io.BytesIO(self.fs.read_committed(self.prefix, name, self.marker))
            return
        with self.fs.open(path, mode) as stream:
            buffered = _Coalescing(stream)
            yield buffered  # type: ignore[misc]  # a writer with write/tell/flush is all DCP uses
            buffered.flush()

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str:
        return f"{os.fspath(path).rstrip('/')}/{suffix}"

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        # Never used: metadata is written under its final name once the data is durable (see finish).
        raise NotImplementedError(f"{self.fs.url(os.fspath(path))}: pcache checkpoints are never renamed")

    def init_path(self, path: str | os.PathLike) -> str:
        return os.fspath(path)

    def mkdir(self, path: str | os.PathLike) -> None:
        """Nothing to do: the origin (an object store, or pcache's upload of a local file) makes parents."""

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return False  # only constructed explicitly, never picked by DCP from a checkpoint_id

    def exists(self, path: str | os.PathLike) -> bool:
        return bool(self.fs.exists(os.fspath(path)))

    def rm_file(self, path: str | os.PathLike) -> None:
        self.fs.rm(os.fspath(path))

    def ls(self, path: str | os.PathLike) -> list[str]:
        return [str(p) for p in self.fs.ls(os.fspath(path), detail=False)]


def rank_bytes(results: list[list[WriteResult]]) -> list[int]:
    """Bytes each rank wrote, from the write results DCP gathers to the coordinator (in rank order)."""
    return [sum(int(r.size_in_bytes) for r in per_rank) for per_rank in results]


class PCacheWriter(FileSystemWriter):
    """DCP ``StorageWriter`` for one step directory, through pcache write-back.

    Args:
        fs: The pcache filesystem.
        prefix: The step directory's path in ``fs``.
        timeout: Seconds ``write_data`` waits until this rank's files are durable at the origin.
        on_durable: Called with this rank's bytes once its files are durable; raising stops the save
            (DCP reports the failure on every rank), which is how an abandoned step stays uncommitted.
        on_finish: Called on the coordinator with every rank's bytes before ``.metadata`` is written; raising
            leaves the step without metadata (and so without a commit).
    """

    def __init__(self, fs: PCacheFileSystem, prefix: str, timeout: float,
                 on_durable: Callable[[int], None] | None = None,
                 on_finish: Callable[[list[int]], None] | None = None) -> None:
        # sync_files=False: pcache fsyncs its staged copy itself; DCP's fallback (os.sync of the whole
        # machine when a stream has no fileno) would stall every process on the node.
        super().__init__(prefix, single_file_per_rank=True, sync_files=False, thread_count=1, overwrite=True)
        self.fs = _PCacheFiles(fs, prefix)  # type: ignore[assignment]  # DCP's own seam (FileSystemBase)
        self.path = self.prefix = prefix.rstrip("/")
        self.pfs, self.timeout = fs, timeout
        self.on_durable, self.on_finish = on_durable, on_finish
        self.staged_at = 0.0  # perf_counter when this rank's file was written into the local write-back

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Write this rank's items (one ``.distcp`` file), then wait until it is durable at the origin."""
        future = super().write_data(plan, planner)
        results = future.wait()
        self.staged_at = time.perf_counter()
        self.pfs.flush(self.prefix, timeout=self.timeout)
        if self.on_durable is not None:
            self.on_durable(sum(int(r.size_in_bytes) for r in results))
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Coordinator: every rank's data is durable (each ``write_data`` flushed before DCP gathered its
        results), so write ``.metadata`` under its final name."""
        if self.on_finish is not None:
            self.on_finish(rank_bytes(results))
        metadata.version = _DCP_VERSION
        metadata.storage_data = {wr.index: wr.storage_data for per_rank in results for wr in per_rank}
        metadata.storage_meta = StorageMeta(checkpoint_id=self.pfs.url(self.prefix), save_id=self.save_id)
        with self.fs.create_stream(f"{self.prefix}/{METADATA}", "wb") as f:
            pickle.dump(metadata, f)


class PCacheReader(FileSystemReader):
    """DCP ``StorageReader`` for one committed step directory: every file read through pcache and checked
    against the step's marker (``pcache.CommitMismatchError`` when it differs; FileNotFoundError without one).

    Args:
        fs: The pcache filesystem.
        prefix: The step directory's path in ``fs``.
        marker: The step's parsed ``_COMMITTED`` marker.
    """

    def __init__(self, fs: PCacheFileSystem, prefix: str, marker: dict[str, Any]) -> None:
        if marker is None:
            raise FileNotFoundError(f"{fs.url(prefix)} is not committed (no complete {MARKER_NAME} marker)")
        super().__init__(prefix)
        self.fs = _PCacheFiles(fs, prefix, marker)  # type: ignore[assignment]  # DCP's own seam (FileSystemBase)
        self.path = self.prefix = prefix.rstrip("/")


def check_entries(url: str, saved: Metadata, state: dict[str, Any]) -> None:
    """Refuse, in one line naming the entry, a ``state`` the checkpoint cannot fill: an entry it does not hold,
    or a tensor it holds with another shape (a checkpoint of another model), before DCP reads anything.

    Raises:
        CheckpointError: naming the entry.
    """
    for fqn, value in _leaves(state, ""):
        entry = saved.state_dict_metadata.get(fqn)
        if entry is None:
            raise CheckpointError(url, f"holds no {fqn} (a checkpoint of another model or trainer)")
        if isinstance(value, torch.Tensor):
            if not isinstance(entry, TensorStorageMetadata):
                raise CheckpointError(url, f"{fqn} is not a tensor in the checkpoint")
            if tuple(entry.size) != tuple(value.shape):
                raise CheckpointError(url, f"{fqn} has shape {tuple(entry.size)} in the checkpoint, "
                                           f"{tuple(value.shape)} in this model (a model of another shape)")


@contextlib.contextmanager
def dcp_errors(url: str) -> Iterator[None]:
    """DCP's CheckpointException (a BaseException carrying every rank's traceback) as one line."""
    try:
        yield
    except CheckpointException as exc:
        rank, (first, _) = next(iter(sorted(exc.failures.items(), key=lambda kv: kv[0])))
        if isinstance(first, CheckpointError):
            raise CheckpointError(first.url, str(first).split(": ", 1)[-1]) from None
        text = str(first).replace("does not match its commit marker", "does not match its commit marker "
                                                                       "(torn or changed)")
        raise CheckpointError(url, f"rank {rank}: {type(first).__name__}: {text}") from None


def _leaves(obj: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """(DCP's flattened name, value) of every leaf: dicts and lists holding tensors are walked, as DCP does."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list) and not _terminal(obj):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{prefix}.{i}")
    else:
        yield prefix, obj


def _terminal(value: list[Any]) -> bool:
    """DCP's rule (``_traverse``): a list is one leaf unless it holds a tensor, a mapping or such a list."""
    return not any(isinstance(v, (dict, torch.Tensor)) or (isinstance(v, list) and not _terminal(v)) for v in value)


@contextlib.contextmanager
def as_checkpoint_error(url: str) -> Iterator[None]:
    """A reader's OSError (a file differing from the marker, a missing file) as one CheckpointError line."""
    try:
        yield
    except CheckpointError:
        raise
    except OSError as exc:
        text = str(exc).replace("does not match its commit marker", "does not match its commit marker (torn or changed)")
        raise CheckpointError(url, text) from None
