"""Asynchronous PyTorch DCP checkpoints through pcache write-back: snapshot, persist in the background, commit.

Layout under the root (``pcache::s3://bucket/run`` or ``pcache::file:///dir``)::

    step_000100/.metadata        DCP metadata (pickled ``Metadata``), written after every data file is durable
    step_000100/__0_0.distcp     DCP data, one file per rank (each rank writes its share of the state)
    step_000100/_COMMITTED       pcache-commit/1 marker: every file above is durable at the origin
    latest                       {"step": 100, "dir": "step_000100"}, written after the marker

A step directory is a stock DCP checkpoint: ``torch.distributed.checkpoint.load`` reads it with no import of
this project (docs/ling_train.md). :mod:`ling_train.dcpio` holds the storage writer and reader.

1. :meth:`CheckpointManager.save` blocks the training thread only while the state is copied into host
   buffers (reused between saves, so the copy does not page-fault fresh memory).
2. A background thread runs ``dcp.save`` of the copy. Its collectives (gather of the save plans, of the
   write results) run on a process group of their own (gloo, created once by every rank), so they never
   interleave with the training thread's collectives on the default group. DCP's default planner assigns
   each replicated tensor (DDP, or the optimizer's step counters) to the rank that has planned the fewest
   bytes so far, so every rank writes about 1/N of the replicated state.
3. Each rank's ``write_data`` returns once its file is durable at the origin; then the coordinator (rank 0)
   writes ``.metadata``, ``commit`` writes ``_COMMITTED``, then ``latest``, then old steps are deleted.

A checkpoint without ``_COMMITTED`` is never loaded: :meth:`latest_step` takes the newest directory with a
marker, and every file read is checked against the marker (size, and xxh3-128 where it has one).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from ling_train.ckptlayout import (
    CheckpointError,
    SaveStats,
    open_pcache,
    step_dir,
)
from ling_train.dcpio import PCacheReader, PCacheWriter, as_checkpoint_error, check_entries, dcp_errors
from ling_train.hostcopy import HostBuffers
from lingcore.log import get_logger
from lingcore.marker import MARKER_NAME
from lingcore.retry import RetryPolicy, retry_call

log = get_logger(__name__)

LATEST = "latest"
# A single process (tools, one-rank runs) saves and loads without a process group on purpose.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
_STEP_RE = re.compile(r"^step_(\d+)$")
_DATA_RE = re.compile(r"^__(\d+)_\d+\.distcp$")


class CheckpointManager:
    """Save, commit, list and load checkpoints under one root.

    Args:
        root: Checkpoint root URL (routed through pcache write-back).
        rank: This process's rank.
        world_size: Number of ranks.
        keep_last: Committed checkpoints kept at the origin (older ones are deleted by rank 0).
        cache_dir: pcache directory ('' for pcache's default).
        endpoint_url: S3 endpoint ('' for ``$AWS_ENDPOINT_URL``).
        timeout: Seconds a persist waits for durability or for the other ranks.
        storage_options: Extra origin options (credentials for tests and demos).
        persist_nice: CPU niceness increment of the persist thread (Linux: per thread), so serializing a
            checkpoint yields the CPU to the training step. Off by default: on the shared 2-core benchmark
            machine it did not measurably shorten the steps, and a starved persist can outlast the
            checkpoint interval, which turns into a training stall (docs/ling_train.md).
        spread: Spread the replicated state over all ranks (DCP's balancing dedup); False makes the lowest
            rank holding a replica write it (rank 0 writes all of DDP's state: the benchmark's baseline).

    Raises:
        CheckpointError: ``world_size > 1`` without an initialized ``torch.distributed`` process group.
    """

    def __init__(self, root: str, *, rank: int = 0, world_size: int = 1, keep_last: int = 3, cache_dir: str = "",
                 endpoint_url: str = "", timeout: float = 600.0, storage_options: dict[str, Any] | None = None,
                 persist_nice: int = 0, spread: bool = True) -> None:
        if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise CheckpointError(root, "saving with several ranks needs an initialized torch.distributed group")
        self.root, self.rank, self.world_size, self.keep_last = root, rank, world_size, keep_last
        self.fs, self.path = open_pcache(root, cache_dir, endpoint_url, storage_options)
        self.timeout, self.persist_nice, self.spread = timeout, persist_nice, spread
        # DCP's collectives in the persist thread get a group of their own: on the default group they could
        # pair up with the training thread's all-reduces (gloo and nccl match collectives by order).
        self._pg = (dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
                    if world_size > 1 else None)
        self.policy = RetryPolicy()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._host = HostBuffers(keep_placement=True)  # FSDP2 shards stay DTensors: DCP writes them
        self.history: list[SaveStats] = []
        self.on_commit: Callable[[int], None] | None = None
        self.housekeeping_errors = 0  # failures after a commit (latest, retention): logged, not raised
        self.last_committed_step: int | None = None  # newest commit this manager made or listed
        self._abandoned: set[int] = set()  # steps given up by finish(): never committed afterwards
        self._durable_lock = threading.Lock()  # orders "durable, so commit" against "abandon"

    # -- saving ------------------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any]) -> SaveStats:
        """Snapshot ``state`` into host memory and persist it in the background; return the stall.

        Raises:
            CheckpointError: if the previous checkpoint's persist failed.
        """
        t0 = time.perf_counter()
        self.wait()
        t1 = time.perf_counter()
        snapshot = self._host.copy(state)
        copied = None
        if torch.cuda.is_available():  # the persist waits for these copies only, not for later steps
            copied = torch.cuda.Event()
            copied.record()
        stats = SaveStats(step=step, snapshot=time.perf_counter() - t1)
        stats.started_at = time.perf_counter()
        stats.stall = stats.started_at - t0
        self.history.append(stats)
        self._thread = threading.Thread(target=self._persist, args=(step, snapshot, stats, copied),
                                        name=f"ckpt-persist-{step}", daemon=True)
        self._thread.start()
        return stats

    def save_sync(self, step: int, state: dict[str, Any]) -> SaveStats:
        """Save and wait until committed (the end of a run)."""
        stats = self.save(step, state)
        self.wait()
        return stats

    def save_synchronously(self, name: str, state: dict[str, Any]) -> tuple[float, int]:
        """The baseline an async save is measured against: ``torch.save`` of ``state`` to
        ``<root>/<name>/`` through the same write-back, blocking until durable; return (seconds, bytes).
        The directory is deleted afterwards and is never committed."""
        prefix = self._url(name)
        t0 = time.perf_counter()
        with self.fs.open(f"{prefix}/rank{self.rank:05d}.pt", "wb") as f:
            torch.save(state, f)
            nbytes = f.tell()
        self.fs.flush(prefix, timeout=self.timeout)
        seconds = time.perf_counter() - t0
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(prefix, recursive=True)
        return seconds, nbytes

    def wait(self) -> None:
        """Wait for the running persist; re-raise its failure in the caller.

        Raises:
            CheckpointError: naming the checkpoint that failed.
        """
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err if isinstance(err, CheckpointError) else CheckpointError(self.root, repr(err)) from err

    @property
    def in_flight(self) -> SaveStats | None:
        """The stats of the persist running now, or None."""
        thread = self._thread
        return self.history[-1] if thread is not None and thread.is_alive() and self.history else None

    def finish(self, abandon: threading.Event | None = None, poll: float = 0.1) -> int | None:
        """Let the running persist finish, unless ``abandon`` is set while its files are not yet durable.

        Durable files are always committed (one small marker PUT is left). An abandoned step never gets a
        marker, so it is never loaded and retention deletes it; what it staged in the pcache write-back is
        left there (pcache has no public way to drop a closed write-back file) and still gets uploaded.

        Returns:
            The abandoned step, or None when the persist finished (or none was running).

        Raises:
            CheckpointError: when the persist failed (as :meth:`wait`).
        """
        thread = self._thread
        if thread is None:
            self.wait()
            return None
        stats = self.history[-1]
        while thread.is_alive():
            if abandon is not None and abandon.is_set():
                with self._durable_lock:
                    if not stats.durable:
                        self._abandoned.add(stats.step)
                        self._thread = None
                        log.info("checkpoint %s abandoned before its files were durable: it is never committed",
                                    self._url(step_dir(stats.step)))
                        return stats.step
            thread.join(poll)
        self.wait()
        return None

    def _url(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])

    def _persist(self, step: int, snapshot: dict[str, Any], stats: SaveStats, copied: Any = None) -> None:
        if self.persist_nice:
            # Linux gives each thread its own nice value; elsewhere this is a no-op.
            with contextlib.suppress(AttributeError, OSError):
                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + self.persist_nice))
        if copied is not None:
            copied.synchronize()  # the non_blocking copies into pinned buffers
        t0 = time.perf_counter()
        prefix = self._url(step_dir(step))

        def durable(nbytes: int) -> None:
            with self._durable_lock:
                stats.nbytes, stats.durable = nbytes, time.perf_counter() - t0
                if step in self._abandoned:  # finish() gave it up and said so: it must stay uncommitted
                    raise CheckpointError(prefix, "abandoned while stopping: never committed")

        def finishing(per_rank: list[int]) -> None:
            stats.rank_bytes = per_rank
            if step in self._abandoned:
                raise CheckpointError(prefix, "abandoned while stopping: never committed")

        try:
            writer = PCacheWriter(self.fs, prefix, self.timeout, on_durable=durable, on_finish=finishing)
            planner = DefaultSavePlanner(dedup_save_to_lowest_rank=not self.spread)
            with dcp_errors(prefix):
                dcp.save(snapshot, storage_writer=writer, planner=planner, process_group=self._pg,
                         no_dist=self._pg is None)
            stats.staged = writer.staged_at - t0 if writer.staged_at else stats.durable
            if self.rank == 0:
                self.fs.commit(prefix, timeout=self.timeout)
                stats.committed = time.perf_counter() - t0
                self.last_committed_step = max(step, self.last_committed_step or 0)
                log.info("checkpoint %s committed: %d bytes, per-rank bytes max %d / mean %.0f", self.fs.url(prefix),
                         sum(stats.rank_bytes), stats.max_rank_bytes, stats.mean_rank_bytes)
                self._after_commit(step, prefix)
            else:
                stats.committed = time.perf_counter() - t0
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread by wait()
            if step in self._abandoned:
                return
            self._error = exc if isinstance(exc, CheckpointError) else CheckpointError(prefix, repr(exc))
            log.error("checkpoint %s failed: %s", prefix, self._error)
        finally:
            stats.finished_at = time.perf_counter()
            stats.done.set()

    def _after_commit(self, step: int, prefix: str) -> None:
        """Housekeeping once ``step`` is committed: its failure is logged and counted, never raised.

        The checkpoint is already safe (resume trusts markers, not ``latest``), and raising on rank 0
        alone would leave the other ranks waiting in their next collective until it times out.
        """
        for name, action in (("latest", lambda: self._write_latest(step)), ("retention", self._retain),
                             ("on_commit", lambda: self.on_commit(step) if self.on_commit else None)):
            try:
                action()
            except Exception as exc:  # noqa: BLE001
                self.housekeeping_errors += 1
                log.warning("checkpoint %s is committed, but %s failed: %r", prefix, name, exc)

    def _write_latest(self, step: int) -> None:
        # Whole or nothing: a kill mid-write must never leave a torn pointer.
        body = json.dumps({"step": step, "dir": step_dir(step), "time": time.time()}).encode()
        self.fs.put_atomic(self._url(LATEST), body)

    def _retain(self) -> None:
        """Delete checkpoints older than the newest ``keep_last`` committed ones (marker first)."""
        committed = self.committed_steps()
        if len(committed) <= self.keep_last:
            return
        cutoff = committed[-self.keep_last]
        for step in self.all_steps():
            if step >= cutoff:
                continue
            prefix = self._url(step_dir(step))
            # The marker goes first: a half-deleted directory must never look committed.
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(f"{prefix}/{MARKER_NAME}")
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(prefix, recursive=True)
            log.info("retention: deleted %s", self.fs.url(prefix))

    # -- listing and loading -------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Steps with a directory at the origin (committed or not), ascending."""
        target = self.fs.origin_path(self.path)
        self.fs.fs.invalidate_cache(target)
        try:
            names = retry_call(lambda: self.fs.fs.ls(target, detail=False), url=self.root, policy=self.policy)
        except FileNotFoundError:
            return []
        steps = []
        for name in names:
            match = _STEP_RE.match(str(name).rstrip("/").rsplit("/", 1)[-1])
            if match:
                steps.append(int(match.group(1)))
        return sorted(steps)

    def committed_steps(self) -> list[int]:
        """Steps with a complete ``_COMMITTED`` marker, ascending (a torn marker does not count)."""
        return [step for step in self.all_steps() if self._marker(step) is not None]

    def _marker(self, step: int) -> dict[str, Any] | None:
        """The parsed marker of ``step``; None when there is none or it is torn (that commit never completed)."""
        return self.fs.read_commit(self._url(step_dir(step)))

    def latest_step(self) -> int | None:
        """The newest committed step, or None. The ``latest`` file is only a hint: a crash between the
        marker and ``latest`` leaves it one behind, so the markers decide."""
        committed = self.committed_steps()
        if committed:
            self.last_committed_step = max(committed[-1], self.last_committed_step or 0)
        return committed[-1] if committed else None

    def ranks(self, step: int) -> int:
        """How many ranks wrote data files of committed ``step`` (0 when it is not committed)."""
        marker = self._marker(step)
        return len({m.group(1) for f in (marker or {}).get("files", []) if (m := _DATA_RE.match(f["path"]))})

    def latest_pointer(self) -> int | None:
        """The step the ``latest`` file names (a hint that may lag the markers), or None without one."""
        try:
            body = self.fs.cat_file(self._url(LATEST))
        except FileNotFoundError:
            return None
        try:
            return int(json.loads(body)["step"])
        except (ValueError, KeyError, TypeError):
            return None

    def _reader(self, step: int) -> PCacheReader:
        prefix = self._url(step_dir(step))
        marker = self._marker(step)
        if marker is None:
            raise CheckpointError(prefix, f"not committed (no complete {MARKER_NAME} marker)")
        return PCacheReader(self.fs, prefix, marker)

    def metadata(self, step: int) -> Metadata:
        """The DCP metadata of committed ``step`` (what it holds: names, shapes, dtypes).

        Raises:
            CheckpointError: when the step is not committed or its metadata differs from the marker.
        """
        reader = self._reader(step)
        with dcp_errors(reader.prefix), as_checkpoint_error(reader.prefix):
            return reader.read_metadata()

    def load(self, step: int, keys: set[str] | None = None) -> dict[str, Any]:
        """The whole state of committed ``step`` in this process (tensors unsharded), or the entries under
        ``keys``; no collective (tools and single processes).

        Raises:
            CheckpointError: when the step is not committed or a file differs from the marker.
        """
        reader = self._reader(step)
        state: dict[str, Any] = {}
        with dcp_errors(reader.prefix), as_checkpoint_error(reader.prefix):
            # What torch's dcp_to_torch_save does: dcp.load would fill a copy of the (empty) dict instead.
            _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
        return state

    def load_into(self, step: int, state: dict[str, Any]) -> None:
        """Load committed ``step`` into ``state`` in place (tensors and DTensors of any sharding: DCP reshards);
        a collective over every rank of this manager.

        Raises:
            CheckpointError: the step is not committed, a file differs from the marker, or the checkpoint lacks
                an entry of ``state`` or holds it with another shape (naming the entry).
        """
        saved = self.metadata(step)
        url = self._url(step_dir(step))
        check_entries(url, saved, state)
        reader = self._reader(step)
        with dcp_errors(url), as_checkpoint_error(url):
            dcp.load(state, storage_reader=reader, process_group=self._pg, no_dist=self._pg is None)

    def bytes_at_origin(self, step: int) -> int:
        """Total size of the files of ``step`` at the origin."""
        base = self.fs.origin_path(self._url(step_dir(step)))
        return sum(int(v.get("size") or 0) for v in self.fs.fs.find(base, detail=True).values())

