"""Cold blocks received straight into the reader's buffer: bytes, disk tier, single-flight, failures."""

from __future__ import annotations

import errno
import os
import threading
import time

import fsspec
import pytest
import s3fs

from lingcore.retry import RetryPolicy
from pcache import PCacheFileSystem
from pcache.config import CacheConfig
from pcache.engine import BlockCache
from pcache.keys import ObjectRef, block_key
from pcache.origin import RangeFetch

KiB = 1024
BLOCK = 256 * KiB


def make_fs(cache_dir, options, **cache_options) -> PCacheFileSystem:
    return fsspec.filesystem("pcache", target_protocol="s3", target_options=options, cache_dir=str(cache_dir),
                             skip_instance_cache=True, block_size=BLOCK, **cache_options)


def test_cold_multi_block_read_lands_in_place_and_on_disk(tmp_path, s3_server, s3_options, bucket,
                                                          chaos_proxy) -> None:
    proxy = chaos_proxy()
    data = os.urandom(8 * BLOCK + 123)
    url = f"{bucket}/fill/a.bin"
    s3fs.S3FileSystem(skip_instance_cache=True, **s3_options).pipe_file(url, data)
    fs = make_fs(tmp_path / "c", s3_server.storage_options(endpoint_url=proxy.endpoint_url))
    proxy.reset_counts()
    assert fs.cat_file(url) == data
    buf = bytearray(3 * BLOCK)
    with fs.open(url) as f:
        f.seek(5 * BLOCK)  # blocks 5-7 come from the disk tier (or are still being written: then shared)
        assert f.readinto(buf) == len(buf) and buf == data[5 * BLOCK:8 * BLOCK]
    fs.engine.drain_writes()
    assert sorted(proxy.get_ranges(f"/{url}")) == sorted(
        f"bytes={i * BLOCK}-{min(len(data), (i + 1) * BLOCK) - 1}" for i in range(9)), "one GET per block"
    ref = fs.ref_for(url)
    # Whole blocks fetched by a multi-block read (the object's short last block too) are on disk,
    # verified, and in the memory tier, so the next epoch's reads are memory hits.
    assert all(fs.in_memory(ref, i * BLOCK, i * BLOCK + 1) for i in range(9))
    assert fs.engine.disk.verify() == []
    for i in range(9):
        assert fs.engine.disk.read(block_key(ref, i, BLOCK)) == data[i * BLOCK:(i + 1) * BLOCK]
    assert fs.engine.counters["misses"] == 9


def test_concurrent_small_reads_share_the_in_place_fetches(tmp_path, s3_server, s3_options, bucket,
                                                           chaos_proxy) -> None:
    """A reader of single blocks that arrives while a large read fetches them waits for those fetches."""
    proxy = chaos_proxy(latency_s=0.3)
    data = os.urandom(12 * BLOCK)
    url = f"{bucket}/fill/b.bin"
    s3fs.S3FileSystem(skip_instance_cache=True, **s3_options).pipe_file(url, data)
    fs = make_fs(tmp_path / "c", s3_server.storage_options(endpoint_url=proxy.endpoint_url), memory_bytes=0)
    fs.info(url)
    proxy.reset_counts()
    results: dict[str, bytes] = {}
    big = threading.Thread(target=lambda: results.update(big=fs.cat_file(url)))
    big.start()
    time.sleep(0.1)  # the large read's fetches are now parked in the proxy's latency
    with fs.open(url) as f:
        small = [f.pread(i * BLOCK + 7, 100) for i in (2, 5, 9)]
    big.join(timeout=60)
    assert results["big"] == data
    assert small == [data[i * BLOCK + 7:i * BLOCK + 107] for i in (2, 5, 9)]
    gets = proxy.get_ranges(f"/{url}")
    assert len(gets) == len(set(gets)) == 12, f"each block fetched once, got {sorted(gets)}"


def test_a_failed_block_stops_every_write_into_the_callers_buffer(tmp_path) -> None:
    """When one block of a multi-block read fails, readinto returns (raises) only after the fetches still
    running have stopped writing into the caller's buffer, which the caller may reuse at once."""
    engine = BlockCache(CacheConfig(cache_dir=str(tmp_path / "c"), block_size=BLOCK))
    data = os.urandom(6 * BLOCK)
    obj = ObjectRef(url="test://fill/c.bin", version="v1", size=len(data))

    def call_into(start: int, end: int, out: memoryview, deadline: float) -> None:
        if start == 0:
            raise OSError(errno.EINVAL, "bad request for the first block (injected)")
        time.sleep(0.3)
        out[:] = data[start:end]

    def call(start: int, end: int, deadline: float) -> bytes:
        return data[start:end]

    fetch = RangeFetch("test://fill/c.bin", RetryPolicy(attempts=1), 30.0, call, call_into)
    buf = bytearray(len(data))
    try:
        with pytest.raises(OSError, match="injected"):
            engine.readinto(obj, 0, memoryview(buf), fetch)
        buf[:] = b"\x00" * len(buf)  # the caller reuses its buffer
        time.sleep(0.5)
        assert buf == bytes(len(buf)), "a fetch wrote into the buffer after readinto had returned"
        assert engine.get_range(obj, BLOCK, 6 * BLOCK, fetch) == data[BLOCK:]  # fetched and cached meanwhile
    finally:
        engine.close()
