"""Typed errors raised by fusefs; each message names the path or URL involved."""

from __future__ import annotations


class MountError(OSError):
    """The mount could not be set up (bad mountpoint, FUSE unavailable, origin listing failed)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


class MountpointError(MountError, ValueError):
    """The mountpoint does not exist, is not a directory, is not empty or is already mounted."""


class NotMountedError(MountError):
    """``fusefs umount`` was given a path that is not a FUSE mount."""
