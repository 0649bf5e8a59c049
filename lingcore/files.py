"""Small file helpers shared by every package: full writes, fsync of a directory, owner-only secrets,
and whole-or-nothing puts to any fsspec filesystem."""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any


def unlink_quiet(path: str) -> None:
    """Remove ``path`` if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync the file or directory at ``path`` (opened read-only: fsync needs no write access)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """fsync a directory so a rename inside it survives a crash."""
    fsync_path(path)


def write_all(fd: int, data: Any) -> None:
    """Write every byte of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def write_private(path: str | os.PathLike[str], data: bytes) -> None:
    """Create or replace ``path`` with ``data``, readable by its owner only from the first byte.

    For secrets (tokens, credentials): writing first and ``chmod`` after leaves a window in which the
    file is world-readable.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
        write_all(fd, data)
    finally:
        os.close(fd)


def put_whole(fs: Any, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` on an fsspec filesystem so readers see all of it or nothing.

    Object stores replace an object in one PUT. A local file system truncates and then writes, so a
    kill in between would leave a torn file (an empty marker, a half ``latest`` pointer): write a
    sibling and rename it over instead.
    """
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol not in ("file", "local"):
        fs.pipe_file(path, data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)
