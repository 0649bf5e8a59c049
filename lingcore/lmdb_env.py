"""One LMDB environment per path per process.

py-lmdb refuses a second ``lmdb.open`` of files that are already open in the process, and LMDB handles
must not be used across ``fork``. Every pcache component opens its index or journal through
:func:`open_env`, which shares one handle per path and drops the inherited ones in a forked child.

A handle is shared only while it still describes the files at its path: when another process (or
thread) has moved the environment aside and created a new one there, :func:`open_env` opens the new
files. The old handle is not closed, since other threads may still be inside a transaction on it; it
closes when its last user lets go. (py-lmdb keys its "already open" guard on the files' inodes, so the
new files open without conflict.)
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

import lmdb

_ENVS: dict[str, tuple[Any, tuple[int, int] | None]] = {}
_LOCK = threading.Lock()


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
    with _LOCK:
        env, ident = _ENVS.get(path, (None, None))
        if env is None or ident != env_identity(path):
            env = lmdb.open(path, **options)
            _ENVS[path] = (env, env_identity(path))
        return env


def _forget_after_fork() -> None:
    global _LOCK
    _LOCK = threading.Lock()
    for env, _ in _ENVS.values():
        with contextlib.suppress(lmdb.Error):
            env.close()  # the child's copy only; the parent's handle is untouched
    _ENVS.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
