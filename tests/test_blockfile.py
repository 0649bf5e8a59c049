"""Block files written with O_DIRECT: exact sizes, verified reads, and the fall-back to buffered writes."""

from __future__ import annotations

import errno
import os

import pytest

from pcache import CacheConfig
from pcache.blockfile import ALIGN
from pcache.diskstore import HEADER, DiskStore
from pcache.options import add_cache_options, cache_config

# Payload sizes around the 4 KiB units O_DIRECT writes in (the 40-byte header comes first).
SIZES = [1, ALIGN - HEADER.size, ALIGN - HEADER.size + 1, 3 * ALIGN, 64 * 1024 + 3]


def _key(n: int) -> bytes:
    return n.to_bytes(16, "little")


def _publish_all(store: DiskStore) -> dict[bytes, bytes]:
    blocks = {_key(n): os.urandom(size) for n, size in enumerate(SIZES)}
    for key, data in blocks.items():
        store.publish(key, data)
    return blocks


def _check(store: DiskStore, blocks: dict[bytes, bytes]) -> None:
    for key, data in blocks.items():
        assert os.path.getsize(store.block_path(key)) == HEADER.size + len(data)  # padding cut off
        assert store.read(key) == data
    assert store.verify() == []
    assert os.listdir(store.tmp_dir) == []


def test_direct_writes_make_exact_verified_block_files(tmp_path) -> None:
    store = DiskStore(str(tmp_path / "c"), 1 << 30)
    assert store.writer.direct
    _check(store, _publish_all(store))
    # A longer block then a shorter one reuse the same aligned buffer: the second file holds only its own bytes.
    store.publish(_key(99), b"\xff" * (2 * ALIGN))
    store.publish(_key(100), b"\x01" * 10)
    with open(store.block_path(_key(100)), "rb") as f:
        assert f.read()[HEADER.size:] == b"\x01" * 10


@pytest.mark.parametrize("refused_at", ["open", "write"])
def test_file_system_refusing_o_direct_falls_back_to_buffered(tmp_path, monkeypatch, refused_at) -> None:
    """Some file systems (FUSE, network) refuse O_DIRECT with EINVAL at open or at the first write."""
    real_open, real_write = os.open, os.write
    direct_fds: set[int] = set()
    refused: list[str] = []

    def fake_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if flags & os.O_DIRECT and refused_at == "open":
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument", path)
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def fake_write(fd, data):  # type: ignore[no-untyped-def]
        if fd in direct_fds and refused_at == "write":
            direct_fds.discard(fd)
            refused.append(str(fd))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "write", fake_write)
    store = DiskStore(str(tmp_path / "c"), 1 << 30)
    blocks = _publish_all(store)
    assert len(refused) == 1, "O_DIRECT is tried once, then the store writes buffered"
    assert not store.writer.direct
    _check(store, blocks)


def test_direct_writes_off_by_option(tmp_path, monkeypatch) -> None:
    store = DiskStore(str(tmp_path / "c"), 1 << 30, direct_writes=False)
    assert not store.writer.direct
    _check(store, _publish_all(store))
    toml = tmp_path / "p.toml"
    toml.write_text("[pcache]\ndirect_writes = false\n")
    assert CacheConfig.load(str(toml), cache_dir=str(tmp_path)).direct_writes is False
    monkeypatch.setenv("PCACHE_DIRECT_WRITES", "true")
    assert CacheConfig.load(str(toml), cache_dir=str(tmp_path)).direct_writes is True
    assert CacheConfig(cache_dir=str(tmp_path)).direct_writes is True
    import argparse

    parser = argparse.ArgumentParser()
    add_cache_options(parser)
    args = parser.parse_args(["--cache-dir", str(tmp_path), "--no-direct-writes"])
    assert cache_config(args).direct_writes is False
