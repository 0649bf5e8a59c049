"""One LMDB environment per path per process.

py-lmdb refuses a second ``lmdb.open`` of files that are already open in the process, and LMDB handles
must not be used across ``fork``. Every pcache component opens its index or journal through
:func:`open_env`, which shares one handle per path and drops the inherited ones in a forked child.

A handle is shared only while it still describes the files at its path: when another process (or
thread) has moved the environment aside and created a new one there, :func:`open_env` opens the new
files. The old handle is not closed, since other threads may still be inside a transaction on it; it
closes when its last user lets go. (py-lmdb keys its "already open" guard on the files' inodes, so the
new files open without conflict.)

Every transaction goes through :func:`transaction`. py-lmdb's ``close()`` waits until no thread is inside
an LMDB call on the environment and no other thread holds its write transaction. In a child forked while
a thread of the parent was doing either, that thread does not exist, so the child's ``close()`` would wait
forever (a DataLoader worker that hangs on its first read). So the fork handlers wait (a bounded time)
until no transaction opened by :func:`transaction` is active, and admit no new one until the fork is done.
An environment still busy when that time runs out is left open, unused, in the child.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import lmdb

_ENVS: dict[str, tuple[Any, tuple[int, int] | None]] = {}
_LOCK = threading.Lock()
# Transactions now active (opened through transaction()), and whether a fork is waiting for them to end.
_GATE = threading.Condition(threading.Lock())
_ACTIVE: dict[str, int] = {}
_FORKING = False
_DEPTH = threading.local()  # how many transactions this thread is inside
_BUSY_AT_FORK: set[str] = set()
# In a child: environments that were busy at the fork, which this process can neither close nor reopen.
_UNUSABLE: set[str] = set()
# A transaction that does not end within this long is left alone rather than blocking fork forever.
FORK_WAIT_S = 30.0


def env_identity(path: str) -> tuple[int, int] | None:
    """Return ``(st_dev, st_ino)`` of the data file of the environment at ``path``; None if there is none."""
    try:
        st = os.stat(os.path.join(path, "data.mdb"))
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def open_env(path: str, **options: Any) -> Any:
    """Return this process's environment for ``path``, opening it with ``options`` the first time.

    Also opens afresh when the files at ``path`` are no longer those of the shared handle.
    """
    path = os.path.abspath(path)
    if path in _UNUSABLE:
        raise OSError(errno.EBUSY, f"LMDB environment {path} was in use by another thread when this process "
                      "was forked, so this process cannot open it (py-lmdb allows one handle per process)")
    with _LOCK:
        env, ident = _ENVS.get(path, (None, None))
        if env is None or ident != env_identity(path):
            env = lmdb.open(path, **options)
            _ENVS[path] = (env, env_identity(path))
        return env


def is_under(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or inside it (both made absolute)."""
    path, root = os.path.abspath(path), os.path.abspath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def close_envs(under: str) -> int:
    """Close and forget this process's environments at or under ``under``; return how many.

    For a process that is done with a directory (a test's temporary cache): the handles, their file
    descriptors and memory maps would otherwise stay open for the life of the process. The caller makes
    sure nothing still uses them.
    """
    with _LOCK:
        gone = [path for path in _ENVS if is_under(path, under)]
        envs = [_ENVS.pop(path)[0] for path in gone]
    for env in envs:
        with contextlib.suppress(lmdb.Error):
            env.close()
    return len(envs)


@contextlib.contextmanager
def transaction(env: Any, write: bool = False, **options: Any) -> Iterator[Any]:
    """``with env.begin(write=write, **options) as txn``, safe against a ``fork`` from another thread."""
    path = os.path.abspath(env.path())
    gate = _GATE
    depth = getattr(_DEPTH, "n", 0)
    with gate:
        # A thread already inside a transaction may open another (the fork waits for both to end).
        while _FORKING and not depth:
            gate.wait()
        _ACTIVE[path] = _ACTIVE.get(path, 0) + 1
    _DEPTH.n = depth + 1
    try:
        with env.begin(write=write, **options) as txn:
            yield txn
    finally:
        _DEPTH.n = depth
        with gate:
            _ACTIVE[path] -= 1
            if not _ACTIVE[path]:
                del _ACTIVE[path]
                gate.notify_all()


def _before_fork() -> None:
    global _FORKING
    _GATE.acquire()
    _FORKING = True
    if not _GATE.wait_for(lambda: not _ACTIVE, timeout=FORK_WAIT_S):
        _BUSY_AT_FORK.update(_ACTIVE)
        logging.getLogger(__name__).warning(
            "fork while LMDB transactions on %s ran for over %.0f s: the child cannot use these environments",
            sorted(_ACTIVE), FORK_WAIT_S)
    # _GATE stays held through the fork: no transaction starts until the after-fork handlers run.


def _after_fork_in_parent() -> None:
    global _FORKING
    _FORKING = False
    _BUSY_AT_FORK.clear()
    _GATE.notify_all()
    _GATE.release()


def _forget_after_fork() -> None:
    global _LOCK, _GATE, _FORKING
    _LOCK = threading.Lock()
    _GATE = threading.Condition(threading.Lock())
    _FORKING = False
    _ACTIVE.clear()
    for path, (env, _) in _ENVS.items():
        if path in _BUSY_AT_FORK:
            _UNUSABLE.add(path)
            continue  # close() would wait for a thread that does not exist here; leave the handle be
        with contextlib.suppress(lmdb.Error):
            env.close()  # the child's copy only; the parent's handle is untouched
    _BUSY_AT_FORK.clear()
    _ENVS.clear()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_forget_after_fork)
