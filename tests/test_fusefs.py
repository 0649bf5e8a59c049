"""fusefs on real mounts of a SeaweedFS bucket: tree and bytes, random reads, concurrency, EROFS, xattrs."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import s3fs
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusefs.testing import FUSE_MISSING, cleanup, drop_page_cache, mount, s3_env
from pcache.testing import SeaweedServer

pytestmark = pytest.mark.skipif(FUSE_MISSING, reason="/dev/fuse does not exist on this machine: no FUSE mounts")

BIG = 3 * 1024 * 1024 + 12345  # spans four 1 MiB blocks, last one partial


class Dataset:
    """A nested tree of ~1,000 objects in its own bucket, mounted once for the module."""

    def __init__(self, files: dict[str, bytes], mountpoint: Path, bucket: str, metrics_port: int) -> None:
        self.files, self.mountpoint, self.bucket, self.metrics_port = files, mountpoint, bucket, metrics_port

    def path(self, rel: str) -> Path:
        return self.mountpoint / rel


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def dataset(s3_server: SeaweedServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataset]:
    rng = random.Random(4)
    files: dict[str, bytes] = {}
    for i in range(1000):
        rel = f"d{i % 10}/e{(i // 10) % 5}/f{i:04d}.bin"
        files[rel] = rng.randbytes(rng.choice([0, 1, 100, 4096, 5000, 20000]))
    for i in range(3):
        files[f"big/shard-{i}.bin"] = rng.randbytes(BIG)
    files["top.txt"] = b"hello fusefs\n"
    bucket = s3_server.make_bucket("fusefs-tree")
    fs = s3fs.S3FileSystem(**s3_server.storage_options(), skip_instance_cache=True)
    fs.pipe({f"{bucket}/data/{rel}": data for rel, data in files.items()})
    fs.pipe({f"{bucket}/elsewhere.bin": b"not under the prefix"})
    tmp = tmp_path_factory.mktemp("fusefs-tree")
    mnt = tmp / "mnt"
    mnt.mkdir()
    port = _free_port()
    env = s3_env(s3_server)
    mount(f"s3://{bucket}/data", mnt, "--endpoint-url", s3_server.endpoint_url, "--cache-dir", str(tmp / "cache"),
          "--block-size", "1MiB", "--metrics-port", str(port), env=env)
    try:
        yield Dataset(files, mnt, bucket, port)
    finally:
        cleanup(mnt)
        s3_server.ensure_running()
        s3_server.delete_bucket(bucket)


def _digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def test_tree_and_every_byte_match_the_source(dataset: Dataset) -> None:
    seen: dict[str, str] = {}
    for root, _dirs, names in os.walk(dataset.mountpoint):
        for name in names:
            full = Path(root) / name
            rel = full.relative_to(dataset.mountpoint).as_posix()
            assert full.stat().st_size == len(dataset.files[rel]), rel
            seen[rel] = _digest(full)
    expected = {rel: xxhash.xxh3_128_hexdigest(data) for rel, data in dataset.files.items()}
    assert seen == expected
    assert sorted(os.listdir(dataset.mountpoint)) == ["big", *[f"d{i}" for i in range(10)], "top.txt"]
    st_root = os.stat(dataset.mountpoint)
    assert oct(st_root.st_mode & 0o777) == oct(0o555)
    vfs = os.statvfs(dataset.mountpoint)
    assert vfs.f_blocks * vfs.f_frsize >= sum(len(d) for d in dataset.files.values())
    assert vfs.f_files >= len(dataset.files)


def test_inodes_are_stable(dataset: Dataset) -> None:
    first = {rel: os.stat(dataset.path(rel)).st_ino for rel in list(dataset.files)[:50]}
    assert len(set(first.values())) == len(first)
    drop = dataset.path("d1")
    os.listdir(drop)
    assert {rel: os.stat(dataset.path(rel)).st_ino for rel in first} == first


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_offset_and_size_reads_match(dataset: Dataset, data: st.DataObject) -> None:
    rel = data.draw(st.sampled_from(["big/shard-0.bin", "big/shard-1.bin", "d3/e1/f0013.bin", "top.txt"]))
    source = dataset.files[rel]
    offset = data.draw(st.integers(0, len(source) + 10))
    size = data.draw(st.integers(0, 2 * 1024 * 1024 + 7))
    fd = os.open(dataset.path(rel), os.O_RDONLY)
    try:
        if data.draw(st.booleans()):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # make the read reach the daemon
        assert os.pread(fd, size, offset) == source[offset:offset + size]
    finally:
        os.close(fd)


READER = """
import hashlib, json, os, random, sys
root, rels, seed = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
out = {}
for _ in range(40):
    rel = rng.choice(rels)
    size = os.path.getsize(os.path.join(root, rel))
    off = rng.randrange(0, max(1, size))
    n = rng.randrange(1, 300000)
    with open(os.path.join(root, rel), "rb") as f:
        f.seek(off)
        out[f"{rel}:{off}:{n}"] = hashlib.sha256(f.read(n)).hexdigest()
print(json.dumps(out))
"""


def test_concurrent_threads_and_processes_read_correct_bytes(dataset: Dataset) -> None:
    import hashlib

    rels = ["big/shard-0.bin", "big/shard-1.bin", "big/shard-2.bin"] + [r for r in dataset.files if r.startswith("d7")][:30]
    for rel in rels:
        drop_page_cache(dataset.path(rel))
    procs = [subprocess.Popen([sys.executable, "-c", READER, str(dataset.mountpoint), json.dumps(rels), str(seed)],
                              stdout=subprocess.PIPE, text=True) for seed in range(3)]
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(60):
            rel = rng.choice(rels)
            src = dataset.files[rel]
            off = rng.randrange(0, max(1, len(src)))
            n = rng.randrange(1, 600000)
            with open(dataset.path(rel), "rb") as f:
                f.seek(off)
                if f.read(n) != src[off:off + n]:
                    errors.append(f"{rel}@{off}+{n}")

    threads = [threading.Thread(target=worker, args=(100 + i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        for key, digest in json.loads(out).items():
            rel, off, n = key.rsplit(":", 2)
            assert hashlib.sha256(dataset.files[rel][int(off):int(off) + int(n)]).hexdigest() == digest, key


def test_writes_creates_and_unlinks_give_erofs(dataset: Dataset) -> None:
    target = dataset.path("top.txt")
    attempts: list[Any] = [
        lambda: os.open(target, os.O_WRONLY),
        lambda: os.open(target, os.O_RDONLY | os.O_APPEND | os.O_WRONLY),
        lambda: os.open(dataset.path("new.txt"), os.O_WRONLY | os.O_CREAT),
        lambda: os.unlink(target),
        lambda: os.mkdir(dataset.path("newdir")),
        lambda: os.rmdir(dataset.path("d1")),
        lambda: os.rename(target, dataset.path("moved.txt")),
        lambda: os.truncate(target, 0),
        lambda: os.chmod(target, 0o644),
        lambda: os.setxattr(target, "user.x", b"1"),
        lambda: os.symlink("top.txt", dataset.path("link")),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS, attempt
    assert target.read_bytes() == dataset.files["top.txt"]


def test_missing_path_gives_enoent(dataset: Dataset) -> None:
    for rel in ("nope.bin", "d1/nope/x", "d1/e0/f9999.bin", "elsewhere.bin"):
        with pytest.raises(FileNotFoundError):
            os.stat(dataset.path(rel))
    with pytest.raises(NotADirectoryError):
        os.listdir(dataset.path("top.txt"))


def test_xattrs_name_the_url_and_etag(dataset: Dataset, s3_server: SeaweedServer) -> None:
    rel = "d2/e3/f0032.bin"
    path = dataset.path(rel)
    assert sorted(os.listxattr(path)) == ["user.pcache.etag", "user.pcache.url"]
    assert os.getxattr(path, "user.pcache.url") == f"s3://{dataset.bucket}/data/{rel}".encode()
    fs = s3fs.S3FileSystem(**s3_server.storage_options(), skip_instance_cache=True)
    etag = fs.info(f"{dataset.bucket}/data/{rel}")["ETag"].strip('"')
    assert os.getxattr(path, "user.pcache.etag").decode() == etag
    assert os.getxattr(dataset.path("d2"), "user.pcache.url") == f"s3://{dataset.bucket}/data/d2".encode()
    with pytest.raises(OSError) as info:
        os.getxattr(path, "user.other")
    assert info.value.errno == errno.ENODATA


def _metric(port: int, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in body.splitlines() if line.startswith(name + " "))


def test_sequential_reads_use_large_fuse_requests(dataset: Dataset) -> None:
    path = dataset.path("big/shard-2.bin")
    drop_page_cache(path)
    reads0, bytes0 = _metric(dataset.metrics_port, "fusefs_reads_total"), \
        _metric(dataset.metrics_port, "fusefs_read_bytes_total")
    assert _digest(path) == xxhash.xxh3_128_hexdigest(dataset.files["big/shard-2.bin"])
    reads = _metric(dataset.metrics_port, "fusefs_reads_total") - reads0
    nbytes = _metric(dataset.metrics_port, "fusefs_read_bytes_total") - bytes0
    assert nbytes >= BIG
    # The kernel default would be 128 KiB requests; max_pages and the mount's readahead allow 1 MiB.
    assert nbytes / reads > 256 * 1024
