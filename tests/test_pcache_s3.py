"""pcache against a real SeaweedFS S3 server: correctness and every fault the issue names."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import fsspec
import pytest
import s3fs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pcache
from pcache import OriginUnavailableError, PCacheFileSystem

MiB = 1024 * 1024
PY = sys.executable


def make_fs(cache_dir, options, **cache_options) -> PCacheFileSystem:
    return fsspec.filesystem("pcache", target_protocol="s3", target_options=options, cache_dir=str(cache_dir),
                             skip_instance_cache=True, **cache_options)


def put(options, url: str, data: bytes) -> None:
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    fs.pipe_file(url, data)


def origin_bytes(options, url: str) -> bytes:
    return s3fs.S3FileSystem(skip_instance_cache=True, **options).cat_file(url)


@pytest.fixture
def blob(bucket, s3_options):
    data = os.urandom(3 * MiB + 12345)
    url = f"{bucket}/data/blob.bin"
    put(s3_options, url, data)
    return url, data


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_ranges_equal_origin(tmp_path_factory, s3_options, blob, data) -> None:
    url, expected = blob
    fs = make_fs(tmp_path_factory.mktemp("c"), s3_options, block_size=256 * 1024)
    with fs.open(url) as f:
        for _ in range(5):
            start = data.draw(st.integers(0, len(expected) + 10))
            size = data.draw(st.integers(0, 2 * MiB))
            f.seek(start)
            assert f.read(size) == expected[start:start + size]
            buf = bytearray(data.draw(st.integers(0, MiB)))
            f.seek(start)
            n = f.readinto(buf)
            assert bytes(buf[:n]) == expected[start:start + n] and n == len(expected[start:start + len(buf)])


def test_fsspec_open_chained_url(tmp_path, s3_options, blob) -> None:
    url, expected = blob
    with fsspec.open(f"pcache::s3://{url}", "rb", pcache={"cache_dir": str(tmp_path)}, s3=s3_options) as f:
        f.seek(MiB)
        assert f.read(100) == expected[MiB:MiB + 100]
    fs = make_fs(tmp_path, s3_options)
    assert fs.info(url)["size"] == len(expected)
    assert fs.ls(url.rsplit("/", 1)[0], detail=False) == [url]
    assert fs.find(url.split("/")[0]) == [url]


def test_missing_object_names_the_url(tmp_path, s3_options, bucket) -> None:
    fs = make_fs(tmp_path, s3_options)
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/nope.bin"):
        fs.open(f"{bucket}/nope.bin")


def test_cached_data_survives_origin_outage(tmp_path, s3_server, s3_options, bucket, blob) -> None:
    url, expected = blob
    put(s3_options, f"{bucket}/data/cold.bin", b"x" * 1000)
    fs = make_fs(tmp_path, s3_options, memory_bytes=0, retry_attempts=2, retry_base_delay=0.01,
                 metadata_ttl=3600)
    assert fs.cat_file(url) == expected
    fs.engine.drain_writes()
    fs.info(f"{bucket}/data/cold.bin")
    s3_server.stop()
    try:
        assert fs.cat_file(url) == expected  # every block from the disk tier
        with pytest.raises(OriginUnavailableError, match=f"s3://{bucket}/data/cold.bin"):
            fs.cat_file(f"{bucket}/data/cold.bin")  # never cached: a clear error, never garbage
    finally:
        s3_server.start()


def test_chaos_reads_and_uploads_complete(tmp_path, s3_server, s3_options, bucket, chaos_proxy) -> None:
    proxy = chaos_proxy(fail_ratio=0.10, seed=42)
    options = s3_server.storage_options(endpoint_url=proxy.endpoint_url)
    data = os.urandom(12 * MiB)
    put(s3_options, f"{bucket}/chaos/in.bin", data)
    fs = make_fs(tmp_path / "c", options, block_size=MiB, retry_base_delay=0.01, upload_part_size=5 * MiB)
    assert fs.cat_file(f"{bucket}/chaos/in.bin") == data
    out = os.urandom(17 * MiB)
    with fs.open(f"{bucket}/chaos/out.bin", "wb") as f:
        f.write(out)
    fs.flush(timeout=120)
    injected = sum(r.injected for r in proxy.records())
    assert injected > 0, "the proxy injected no failures"
    assert origin_bytes(s3_options, f"{bucket}/chaos/out.bin") == out


READER = textwrap.dedent("""
    import os, sys, time, fsspec, json
    cache_dir, url, options, go = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    fs = fsspec.filesystem("pcache", target_protocol="s3", target_options=options, cache_dir=cache_dir)
    fs.info(url)
    while not os.path.exists(go):
        time.sleep(0.005)
    with fs.open(url) as f:
        data = b"".join(iter(lambda: f.read(3 * 1024 * 1024 + 17), b""))
    import hashlib; print(hashlib.sha256(data).hexdigest())
""")


def test_eight_processes_make_one_get_per_block(tmp_path, s3_server, s3_options, bucket, chaos_proxy) -> None:
    proxy = chaos_proxy(fail_ratio=0.0, latency_s=0.01)
    options = s3_server.storage_options(endpoint_url=proxy.endpoint_url)
    data = os.urandom(64 * MiB)
    url = f"{bucket}/shared/big.bin"
    put(s3_options, url, data)
    go = tmp_path / "go"
    procs = [subprocess.Popen([PY, "-c", READER, str(tmp_path / "cache"), url, json.dumps(options), str(go)],
                              stdout=subprocess.PIPE, text=True) for _ in range(8)]
    time.sleep(3)  # let every reader import and stat the object
    proxy.reset_counts()
    go.touch()
    digests = {p.communicate(timeout=300)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    import hashlib

    assert digests == {hashlib.sha256(data).hexdigest()}
    gets = proxy.get_ranges(f"/{url}")
    assert len(gets) == 16, f"expected one GET per 4 MiB block, got {len(gets)}"
    assert len(set(gets)) == 16


WRITER = textwrap.dedent("""
    import os, sys, json, fsspec
    cache_dir, url, options, size = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    fs = fsspec.filesystem("pcache", target_protocol="s3", target_options=options, cache_dir=cache_dir,
                           upload_part_size="5MiB", upload_concurrency=2)
    data = bytes(range(256)) * (size // 256)
    with fs.open(url, "wb") as f:
        f.write(data)
    print("closed", flush=True)
    import time; time.sleep(60)
""")


@pytest.mark.parametrize("via_api", [False, True], ids=["cli", "api"])
def test_kill9_after_close_then_pcache_flush(tmp_path, s3_server, s3_options, bucket, chaos_proxy,
                                             via_api: bool) -> None:
    proxy = chaos_proxy(fail_ratio=0.0, latency_s=0.5)  # slow origin: the upload cannot finish in time
    options = s3_server.storage_options(endpoint_url=proxy.endpoint_url)
    url, size = f"{bucket}/ckpt/step100/model.distcp", 24 * MiB
    writer = subprocess.Popen([PY, "-c", WRITER, str(tmp_path / "c"), url, json.dumps(options), str(size)],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert writer.stdout is not None and writer.stdout.readline().strip() == "closed"
    os.killpg(writer.pid, signal.SIGKILL)  # the writer and its uploader die, like a lost node
    writer.wait()
    time.sleep(0.5)
    s3 = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options)
    assert not s3.exists(url), "upload finished before the kill; the test proved nothing"
    env = dict(os.environ, AWS_ACCESS_KEY_ID=s3_server.access_key, AWS_SECRET_ACCESS_KEY=s3_server.secret_key)
    if via_api:  # a restarted trainer finishes the upload with pcache.flush(cache_dir=...)
        code = f"import pcache; pcache.flush(cache_dir={str(tmp_path / 'c')!r}, timeout=300)"
        done = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    out = subprocess.run([PY, "-m", "pcache.cli", "flush", "--cache-dir", str(tmp_path / "c"),
                          "--endpoint-url", s3_server.endpoint_url, "--json"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["uploaded"] == (0 if via_api else 1)
    s3.invalidate_cache()
    assert s3.cat_file(url) == bytes(range(256)) * (size // 256)
    uploads = s3.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    assert uploads == [], f"orphan multipart uploads: {uploads}"


def test_commit_never_marks_pending_files(tmp_path, s3_server, s3_options, bucket) -> None:
    fs = make_fs(tmp_path, s3_options, retry_base_delay=0.05)
    prefix = f"{bucket}/ckpt/step200"
    s3_server.stop()
    try:
        with fs.open(f"{prefix}/rank0.distcp", "wb") as f:
            f.write(b"weights" * 1000)
        assert fs.cat_file(f"{prefix}/rank0.distcp") == b"weights" * 1000  # read back before upload
        with pytest.raises((TimeoutError, pcache.UploadError)):
            pcache.commit(f"s3://{prefix}", timeout=2)
    finally:
        s3_server.start()
    s3 = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options)
    assert not s3.exists(f"{prefix}/_COMMITTED")
    marker_url = pcache.commit(f"s3://{prefix}", timeout=180)
    assert marker_url == f"s3://{prefix}/_COMMITTED"
    manifest = json.loads(s3.cat_file(f"{prefix}/_COMMITTED"))
    assert [f["path"] for f in manifest["files"]] == ["rank0.distcp"]
    assert manifest["files"][0]["xxh3_128"] and manifest["files"][0]["size"] == 7000


def test_no_secret_reaches_disk(tmp_path, s3_server, s3_options, bucket) -> None:
    fs = make_fs(tmp_path, s3_options)
    with fs.open(f"{bucket}/ckpt/s/x.bin", "wb") as f:
        f.write(b"abc")
    fs.flush(timeout=60)
    for root, _, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                blob = fh.read()
            assert s3_server.secret_key.encode() not in blob, f"secret written to {name}"


def test_wrong_credentials_fail_fast_without_retries(tmp_path, s3_server, bucket, blob, chaos_proxy) -> None:
    url, _ = blob
    proxy = chaos_proxy(fail_ratio=0.0)
    bad = s3_server.storage_options(endpoint_url=proxy.endpoint_url)
    bad["secret"] = "not-the-secret"
    fs = make_fs(tmp_path, bad, retry_attempts=4, retry_base_delay=0.01)
    with pytest.raises(PermissionError):
        fs.cat_file(url)
    # One request, answered 403, and no retry: a bad credential is permanent.
    assert proxy.count() == 1, [(r.method, r.path, r.status) for r in proxy.records()]


def test_range_reader_403_is_permission_error(tmp_path, s3_server, s3_options, blob, chaos_proxy) -> None:
    """The presigned ranged-GET path (not just info()) reports a refused signature as PermissionError."""
    url, _ = blob
    fs = make_fs(tmp_path, s3_options, retry_attempts=4, retry_base_delay=0.01)
    with fs.open(url) as f:  # info() with good credentials
        f.fs.origin._s3.fs = s3fs.S3FileSystem(skip_instance_cache=True,  # then presign with a bad secret
                                               **{**s3_options, "secret": "not-the-secret"})
        f.fs.origin._s3._urls.clear()
        with pytest.raises(PermissionError, match="access denied"):
            f.read(100)
