"""Asynchronous checkpoints through pcache write-back: snapshot, persist in the background, commit, resume.

Layout under the root (``pcache::s3://bucket/run`` or ``pcache::file:///dir``)::

    step_000100/rank00000.pt   one torch.save file per rank (rank 0 also holds model and optimizer)
    step_000100/_COMMITTED     pcache-commit/1 marker: every rank's file is durable at the origin
    latest                     {"step": 100, "dir": "step_000100"}, written after the marker

1. :meth:`CheckpointManager.save` blocks the training thread only while the state is copied into host
   buffers (reused between saves, so the copy does not page-fault fresh memory).
2. A background thread ``torch.save``\\s the copy into a pcache write-back file (fsynced locally), then
   waits until it is durable at the origin (``flush``).
3. Every rank reports "durable" through the torch.distributed store (not a collective, so the training
   thread's collectives are untouched); rank 0 waits for all of them, then ``commit`` writes
   ``_COMMITTED``, then ``latest`` is updated, then old checkpoints are deleted (keep-last-N).

A checkpoint without ``_COMMITTED`` is never loaded: :meth:`latest_step` takes the newest directory
with a marker, and :meth:`load` checks every file's size and xxh3-128 against the marker.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import io
import json
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from ling_train.ckptlayout import (
    CheckpointError,
    SaveStats,
    open_pcache,
    step_dir,
)
from lingcore.log import get_logger
from lingcore.marker import MARKER_NAME
from lingcore.retry import RetryPolicy, retry_call
from pcache import CommitMismatchError

log = get_logger(__name__)

LATEST = "latest"
_STEP_RE = re.compile(r"^step_(\d+)$")
_RANK_RE = re.compile(r"^rank\d{5}\.pt$")


class CheckpointManager:
    """Save, commit, list and load checkpoints under one root.

    Args:
        root: Checkpoint root URL (routed through pcache write-back).
        rank: This process's rank.
        world_size: Number of ranks.
        keep_last: Committed checkpoints kept at the origin (older ones are deleted by rank 0).
        cache_dir: pcache directory ('' for pcache's default).
        endpoint_url: S3 endpoint ('' for ``$AWS_ENDPOINT_URL``).
        store: torch.distributed store used to gather "durable" reports (needed when ``world_size > 1``).
        timeout: Seconds a persist waits for durability or for the other ranks.
        storage_options: Extra origin options (credentials for tests and demos).
        persist_nice: CPU niceness increment of the persist thread (Linux: per thread), so serializing a
            checkpoint yields the CPU to the training step. Off by default: on the shared 2-core benchmark
            machine it did not measurably shorten the steps, and a starved persist can outlast the
            checkpoint interval, which turns into a training stall (docs/ling_train.md).
    """

    def __init__(self, root: str, *, rank: int = 0, world_size: int = 1, keep_last: int = 3, cache_dir: str = "",
                 endpoint_url: str = "", store: Any = None, timeout: float = 600.0,
                 storage_options: dict[str, Any] | None = None, persist_nice: int = 0) -> None:
        if world_size > 1 and store is None:
            raise CheckpointError(root, "a distributed store is needed to commit across ranks")
        self.root, self.rank, self.world_size, self.keep_last = root, rank, world_size, keep_last
        self.fs, self.path = open_pcache(root, cache_dir, endpoint_url, storage_options)
        self.store, self.timeout, self.persist_nice = store, timeout, persist_nice
        self.policy = RetryPolicy()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._buffers: dict[str, torch.Tensor] = {}
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
        snapshot = self._snapshot(state, "")
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

    def _snapshot(self, obj: Any, key: str) -> Any:
        """Copy tensors into reused host buffers (pinned when the source is on a GPU); deep-copy the rest."""
        if isinstance(obj, torch.Tensor):
            src = obj.detach()
            if hasattr(src, "to_local"):  # DTensor (FSDP2): this rank's shard
                src = src.to_local()
            buf = self._buffers.get(key)
            if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda)
                self._buffers[key] = buf
            buf.copy_(src, non_blocking=src.is_cuda)
            return buf
        if isinstance(obj, dict):
            return {k: self._snapshot(v, f"{key}/{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            items = [self._snapshot(v, f"{key}/{i}") for i, v in enumerate(obj)]
            return type(obj)(items) if isinstance(obj, list) else tuple(items)
        return copy.deepcopy(obj)

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
        try:
            with self.fs.open(f"{prefix}/rank{self.rank:05d}.pt", "wb") as f:
                torch.save(snapshot, f)
                stats.nbytes = f.tell()
            stats.staged = time.perf_counter() - t0
            self.fs.flush(prefix, timeout=self.timeout)
            with self._durable_lock:
                stats.durable = time.perf_counter() - t0
                if step in self._abandoned:  # finish() gave it up and said so: it must stay uncommitted
                    return
            self._report(step, "ok")
            if self.rank == 0:
                self._gather(step)
                self.fs.commit(prefix, timeout=self.timeout)
                stats.committed = time.perf_counter() - t0
                self.last_committed_step = max(step, self.last_committed_step or 0)
                self._after_commit(step, prefix)
            else:
                stats.committed = time.perf_counter() - t0
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread by wait()
            with contextlib.suppress(Exception):
                self._report(step, f"failed: {exc!r}")
            self._error = exc if isinstance(exc, CheckpointError) else CheckpointError(prefix, repr(exc))
            log.error("checkpoint %s failed: %r", prefix, exc)
        finally:
            stats.finished_at = time.perf_counter()
            stats.done.set()

    def _key(self, step: int, rank: int) -> str:
        return f"ling_train/ckpt/{step}/{rank}"

    def _report(self, step: int, status: str) -> None:
        if self.world_size > 1:
            self.store.set(self._key(step, self.rank), status)

    def _gather(self, step: int) -> None:
        """Rank 0: wait until every rank's file for ``step`` is durable (or one failed)."""
        if self.world_size == 1:
            return
        keys = [self._key(step, r) for r in range(self.world_size)]
        self.store.wait(keys, datetime.timedelta(seconds=self.timeout))
        for r, k in enumerate(keys):
            status = self.store.get(k).decode()
            if status != "ok":
                raise CheckpointError(self._url(step_dir(step)), f"rank {r} did not persist: {status}")

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
        """How many rank files committed ``step`` holds (0 when it is not committed)."""
        marker = self._marker(step)
        return sum(1 for f in (marker or {}).get("files", []) if _RANK_RE.match(f["path"]))

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

    def load(self, step: int, rank: int | None = None) -> dict[str, Any]:
        """Load ``rank``'s file (default: own) of committed ``step``, verified against the marker.

        Raises:
            CheckpointError: when the step is not committed or a file differs from the marker.
        """
        rank = self.rank if rank is None else rank
        prefix = self._url(step_dir(step))
        marker = self._marker(step)
        if marker is None:
            raise CheckpointError(prefix, f"not committed (no complete {MARKER_NAME} marker)")
        name = f"rank{rank:05d}.pt"
        try:
            data = self.fs.read_committed(prefix, name, marker)
        except CommitMismatchError as exc:
            raise CheckpointError(f"{prefix}/{name}", f"does not match the commit marker (torn or changed): "
                                                      f"{exc.reason}") from None
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    def bytes_at_origin(self, step: int) -> int:
        """Total size of the files of ``step`` at the origin."""
        base = self.fs.origin_path(self._url(step_dir(step)))
        return sum(int(v.get("size") or 0) for v in self.fs.fs.find(base, detail=True).values())
