"""Clean stops: SIGINT and SIGTERM end a run at a step boundary instead of tearing it mid-step.

The first signal asks the training loop to stop after the step in progress and to let the in-flight
checkpoint finish; a second one abandons that checkpoint unless its files are already durable (it is
then committed anyway: one small marker PUT); a third raises :class:`Interrupted` wherever the main
thread is. Outside the loop (loading data, building the model) the first signal raises at once.

The process exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM), as shells expect.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType


class Interrupted(KeyboardInterrupt):
    """A stop signal that could not wait for a step boundary; ``signum`` says which signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Turns SIGINT/SIGTERM into a stop request the training loop polls (see the module docstring).

    Attributes:
        signum: The first signal received, or None.
        abandon: Set by the second signal: give up the in-flight checkpoint.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0
        self.abandon = threading.Event()
        self._deferring = False

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """128 + the first signal's number (130 when none came: an interrupt by other means)."""
        return 128 + (self.signum or signal.SIGINT)

    @property
    def name(self) -> str:
        """The first signal's name (``SIGINT``), or ``interrupt``."""
        return signal.Signals(self.signum).name if self.signum else "interrupt"

    def install(self) -> Callable[[], None]:
        """Handle SIGINT and SIGTERM in this (main) thread; return a function that restores the old handlers.

        Does nothing off the main thread (Python delivers signals to the main thread only).
        """
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        old = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            for sig, handler in old.items():
                signal.signal(sig, handler)

        return restore

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        """While inside, the first signal only records the request: the loop stops at its next boundary."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def handle(self, signum: int, frame: FrameType | None = None) -> None:
        """The signal handler."""
        self.count += 1
        if self.signum is None:
            self.signum = signum
        if not self._deferring or self.count >= 3:
            raise Interrupted(self.signum)
        if self.count == 1:
            _say(f"ling-train: {self.name}: stopping after this step; the checkpoint in flight finishes first "
                 "(signal again to abandon it, three times to quit at once)")
        else:
            self.abandon.set()
            _say(f"ling-train: {signal.Signals(signum).name} again: abandoning the checkpoint in flight "
                 "unless its files are already durable")


def _say(line: str) -> None:
    # os.write, not print: a handler that runs while the main thread is inside a print to the same
    # buffered stream would raise "reentrant call".
    with contextlib.suppress(OSError):
        os.write(2, (line + "\n").encode())


def resume_command(argv: Sequence[str]) -> str:
    """The command line that resumes this run: the same arguments plus ``--resume``."""
    args = list(argv)
    if "--resume" not in args and "--resume-if-exists" not in args:
        args.append("--resume")
    return shlex.join(["ling-train", *args])


def stop_report(signal_name: str, step: int | None, ckpt: str, last_committed: int | None,
                abandoned: int | None, argv: Sequence[str], finished: int | None = None) -> list[str]:
    """The lines printed when a run stops early: where it stopped, what is committed, how to resume.

    Args:
        signal_name: ``SIGINT`` or ``SIGTERM``.
        step: The last finished step (None: stopped before training started).
        ckpt: The checkpoint root ('' when the run saves none).
        last_committed: The newest committed step, if any.
        abandoned: A checkpoint given up while stopping, if any.
        argv: The run's arguments, for the resume command.
        finished: A checkpoint that was in flight at the stop and was finished (committed), if any.
    """
    where = "before step 1" if step is None else f"after step {step}"
    lines = [f"ling-train: stopped by {signal_name} {where}"]
    if finished is not None:
        lines.append(f"ling-train: checkpoint step {finished} was in flight: finished and committed before exiting")
    if abandoned is not None:
        lines.append(f"ling-train: checkpoint step {abandoned} abandoned: never committed, so never loaded; what "
                     "of it reached the pcache write-back is still uploaded (by its uploader or `pcache flush`), "
                     "and retention deletes it")
    if not ckpt:
        lines.append("ling-train: no --ckpt: nothing was saved")
    elif last_committed is None:
        lines.append(f"ling-train: no checkpoint committed under {ckpt} by this run; to resume later, run: "
                     f"{resume_command([*argv, '--resume-if-exists'])}")
    else:
        lines.append(f"ling-train: last committed checkpoint: step {last_committed} under {ckpt}")
        lines.append(f"ling-train: resume with: {resume_command(argv)}")
    return lines
