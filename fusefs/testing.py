"""Helpers for tests and benchmarks of real mounts: run the CLI, find the daemon, unmount at teardown."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fusefs import mount_entry, unmount
from pcache.testing import SeaweedServer

FUSE_MISSING = not os.path.exists("/dev/fuse")


def s3_env(server: SeaweedServer, **extra: str) -> dict[str, str]:
    """Environment for a fusefs process reading ``server`` (credentials through the AWS variables)."""
    env = dict(os.environ, AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key,
               AWS_REGION="us-east-1", PCACHE_LOG_LEVEL="INFO")
    env.update(extra)
    return env


def fusefs(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python -m fusefs ARGS`` and return the finished process (output captured)."""
    return subprocess.run([sys.executable, "-m", "fusefs", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


def mount(source: str, mountpoint: Path, *args: str, env: dict[str, str] | None = None) -> None:
    """Mount (daemonized) and assert it worked."""
    proc = fusefs("mount", source, str(mountpoint), *args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert mount_entry(str(mountpoint)) is not None


def daemon_pid(mountpoint: Path) -> int:
    """Pid of the fusefs daemon serving ``mountpoint``."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"fusefs" in cmdline and b"mount" in cmdline and os.fsencode(str(mountpoint)) in cmdline:
            return int(entry)
    raise AssertionError(f"no fusefs daemon for {mountpoint}")


def wait_gone(pid: int, timeout: float = 30.0) -> None:
    """Wait until process ``pid`` has exited (it is not our child, so poll /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state == "Z":
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still running after {timeout} s")


def cleanup(mountpoint: Path) -> None:
    """Unmount if still mounted (teardown must not leave mounts behind)."""
    if mount_entry(str(mountpoint)) is not None:
        pid: int | None
        try:
            pid = daemon_pid(mountpoint)
        except AssertionError:
            pid = None
        unmount(str(mountpoint))
        if pid is not None:
            wait_gone(pid)


def drop_page_cache(path: Any) -> None:
    """Drop the kernel's cached pages of one file, so the next read reaches the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
