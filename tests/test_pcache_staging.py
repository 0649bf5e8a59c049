"""pcache.staging against the real SeaweedFS (no FUSE): random-access staged writes, and renames and
deletes of write-back files before and after their upload."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import s3fs
import xxhash

from pcache import PCacheFileSystem, StagedWrite, drop_staged, is_pending, move_staged, staged_files
from pcache.testing import SeaweedServer


def _pfs(options: dict[str, Any], cache: Path) -> PCacheFileSystem:
    return PCacheFileSystem(target_protocol="s3", target_options=options, cache_dir=str(cache),
                            retry_attempts=2, retry_base_delay=0.05, skip_instance_cache=True)


def test_random_writes_publish_with_the_right_hash_and_rewrites_do_not_touch_the_published_copy(
        bucket: str, s3_options: dict[str, Any], tmp_path: Path) -> None:
    pfs = _pfs(s3_options, tmp_path / "c")
    staged = StagedWrite(pfs, f"s3://{bucket}/r/a.bin")
    staged.pwrite(b"b" * 10, 10)
    staged.pwrite(b"a" * 10, 0)  # out of order: hashed from the file at publish
    staged.truncate(25)
    entry_id = staged.publish()
    staged.pwrite(b"LATER", 0)  # after the publish: a copy, the journaled bytes stay as published
    assert staged.pread(25, 0) == b"LATER" + b"a" * 5 + b"b" * 10 + b"\0" * 5
    staged.close()  # the later bytes were never published: dropped
    assert entry_id is not None and is_pending(pfs, f"s3://{bucket}/r/a.bin")
    pfs.flush(f"s3://{bucket}/r")
    s3 = s3fs.S3FileSystem(**s3_options, skip_instance_cache=True)
    body = s3.cat_file(f"{bucket}/r/a.bin")
    assert body == b"a" * 10 + b"b" * 10 + b"\0" * 5
    [(_, record)] = list(pfs.writeback.journal.done(f"s3://{bucket}/r"))
    assert record["xxh3_128"] == xxhash.xxh3_128_hexdigest(body)


def test_move_before_upload_retargets_and_nothing_reaches_the_old_name(
        s3_server: SeaweedServer, bucket: str, chaos_proxy: Any, proxy_options: Any, tmp_path: Path) -> None:
    proxy = chaos_proxy()
    pfs = _pfs(proxy_options(proxy), tmp_path / "c")
    fault = proxy.fail("PUT", times=None)  # uploads fail: the entries stay pending
    for name, body in (("x.tmp", b"new"), ("x", b"old"), ("gone", b"bye")):
        staged = StagedWrite(pfs, f"s3://{bucket}/m/{name}")
        staged.pwrite(body, 0)
        staged.publish()
        staged.close()
    assert move_staged(pfs, f"s3://{bucket}/m/x.tmp", f"s3://{bucket}/m/x") == "retargeted"  # over "x"
    assert drop_staged(pfs, f"s3://{bucket}/m/gone") == "dropped"
    assert sorted(os.path.basename(p) for p in staged_files(pfs, f"s3://{bucket}/m")) == ["x"]
    fault.cancel()
    pfs.flush(f"s3://{bucket}/m")
    s3 = s3fs.S3FileSystem(**s3_server.storage_options(), skip_instance_cache=True)
    assert sorted(os.path.basename(k) for k in s3.find(f"{bucket}/m")) == ["x"]
    assert s3.cat_file(f"{bucket}/m/x") == b"new"
    # Uploaded: a server-side copy, then the old name is deleted.
    assert move_staged(pfs, f"s3://{bucket}/m/x", f"s3://{bucket}/m/y") == "copied"
    s3.invalidate_cache()
    assert sorted(os.path.basename(k) for k in s3.find(f"{bucket}/m")) == ["y"]
    assert drop_staged(pfs, f"s3://{bucket}/m/y") == "deleted"
    s3.invalidate_cache()
    assert not s3.exists(f"{bucket}/m/y") and not s3.exists(f"{bucket}/m/x")


def test_a_failed_write_behind_surfaces_at_publish_and_nothing_is_journaled(
        bucket: str, s3_options: dict[str, Any], tmp_path: Path, monkeypatch: Any) -> None:
    import errno

    import pytest

    pfs = _pfs(s3_options, tmp_path / "c")
    staged = StagedWrite(pfs, f"s3://{bucket}/f/full.bin")
    real = os.pwrite

    def full_disk(fd: int, data: Any, offset: int) -> int:
        if offset >= 1 << 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk)
    assert staged.write_behind(b"x" * (1 << 20), 0) == 1 << 20  # queued: the caller is answered at once
    staged.write_behind(b"y" * 10, 1 << 20)
    with pytest.raises(OSError) as exc:
        staged.publish()
    assert exc.value.errno == errno.ENOSPC and f"s3://{bucket}/f/full.bin" in str(exc.value)
    staged.close()
    monkeypatch.undo()
    assert not is_pending(pfs, f"s3://{bucket}/f/full.bin")
    assert not pfs.writeback.journal.pending()
