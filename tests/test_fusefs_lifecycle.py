"""fusefs mount lifecycle and faults on real mounts: exit codes, signals, kill -9, dead origin, --refresh."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import s3fs

from fusefs import mount_entry
from fusefs.testing import (
    FUSE_MISSING,
    cleanup,
    daemon_pid,
    drop_page_cache,
    fusefs,
    mount,
    s3_env,
    wait_gone,
)
from pcache.testing import NodeProcess, SeaweedServer, write_token

pytestmark = pytest.mark.skipif(FUSE_MISSING, reason="/dev/fuse does not exist on this machine: no FUSE mounts")


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    cleanup(path)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "x.bin").write_bytes(os.urandom(300_000))
    (root / "top.txt").write_bytes(b"top\n")
    return root


def _wait_for(predicate: object, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_file_url_mount_daemonizes_and_exit_code_zero(src: Path, mnt: Path, tmp_path: Path) -> None:
    proc = fusefs("mount", f"file://{src}", str(mnt), "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    assert (mnt / "a" / "b" / "x.bin").read_bytes() == (src / "a" / "b" / "x.bin").read_bytes()
    entry = mount_entry(str(mnt))
    assert entry is not None and entry["fstype"] == "fuse.fusefs"
    with open("/proc/self/mountinfo") as fh:
        line = next(ln for ln in fh if f" {mnt} " in ln)
    assert " ro," in line and "allow_other" not in line  # read-only, no allow_other unless asked
    pid = daemon_pid(mnt)
    assert os.getsid(pid) == pid  # detached into its own session
    assert (tmp_path / "cache" / "fusefs.log").exists()


def test_bad_mountpoints_and_options_exit_nonzero_with_a_clear_message(src: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    proc = fusefs("mount", f"file://{src}", str(missing))
    assert proc.returncode == 2 and "does not exist" in proc.stderr and str(missing) in proc.stderr
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    proc = fusefs("mount", f"file://{src}", str(full))
    assert proc.returncode == 2 and "not empty" in proc.stderr
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = fusefs("mount", f"file://{src}", str(afile))
    assert proc.returncode == 2 and "not a directory" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = fusefs("mount", f"file://{src}", str(empty), "--refresh", "-1")
    assert proc.returncode == 2 and "'refresh'" in proc.stderr
    proc = fusefs("mount", f"file://{tmp_path}/no-such-source", str(empty))
    assert proc.returncode == 2 and "no-such-source" in proc.stderr
    proc = fusefs("umount", str(empty))
    assert proc.returncode == 1 and "not mounted" in proc.stderr
    assert mount_entry(str(empty)) is None


def test_a_busy_metrics_port_fails_the_mount_without_leaving_a_dead_one(src: Path, mnt: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = fusefs("mount", f"file://{src}", str(mnt), "--cache-dir", str(tmp_path / "c"),
                      "--metrics-port", str(port))
    assert proc.returncode == 1 and str(port) in proc.stderr, proc.stderr
    assert mount_entry(str(mnt)) is None and os.listdir(mnt) == []


def test_missing_bucket_fails_in_the_daemon_and_exit_code_says_so(s3_server: SeaweedServer, mnt: Path,
                                                                  tmp_path: Path) -> None:
    proc = fusefs("mount", "s3://no-such-bucket-fusefs/prefix", str(mnt), "--endpoint-url", s3_server.endpoint_url,
                  "--cache-dir", str(tmp_path / "cache"), env=s3_env(s3_server))
    assert proc.returncode != 0
    assert "no-such-bucket-fusefs" in proc.stderr
    assert mount_entry(str(mnt)) is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(src: Path, mnt: Path, tmp_path: Path, sig: signal.Signals) -> None:
    mount(f"file://{src}", mnt, "--cache-dir", str(tmp_path / "cache"))
    assert (mnt / "top.txt").read_bytes() == b"top\n"
    pid = daemon_pid(mnt)
    os.kill(pid, sig)
    wait_gone(pid)
    assert mount_entry(str(mnt)) is None
    assert os.listdir(mnt) == []  # the directory is usable again, not a dead endpoint
    assert f"signal {sig.name}: unmounting" in (tmp_path / "cache" / "fusefs.log").read_text()


def test_foreground_mount_stops_on_sigterm(src: Path, mnt: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "fusefs", "mount", "--foreground", f"file://{src}", str(mnt),
                             "--cache-dir", str(tmp_path / "cache")], stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: mount_entry(str(mnt)) is not None, what="the foreground mount")
        assert (mnt / "a" / "b" / "x.bin").stat().st_size == 300_000
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert mount_entry(str(mnt)) is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_umount_cleans_up_after_kill_9(src: Path, mnt: Path, tmp_path: Path) -> None:
    mount(f"file://{src}", mnt, "--cache-dir", str(tmp_path / "cache"))
    pid = daemon_pid(mnt)
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    with pytest.raises(OSError) as info:
        os.listdir(mnt)
    assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)  # the kernel answers either for a dead daemon
    proc = fusefs("mount", f"file://{src}", str(mnt))
    assert proc.returncode == 2 and "fusefs umount" in proc.stderr  # a stale mount is named as such
    proc = fusefs("umount", str(mnt))
    assert proc.returncode == 0, proc.stderr
    assert mount_entry(str(mnt)) is None and os.listdir(mnt) == []
    mount(f"file://{src}", mnt, "--cache-dir", str(tmp_path / "cache"))  # and it mounts again
    assert (mnt / "top.txt").read_bytes() == b"top\n"


def test_dead_origin_cached_files_stay_readable_uncached_give_eio(s3_server: SeaweedServer, bucket: str,
                                                                  mnt: Path, tmp_path: Path) -> None:
    fs = s3fs.S3FileSystem(**s3_server.storage_options(), skip_instance_cache=True)
    warm, cold = os.urandom(2_500_000), os.urandom(700_000)
    fs.pipe({f"{bucket}/ds/warm.bin": warm, f"{bucket}/ds/sub/cold.bin": cold})
    cache = tmp_path / "cache"
    env = s3_env(s3_server, PCACHE_RETRY_ATTEMPTS="2", PCACHE_RETRY_BASE_DELAY="0.05")
    # No memory tier: after the outage the warm file must come from the disk tier.
    mount(f"s3://{bucket}/ds", mnt, "--endpoint-url", s3_server.endpoint_url, "--cache-dir", str(cache),
          "--block-size", "1MiB", "--memory-bytes", "0", env=env)
    assert (mnt / "warm.bin").read_bytes() == warm
    _wait_for(lambda: sum(len(f) for _, _, f in os.walk(cache / "blocks")) >= 3, what="warm blocks on disk")
    s3_server.stop()
    drop_page_cache(mnt / "warm.bin")
    assert (mnt / "warm.bin").read_bytes() == warm
    assert (mnt / "sub" / "cold.bin").stat().st_size == len(cold)  # metadata is in the inode table
    with pytest.raises(OSError) as info:
        (mnt / "sub" / "cold.bin").read_bytes()
    assert info.value.errno == errno.EIO
    log = (cache / "fusefs.log").read_text()
    assert f"s3://{bucket}/ds/sub/cold.bin" in log
    s3_server.ensure_running()
    # The same file reads correctly once the origin is back: an error was never cached as data.
    assert (mnt / "sub" / "cold.bin").read_bytes() == cold


def test_refresh_shows_new_version_and_never_old_bytes(s3_server: SeaweedServer, bucket: str, mnt: Path,
                                                       tmp_path: Path) -> None:
    fs = s3fs.S3FileSystem(**s3_server.storage_options(), skip_instance_cache=True)
    old, new = b"A" * 1_500_000, b"B" * 1_500_000
    fs.pipe({f"{bucket}/r/shard.bin": old, f"{bucket}/r/gone.bin": b"x"})
    mount(f"s3://{bucket}/r", mnt, "--endpoint-url", s3_server.endpoint_url, "--cache-dir", str(tmp_path / "c"),
          "--refresh", "0.3", "--block-size", "1MiB", env=s3_env(s3_server))
    path = mnt / "shard.bin"
    old_etag = os.getxattr(path, "user.pcache.etag")
    ino = path.stat().st_ino
    assert path.read_bytes() == old  # now cached in the kernel, the memory tier and on disk
    held = open(path, "rb")  # noqa: SIM115 - a reader that keeps the old version open across the refresh
    fs.pipe({f"{bucket}/r/shard.bin": new, f"{bucket}/r/added.bin": b"added"})
    fs.rm(f"{bucket}/r/gone.bin")
    new_etag = fs.info(f"{bucket}/r/shard.bin")["ETag"].strip('"').encode()
    assert new_etag != old_etag
    _wait_for(lambda: os.getxattr(path, "user.pcache.etag") == new_etag, what="the refreshed version")
    with open(path, "rb") as fresh:
        # The old handle reads after the refresh: its pages must never reach opens of the new version.
        assert os.pread(held.fileno(), 4096, 0) == old[:4096] and os.fstat(held.fileno()).st_size == len(old)
        assert os.pread(fresh.fileno(), 4096, 0) == new[:4096]
    held.close()
    assert path.read_bytes() == new
    with open(path, "rb") as f:
        f.seek(1_200_000)
        assert f.read(10) == b"B" * 10
    assert path.stat().st_ino != ino  # a new version is a new inode, so page caches never mix
    _wait_for(lambda: (mnt / "added.bin").exists(), what="the new object")
    assert (mnt / "added.bin").read_bytes() == b"added"
    _wait_for(lambda: not (mnt / "gone.bin").exists(), what="the deleted object to disappear")


def test_mount_through_a_pcache_cluster(s3_server: SeaweedServer, bucket: str, mnt: Path, tmp_path: Path) -> None:
    fs = s3fs.S3FileSystem(**s3_server.storage_options(), skip_instance_cache=True)
    data = os.urandom(3_000_000)
    fs.pipe({f"{bucket}/c/x.bin": data})
    token = write_token(tmp_path / "token")
    env = s3_env(s3_server)
    node = NodeProcess(tmp_path / "node", token, s3_server.endpoint_url, env, ("--block-size", "1MiB"))
    peer = node.start()
    try:
        mount(f"s3://{bucket}/c", mnt, "--endpoint-url", s3_server.endpoint_url, "--cache-dir", str(tmp_path / "c"),
              "--block-size", "1MiB", "--peers", peer, "--token-file", token, env=env)
        assert (mnt / "x.bin").read_bytes() == data
        # The node fetched the blocks (its disk tier holds them): reads went through the cluster.
        _wait_for(lambda: sum(len(f) for _, _, f in os.walk(tmp_path / "node" / "blocks")) >= 3,
                  what="blocks on the peer")
    finally:
        cleanup(mnt)
        node.stop()


def test_object_changed_without_refresh_gives_an_error_never_mixed_bytes(s3_server: SeaweedServer, bucket: str,
                                                                         mnt: Path, tmp_path: Path) -> None:
    fs = s3fs.S3FileSystem(**s3_server.storage_options(), skip_instance_cache=True)
    old = b"A" * 3_000_000
    fs.pipe({f"{bucket}/s/x.bin": old})
    mount(f"s3://{bucket}/s", mnt, "--endpoint-url", s3_server.endpoint_url, "--cache-dir", str(tmp_path / "c"),
          "--block-size", "1MiB", env=s3_env(s3_server, PCACHE_READAHEAD_BLOCKS="0"))
    with open(mnt / "x.bin", "rb") as f:
        assert f.read(1000) == b"A" * 1000  # block 0 cached; the rest is not
        fs.pipe({f"{bucket}/s/x.bin": b"B" * 3_000_000})
        f.seek(2_500_000)
        with pytest.raises(OSError) as info:
            f.read(1000)
        assert info.value.errno in (errno.ESTALE, errno.EIO)  # the pinned version is gone: no B bytes


def test_allow_other_only_when_asked(src: Path, mnt: Path, tmp_path: Path) -> None:
    mount(f"file://{src}", mnt, "--cache-dir", str(tmp_path / "cache"), "--allow-other")
    with open("/proc/self/mountinfo") as fh:
        line = next(ln for ln in fh if f" {mnt} " in ln)
    assert "allow_other" in line and " ro," in line


def test_help_explains_commands_and_options() -> None:
    top = fusefs("--help")
    assert top.returncode == 0 and "umount" in top.stdout and "stale" in top.stdout
    sub = fusefs("mount", "--help")
    for flag in ("--cache-dir", "--foreground", "--allow-other", "--refresh", "--peers", "--endpoint-url",
                 "--entry-timeout", "--attr-timeout", "FUSEFS_", "PCACHE_"):
        assert flag in sub.stdout, flag
