"""pcache's public surface (``pcache/__init__.py``): the calls fusefs, loaders and ling_train make.

Each test runs on a local ``file://`` origin and on the real SeaweedFS server.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lingcore.marker import MARKER_NAME
from pcache import CacheConfig, CommitMismatchError, ObjectRef, PCacheFileSystem, admin, block_key, release
from pcache.diskstore import HEADER

KiB = 1024
BLOCK = 64 * KiB


@pytest.fixture(params=["file", "s3"])
def origin(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[PCacheFileSystem, str]]:
    """(pcache filesystem with hour-long metadata caching, a fresh root path at its origin)."""
    options: dict[str, Any] = {"cache_dir": str(tmp_path / "cache"), "block_size": BLOCK, "metadata_ttl": 3600,
                               "skip_instance_cache": True, "uploader_nice": 0}
    if request.param == "file":
        root = tmp_path / "origin"
        root.mkdir()
        yield PCacheFileSystem(target_protocol="file", **options), str(root)
    else:
        bucket = request.getfixturevalue("bucket")
        s3_options = request.getfixturevalue("s3_options")
        yield PCacheFileSystem(target_protocol="s3", target_options=s3_options, **options), f"{bucket}/api"


def test_origin_path_and_url(origin: tuple[PCacheFileSystem, str]) -> None:
    pfs, root = origin
    proto = pfs.target_protocol
    for spelling in (f"pcache::{proto}://{root}/a/b.bin", f"{proto}://{root}/a/b.bin/", f"{root}/a/b.bin"):
        assert pfs.origin_path(spelling) == f"{root}/a/b.bin"
    assert pfs.url(f"{root}/a/b.bin") == (f"s3://{root}/a/b.bin" if proto == "s3" else f"{root}/a/b.bin")


def test_ref_for_with_a_listed_version_keys_the_same_blocks(origin: tuple[PCacheFileSystem, str]) -> None:
    """fusefs opens files with the listing's version; its blocks must be the ones every other reader uses."""
    pfs, root = origin
    pfs.fs.pipe_file(f"{root}/x.bin", b"x" * 1000)
    ref = pfs.ref_for(f"{root}/x.bin")
    assert isinstance(ref, ObjectRef) and ref.size == 1000
    assert pfs.ref_for(f"{root}/x.bin", ref.version, ref.size) == ref
    assert block_key(pfs.ref_for(f"pcache::{pfs.target_protocol}://{root}/x.bin", ref.version, 1000), 0, BLOCK) \
        == block_key(ref, 0, BLOCK)


def test_in_memory_false_before_a_read_and_true_after(origin: tuple[PCacheFileSystem, str]) -> None:
    pfs, root = origin
    data = os.urandom(5 * BLOCK + 17)
    pfs.fs.pipe_file(f"{root}/m.bin", data)
    ref = pfs.ref_for(f"{root}/m.bin")
    assert not pfs.in_memory(ref, 0, BLOCK)
    with pfs.open(f"{root}/m.bin", "rb") as f:
        f.seek(BLOCK + 10)
        assert f.read(BLOCK) == data[BLOCK + 10:2 * BLOCK + 10]  # blocks 1 and 2
    assert pfs.in_memory(ref, BLOCK, 3 * BLOCK)
    assert pfs.in_memory(ref, 3 * BLOCK, 3 * BLOCK)  # an empty range needs nothing
    assert not pfs.in_memory(ref, 0, 2 * BLOCK)  # block 0 was never read
    assert pfs.in_memory(ref, 2 * BLOCK + 1, 10 * BLOCK) == pfs.in_memory(ref, 2 * BLOCK, len(data))


def test_put_atomic_replaces_whole_and_drops_cached_metadata(origin: tuple[PCacheFileSystem, str]) -> None:
    pfs, root = origin
    path = f"{root}/latest"
    pfs.put_atomic(path, b"old")
    assert pfs.info(path)["size"] == 3  # now cached for an hour
    pfs.put_atomic(f"pcache::{pfs.target_protocol}://{path}", b'{"step": 100}')
    assert pfs.info(path)["size"] == 13 and pfs.cat_file(path) == b'{"step": 100}'
    assert pfs.fs.cat_file(pfs.origin_path(path)) == b'{"step": 100}'
    assert sorted(os.path.basename(p) for p in pfs.fs.ls(root, detail=False)) == ["latest"]  # nothing aside


def test_put_atomic_cut_mid_write_leaves_the_old_content_whole(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill mid-write on a local origin: a plain pipe_file would leave the pointer torn."""
    root = tmp_path / "origin"
    root.mkdir()
    (root / "latest").write_bytes(b'{"step": 1}')
    pfs = PCacheFileSystem(target_protocol="file", cache_dir=str(tmp_path / "c"), skip_instance_cache=True,
                           retry_attempts=1)
    real = pfs.fs.pipe_file

    def cut(path: str, value: bytes, **kwargs: Any) -> None:
        real(path, value[: len(value) // 2])
        raise ConnectionResetError(errno.ECONNRESET, "killed mid-write")

    monkeypatch.setattr(pfs.fs, "pipe_file", cut)
    with pytest.raises(OSError):
        pfs.put_atomic(str(root / "latest"), b'{"step": 200000}')
    assert (root / "latest").read_bytes() == b'{"step": 1}'


def test_put_atomic_retries_a_transient_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "origin"
    root.mkdir()
    pfs = PCacheFileSystem(target_protocol="file", cache_dir=str(tmp_path / "c"), skip_instance_cache=True,
                           retry_base_delay=0.001)
    real, calls = pfs.fs.pipe_file, []

    def flaky(path: str, value: bytes, **kwargs: Any) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        real(path, value)

    monkeypatch.setattr(pfs.fs, "pipe_file", flaky)
    pfs.put_atomic(str(root / "p"), b"body")
    assert (root / "p").read_bytes() == b"body" and len(calls) == 2


def test_rm_drops_cached_metadata(origin: tuple[PCacheFileSystem, str]) -> None:
    pfs, root = origin
    for name in ("one", "dir/a", "dir/sub/b"):
        pfs.fs.makedirs(os.path.dirname(f"{root}/{name}"), exist_ok=True)
        pfs.fs.pipe_file(f"{root}/{name}", b"data")
    for name in ("one", "dir/a", "dir/sub/b"):
        assert pfs.info(f"{root}/{name}")["size"] == 4  # cached for an hour
    assert {os.path.basename(p) for p in pfs.ls(root, detail=False)} == {"one", "dir"}
    pfs.rm(f"{root}/one")
    with pytest.raises(FileNotFoundError):
        pfs.info(f"{root}/one")
    assert {os.path.basename(p.rstrip("/")) for p in pfs.ls(root, detail=False)} == {"dir"}
    pfs.rm(f"pcache::{pfs.target_protocol}://{root}/dir", recursive=True)
    for name in ("dir/a", "dir/sub/b"):
        with pytest.raises(FileNotFoundError):
            pfs.info(f"{root}/{name}")
    if pfs.target_protocol == "file":  # S3 deletes are idempotent: s3fs does not check first
        with pytest.raises(FileNotFoundError):
            pfs.rm(f"{root}/one")


def _write(pfs: PCacheFileSystem, path: str, data: bytes) -> None:
    with pfs.open(path, "wb") as f:
        f.write(data)


def test_commit_then_read_and_verify_detects_a_changed_file(origin: tuple[PCacheFileSystem, str]) -> None:
    pfs, root = origin
    prefix = f"{root}/step_000001"
    files = {"rank0.pt": os.urandom(3 * BLOCK), "rank1.pt": os.urandom(100), "sub/x": b"x"}
    assert pfs.read_commit(prefix) is None
    for name, data in files.items():
        _write(pfs, f"{prefix}/{name}", data)
    with pytest.raises(FileNotFoundError, match="not committed"):
        pfs.verify_commit(prefix)
    assert pfs.commit(prefix, timeout=120).endswith(f"/{MARKER_NAME}")

    marker = pfs.read_commit(f"pcache::{pfs.target_protocol}://{prefix}")
    assert marker is not None and marker["format"] == "pcache-commit/1"
    assert {f["path"]: f["size"] for f in marker["files"]} == {k: len(v) for k, v in files.items()}
    assert pfs.verify_commit(prefix) == {}
    assert pfs.read_committed(prefix, "rank0.pt") == files["rank0.pt"]
    with pytest.raises(CommitMismatchError, match="not listed"):
        pfs.read_committed(prefix, "rank9.pt", marker)

    # Change the files behind pcache's back: same size with one byte flipped, shorter, gone.
    flipped = bytearray(files["rank0.pt"])
    flipped[BLOCK + 5] ^= 0xFF
    pfs.fs.pipe_file(pfs.origin_path(f"{prefix}/rank0.pt"), bytes(flipped))
    pfs.fs.pipe_file(pfs.origin_path(f"{prefix}/rank1.pt"), b"short")
    pfs.fs.rm(pfs.origin_path(f"{prefix}/sub/x"))
    problems = pfs.verify_commit(prefix)
    assert problems == {"rank0.pt": "xxh3-128 differs from the marker's",
                        "rank1.pt": "size 5 differs from the marker's 100", "sub/x": "missing at the origin"}
    with pytest.raises(CommitMismatchError, match="rank1.pt does not match its commit marker: size 5"):
        pfs.read_committed(prefix, "rank1.pt")


def test_a_torn_marker_is_not_a_commit(origin: tuple[PCacheFileSystem, str]) -> None:
    pfs, root = origin
    prefix = f"{root}/step_000002"
    _write(pfs, f"{prefix}/a", b"a")
    pfs.commit(prefix, timeout=120)
    marker = pfs.origin_path(f"{prefix}/{MARKER_NAME}")
    pfs.fs.pipe_file(marker, pfs.fs.cat_file(marker)[:30])
    assert pfs.read_commit(prefix) is None
    with pytest.raises(FileNotFoundError, match="not committed"):
        pfs.read_committed(prefix, "a")


# -- admin: the library behind the CLI returns what the CLI prints ------------------------------------

def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pcache.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120, check=False)


def test_admin_returns_the_data_the_cli_prints(tmp_path: Path, s3_server: Any, s3_options: dict[str, Any],
                                               bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = str(tmp_path / "c")
    config = CacheConfig(cache_dir=cache, block_size=BLOCK)
    env = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
           "AWS_ENDPOINT_URL": s3_server.endpoint_url, "PCACHE_BLOCK_SIZE": str(BLOCK)}
    for name, value in env.items():  # admin.warm, like the CLI, takes credentials from the environment
        monkeypatch.setenv(name, value)
    pfs = PCacheFileSystem(target_protocol="s3", target_options=s3_options, skip_instance_cache=True,
                           cache_dir=str(tmp_path / "writer"))
    for i in range(2):
        pfs.fs.pipe_file(f"{bucket}/ds/shard-{i}.bin", os.urandom(3 * BLOCK + i))
    seen: dict[str, list[int]] = {}
    warmed = admin.warm(config, [f"s3://{bucket}/ds/"], s3_server.endpoint_url,
                        progress=lambda url, n, total: seen.setdefault(url, [total]).append(n))
    assert warmed == {"files": 2, "bytes": 6 * BLOCK + 1}
    assert seen[f"s3://{bucket}/ds/"][0] == 6 * BLOCK + 1 and sum(seen[f"s3://{bucket}/ds/"][1:]) == 6 * BLOCK + 1

    stat = admin.stat(config)
    assert stat["disk_blocks"] == 7 and stat["misses"] == 7 and stat["pending_uploads"] == 0
    assert json.loads(_cli("stat", "--cache-dir", cache, "--json", env=env).stdout) == stat

    block = max((p for p in (tmp_path / "c" / "blocks").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(block.read_bytes())
    raw[HEADER.size + 1] ^= 0x01
    block.write_bytes(bytes(raw))
    ticks: list[tuple[int, int]] = []
    assert admin.verify(config, progress=lambda k, total: ticks.append((k, total))) == \
        {"checked": 7, "corrupt": [str(block)]}
    assert ticks and all(total == 7 for _, total in ticks)
    assert json.loads(_cli("verify", "--cache-dir", cache, "--json", env=env).stdout) == {"checked": 6, "corrupt": []}

    gc = admin.gc(config)
    assert gc["orphan_staged"] == 0 and gc["done_records_pruned"] == 0
    assert json.loads(_cli("gc", "--cache-dir", cache, "--json", env=env).stdout).keys() == gc.keys()

    flushed = admin.flush(config)
    assert flushed == {"uploaded": 0, "failed": [], "still_pending": 0, "replicas_adopted": 0,
                       "replicas_dropped": 0, "replicas_failed": 0, "orphan_uploads_aborted": 0,
                       "orphan_uploads_failed": 0}
    assert json.loads(_cli("flush", "--cache-dir", cache, "--json", env=env).stdout) == flushed


def test_admin_node_client_needs_a_token_file() -> None:
    from pcache import ConfigError

    with pytest.raises(ConfigError, match="token_file"):
        admin.node_stat("http://127.0.0.1:9", None)


def test_release_closes_threads_and_handles_of_a_cache_dir_and_it_reopens(tmp_path) -> None:
    import threading

    import fsspec

    src = tmp_path / "data.bin"
    src.write_bytes(os.urandom(300_000))
    cache = tmp_path / "cache"

    def fetch_threads() -> int:
        return sum(t.name.startswith(("pcache-fetch", "pcache-publish")) for t in threading.enumerate())

    before, fds_before = fetch_threads(), len(os.listdir("/proc/self/fd"))
    fs = fsspec.filesystem("pcache", target_protocol="file", cache_dir=str(cache), skip_instance_cache=True,
                           block_size=65536)
    assert fs.cat_file(str(src)) == src.read_bytes()
    assert fetch_threads() > before
    release(str(tmp_path))
    assert fetch_threads() == before
    assert len(os.listdir("/proc/self/fd")) <= fds_before
    again = fsspec.filesystem("pcache", target_protocol="file", cache_dir=str(cache), skip_instance_cache=True,
                              block_size=65536)
    assert again.cat_file(str(src)) == src.read_bytes()  # reopened; the blocks are still on disk
    assert again.engine.counters["hits_disk"] >= 1
