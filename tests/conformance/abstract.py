"""The abstract pcache conformance suite, in the style of fsspec's ``fsspec/tests/abstract``.

Every origin kind runs it through an empty subclass that only provides the ``origin`` fixture (an
:class:`~conformance.origins.OriginKind`), see ``test_conformance_origins.py``. What it holds, for every
origin:

- the read API through pcache: open, read, readinto, seek, tell, cat, cat_file with negative and
  out-of-range offsets, ls, info, find, glob, exists, in both the path and the URL spelling;
- version pinning: an open handle never mixes two versions of an object rewritten at the origin; a new
  open after ``metadata_ttl`` sees the new version;
- the stale-read rule: after ``metadata_ttl`` no read returns an older version, even after an ``ls``;
- write-back: read-your-writes before the upload (cat, info, exists, ls, find, glob), flush, commit
  marker.

Only the S3 kinds hold the outage rules (a fully cached object stays readable while ``stale_if_error``
allows; anything uncached raises ``OriginUnavailableError`` naming the URL; a blackholed origin fails a
read within ``origin_timeout``): a local directory or an in-process ``memory://`` store cannot be
"unreachable" in any way a user could meet, so those cases skip there. Blackholing needs a proxy in
front of the server, so only the chaos-proxy kind runs that case.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from conformance.origins import BLOCK_SIZE, METADATA_TTL, OriginKind
from pcache import OriginUnavailableError, PCacheFileSystem
from pcache.errors import StaleObjectError

# Past the metadata TTL, with a margin for a slow shared machine.
AFTER_TTL = METADATA_TTL + 0.3
BIG = 4 * BLOCK_SIZE + 123  # five blocks, the last one short


def _rand(n: int) -> bytes:
    return os.urandom(n)



class PCacheConformance:
    """Everything pcache promises, whatever the origin. Subclasses provide only the ``origin`` fixture."""

    @pytest.fixture
    def origin(self) -> OriginKind:
        raise NotImplementedError("an origin kind's subclass provides this fixture")

    @pytest.fixture
    def tree(self, origin: OriginKind) -> dict[str, bytes]:
        """Objects put at the origin by another client; keys are pcache-form names."""
        files = {
            origin.path("dir/a.bin"): _rand(BIG),
            origin.path("dir/b.txt"): b"hello pcache\n",
            origin.path("dir/sub/c.bin"): _rand(1000),
            origin.path("top.bin"): _rand(BLOCK_SIZE),
        }
        for path, data in files.items():
            origin.put(path, data)
        return files

    @pytest.fixture
    def fs(self, origin: OriginKind, tmp_path: Path) -> PCacheFileSystem:
        return origin.make_fs(tmp_path / "cache")

    # ------------------------------------------------------------------ read API
    def test_open_read_seek_tell(self, origin: OriginKind, fs: PCacheFileSystem, tree: dict[str, bytes]) -> None:
        path = origin.path("dir/a.bin")
        data = tree[path]
        with fs.open(path, "rb") as f:
            assert f.read(10) == data[:10] and f.tell() == 10
            assert f.seek(BLOCK_SIZE - 5) == BLOCK_SIZE - 5
            assert f.read(10) == data[BLOCK_SIZE - 5:BLOCK_SIZE + 5]  # across a block boundary
            assert f.seek(-7, 1) == BLOCK_SIZE - 2 and f.read(4) == data[BLOCK_SIZE - 2:BLOCK_SIZE + 2]
            assert f.seek(-100, 2) == len(data) - 100 and f.read() == data[-100:]
            assert f.read(10) == b"" and f.read() == b""  # at EOF
            f.seek(len(data) + 50)
            assert f.read(10) == b""  # past EOF
            f.seek(0)
            assert f.read() == data
            buf = bytearray(3 * BLOCK_SIZE)
            f.seek(100)
            n = f.readinto(buf)
            assert n == len(buf) and bytes(buf) == data[100:100 + len(buf)]
            with pytest.raises(ValueError):
                f.seek(-1)

    def test_url_and_path_spellings_agree(self, origin: OriginKind, fs: PCacheFileSystem,
                                          tree: dict[str, bytes]) -> None:
        path = origin.path("dir/b.txt")
        with fs.open(origin.url(path)) as f:
            assert f.read() == tree[path]
        assert fs.cat_file(origin.url(path)) == tree[path]
        assert fs.info(origin.url(path))["size"] == len(tree[path])
        assert fs.exists(origin.url(path))

    def test_cat_file_offsets(self, origin: OriginKind, fs: PCacheFileSystem, tree: dict[str, bytes]) -> None:
        path = origin.path("dir/a.bin")
        data = tree[path]
        size = len(data)
        cases: list[tuple[int | None, int | None]] = [
            (None, None), (0, 0), (10, 100), (BLOCK_SIZE - 1, 2 * BLOCK_SIZE + 1), (-100, None), (-100, -10),
            (10, -10), (-size, None), (size, None), (size + 10, None), (10, size + 1000), (100, 10),
            (-10, -100), (None, -1), (size - 1, size),
        ]
        for start, end in cases:
            assert fs.cat_file(path, start=start, end=end) == data[start:end], (start, end)

    def test_cat_file_negative_start_beyond_size(self, origin: OriginKind, fs: PCacheFileSystem,
                                                 tree: dict[str, bytes]) -> None:
        path = origin.path("dir/b.txt")
        data = tree[path]
        # Every fsspec backend answers like a Python slice: the whole file.
        assert fs.cat_file(path, start=-(len(data) + 100)) == data
        assert fs.cat_file(path, start=-(len(data) + 100), end=5) == data[:5]

    def test_cat_many(self, request: pytest.FixtureRequest, origin: OriginKind, fs: PCacheFileSystem,
                      tree: dict[str, bytes]) -> None:
        a, b = origin.path("dir/a.bin"), origin.path("dir/b.txt")
        assert fs.cat(a) == tree[a]
        assert fs.cat([a, b]) == {a: tree[a], b: tree[b]}
        c = origin.path("dir/sub/c.bin")
        assert fs.cat(origin.path("dir/sub/*")) == {c: tree[c]}  # a glob expands

    def test_ls_and_info(self, origin: OriginKind, fs: PCacheFileSystem, tree: dict[str, bytes]) -> None:
        d = origin.path("dir")
        names = {origin.path("dir/a.bin"), origin.path("dir/b.txt"), origin.path("dir/sub")}
        assert set(fs.ls(d, detail=False)) == names
        assert set(fs.ls(origin.url(d), detail=False)) == names
        detail = {e["name"]: e for e in fs.ls(d, detail=True)}
        assert set(detail) == names
        assert detail[origin.path("dir/a.bin")]["size"] == BIG
        assert detail[origin.path("dir/a.bin")]["type"] == "file"
        assert detail[origin.path("dir/sub")]["type"] == "directory"
        info = fs.info(origin.path("dir/a.bin"))
        assert info["size"] == BIG and info["type"] == "file"
        assert fs.info(d)["type"] == "directory"
        assert fs.isdir(d) and fs.isfile(origin.path("dir/b.txt")) and not fs.isfile(d)
        assert fs.size(origin.path("dir/b.txt")) == len(tree[origin.path("dir/b.txt")])

    def test_exists_and_missing(self, origin: OriginKind, fs: PCacheFileSystem, tree: dict[str, bytes]) -> None:
        assert fs.exists(origin.path("dir/a.bin"))
        assert fs.exists(origin.path("dir"))
        missing = origin.path("dir/nope.bin")
        assert not fs.exists(missing)
        assert not fs.exists(origin.path("no-such-dir/x"))
        for call in (fs.info, fs.open, fs.cat_file):
            with pytest.raises(FileNotFoundError, match=re.escape(missing.lstrip("/"))):
                call(missing)

    def test_find_and_glob(self, request: pytest.FixtureRequest, origin: OriginKind, fs: PCacheFileSystem,
                           tree: dict[str, bytes]) -> None:
        root = origin.root
        assert set(fs.find(root)) == set(tree)
        assert set(fs.find(origin.url(root))) == set(tree)
        assert set(fs.find(root, maxdepth=1)) == {origin.path("top.bin")}
        assert origin.path("dir/sub") in fs.find(root, withdirs=True)
        detail = fs.find(root, detail=True)
        assert detail[origin.path("dir/a.bin")]["size"] == BIG
        want = {origin.path("dir/a.bin"), origin.path("dir/b.txt")}
        assert set(fs.glob(origin.path("dir/*.*"))) == want
        assert set(fs.glob(origin.url(origin.path("dir/*.*")))) == want
        assert set(fs.glob(origin.path("**/*.bin"))) == {p for p in tree if p.endswith(".bin")}
        assert fs.glob(origin.path("dir/*.nothing")) == []

    # ------------------------------------------------------------------ versions and staleness
    def test_open_handle_never_mixes_versions(self, request: pytest.FixtureRequest, origin: OriginKind,
                                              tmp_path: Path) -> None:
        if not origin.pins_versions:
            request.applymarker(pytest.mark.xfail(
                reason=f"{origin.name} has no ETag/If-Match: a same-size rewrite is not detected (reported)",
                strict=False))
        fs = origin.make_fs(tmp_path / "cache", readahead_blocks=0)
        path = origin.path("pin/obj.bin")
        v1, v2 = _rand(BIG), _rand(BIG)  # same size: only the version tells them apart
        origin.put(path, v1)
        with fs.open(path) as f:
            assert f.read(BLOCK_SIZE) == v1[:BLOCK_SIZE]
            origin.put(path, v2)
            try:
                rest = f.read()
            except StaleObjectError as e:  # refusing is fine; mixing is not
                assert path.lstrip("/") in str(e)
            else:
                assert rest == v1[BLOCK_SIZE:], "an open handle returned bytes of a newer version"
        time.sleep(AFTER_TTL)
        with fs.open(path) as f:  # a new open after metadata_ttl sees the new version, every byte of it
            assert f.size == len(v2)
            assert f.read() == v2

    def test_new_version_after_ttl(self, origin: OriginKind, fs: PCacheFileSystem) -> None:
        path = origin.path("ttl/obj.bin")
        v1, v2 = _rand(2 * BLOCK_SIZE), _rand(3 * BLOCK_SIZE + 7)
        origin.put(path, v1)
        assert fs.cat_file(path) == v1
        origin.put(path, v2)
        time.sleep(AFTER_TTL)
        assert fs.info(path)["size"] == len(v2)
        assert fs.cat_file(path) == v2
        assert fs.cat_file(path, start=-10) == v2[-10:]

    def test_no_stale_read_after_ls(self, origin: OriginKind, fs: PCacheFileSystem) -> None:
        d = origin.path("stale")
        path, new = f"{d}/a.txt", f"{d}/new.txt"
        origin.put(path, b"version one")
        assert fs.ls(d, detail=False) == [path]
        fs.find(d)
        assert fs.cat_file(path) == b"version one"
        assert not fs.exists(new)  # a negative answer, cached for at most metadata_ttl
        origin.put(path, b"version two, longer")
        origin.put(new, b"new")
        time.sleep(AFTER_TTL)
        assert fs.info(path)["size"] == len(b"version two, longer")
        assert fs.cat_file(path) == b"version two, longer"
        with fs.open(path) as f:
            assert f.read() == b"version two, longer"
        assert fs.exists(new)
        assert fs.cat_file(new) == b"new"
        assert set(fs.ls(d, detail=False)) == {path, new}
        assert set(fs.find(d)) == {path, new}

    # ------------------------------------------------------------------ outage (S3 kinds)
    # The outage cases keep the suite's retry attempts (make_fs): their warm-up runs while the chaos kind
    # fails 5% of requests, where a budget of 2 meets two 503s in a row sooner or later. Only the
    # explicit outage (origin.outage(): every request refused or answered 503) may make a call fail.
    def _need_outage(self, origin: OriginKind) -> None:
        if not origin.can_fail:
            pytest.skip(f"a {origin.name} origin cannot be unreachable; the outage rules hold for S3 only")

    def test_outage_cached_blocks_served_uncached_raise(self, origin: OriginKind, tmp_path: Path) -> None:
        self._need_outage(origin)
        # Metadata fresh for the whole test: this case is about blocks, not the stale-if-error window.
        fs = origin.make_fs(tmp_path / "cache", memory_bytes=0, metadata_ttl=3600)
        full, part, cold = (origin.path(f"out/{n}.bin") for n in ("full", "part", "cold"))
        data = {p: _rand(BIG) for p in (full, part, cold)}
        for p, d in data.items():
            origin.put(p, d)
        assert fs.cat_file(full) == data[full]
        with fs.open(part) as f:
            assert f.read(100) == data[part][:100]  # the first block only
        fs.info(cold)  # metadata known, no block
        fs.engine.drain_writes()
        never = origin.path("out/never-seen.bin")
        with origin.outage():
            assert fs.cat_file(full) == data[full]  # every block from the disk tier
            with fs.open(full) as f:
                f.seek(BIG - 10)
                assert f.read() == data[full][-10:]
            assert fs.cat_file(part, 0, 100) == data[part][:100]
            for p in (part, cold):
                with pytest.raises(OriginUnavailableError, match=re.escape(origin.url(p))):
                    fs.cat_file(p)  # never garbage, never a hang: a clear error naming the URL
            with pytest.raises(OriginUnavailableError, match=re.escape(origin.url(never))):
                fs.open(never)

    def test_outage_stale_if_error(self, origin: OriginKind, tmp_path: Path) -> None:
        self._need_outage(origin)
        fs = origin.make_fs(tmp_path / "c1", memory_bytes=0)  # stale_if_error: 1 h default
        strict = origin.make_fs(tmp_path / "c0", memory_bytes=0, stale_if_error=0)
        full, cold = origin.path("sie/full.bin"), origin.path("sie/cold.bin")
        data = _rand(BIG)
        origin.put(full, data)
        origin.put(cold, b"cold" * 100)
        for f in (fs, strict):
            assert f.cat_file(full) == data
            f.info(cold)
            f.engine.drain_writes()
        with origin.outage():
            time.sleep(AFTER_TTL)  # metadata expired: only stale_if_error lets these through
            assert fs.info(full)["size"] == BIG
            with fs.open(full) as f:
                assert f.read() == data
            assert fs.cat_file(full, start=-5) == data[-5:]
            with pytest.raises(OriginUnavailableError, match=re.escape(origin.url(cold))):
                fs.cat_file(cold)  # its version is known, its blocks are not: still an error
            with pytest.raises(OriginUnavailableError, match=re.escape(origin.url(full))):
                strict.cat_file(full)  # stale_if_error=0 turns serving stale off

    @pytest.mark.timeout(90)
    def test_blackholed_origin_fails_within_origin_timeout(self, origin: OriginKind, tmp_path: Path) -> None:
        if not origin.can_blackhole:
            pytest.skip(f"blackholing a {origin.name} origin needs a proxy in front of it (the s3-chaos kind)")
        fs = origin.make_fs(tmp_path / "cache", origin_timeout=2, metadata_ttl=3600, retry_attempts=6)
        path = origin.path("bh/obj.bin")
        origin.put(path, _rand(BIG))
        fs.info(path)
        with origin.blackhole():
            start = time.monotonic()
            with pytest.raises(OriginUnavailableError, match=re.escape(origin.url(path))):
                fs.cat_file(path)
            elapsed = time.monotonic() - start
        assert elapsed < 2 + 8, f"a blackholed read took {elapsed:.1f}s with origin_timeout=2"

    # ------------------------------------------------------------------ write-back
    @staticmethod
    def _hold_uploads(fs: PCacheFileSystem, monkeypatch: pytest.MonkeyPatch) -> None:
        """Keep written files staged: no uploader process starts until ``monkeypatch.undo()``."""
        monkeypatch.setattr(fs.writeback, "kick", lambda: None)

    def test_write_back(self, origin: OriginKind, fs: PCacheFileSystem, monkeypatch: pytest.MonkeyPatch) -> None:
        prefix = origin.path("ckpt/step1")
        path = f"{prefix}/rank0.bin"
        if origin.process_local:
            # The uploader is another process; an in-process store would take the upload in *its* memory.
            with pytest.raises(ValueError, match=re.escape(path.lstrip("/"))):
                fs.open(path, "wb")
            return
        data = _rand(2 * BLOCK_SIZE + 17)
        self._hold_uploads(fs, monkeypatch)
        with fs.open(path, "wb") as f:
            f.write(data[:1000])
            f.write(data[1000:])
        assert not origin.exists(path), "uploads were held; the file must be staged only"
        assert fs.cat_file(path) == data  # read-your-writes before the upload
        assert fs.cat_file(path, start=-17) == data[-17:]
        with fs.open(path) as f:
            assert f.read() == data
        assert fs.info(path)["size"] == len(data)
        assert fs.exists(path)
        monkeypatch.undo()
        fs.flush(timeout=60)
        assert origin.cat(path) == data
        assert fs.cat_file(path) == data
        marker_url = fs.commit(prefix, timeout=60)
        assert marker_url == f"{origin.url(prefix)}/_COMMITTED"
        manifest: dict[str, Any] = json.loads(origin.cat(f"{prefix}/_COMMITTED"))
        assert [(e["path"], e["size"]) for e in manifest["files"]] == [("rank0.bin", len(data))]
        assert manifest["files"][0]["xxh3_128"]

    def test_staged_files_are_listed(self, origin: OriginKind, fs: PCacheFileSystem,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
        if origin.process_local:
            pytest.skip("memory:// cannot be a write-back target (see test_write_back)")
        d = origin.path("staged")
        origin.put(f"{d}/old.bin", b"old")
        path = f"{d}/new.bin"
        self._hold_uploads(fs, monkeypatch)
        with fs.open(path, "wb") as f:
            f.write(b"staged bytes")
        assert not origin.exists(path)
        assert set(fs.ls(d, detail=False)) == {f"{d}/old.bin", path}
        assert {e["name"]: e["size"] for e in fs.ls(d, detail=True)}[path] == len(b"staged bytes")
        assert path in fs.find(d)
        assert path in fs.find(origin.root)
        assert fs.glob(f"{d}/new.*") == [path]
