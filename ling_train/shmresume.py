"""What the trainer does with memory snapshots (:mod:`ling_train.shmsnap` segments): take one every K
steps, choose it at a restart (every rank agrees on the step), persist the newest at a breakpoint (SIGTERM,
an exception), remove it at a clean exit. docs/ling_train.md, "Memory snapshots", has the semantics.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from ling_train.hostcopy import HostBuffers
from ling_train.shmsnap import Segment, job_hash
from lingcore.log import get_logger

log = get_logger(__name__)


def full_state(trainer: Any) -> dict[str, Any]:
    """``trainer.state()`` with the model and optimizer on every rank: a DDP rank other than 0 has no
    checkpoint file with them, and a restart from memory must not need another rank's segment."""
    state = dict(trainer.state())
    if "model" not in state:
        state["model"] = trainer.model.state_dict()
        state["optim"] = trainer.opt.state_dict()
        state["model_config"] = trainer.model.config.to_dict()
    return state


class MemorySnapshots:
    """What the trainer does with memory snapshots: take one every K steps, choose it at start (all
    ranks agree), persist the newest at a breakpoint, remove them at a clean exit.

    It is also the ``source`` :meth:`ling_train.trainer.Trainer.restore` reads a snapshot from.
    """

    def __init__(self, segment: Segment, every: int) -> None:
        self.segment, self.every = segment, every
        self.newest: int | None = None  # the newest step in the segment that this process wrote or chose
        self.stalls: list[float] = []  # training-thread time of each snapshot (the copy to host buffers)
        self.seconds: list[float] = []  # background time of each (serialize into the segment)
        self._loaded: dict[int, dict[str, Any]] = {}
        self._host = HostBuffers(keep_placement=False)  # a rank's own shards, as plain tensors
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, cfg: Any, rank: int, world: int) -> MemorySnapshots | None:
        """The snapshots of this run, or None without ``--snapshot-every``."""
        if not cfg.snapshot_every:
            return None
        return cls(Segment(job_hash(cfg.ckpt, cfg.job_id), rank, world), cfg.snapshot_every)

    def take(self, trainer: Any, wait: bool = False) -> None:
        """Snapshot the trainer's state at its current step: copied into reused host buffers here (the
        stall), written into the segment by a background thread (``wait``: before returning). A write
        still running from the previous call is waited for first."""
        self.wait()
        t0 = time.perf_counter()
        state = self._host.copy(full_state(trainer))
        copied = None
        if torch.cuda.is_available():  # the write waits for these copies only
            copied = torch.cuda.Event()
            copied.record()
        self.stalls.append(time.perf_counter() - t0)
        self._thread = threading.Thread(target=self._write, args=(trainer.step, state, copied),
                                        name=f"shm-snapshot-{trainer.step}", daemon=True)
        self._thread.start()
        if wait:
            self.wait()

    def remove(self) -> None:
        """Remove the segment, once no write is in flight (one would create it again)."""
        self.wait()
        self.segment.remove()

    def wait(self) -> None:
        """Wait for the snapshot being written, if any (a failed write is logged, not raised: the
        checkpoints at the origin are unaffected)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _write(self, step: int, state: dict[str, Any], copied: Any) -> None:
        try:
            if copied is not None:
                copied.synchronize()
            t0 = time.perf_counter()
            nbytes = self.segment.write(step, state)
            self.newest = step
            self.seconds.append(time.perf_counter() - t0)
            log.debug("memory snapshot at step %d: %d bytes in %s in %.3fs", step, nbytes, self.segment.path,
                      self.seconds[-1])
        except Exception as exc:  # noqa: BLE001 - logged; the previous snapshot stays valid
            log.error("memory snapshot at step %d into %s failed: %r", step, self.segment.path, exc)

    def choose(self, committed: int | None, device: torch.device) -> int | None:
        """The snapshot step every rank resumes from, or None to fall back to the committed step.

        Every rank must call it: the step is the minimum over the ranks' newest intact snapshots, and it
        is used only when every rank holds it and it is newer than ``committed``.
        """
        import torch.distributed as dist

        found = self.segment.scan(newest_only=True)
        world = self.segment.world
        agreed = torch.tensor([max(found, default=-1)], dtype=torch.int64, device=device)
        if world > 1:
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        step = int(agreed.item())
        if 0 <= step < max(found, default=-1):  # another rank is behind: is its step in the older slot here?
            found = self.segment.scan()
        usable = torch.tensor([1 if step in found and (committed is None or step > committed) else 0],
                              dtype=torch.int64, device=device)
        if world > 1:
            dist.all_reduce(usable, op=dist.ReduceOp.MIN)
        if usable.item():
            self.newest = step  # the segment's newest, which a breakpoint persists until a later one is taken
            return step
        if found:
            if step < 0:
                why = "another rank holds no intact snapshot"
            elif step in found and committed is not None and step <= committed:
                why = f"step {step} is not newer than committed step {committed}"
            else:
                why = f"step {step} is not held intact by every rank"
            log.info("memory snapshot %s not used: %s; resuming from the committed step", self.segment.path, why)
        return None

    # The two methods Trainer.restore calls on its source (CheckpointManager has the same two).
    def ranks(self, step: int) -> int:
        """Every rank holds its own snapshot."""
        return self.segment.world

    def load(self, step: int, rank: int | None = None) -> dict[str, Any]:
        """This rank's snapshot ``step`` (any ``rank``: every segment holds the model and optimizer).

        Raises:
            ValueError: when it is no longer intact (it was validated by :meth:`choose` just before).
        """
        if step not in self._loaded:
            state = self.segment.load(step)
            if state is None:
                raise ValueError(f"memory snapshot {self.segment.path}: step {step} is no longer intact")
            self._loaded = {step: state}
        return self._loaded[step]

    def describe(self, step: int) -> str:
        """The log line of a resume from memory."""
        self._loaded.clear()
        return f"resumed from memory snapshot at step {step} ({self.segment.path})"

    def persist(self, trainer: Any, *, live: bool, abandon: Any = None) -> bool:
        """Persist at a breakpoint: commit the newest snapshot through the normal checkpoint path.

        Args:
            trainer: The trainer (its ``ckpt`` is the CheckpointManager).
            live: The trainer's state is consistent (a stop at a step boundary): snapshot it first.
                Otherwise (an exception mid-step) the newest snapshot in memory is what gets persisted.
            abandon: An event that gives the persist up (a second stop signal).

        Returns:
            Whether the newest snapshot is committed now (persisted, or it was already). False when the
            persist failed or was abandoned (logged): the segment then stays for a restart.
        """
        ckpt = trainer.ckpt
        if ckpt is None:
            return False
        try:
            self.wait()
            if live and (self.newest is None or trainer.step > self.newest):
                self.take(trainer, wait=True)
            step = trainer.step if live else self.newest  # live: its own state, even if the shm write failed
            committed = ckpt.latest_step()
            if step is None or (committed is not None and step <= committed):
                return True
            state = trainer.state() if live else self.load(step)
            ckpt.save(step, state)
            if ckpt.finish(abandon) is not None:
                log.warning("memory snapshot at step %d not persisted: abandoned; it stays in %s", step,
                            self.segment.path)
                return False
        except Exception as exc:  # noqa: BLE001 - the original failure matters more; the snapshot stays
            log.error("persisting memory snapshot %s failed: %r; it stays in memory for a restart",
                      self.segment.path, exc)
            return False
        log.warning("persisted memory snapshot at step %d: committed under %s", step, ckpt.root)
        return True
