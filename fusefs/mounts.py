"""Mountpoint checks, ``/proc/self/mountinfo`` lookups, unmounting (also of stale mounts) and BDI tuning."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess

from fusefs.errors import MountError, MountpointError, NotMountedError
from lingcore.log import get_logger

log = get_logger(__name__)


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def mount_entry(mountpoint: str) -> dict[str, str] | None:
    """Return ``{"dev": "0:53", "fstype": "fuse.fusefs", "source": ...}`` for ``mountpoint``, or None."""
    target = os.path.abspath(mountpoint)
    try:
        with open("/proc/self/mountinfo") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:  # the last matching line is the mount on top
        left, _, right = line.partition(" - ")
        parts, rparts = left.split(), right.split()
        if len(parts) >= 5 and len(rparts) >= 2 and _unescape(parts[4]) == target:
            found = {"dev": parts[2], "fstype": rparts[0], "source": _unescape(rparts[1])}
    return found


def check_mountpoint(mountpoint: str) -> str:
    """Return the absolute mountpoint if it is an existing, empty, unmounted directory.

    Raises:
        MountpointError: naming the path and what is wrong with it.
    """
    path = os.path.abspath(mountpoint)
    if mount_entry(path) is not None:
        raise MountpointError(path, "is already a mount point (run `fusefs umount` first if it is stale)")
    try:
        entries = os.listdir(path)
    except FileNotFoundError:
        raise MountpointError(path, "mountpoint does not exist; create an empty directory first") from None
    except NotADirectoryError:
        raise MountpointError(path, "mountpoint is not a directory") from None
    except OSError as exc:
        if exc.errno in STALE_ERRNOS:
            raise MountpointError(path, "is a stale mount; run `fusefs umount` on it") from None
        raise MountpointError(path, f"cannot use as a mountpoint: {exc.strerror}") from None
    if entries:
        raise MountpointError(path, f"mountpoint is not empty ({len(entries)} entries); use an empty directory")
    return path


#: What the kernel answers for a mount whose daemon died: ENOTCONN, or ECONNABORTED on the first access
#: after the connection was torn down.
STALE_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)


def set_read_ahead(mountpoint: str, nbytes: int) -> None:
    """Set the kernel readahead of the mount's BDI (best effort: it needs root)."""
    entry = mount_entry(mountpoint)
    if entry is None or nbytes <= 0:
        return
    path = f"/sys/class/bdi/{entry['dev']}/read_ahead_kb"
    try:
        with open(path, "w") as fh:
            fh.write(str(max(4, nbytes // 1024)))
    except OSError as exc:
        log.info("kernel readahead left at its default (%s: %s)", path, exc.strerror)


def unmount(mountpoint: str) -> None:
    """Unmount a fusefs mount, including a stale one whose daemon was killed.

    Tries ``fusermount3 -u``, then a lazy unmount (``-z``, for busy or dead mounts).

    Raises:
        NotMountedError: ``mountpoint`` is not a mount point.
        MountError: every unmount attempt failed.
    """
    path = os.path.abspath(mountpoint)
    if mount_entry(path) is None:
        raise NotMountedError(path, "is not mounted")
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    attempts = [[tool, "-u", path], [tool, "-u", "-z", path]] if tool else []
    if os.geteuid() == 0:
        attempts.append(["umount", "-l", path])
    errors = []
    for cmd in attempts:
        if cmd[0] is None:
            continue
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False)
        if proc.returncode == 0 and mount_entry(path) is None:
            return
        errors.append(f"{' '.join(str(c) for c in cmd)}: {proc.stderr.strip() or proc.returncode}")
    if mount_entry(path) is None:
        return
    raise MountError(path, "could not unmount: " + "; ".join(errors))
