"""Readahead: sequential readers get blocks prefetched in parallel, with bytes in flight bounded."""

from __future__ import annotations

import os
import threading
import time

import fsspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

KiB = 1024
BLOCK = 64 * KiB


def slow_fs(tmp_path, src, delay: float, **options):
    fs = fsspec.filesystem("pcache", target_protocol="file", cache_dir=str(tmp_path / "c"), block_size=BLOCK,
                           skip_instance_cache=True, **options)
    state = {"now": 0, "max": 0, "calls": 0}
    lock = threading.Lock()
    real = fs.origin.fetcher

    def fetcher(path, version=None):
        inner = real(path, version)

        def fetch(start, end):
            with lock:
                state["now"] += 1
                state["calls"] += 1
                state["max"] = max(state["max"], state["now"])
            try:
                time.sleep(delay)
                return inner(start, end)
            finally:
                with lock:
                    state["now"] -= 1

        return fetch

    fs.origin.fetcher = fetcher  # type: ignore[method-assign]
    return fs, state


def test_sequential_reads_prefetch_ahead_within_the_inflight_budget(tmp_path) -> None:
    src = tmp_path / "seq.bin"
    src.write_bytes(os.urandom(40 * BLOCK))
    fs, state = slow_fs(tmp_path, src, 0.05, readahead_blocks=16, fetch_workers=16, max_inflight_bytes=4 * BLOCK)
    with fs.open(str(src)) as f:
        for _ in range(4):
            assert len(f.read(BLOCK)) == BLOCK
        time.sleep(0.5)  # prefetches land
        ref = fs.ref(str(src))
        ahead = [i for i in range(4, 40) if fs.engine.contains(ref, i)]
        assert ahead, "no block was prefetched ahead of a sequential reader"
        assert state["max"] <= 4 + 1, f"{state['max']} in flight; prefetch budget is 4 blocks + 1 demand read"
        state["max"] = 0
        assert f.read() == src.read_bytes()[4 * BLOCK:]  # one big demand read: parallel, same budget
        assert 2 <= state["max"] <= 4 + 4, state["max"]
    assert state["calls"] == 40, "a block was fetched twice"


def test_random_reads_do_not_prefetch(tmp_path) -> None:
    src = tmp_path / "rand.bin"
    src.write_bytes(os.urandom(40 * BLOCK))
    fs, state = slow_fs(tmp_path, src, 0.0, readahead_blocks=16)
    with fs.open(str(src)) as f:
        for i in (30, 2, 17, 9):
            f.seek(i * BLOCK + 7)
            f.read(100)
    assert state["calls"] == 4


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.integers(0, 700 * KiB), size=st.integers(0, 400 * KiB), memory=st.sampled_from([0, 1 << 20]))
def test_disk_tier_read_and_readinto_match(tmp_path_factory, start: int, size: int, memory: int) -> None:
    base = tmp_path_factory.getbasetemp() / "dt"
    base.mkdir(exist_ok=True)
    src = base / "src.bin"
    if not src.exists():
        src.write_bytes(os.urandom(640 * KiB + 123))
    data = src.read_bytes()
    fs = fsspec.filesystem("pcache", target_protocol="file", cache_dir=str(base / f"c{memory}"),
                           block_size=BLOCK, memory_bytes=memory, skip_instance_cache=True)
    fs.cat_file(str(src))  # warm the disk tier
    fs.engine.drain_writes()
    with fs.open(str(src)) as f:
        f.seek(start)
        assert f.read(size) == data[start:start + size]
        buf = bytearray(size)
        f.seek(start)
        n = f.readinto(buf)
        assert bytes(buf[:n]) == data[start:start + size]
