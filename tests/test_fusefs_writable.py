"""fusefs mount --writable on real mounts over the real SeaweedFS: POSIX semantics of staged files, the
frameworks that checkpoint to a path (DCP, torch.save, safetensors, a Hugging Face directory), commit,
and the faults (kill -9, full disk tier, origin outage, writes to origin objects)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import s3fs

from fusefs.testing import FUSE_MISSING, cleanup, daemon_pid, fusefs, mount, s3_env, wait_gone
from pcache.testing import ChaosProxy, SeaweedServer

pytestmark = pytest.mark.skipif(FUSE_MISSING, reason="/dev/fuse does not exist on this machine: no FUSE mounts")

MiB = 1024 * 1024
PY = sys.executable
ORIGIN = {"ckpt/origin.bin": os.urandom(100_000), "ckpt/old/_COMMITTED": b"{}", "ckpt/old/w.bin": b"w" * 1000,
          "ckpt/clean.bin": os.urandom(6 * MiB)}


@dataclass
class Mounted:
    mnt: Path
    bucket: str
    cache: Path
    s3: Any
    port: int
    env: dict[str, str]

    def origin(self, rel: str) -> bytes:
        self.s3.invalidate_cache()
        return bytes(self.s3.cat_file(f"{self.bucket}/ckpt/{rel}"))

    def exists(self, rel: str) -> bool:
        self.s3.invalidate_cache()
        return bool(self.s3.exists(f"{self.bucket}/ckpt/{rel}"))

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return fusefs(*args, env=self.env, timeout=timeout)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mount(server: SeaweedServer, bucket: str, root: Path, endpoint: str, *extra: str) -> Mounted:
    mnt = root / "mnt"
    mnt.mkdir(exist_ok=True)
    port = _free_port()
    env = s3_env(server, PCACHE_RETRY_ATTEMPTS="2", PCACHE_RETRY_BASE_DELAY="0.05")
    mount(f"s3://{bucket}/ckpt", mnt, "--writable", "--endpoint-url", endpoint, "--cache-dir", str(root / "cache"),
          "--metrics-port", str(port), *extra, env=env)
    s3 = s3fs.S3FileSystem(**server.storage_options(), skip_instance_cache=True)
    return Mounted(mnt, bucket, root / "cache", s3, port, env)


def _seed(server: SeaweedServer, name: str) -> str:
    bucket = server.make_bucket(name)
    client = server.client()
    for key, body in ORIGIN.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    return bucket


@pytest.fixture(scope="module")
def wm(s3_server: SeaweedServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mounted]:
    """One writable mount shared by the checks that do not break it."""
    bucket = _seed(s3_server, "fusefs-writable")
    m = _mount(s3_server, bucket, tmp_path_factory.mktemp("wmount"), s3_server.endpoint_url)
    try:
        yield m
    finally:
        cleanup(m.mnt)
        s3_server.ensure_running()
        s3_server.delete_bucket(bucket)


def _flush(m: Mounted, rel: str = "") -> None:
    proc = m.run("flush", str(m.mnt / rel))
    assert proc.returncode == 0, proc.stderr


def _commit(m: Mounted, rel: str) -> dict[str, Any]:
    proc = m.run("commit", str(m.mnt / rel))
    assert proc.returncode == 0, proc.stderr
    marker: dict[str, Any] = json.loads(m.origin(f"{rel}/_COMMITTED"))
    return marker


def _same_everywhere(m: Mounted, rel: str) -> list[str]:
    """Every file under ``rel``: the mount's bytes equal the origin's; return the names."""
    names = []
    for root, _dirs, files in os.walk(m.mnt / rel):
        for name in files:
            path = Path(root) / name
            sub = path.relative_to(m.mnt).as_posix()
            assert path.read_bytes() == m.origin(sub), sub
            names.append(path.relative_to(m.mnt / rel).as_posix())
    return sorted(names)


def _origin_names(m: Mounted, rel: str) -> list[str]:
    m.s3.invalidate_cache()
    base = f"{m.bucket}/ckpt/{rel}/"
    return sorted(k[len(base):] for k in m.s3.find(base))


# -- POSIX semantics of staged files -----------------------------------------------------------------
def test_staged_files_write_read_stat_truncate_rename_unlink_mkdir_rmdir(wm: Mounted) -> None:
    d = wm.mnt / "posix"
    d.mkdir()
    assert oct(d.stat().st_mode & 0o777) == oct(0o755)
    data = os.urandom(3 * MiB + 7)
    with open(d / "a.bin", "wb") as f:
        f.write(data)
        assert os.fstat(f.fileno()).st_size == len(data)
        assert os.getxattr(d / "a.bin", "user.fusefs.state") == b"writing"
    assert (d / "a.bin").stat().st_size == len(data)
    assert (d / "a.bin").read_bytes() == data
    with open(d / "rw.bin", "w+b") as f:  # random writes and reads on one descriptor
        f.write(b"x" * 100)
        f.seek(10)
        f.write(b"HELLO")
        f.seek(0)
        assert f.read() == b"x" * 10 + b"HELLO" + b"x" * 85
    os.truncate(d / "rw.bin", 12)
    assert (d / "rw.bin").read_bytes() == b"x" * 10 + b"HE"
    (d / "b.tmp").write_bytes(b"new contents")
    (d / "b").write_bytes(b"old contents")
    os.replace(d / "b.tmp", d / "b")  # over another staged file
    assert (d / "b").read_bytes() == b"new contents" and not (d / "b.tmp").exists()
    (d / "gone").write_bytes(b"bye")
    os.unlink(d / "gone")
    (d / "sub").mkdir()
    (d / "sub" / "f").write_bytes(b"f")
    with pytest.raises(OSError) as exc:
        os.rmdir(d / "sub")
    assert exc.value.errno == errno.ENOTEMPTY
    (d / "empty").mkdir()
    os.rmdir(d / "empty")
    with pytest.raises(OSError) as exc:
        os.rename(d / "sub", d / "sub2")  # files below would each need a rename: mv copies instead
    assert exc.value.errno == errno.EXDEV
    assert sorted(os.listdir(d)) == ["a.bin", "b", "rw.bin", "sub"]
    _flush(wm, "posix")
    assert _origin_names(wm, "posix") == ["a.bin", "b", "rw.bin", "sub/f"]
    assert wm.origin("posix/b") == b"new contents" and wm.origin("posix/rw.bin") == b"x" * 10 + b"HE"
    assert wm.origin("posix/a.bin") == data
    assert os.getxattr(d / "a.bin", "user.fusefs.state") == b"uploaded"
    with open("/proc/self/mountinfo") as fh:
        line = next(ln for ln in fh if f" {wm.mnt} " in ln)
    assert " rw," in line and "nosuid" in line and "nodev" in line and "allow_other" not in line


def test_rename_of_an_uploaded_file_copies_server_side_and_deletes(wm: Mounted) -> None:
    d = wm.mnt / "moved"
    d.mkdir()
    (d / "x.tmp").write_bytes(b"payload" * 1000)
    _flush(wm, "moved")
    assert _origin_names(wm, "moved") == ["x.tmp"]
    os.rename(d / "x.tmp", d / "x")
    assert _origin_names(wm, "moved") == ["x"]  # at once: no object left under the temporary name
    assert (d / "x").read_bytes() == b"payload" * 1000 == wm.origin("moved/x")


def test_origin_objects_and_the_marker_name_are_refused_and_the_origin_is_untouched(wm: Mounted) -> None:
    before = {k: wm.origin(k.removeprefix("ckpt/")) for k in ORIGIN}
    target = wm.mnt / "origin.bin"
    for action in (lambda: os.open(target, os.O_RDWR), lambda: os.open(target, os.O_WRONLY | os.O_TRUNC),
                   lambda: os.open(target, os.O_WRONLY | os.O_APPEND),
                   lambda: os.truncate(target, 0), lambda: os.unlink(target),
                   lambda: os.rename(target, wm.mnt / "renamed.bin"),
                   lambda: (wm.mnt / "_COMMITTED").write_bytes(b"{}"),
                   lambda: (wm.mnt / "old" / "_COMMITTED").write_bytes(b"{}"),
                   lambda: os.rmdir(wm.mnt / "old")):
        with pytest.raises(OSError) as exc:
            action()
        assert exc.value.errno in (errno.EPERM, errno.EACCES, errno.ENOTEMPTY), exc.value
    (wm.mnt / "m.tmp").write_bytes(b"{}")
    with pytest.raises(PermissionError):
        os.rename(wm.mnt / "m.tmp", wm.mnt / "_COMMITTED")
    os.unlink(wm.mnt / "m.tmp")
    assert target.read_bytes() == ORIGIN["ckpt/origin.bin"]
    assert {k: wm.origin(k.removeprefix("ckpt/")) for k in ORIGIN} == before


# -- frameworks, unchanged ---------------------------------------------------------------------------
def test_dcp_torch_save_safetensors_and_hf_directory_commit_and_read_back(wm: Mounted) -> None:
    import torch
    import torch.distributed.checkpoint as dcp
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    state = {"w": torch.randn(256, 256), "b": torch.arange(1000), "e": torch.randn(64, 64)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(wm.mnt / "dcp1")))
    (wm.mnt / "ts").mkdir()
    torch.save(state, wm.mnt / "ts" / "model.pt")
    save_file(state, str(wm.mnt / "ts" / "model.safetensors"))
    hf = wm.mnt / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 256}))
    save_torch_state_dict(state, str(hf), max_shard_size="200KB")
    assert sorted(os.listdir(hf)) == ["config.json", "model-00001-of-00002.safetensors",
                                      "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    for unit in ("dcp1", "ts", "hf"):
        marker = _commit(wm, unit)
        files = _same_everywhere(wm, unit)
        assert sorted(e["path"] for e in marker["files"]) == sorted(f for f in files if f != "_COMMITTED")
        assert all(e["xxh3_128"] for e in marker["files"]), marker  # every file vouched for by its upload
        assert not [n for n in _origin_names(wm, unit) if n.endswith(".tmp")]
    assert ".metadata" in _origin_names(wm, "dcp1")
    loaded = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(loaded, storage_reader=dcp.FileSystemReader(str(wm.mnt / "dcp1")))
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    again = torch.load(wm.mnt / "ts" / "model.pt")
    assert all(torch.equal(again[k], state[k]) for k in state)
    assert all(torch.equal(load_file(str(wm.mnt / "ts" / "model.safetensors"))[k], state[k]) for k in state)


def _dcp_rank(rank: int, port: str, path: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(rank)
    dcp.save({f"r{rank}": torch.randn(128, 128), "shared": torch.arange(10)},
             storage_writer=dcp.FileSystemWriter(path))
    dist.destroy_process_group()


def test_dcp_two_rank_gloo_writes_through_the_mount(wm: Mounted) -> None:
    import multiprocessing

    import torch  # noqa: F401 - imported once here; the forked ranks reuse it

    port = str(_free_port())
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_dcp_rank, args=(rank, port, str(wm.mnt / "dcp2"))) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    marker = _commit(wm, "dcp2")
    files = _same_everywhere(wm, "dcp2")
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "_COMMITTED"} <= set(files)
    assert len(marker["files"]) == len(files) - 1
    assert not [n for n in _origin_names(wm, "dcp2") if n.endswith(".tmp")]


def test_metrics_count_staged_uploaded_and_pending_bytes(wm: Mounted) -> None:
    (wm.mnt / "metrics.bin").write_bytes(b"m" * 123_457)
    _flush(wm)
    deadline = time.monotonic() + 10
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{wm.port}/metrics", timeout=10).read().decode()
        values = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}
        if values.get("fusefs_uploaded_bytes_total", 0) >= 123_457 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert values["fusefs_staged_bytes_total"] >= 123_457
    assert values["fusefs_uploaded_bytes_total"] >= 123_457
    assert values["fusefs_pending_bytes"] == 0


def test_babel_sync_once_copies_a_unit_committed_through_the_mount(wm: Mounted, s3_server: SeaweedServer,
                                                                   tmp_path: Path) -> None:
    unit = wm.mnt / "units" / "v1"
    unit.mkdir(parents=True)
    files = {f"part-{i}.bin": os.urandom(20_000 + i) for i in range(3)}
    for name, body in files.items():
        (unit / f"{name}.tmp").write_bytes(body)
        os.rename(unit / f"{name}.tmp", unit / name)
    _commit(wm, "units/v1")
    dst = s3_server.make_bucket("fusefs-babel-dst")
    config = tmp_path / "babel.toml"
    config.write_text(f"""
[sites.a]
url = "s3://{wm.bucket}/ckpt"
endpoint_url = "{s3_server.endpoint_url}"
[sites.b]
url = "s3://{dst}"
[[rules]]
name = "units"
source = "a"
destinations = ["b"]
include = ["units/**"]
unit_marker = "_COMMITTED"
""")
    environ = {**os.environ, "AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
               "AWS_ENDPOINT_URL": s3_server.endpoint_url, "BABEL_STATE_DIR": str(tmp_path / "state"),
               "BABEL_LISTING_SETTLE_SECONDS": "0"}
    proc = subprocess.run([PY, "-m", "babel_sync.cli", "once", "--config", str(config)], capture_output=True,
                          text=True, env=environ, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=dst)["Contents"]]
    assert {*(f"units/v1/{n}" for n in files), "units/v1/_COMMITTED"} <= set(keys), keys
    assert {n: client.get_object(Bucket=dst, Key=f"units/v1/{n}")["Body"].read() for n in files} == files
    s3_server.delete_bucket(dst)


# -- faults --------------------------------------------------------------------------------------------
@pytest.fixture
def proxied(s3_server: SeaweedServer, chaos_proxy: Any, tmp_path: Path) -> Iterator[tuple[Mounted, ChaosProxy]]:
    bucket = _seed(s3_server, f"fusefs-wfault-{os.getpid()}-{time.monotonic_ns() % 10**6}")
    proxy = chaos_proxy()
    m = _mount(s3_server, bucket, tmp_path, proxy.endpoint_url, "--disk-bytes", "12MiB", "--block-size", "1MiB",
               "--memory-bytes", "4MiB")
    try:
        yield m, proxy
    finally:
        for hold in list(proxy._holds):
            hold.release()
        cleanup(m.mnt)
        s3_server.ensure_running()
        s3_server.delete_bucket(bucket)


def test_rename_while_the_upload_runs_waits_then_copies_and_outage_fails_commit(
        proxied: tuple[Mounted, ChaosProxy]) -> None:
    m, proxy = proxied
    (m.mnt / "u").mkdir()
    hold = proxy.hold("PUT", f"/{m.bucket}/ckpt/u/.metadata.tmp", stage="response")
    (m.mnt / "u" / ".metadata.tmp").write_bytes(b"meta" * 100)
    assert hold.wait(30)  # the uploader sent it and waits for the answer: the upload is running
    done = threading.Event()
    renamer = threading.Thread(target=lambda: (os.rename(m.mnt / "u" / ".metadata.tmp", m.mnt / "u" / ".metadata"),
                                               done.set()))
    renamer.start()
    assert not done.wait(0.5)  # the rename waits for the running upload
    hold.release()
    renamer.join(30)
    assert done.is_set()
    assert _origin_names(m, "u") == [".metadata"] and m.origin("u/.metadata") == b"meta" * 100

    fault = proxy.fail("PUT", times=None)  # the origin takes no more writes
    (m.mnt / "u" / "shard.bin").write_bytes(b"s" * 5000)  # close() returns: durable locally
    proc = m.run("commit", str(m.mnt / "u"), "--timeout", "5")
    assert proc.returncode == 1, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"s3://{m.bucket}/ckpt/u" in lines[0], proc.stderr
    assert not m.exists("u/_COMMITTED") and not m.exists("u/shard.bin")
    fault.cancel()
    marker = _commit(m, "u")
    assert sorted(e["path"] for e in marker["files"]) == [".metadata", "shard.bin"]


def test_full_disk_tier_gives_enospc_and_publishes_nothing(proxied: tuple[Mounted, ChaosProxy]) -> None:
    m, proxy = proxied
    assert (m.mnt / "clean.bin").read_bytes() == ORIGIN["ckpt/clean.bin"]  # 6 MiB of clean blocks on disk
    proxy.fail("PUT", times=None)
    proxy.fail("POST", times=None)
    # Dirty, stays pending; 6 clean + 8 dirty MiB exceed the 12 MiB budget: clean blocks make room.
    (m.mnt / "first.bin").write_bytes(os.urandom(8 * MiB))
    with pytest.raises(OSError) as exc, open(m.mnt / "second.bin", "wb") as f:
        f.write(os.urandom(8 * MiB))
        f.flush()
        os.fsync(f.fileno())
    assert exc.value.errno == errno.ENOSPC
    deadline = time.monotonic() + 10  # the kernel forgets the name asynchronously
    while (m.mnt / "second.bin").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (m.mnt / "second.bin").exists()
    assert (m.mnt / "first.bin").stat().st_size == 8 * MiB
    assert not m.exists("second.bin")
    journal = subprocess.run([PY, "-c", "import sys; from pcache.journal import Journal; "
                              "print([e['path'] for e in Journal(sys.argv[1]).pending()])", str(m.cache)],
                             capture_output=True, text=True, check=True)
    assert "second.bin" not in journal.stdout and "first.bin" in journal.stdout


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (the uploader processes a daemon spawned)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _kill_node(m: Mounted) -> None:
    """kill -9 the daemon and the uploader it spawned (the whole node goes), then drop the dead mount."""
    pid = daemon_pid(m.mnt)
    uploaders = _children(pid)
    os.kill(pid, signal.SIGKILL)
    for upid in uploaders:
        os.kill(upid, signal.SIGKILL)
    wait_gone(pid)
    assert m.run("umount", str(m.mnt)).returncode == 0


def test_kill9_after_close_loses_nothing(proxied: tuple[Mounted, ChaosProxy], s3_server: SeaweedServer) -> None:
    m, proxy = proxied
    fault = proxy.fail("PUT", times=None)
    (m.mnt / "k").mkdir()
    (m.mnt / "k" / "a.bin").write_bytes(b"a" * 70_000)  # close() returned: journaled
    (m.mnt / "k" / "b.tmp").write_bytes(b"b" * 50_000)
    os.rename(m.mnt / "k" / "b.tmp", m.mnt / "k" / "b.bin")
    _kill_node(m)
    fault.cancel()
    assert not m.exists("k/a.bin")
    proc = subprocess.run([PY, "-m", "pcache.cli", "flush", "--cache-dir", str(m.cache), "--endpoint-url",
                           s3_server.endpoint_url], capture_output=True, text=True, env=m.env, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert m.origin("k/a.bin") == b"a" * 70_000 and m.origin("k/b.bin") == b"b" * 50_000
    assert _origin_names(m, "k") == ["a.bin", "b.bin"]

    # The next mount of the same cache uploads by itself, and shows the file meanwhile.
    args = ("--writable", "--endpoint-url", proxy.endpoint_url, "--cache-dir", str(m.cache))
    mount(f"s3://{m.bucket}/ckpt", m.mnt, *args, env=m.env)
    fault = proxy.fail("PUT", times=None)
    (m.mnt / "k" / "c.bin").write_bytes(b"c" * 1000)
    _kill_node(m)
    assert not m.exists("k/c.bin")
    fault.cancel()
    mount(f"s3://{m.bucket}/ckpt", m.mnt, *args, env=m.env)
    assert (m.mnt / "k" / "c.bin").read_bytes() == b"c" * 1000
    deadline = time.monotonic() + 30
    while not m.exists("k/c.bin") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert m.origin("k/c.bin") == b"c" * 1000


def test_writable_with_refresh_is_a_config_error() -> None:
    from fusefs import MountConfig
    from lingcore.errors import ConfigError

    with pytest.raises(ConfigError, match="refresh"):
        MountConfig(writable=True, refresh=5)
