"""fusefs: a FUSE mount of any fsspec URL, with reads served through pcache; read-only, or ``--writable``
(new files written through pcache's write-back, origin objects read-only; see docs/fusefs.md).

Public API:

- :func:`fusefs.cli.main` (the ``fusefs`` command: ``mount``, ``umount``, and ``commit``/``flush`` of a
  writable mount, which reach its daemon through :mod:`fusefs.control`)
- :class:`Mount` and :class:`MountSpec` (mount from Python, e.g. in a test or a launcher)
- :class:`MountConfig` (mount settings: timeouts, refresh, readahead, metrics)
- :func:`unmount`, :func:`check_mountpoint`, :func:`mount_entry`
- typed errors: :class:`MountError`, :class:`MountpointError`, :class:`NotMountedError`
- :data:`XATTR_URL`, :data:`XATTR_ETAG`: the extended attributes every file carries
"""

from __future__ import annotations

from fusefs.config import MountConfig
from fusefs.errors import MountError, MountpointError, NotMountedError
from fusefs.mounts import check_mountpoint, mount_entry, unmount
from fusefs.ops import XATTR_ETAG, XATTR_URL

__all__ = [
    "XATTR_ETAG",
    "XATTR_URL",
    "Mount",
    "MountConfig",
    "MountError",
    "MountSpec",
    "MountpointError",
    "NotMountedError",
    "check_mountpoint",
    "mount_entry",
    "unmount",
]


def __getattr__(name: str) -> object:
    # The daemon pulls in pyfuse3, trio and pcache's engine; import it only when asked for.
    if name in ("Mount", "MountSpec"):
        from fusefs import daemon

        return getattr(daemon, name)
    raise AttributeError(name)
