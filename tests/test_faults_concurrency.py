"""Faults around processes and concurrency: fork, rewrites of one URL, gc races, commit across caches."""

from __future__ import annotations

import gc
import os
import threading

import fsspec
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import pcache
from pcache.eviction import SMALL, S3Fifo, _seq_key
from pcache.journal import Journal, split_secrets
from pcache.uploader import Uploader

KiB = 1024
BLOCK = 64 * KiB


def local_fs(cache_dir, **options):
    options.setdefault("block_size", BLOCK)
    return fsspec.filesystem("pcache", target_protocol="file", cache_dir=str(cache_dir),
                             skip_instance_cache=True, **options)


class _Shards(Dataset):
    """Reads 8 ranges of one file through a pcache filesystem built in the parent process."""

    def __init__(self, fs, path: str) -> None:
        self.fs, self.path = fs, path

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        data = self.fs.cat_file(self.path, i * 4 * BLOCK, (i + 1) * 4 * BLOCK)
        other = local_fs(self.fs.config.cache_dir)  # a new filesystem inside the worker works too
        assert other.cat_file(self.path, 0, 10) == data[:10] or i > 0
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def test_forked_dataloader_workers_read_correct_bytes(tmp_path) -> None:
    src = tmp_path / "shard.bin"
    src.write_bytes(os.urandom(32 * BLOCK))
    fs = local_fs(tmp_path / "c")
    fs.cat_file(str(src), 0, 8 * BLOCK)  # parent warms part of it: engine, LMDB and threads exist
    loader = DataLoader(_Shards(fs, str(src)), batch_size=None, num_workers=2,
                        multiprocessing_context="fork", timeout=60)
    got = b"".join(bytes(t.numpy()) for t in loader)
    assert got == src.read_bytes()
    assert fs.cat_file(str(src)) == src.read_bytes()  # the parent still works afterwards


def test_older_write_never_overwrites_newer_at_origin(tmp_path) -> None:
    """OLD is still pending (say its first upload failed) when NEW of the same URL is already uploaded."""
    origin = tmp_path / "origin"
    origin.mkdir()
    config = pcache.CacheConfig(cache_dir=str(tmp_path / "c"))
    journal = Journal(config.cache_dir)
    url = str(origin / "latest.pt")

    def stage(entry_id: str, data: bytes, created: float) -> None:
        with open(journal.data_path(entry_id), "wb") as fh:
            fh.write(data)
        journal.add({"id": entry_id, "url": url, "protocol": "file", "path": url, "options": {},
                     "size": len(data), "xxh3_128": "x", "created": created, "attempts": 0})

    stage("old", b"OLD", 1.0)
    stage("new", b"NEWER", 2.0)
    assert journal.pending_bytes() == 3 + 5 == sum(e["size"] for e in journal.pending())
    uploader = Uploader(config)
    assert uploader.upload_one(journal.get("new")) is True  # NEW wins the race to the origin
    assert journal.pending_bytes() == 3  # completing an entry releases its bytes
    assert journal.pending_for_url(url) is None, "readers must not be served the superseded OLD copy"
    assert uploader.drain() == []  # OLD's retry comes later
    assert (origin / "latest.pt").read_bytes() == b"NEWER"
    assert journal.pending() == [] and not os.path.exists(journal.data_path("old"))
    assert journal.pending_bytes() == 0  # superseding releases them too


def test_rewrite_of_same_url_keeps_the_last_write(tmp_path) -> None:
    fs = local_fs(tmp_path / "c")
    target = str(tmp_path / "origin" / "ckpt.bin")
    for i in range(5):
        with fs.open(target, "wb") as f:
            f.write(f"version {i}".encode() * 1000)
    fs.flush(timeout=60)
    with open(target, "rb") as fh:
        assert fh.read() == b"version 4" * 1000


def test_commit_waits_for_every_cache_dir_of_the_process(tmp_path, s3_server, s3_options, bucket) -> None:
    ckpt = fsspec.filesystem("pcache", target_protocol="s3", target_options=s3_options,
                             cache_dir=str(tmp_path / "ckpt"), skip_instance_cache=True, retry_base_delay=0.05)
    prefix = f"{bucket}/run/step_000300"
    s3_server.stop()
    try:
        with ckpt.open(f"{prefix}/rank0.pt", "wb") as f:
            f.write(b"w" * 5000)
        # A dataset filesystem on another cache directory is created later: commit must still wait.
        fsspec.filesystem("pcache", target_protocol="s3", target_options=s3_options,
                          cache_dir=str(tmp_path / "data"), skip_instance_cache=True)
        with pytest.raises((TimeoutError, pcache.UploadError)):
            pcache.commit(f"s3://{prefix}", timeout=2)
    finally:
        s3_server.start()
    import s3fs

    assert not s3fs.S3FileSystem(skip_instance_cache=True, **s3_options).exists(f"{prefix}/_COMMITTED")
    assert pcache.commit(f"s3://{prefix}", timeout=180).endswith("_COMMITTED")


def test_unclosed_write_back_file_is_discarded_not_uploaded(tmp_path) -> None:
    fs = local_fs(tmp_path / "c")
    f = fs.open(str(tmp_path / "origin" / "partial.pt"), "wb")
    f.write(b"half a checkpoint")
    del f
    gc.collect()
    assert fs.writeback.journal.pending() == []
    assert not [n for n in os.listdir(tmp_path / "c" / "writeback") if n.endswith((".tmp", ".data"))]


@pytest.mark.parametrize("options", [
    {"account_key": "AZSECRET"},
    {"connection_string": "AccountKey=AZSECRET"},
    {"s3_additional_kwargs": {"SSECustomerKey": "AZSECRET"}},
    {"client_kwargs": {"headers": {"Authorization": "Bearer AZSECRET"}}},
    {"key": "AKIA", "secret": "AZSECRET", "token": "AZSECRET"},
])
def test_secret_options_never_reach_the_journal(options) -> None:
    public, _ = split_secrets(options)
    assert "AZSECRET" not in repr(public) and "AKIA" not in repr(public)


def test_concurrent_drains_do_not_deadlock(tmp_path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(40 * BLOCK))
    fs = local_fs(tmp_path / "c", max_inflight_bytes=4 * BLOCK)
    fs.cat_file(str(src))
    threads = [threading.Thread(target=fs.engine.drain_writes) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads), "drain_writes deadlocked"


def test_hits_of_a_read_only_process_reach_the_shared_index(tmp_path) -> None:
    src = tmp_path / "hot.bin"
    src.write_bytes(os.urandom(2 * BLOCK))
    fs = local_fs(tmp_path / "c", memory_bytes=0)
    fs.cat_file(str(src))
    fs.engine.drain_writes()
    import subprocess
    import sys

    code = (f"import fsspec; fs = fsspec.filesystem('pcache', target_protocol='file', "
            f"cache_dir={str(tmp_path / 'c')!r}, block_size={BLOCK}, memory_bytes=0)\n"
            f"for _ in range(3): fs.cat_file({str(src)!r}, 0, 100)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)  # reads only, then exits
    from pcache.keys import block_key

    key = block_key(fs.ref(str(src)), 0, BLOCK)
    with fs.engine.disk.env.begin() as txn:
        entry = fs.engine.disk.fifo.get(txn, key)
    assert entry is not None and entry.freq >= 1


def test_dangling_queue_slots_are_repaired(tmp_path) -> None:
    fs = local_fs(tmp_path / "c", disk_bytes=4 * (BLOCK + 64), memory_bytes=0)
    fifo: S3Fifo = fs.engine.disk.fifo
    with fs.engine.disk.env.begin(write=True) as txn:  # a slot whose block entry is gone
        txn.put(_seq_key(0), b"\x00" * 16, db=fifo.queues[SMALL])
    for i in range(8):
        p = tmp_path / f"f{i}.bin"
        p.write_bytes(os.urandom(BLOCK))
        assert fs.cat_file(str(p)) == p.read_bytes()
        fs.engine.drain_writes()
    assert fs.engine.disk.stats()["evictions"] > 0


def test_commit_marker_is_whole_and_never_carries_a_stale_hash(tmp_path) -> None:
    import json

    fs = local_fs(tmp_path / "c")
    origin = tmp_path / "origin" / "step_1"
    origin.mkdir(parents=True)
    with fs.open(str(origin / "rank0.pt"), "wb") as f:
        f.write(b"first write")
    with fs.open(str(origin / "rank1.pt"), "wb") as f:
        f.write(b"kept")
    fs.flush(timeout=60)
    (origin / "rank0.pt").write_bytes(b"rewritten elsewhere, not through this cache")
    with open(pcache.commit(str(origin), timeout=60)) as fh:
        marker = json.load(fh)
    hashes = {f["path"]: f["xxh3_128"] for f in marker["files"]}
    assert hashes["rank0.pt"] is None  # this node's journal describes an older object: no hash at all
    assert hashes["rank1.pt"] is not None
    assert sorted(os.listdir(origin)) == ["_COMMITTED", "rank0.pt", "rank1.pt"]  # no temporary left
