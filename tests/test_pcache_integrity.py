"""pcache keeps its promises when its own files are damaged: blocks bound to their keys, a damaged
index rebuilt once, and write-back data that makes clean blocks leave instead of failing.

Local ``file://`` origins throughout (the faults are in the cache directory, not at the origin).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import time

import fsspec
import pytest

from lingcore.checksum import block_checksum
from pcache import CacheFullError, PCacheFileSystem
from pcache.diskstore import HEADER, DiskStore
from pcache.errors import CacheIndexError
from pcache.keys import block_key
from pcache.testing import NodeProcess, write_token

KiB = 1024
BS = 64 * KiB


def make_fs(cache_dir, **options) -> PCacheFileSystem:
    options.setdefault("block_size", BS)
    return fsspec.filesystem("pcache", target_protocol="file", cache_dir=str(cache_dir),
                             skip_instance_cache=True, **options)


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "src.bin"
    path.write_bytes(os.urandom(4 * BS))
    return path


def warm(fs: PCacheFileSystem, path) -> list[str]:
    """Read ``path`` through ``fs`` until every block is on disk; return the block files in order."""
    assert fs.cat_file(str(path)) == path.read_bytes()
    fs.engine.drain_writes()
    ref = fs.ref(str(path))
    files = [fs.engine.disk.block_path(block_key(ref, i, BS)) for i in range(-(-ref.size // BS))]
    assert all(os.path.exists(f) for f in files)
    return files


def damage(kind: str, files: list[str]) -> str:
    """Damage block 1's file as ``kind`` says; return its path."""
    if kind == "copied":  # another block's file copied over it: header and checksum are intact
        shutil.copyfile(files[0], files[1])
    elif kind == "renamed":  # another block's file renamed onto it
        os.replace(files[2], files[1])
    elif kind == "truncated":
        os.truncate(files[1], HEADER.size + 10)
    return files[1]


@pytest.mark.parametrize("kind", ["copied", "renamed", "truncated"])
def test_a_damaged_block_file_is_refetched_not_served(tmp_path, source, kind) -> None:
    fs = make_fs(tmp_path / "c", memory_bytes=0)
    data = source.read_bytes()
    damage(kind, warm(fs, source))
    misses = fs.engine.counters["misses"]
    assert fs.cat_file(str(source), BS, 2 * BS) == data[BS:2 * BS]  # one block: the verifying read
    assert fs.engine.counters["misses"] == misses + 1
    damage(kind, warm(fs, source))
    assert fs.cat_file(str(source)) == data  # several blocks: the zero-copy scratch-buffer path
    fs.engine.drain_writes()  # a publish in flight carries the counts with it
    fs.engine.disk.flush_hits()
    assert fs.engine.disk.stats()["corrupt_blocks"] == 2


@pytest.mark.parametrize("kind", ["copied", "renamed", "truncated"])
def test_verify_reports_a_damaged_block_file_as_corrupt(tmp_path, source, kind) -> None:
    fs = make_fs(tmp_path / "c", memory_bytes=0)
    bad = damage(kind, warm(fs, source))
    store = DiskStore(str(tmp_path / "c"), fs.config.disk_bytes)
    assert store.verify() == [bad]
    assert not os.path.exists(bad)
    assert store.verify() == []
    assert fs.cat_file(str(source)) == source.read_bytes()


def test_verify_cli_counts_a_block_copied_over_another(tmp_path, source) -> None:
    fs = make_fs(tmp_path / "c", memory_bytes=0)
    bad = damage("copied", warm(fs, source))
    out = subprocess.run([sys.executable, "-m", "pcache.cli", "verify", "--cache-dir", str(tmp_path / "c"),
                          "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert json.loads(out.stdout) == {"checked": 4, "corrupt": [bad]}


def test_blocks_of_the_old_format_are_misses_not_corruption(tmp_path, source) -> None:
    fs = make_fs(tmp_path / "c", memory_bytes=0)
    files = warm(fs, source)
    data = source.read_bytes()
    old = struct.Struct("<4sB3xQQQ")  # PCB1: no key in the header
    with open(files[1], "wb") as fh:
        fh.write(old.pack(b"PCB1", 0, BS, BS, block_checksum(data[BS:2 * BS])) + data[BS:2 * BS])
    misses = fs.engine.counters["misses"]
    assert fs.cat_file(str(source)) == data
    assert fs.engine.counters["misses"] == misses + 1
    fs.engine.drain_writes()
    fs.engine.disk.flush_hits()
    assert fs.engine.disk.stats()["corrupt_blocks"] == 0
    with open(files[1], "rb") as fh:
        assert fh.read(4) == b"PCB2"


def test_a_node_never_sends_a_block_file_copied_over_another(tmp_path, source) -> None:
    """The node sends disk blocks with sendfile, unverified; the header still has to name the key."""
    token = write_token(tmp_path / "token")
    node = NodeProcess(tmp_path / "node", token, "", dict(os.environ),
                       ("--origin-protocol", "file", "--memory-bytes", "0", "--block-size", "64KiB"))
    url = node.start()
    try:
        def reader(name: str) -> PCacheFileSystem:
            return make_fs(tmp_path / name, peers=(url,), token_file=token, memory_bytes=0)

        data = source.read_bytes()
        assert reader("r1").cat_file(str(source)) == data
        ref = make_fs(tmp_path / "keys").ref(str(source))  # a file origin: the node's keys are ours
        store = DiskStore(str(tmp_path / "node"), 1 << 30)
        files = [store.block_path(block_key(ref, i, BS)) for i in range(4)]
        deadline = time.monotonic() + 10
        while not all(os.path.exists(f) for f in files):
            assert time.monotonic() < deadline, "the node never stored its blocks"
            time.sleep(0.05)
        damage("copied", files)
        fs = reader("r2")
        assert fs.cat_file(str(source)) == data
        assert fs.peers.counters["peer_hits"] == 4
    finally:
        assert node.stop() == 0


def test_a_peer_answering_with_another_block_size_is_not_believed(tmp_path) -> None:
    """Block 1 at 64 KiB and block 1 at 128 KiB of a 192 KiB object have the same length, not the same bytes."""
    src = tmp_path / "odd.bin"
    src.write_bytes(os.urandom(3 * BS))
    token = write_token(tmp_path / "token")
    node = NodeProcess(tmp_path / "node", token, "", dict(os.environ),
                       ("--origin-protocol", "file", "--block-size", "128KiB"))
    url = node.start()
    try:
        fs = make_fs(tmp_path / "r", peers=(url,), token_file=token)
        assert fs.cat_file(str(src), BS, 2 * BS) == src.read_bytes()[BS:2 * BS]
        assert fs.peers.counters["peer_hits"] == 0 and fs.peers.counters["peer_errors"] >= 1
    finally:
        assert node.stop() == 0


# -- a damaged index ----------------------------------------------------------------------------------
def damage_index(index_dir) -> None:
    """Overwrite every page of a real LMDB index except the two meta pages and the main database's
    root. The environment and its named databases still open; every transaction on them then fails
    (``MDB_BAD_TXN`` on the first read of a write transaction, like the index in the bug report)."""
    path = os.path.join(index_dir, "data.mdb")
    with open(path, "r+b") as fh:
        metas = []
        for page in (0, 1):
            fh.seek(page * 4096 + 16)  # past the page header: MDB_meta
            meta = fh.read(160)
            # magic u32, version u32, address u64, mapsize u64, then two MDB_db of 48 bytes (free, main)
            # whose last field is the root page; then last page u64 and txnid u64.
            metas.append((struct.unpack_from("<Q", meta, 24 + 96 + 8)[0], struct.unpack_from("<Q", meta, 24 + 88)[0]))
        main_root = max(metas)[1]
        for page in range(2, os.path.getsize(path) // 4096):
            if page != main_root:
                fh.seek(page * 4096)
                fh.write(b"\xa5" * 4096)


def warm_in_subprocess(cache_dir, path) -> None:
    code = (f"import fsspec; fs = fsspec.filesystem('pcache', target_protocol='file', cache_dir={str(cache_dir)!r},"
            f" block_size={BS}); fs.cat_file({str(path)!r}); fs.engine.drain_writes()")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_an_index_that_opens_but_fails_transactions_is_rebuilt_once(tmp_path, source, caplog) -> None:
    cache = tmp_path / "c"
    warm_in_subprocess(cache, source)
    damage_index(cache / "index")
    fresh = tmp_path / "fresh.bin"
    fresh.write_bytes(os.urandom(2 * BS))
    fs = make_fs(cache, memory_bytes=0)
    with caplog.at_level("INFO", logger="pcache.index"):
        assert fs.cat_file(str(fresh)) == fresh.read_bytes()
        fs.engine.drain_writes()
        assert fs.cat_file(str(source)) == source.read_bytes()
    ref = fs.ref(str(fresh))
    assert all(os.path.exists(fs.engine.disk.block_path(block_key(ref, i, BS))) for i in range(2)), \
        "blocks are no longer cached"
    assert fs.engine.counters["misses"] == 2, "the warm blocks were lost with the index"
    assert fs.engine.disk.stats()["blocks"] == 6
    asides = [p for p in cache.iterdir() if p.name.startswith("index.corrupt-")]
    assert len(asides) == 1
    assert len([r for r in caplog.records if "is damaged" in r.getMessage()]) == 1


def test_gc_and_verify_on_a_damaged_index_end_typed(tmp_path, source) -> None:
    cache = tmp_path / "c"
    warm_in_subprocess(cache, source)
    for command in ("gc", "verify", "stat"):
        damage_index(cache / "index")
        out = subprocess.run([sys.executable, "-m", "pcache.cli", command, "--cache-dir", str(cache), "--json"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (command, out.stderr)
        assert "Traceback" not in out.stderr
    assert len([p for p in cache.iterdir() if p.name.startswith("index.corrupt-")]) == 3
    out = subprocess.run([sys.executable, "-m", "pcache.cli", "gc", "--cache-dir", str(cache), "--json"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout)["adopted"] == 0  # the rebuilt index already holds every block
    assert json.loads(out.stdout)["corrupt_copies_pruned"] == 0  # kept for inspection for a while
    out = subprocess.run([sys.executable, "-m", "pcache.cli", "gc", "--cache-dir", str(cache), "--json",
                          "--keep-done-days", "0"], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout)["corrupt_copies_pruned"] == 3
    assert not [p for p in cache.iterdir() if ".corrupt-" in p.name]
    assert (cache / "index").is_dir()  # the live index stays


def test_an_index_failing_again_after_its_rebuild_is_a_typed_error(tmp_path, source) -> None:
    cache = tmp_path / "c"
    warm_in_subprocess(cache, source)
    store = DiskStore(str(cache), 1 << 30)
    damage_index(cache / "index")
    assert store.stats()["blocks"] == 4  # rebuilt once
    damage_index(cache / "index")
    with pytest.raises(CacheIndexError, match=re.escape(str(cache / "index"))):
        store.gc()


REBUILDER = textwrap.dedent("""
    import os, sys, time, fsspec
    cache_dir, ready, go = sys.argv[1:4]
    fs = fsspec.filesystem("pcache", target_protocol="file", cache_dir=cache_dir, block_size=65536,
                           memory_bytes=0)
    fs.engine  # opens the damaged index, which opens fine
    open(ready, "w").close()
    while not os.path.exists(go):
        time.sleep(0.002)
    fs.engine.disk.flush_hits()
    fs.engine.disk.note_stat("misses")
    fs.engine.disk.flush_hits()  # the first index transaction: finds the damage
    print(fs.engine.disk.stats()["blocks"])
""")


def test_two_processes_finding_a_damaged_index_rebuild_it_once(tmp_path, source) -> None:
    cache = tmp_path / "c"
    warm_in_subprocess(cache, source)
    damage_index(cache / "index")
    go = tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", REBUILDER, str(cache), str(r), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in ready]
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in ready):  # every process holds the damaged index open
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a process did not start"
        time.sleep(0.02)
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert [out.strip() for out, _ in outs] == ["4", "4", "4"]
    assert len([p for p in cache.iterdir() if p.name.startswith("index.corrupt-")]) == 1
    assert sum("is damaged" in err for _, err in outs) == 1


# -- write-back and the disk budget -----------------------------------------------------------------------
def fill_with_clean_blocks(fs: PCacheFileSystem, tmp_path, nbytes: int) -> list:
    files = []
    for i in range(nbytes // (4 * BS)):
        p = tmp_path / f"clean{i}.bin"
        p.write_bytes(os.urandom(4 * BS))
        assert fs.cat_file(str(p)) == p.read_bytes()
        fs.engine.drain_writes()
        files.append(p)
    return files


def test_a_write_back_evicts_clean_blocks_to_stay_in_the_budget(tmp_path) -> None:
    budget = 1024 * KiB
    fs = make_fs(tmp_path / "c", disk_bytes=budget, memory_bytes=0)
    fill_with_clean_blocks(fs, tmp_path, budget)
    assert fs.engine.disk.stats()["total"] > budget - 4 * BS  # the tier is full of clean blocks
    target = tmp_path / "ckpt" / "step.pt"
    payload = os.urandom(600 * KiB)
    with fs.open(str(target), "wb") as f:
        f.write(payload)
    assert fs.engine.disk.stats()["total"] <= budget - len(payload), "clean blocks kept the dirty bytes' room"
    fs.flush(timeout=60)
    assert target.read_bytes() == payload


def test_a_write_back_into_a_budget_full_of_dirty_data_raises(tmp_path) -> None:
    budget = 1024 * KiB
    fs = make_fs(tmp_path / "c", disk_bytes=budget, memory_bytes=0)
    fill_with_clean_blocks(fs, tmp_path, budget)
    blocked = tmp_path / "blocked"
    blocked.write_bytes(b"")  # a file where a directory should be: this upload keeps failing
    with fs.open(str(blocked / "stuck.pt"), "wb") as f:
        f.write(os.urandom(900 * KiB))
    assert fs.writeback.is_pending(fs.url(str(blocked / "stuck.pt")))
    target = tmp_path / "ckpt" / "big.pt"
    with pytest.raises(CacheFullError, match="big.pt"), fs.open(str(target), "wb") as f:
        f.write(os.urandom(200 * KiB))
    assert not [n for n in os.listdir(tmp_path / "c" / "writeback") if n.endswith(".tmp")]
    with fs.open(str(tmp_path / "ckpt" / "small.pt"), "wb") as f:  # what still fits is accepted
        f.write(os.urandom(100 * KiB))
    assert fs.engine.disk.stats()["total"] <= budget - 1000 * KiB


def _mount_tmpfs(path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    if os.geteuid() != 0 or not _mount_tmpfs(mnt, "2m"):
        pytest.skip("needs root to mount a 2 MiB tmpfs for a real ENOSPC")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_write_back_on_a_file_system_full_of_clean_blocks_evicts_them(tmp_path, small_disk) -> None:
    fs = make_fs(small_disk / "c", memory_bytes=0)  # default 16 GiB budget: the file system fills first
    fill_with_clean_blocks(fs, tmp_path, 3 * 1024 * KiB)
    blocks_before = sum(1 for _ in fs.engine.disk.iter_block_files())
    target = tmp_path / "ckpt" / "step.pt"
    payload = os.urandom(700 * KiB)
    with fs.open(str(target), "wb") as f:
        f.write(payload)
    assert sum(1 for _ in fs.engine.disk.iter_block_files()) < blocks_before
    fs.flush(timeout=60)
    assert target.read_bytes() == payload
