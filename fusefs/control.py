"""``fusefs commit`` and ``fusefs flush`` talk to the daemon of a writable mount over a unix socket.

The socket lives in ``<cache_dir>/fusefs-control/`` (directory 0700, socket 0600), so only the user who
mounted can reach it, and the daemon also checks the peer's uid (``SO_PEERCRED``). No network port is
ever opened. The client finds the socket through the ``user.fusefs.control`` extended attribute of the
mount's root, so it needs nothing but a path inside the mount.

The protocol is one JSON line each way: ``{"op": "commit"|"flush", "path": "rel/dir", "timeout": s}``,
answered by ``{"ok": true, "url": ...}`` or ``{"ok": false, "error": "one line naming the URL"}``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from fusefs.errors import NotMountedError
from fusefs.mounts import mount_entry
from lingcore.log import get_logger

log = get_logger(__name__)

XATTR_CONTROL = "user.fusefs.control"
_MAX_PATH = 100  # sun_path holds 108 bytes; longer paths are reached through /proc/self/fd


def socket_path(cache_dir: str, mountpoint: str) -> str:
    """Where the daemon of ``mountpoint`` listens."""
    name = hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:16]
    return os.path.join(os.path.abspath(cache_dir), "fusefs-control", f"{name}.sock")


def _short(path: str, dir_fd: int) -> str:
    return path if len(path) <= _MAX_PATH else f"/proc/self/fd/{dir_fd}/{os.path.basename(path)}"


class ControlServer:
    """Accepts commit/flush requests in a background thread; each request runs in its own thread.

    Args:
        path: Socket path (from :func:`socket_path`).
        handle: ``handle(request) -> reply``; raised exceptions become ``{"ok": false, "error": str(exc)}``.
    """

    def __init__(self, path: str, handle: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.path, self.handle = path, handle
        directory = os.path.dirname(path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a socket left by a killed daemon
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        old = os.umask(0o177)  # the socket is created 0600: no window in which others could connect
        try:
            self._sock.bind(_short(path, dir_fd))
        finally:
            os.umask(old)
            os.close(dir_fd)
        self._sock.listen(16)
        self._uid = os.getuid()
        self._thread = threading.Thread(target=self._serve, name="fusefs-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed at unmount
            threading.Thread(target=self._one, args=(conn,), name="fusefs-control-req", daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _, uid, _ = struct.unpack("3i", creds)
            if uid not in (self._uid, 0):
                log.warning("control request from uid %d refused", uid)
                return
            try:
                request = json.loads(conn.makefile("rb").readline() or b"{}")
                reply = self.handle(request)
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the CLI as one line
                log.error("control request failed: %s", exc)
                reply = {"ok": False, "error": str(exc) or type(exc).__name__}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(reply).encode() + b"\n")


def find_mount(path: str) -> tuple[str, str]:
    """Return ``(mount root, path relative to it)`` of ``path`` inside a fusefs mount.

    Raises:
        NotMountedError: ``path`` is not inside a fusefs mount.
    """
    current = os.path.abspath(path)
    while True:
        entry = mount_entry(current)
        if entry is not None:
            if not entry["fstype"].startswith("fuse.fusefs"):
                break
            return current, os.path.relpath(os.path.abspath(path), current).replace(os.sep, "/").lstrip(".")
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    raise NotMountedError(os.path.abspath(path), "is not inside a fusefs mount")


def request(path: str, op: str, timeout: float | None = None) -> dict[str, Any]:
    """Send ``op`` for ``path`` (inside a writable mount) to its daemon and return the reply.

    Raises:
        NotMountedError: not inside a fusefs mount, or the mount is not writable.
        OSError: the daemon refused or failed; the message is the daemon's one line.
    """
    root, rel = find_mount(path)
    try:
        control = os.getxattr(root, XATTR_CONTROL).decode()
    except OSError:
        raise NotMountedError(root, "is not a writable fusefs mount (mount it with --writable)") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dir_fd = os.open(os.path.dirname(control), os.O_RDONLY | os.O_DIRECTORY)
    try:
        sock.connect(_short(control, dir_fd))
        sock.sendall(json.dumps({"op": op, "path": rel, "timeout": timeout}).encode() + b"\n")
        line = sock.makefile("rb").readline()
    finally:
        os.close(dir_fd)
        sock.close()
    if not line:
        raise OSError(f"the daemon of {root} closed the control connection without an answer")
    reply: dict[str, Any] = json.loads(line)
    if not reply.get("ok"):
        raise OSError(reply.get("error") or f"{op} of {path} failed")
    return reply
