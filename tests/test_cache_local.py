"""pcache engine against a local-file origin: tiers, eviction budget, integrity, full disk, zstd."""

from __future__ import annotations

import os
import subprocess
import threading

import fsspec
import pytest

from pcache import CacheFullError, PCacheFileSystem
from pcache.diskstore import HEADER
from pcache.keys import block_key

KiB = 1024


def make_fs(cache_dir, **options) -> PCacheFileSystem:
    options.setdefault("block_size", 64 * KiB)
    return fsspec.filesystem("pcache", target_protocol="file", cache_dir=str(cache_dir),
                             skip_instance_cache=True, **options)


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "src.bin"
    path.write_bytes(os.urandom(1_000_000))
    return path


def test_read_through_and_warm_restart(tmp_path, source) -> None:
    fs = make_fs(tmp_path / "c")
    data = source.read_bytes()
    with fs.open(str(source)) as f:
        assert f.read() == data
    assert fs.engine.counters["misses"] == 16
    # A new process finds the warm cache on disk and never touches the origin.
    code = (f"import fsspec; fs = fsspec.filesystem('pcache', target_protocol='file', cache_dir={str(tmp_path / 'c')!r},"
            f" block_size={64 * KiB}); d = fs.cat_file({str(source)!r}); "
            f"assert fs.engine.counters['misses'] == 0, fs.engine.counters; print(len(d))")
    out = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(len(data))


def test_flipped_byte_on_disk_is_detected_and_refetched(tmp_path, source) -> None:
    fs = make_fs(tmp_path / "c", memory_bytes=0)
    data = source.read_bytes()
    assert fs.cat_file(str(source)) == data
    fs.engine.drain_writes()
    ref = fs.ref(str(source))
    path = fs.engine.disk.block_path(block_key(ref, 3, 64 * KiB))
    with open(path, "r+b") as fh:  # flip one payload byte
        fh.seek(HEADER.size + 100)
        byte = fh.read(1)
        fh.seek(HEADER.size + 100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    assert fs.cat_file(str(source)) == data
    assert fs.engine.counters["misses"] == 17  # exactly the corrupt block was refetched
    fs.engine.disk.flush_hits()
    assert fs.engine.disk.stats()["corrupt_blocks"] == 1


def test_truncated_block_is_never_returned(tmp_path, source) -> None:
    fs = make_fs(tmp_path / "c", memory_bytes=0)
    data = source.read_bytes()
    fs.cat_file(str(source))
    fs.engine.drain_writes()
    path = fs.engine.disk.block_path(block_key(fs.ref(str(source)), 0, 64 * KiB))
    os.truncate(path, HEADER.size + 10)
    assert fs.cat_file(str(source), 0, 1000) == data[:1000]


def test_zstd_blocks_round_trip(tmp_path) -> None:
    src = tmp_path / "text.bin"
    src.write_bytes(b"tokens " * 200_000)
    fs = make_fs(tmp_path / "c", compression="zstd", memory_bytes=0)
    assert fs.cat_file(str(src)) == src.read_bytes()
    fs.engine.drain_writes()
    assert fs.engine.disk.stats()["total"] < src.stat().st_size / 10
    assert fs.cat_file(str(src), 5, 300_000) == src.read_bytes()[5:300_000]


def test_budget_holds_under_twice_the_cache_size(tmp_path) -> None:
    budget = 1024 * KiB
    files = []
    for i in range(4):  # 2 MiB of data through a 1 MiB disk tier
        p = tmp_path / f"f{i}.bin"
        p.write_bytes(os.urandom(512 * KiB))
        files.append(p)
    fs = make_fs(tmp_path / "c", disk_bytes=budget, memory_bytes=0)
    block_on_disk = 64 * KiB + HEADER.size
    for round_ in range(3):
        for p in files:
            assert fs.cat_file(str(p)) == p.read_bytes()
            fs.engine.drain_writes()
            used = fs.engine.disk.stats()["total"]
            on_disk = sum(os.path.getsize(path) for _, path in fs.engine.disk.iter_block_files())
            assert used <= budget + block_on_disk, (round_, used)
            assert on_disk <= budget + block_on_disk
    assert fs.engine.disk.stats()["evictions"] > 0


def test_s3fifo_keeps_reread_blocks_through_a_scan(tmp_path) -> None:
    hot = tmp_path / "hot.bin"
    hot.write_bytes(os.urandom(128 * KiB))
    fs = make_fs(tmp_path / "c", disk_bytes=640 * KiB, memory_bytes=0)
    for _ in range(3):  # hot blocks earn frequency
        fs.cat_file(str(hot))
        fs.engine.drain_writes()
    for i in range(6):  # a one-pass scan three times the cache size
        p = tmp_path / f"scan{i}.bin"
        p.write_bytes(os.urandom(320 * KiB))
        fs.cat_file(str(p))
        fs.engine.drain_writes()
    before = fs.engine.counters["misses"]
    fs.cat_file(str(hot))
    assert fs.engine.counters["misses"] == before, "hot blocks were flushed by a scan"


def test_concurrent_threads_fetch_each_block_once(tmp_path, source) -> None:
    fs = make_fs(tmp_path / "c")
    fetched: list[tuple[int, int]] = []
    real = fs.origin.fetcher

    def counting(path, version=None):
        inner = real(path, version)

        def fetch(start, end):
            fetched.append((start, end))
            return inner(start, end)

        return fetch

    fs.origin.fetcher = counting  # type: ignore[method-assign]
    results = []
    threads = [threading.Thread(target=lambda: results.append(fs.cat_file(str(source)))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(r == source.read_bytes() for r in results)
    assert sorted(fetched) == sorted(set(fetched)) and len(fetched) == 16


def _mount_tmpfs(path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "tiny"
    if os.geteuid() != 0 or not _mount_tmpfs(mnt, "600k"):
        pytest.skip("needs root to mount a 600 KiB tmpfs for a real ENOSPC")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_reads_still_work_and_cache_stays_consistent(tmp_path, source, tiny_disk) -> None:
    fs = make_fs(tiny_disk / "c", memory_bytes=0)  # default 16 GiB budget: the file system fills first
    data = source.read_bytes()
    assert fs.cat_file(str(source)) == data  # blocks that do not fit are served, not cached
    fs.engine.drain_writes()
    assert fs.cat_file(str(source)) == data
    fs.engine.drain_writes()
    assert not os.listdir(tiny_disk / "c" / "tmp"), "partial temp blocks left behind"
    assert fs.engine.disk.verify() == []
    fs.engine.disk.flush_hits()
    files = {k for k, _ in fs.engine.disk.iter_block_files()}
    with fs.engine.disk.env.begin() as txn:
        indexed = {bytes(k) for k, _ in txn.cursor(db=fs.engine.disk.fifo.blocks)}
    assert files == indexed


def test_full_disk_write_back_raises_typed_error(tmp_path, tiny_disk) -> None:
    fs = make_fs(tiny_disk / "c")
    target = tmp_path / "ckpt" / "big.bin"
    with pytest.raises(CacheFullError, match="big.bin"), fs.open(str(target), "wb") as f:
        for _ in range(20):
            f.write(os.urandom(100 * KiB))
    assert fs.writeback.journal.pending() == []
    assert not [n for n in os.listdir(tiny_disk / "c" / "writeback") if n.endswith((".tmp", ".data"))]
    assert not target.exists()


def test_corrupt_index_is_rebuilt_from_block_files(tmp_path, source) -> None:
    code = (f"import fsspec; fs = fsspec.filesystem('pcache', target_protocol='file', cache_dir={str(tmp_path / 'c')!r},"
            f" block_size={64 * KiB}); fs.cat_file({str(source)!r})")
    subprocess.run([os.sys.executable, "-c", code], check=True, timeout=60)  # warm, in another process
    with open(tmp_path / "c" / "index" / "data.mdb", "r+b") as fh:  # trash the index
        fh.write(os.urandom(8192))
    fs = make_fs(tmp_path / "c")
    assert fs.cat_file(str(source)) == source.read_bytes()
    assert fs.engine.counters["misses"] == 0, "the warm blocks were lost with the index"
    assert fs.engine.disk.stats()["blocks"] == 16
    assert any(p.name.startswith("index.corrupt-") for p in (tmp_path / "c").iterdir())
