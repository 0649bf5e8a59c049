"""Fork while other threads hold LMDB transactions or cross-process locks (DataLoader workers fork)."""

from __future__ import annotations

import errno
import os
import signal
import threading

from lingcore import lmdb_env
from lingcore.lmdb_env import open_env, transaction
from pcache.locks import StripeLocks


def _in_child(check) -> int:
    """Fork; run ``check()`` in the child under a 20 s alarm; return the child's exit code."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            signal.alarm(20)  # a hang shows up as death by SIGALRM, not as a stuck test run
            code = check()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _hold_write_transaction(env, hold_s: float) -> threading.Thread:
    inside = threading.Event()

    def writer() -> None:
        with transaction(env, write=True) as txn:
            txn.put(b"k", b"v")
            inside.set()
            threading.Event().wait(hold_s)

    thread = threading.Thread(target=writer)
    thread.start()
    inside.wait(5)
    return thread


def test_child_forked_during_a_write_transaction_reopens_the_environment(tmp_path) -> None:
    # py-lmdb's close() in the child used to wait forever for the parent's writer thread.
    path = str(tmp_path / "env")
    env = open_env(path, map_size=1 << 20)
    writer = _hold_write_transaction(env, 0.5)  # the fork waits for it to commit

    def check() -> int:
        with transaction(open_env(path, map_size=1 << 20)) as txn:
            return 0 if txn.get(b"k") == b"v" else 2

    assert _in_child(check) == 0
    writer.join()
    with transaction(env) as txn:  # the parent's handle is untouched
        assert txn.get(b"k") == b"v"


def test_a_transaction_longer_than_the_fork_wait_makes_the_child_fail_fast(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(lmdb_env, "FORK_WAIT_S", 0.2)
    path = str(tmp_path / "env")
    env = open_env(path, map_size=1 << 20)
    writer = _hold_write_transaction(env, 2.0)

    def check() -> int:
        try:
            open_env(path, map_size=1 << 20)
        except OSError as exc:
            return 0 if exc.errno == errno.EBUSY and path in str(exc) else 2
        return 4

    assert _in_child(check) == 0
    writer.join()


def test_a_stripe_lock_held_by_the_parent_at_fork_is_not_held_by_the_child(tmp_path) -> None:
    locks = StripeLocks(str(tmp_path / "locks"), n_stripes=4)
    fd = locks.acquire(b"\x01" * 16)
    read_end, write_end = os.pipe()

    def check() -> int:
        os.read(read_end, 1)  # the parent has released its lock
        got = locks.try_acquire(b"\x01" * 16)
        return 0 if got is not None else 2

    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            signal.alarm(20)
            code = check()
        finally:
            os._exit(code)
    locks.release(fd)
    os.write(write_end, b"x")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
