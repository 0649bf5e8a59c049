"""One LMDB environment per path per process.

py-lmdb refuses a second ``lmdb.open`` of a path that is already open in the process, and LMDB handles
must not be used across ``fork``. Every pcache component opens its index or journal through
:func:`open_env`, which shares one handle per path and drops the inherited ones in a forked child.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

import lmdb

_ENVS: dict[str, Any] = {}
_LOCK = threading.Lock()


def open_env(path: str, **options: Any) -> Any:
    """Return this process's environment for ``path``, opening it with ``options`` the first time."""
    path = os.path.abspath(path)
    with _LOCK:
        env = _ENVS.get(path)
        if env is None:
            env = _ENVS[path] = lmdb.open(path, **options)
        return env


def _forget_after_fork() -> None:
    global _LOCK
    _LOCK = threading.Lock()
    for env in _ENVS.values():
        with contextlib.suppress(lmdb.Error):
            env.close()  # the child's copy only; the parent's handle is untouched
    _ENVS.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
