"""pcache's metadata plane, serve-stale-on-error and bounded failure, against real SeaweedFS.

Faults are injected for real: another S3 client rewrites objects, SeaweedFS is stopped, and a plain
socket that accepts connections and never answers stands in for a blackholed origin.
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import fsspec
import pytest
import s3fs

from lingcore.errors import OriginUnavailableError
from lingcore.retry import RetryPolicy, retry_call
from pcache import ObjectRef, PCacheFile, PCacheFileSystem

MiB = 1024 * 1024


def make_fs(cache_dir: Any, options: dict[str, Any], **cache_options: Any) -> PCacheFileSystem:
    return fsspec.filesystem("pcache", target_protocol="s3", target_options=options, cache_dir=str(cache_dir),
                             skip_instance_cache=True, **cache_options)


def client(options: dict[str, Any]) -> s3fs.S3FileSystem:
    """Another S3 client (not pcache): its writes are what pcache must notice."""
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **options)


@pytest.fixture
def blackhole() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a socket that accepts every connection and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for conn in held:
        conn.close()


def fake_options(endpoint: str) -> dict[str, Any]:
    return {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


# -- item 1: no stale bytes after metadata_ttl, whatever was listed ---------------------------------------
def test_rewrite_after_ls_is_read_after_ttl(tmp_path, s3_options, bucket) -> None:
    other = client(s3_options)
    other.pipe_file(f"{bucket}/dir/a.txt", b"old")
    fs = make_fs(tmp_path, s3_options, metadata_ttl=0.5)
    assert fs.ls(f"{bucket}/dir", detail=False) == [f"{bucket}/dir/a.txt"]
    assert fs.cat_file(f"{bucket}/dir/a.txt") == b"old"
    assert not fs.exists(f"{bucket}/dir/b.txt")
    other.pipe_file(f"{bucket}/dir/a.txt", b"new, longer")
    other.pipe_file(f"{bucket}/dir/b.txt", b"b")
    time.sleep(0.6)
    assert fs.cat_file(f"{bucket}/dir/a.txt") == b"new, longer"
    assert fs.info(f"{bucket}/dir/a.txt")["size"] == len(b"new, longer")
    assert fs.exists(f"{bucket}/dir/b.txt")  # a new object appears once its negative entry expires
    assert fs.ls(f"{bucket}/dir", detail=False) == [f"{bucket}/dir/a.txt", f"{bucket}/dir/b.txt"]


def test_negative_entries_and_listings_are_remembered_and_shared(tmp_path, s3_server, s3_options, bucket,
                                                                 chaos_proxy) -> None:
    proxy = chaos_proxy()
    options = s3_server.storage_options(endpoint_url=proxy.endpoint_url)
    client(s3_options).pipe_file(f"{bucket}/d/x.bin", b"x" * 100)
    fs = make_fs(tmp_path, options, metadata_ttl=60)
    assert not fs.exists(f"{bucket}/d/missing")
    fs.ls(f"{bucket}/d")
    proxy.reset_counts()
    assert not fs.exists(f"{bucket}/d/missing")  # negative entry: no request
    assert fs.info(f"{bucket}/d/x.bin")["size"] == 100  # from the listing: no HEAD
    assert proxy.records() == []
    # A second process sharing the cache directory uses the same answers (no request either).
    code = textwrap.dedent("""
        import json, sys, fsspec
        fs = fsspec.filesystem("pcache", target_protocol="s3", target_options=json.loads(sys.argv[2]),
                               cache_dir=sys.argv[1], metadata_ttl=60)
        print(json.dumps([fs.exists(sys.argv[3] + "/d/missing"), fs.info(sys.argv[3] + "/d/x.bin")["size"],
                          fs.ls(sys.argv[3] + "/d", detail=False)]))
    """)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path), json.dumps(options), bucket],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [False, 100, [f"{bucket}/d/x.bin"]]
    assert proxy.records() == [], "the second process asked the origin again"


# -- item 2: serve stale on error, bounded --------------------------------------------------------------
STALE_READER = textwrap.dedent("""
    import hashlib, json, sys, fsspec
    from pcache import OriginUnavailableError
    fs = fsspec.filesystem("pcache", target_protocol="s3", target_options=json.loads(sys.argv[2]),
                           cache_dir=sys.argv[1], metadata_ttl=0.1, retry_attempts=2, retry_base_delay=0.01,
                           block_size=1024 * 1024)
    print(hashlib.sha256(fs.cat_file(sys.argv[3])).hexdigest())
    try:
        fs.cat_file(sys.argv[4])
    except OriginUnavailableError as exc:
        print(exc)
""")


def test_cached_object_is_served_through_an_outage(tmp_path, s3_server, s3_options, bucket, caplog) -> None:
    data = os.urandom(2 * MiB + 7)
    url, cold = f"{bucket}/s/blob.bin", f"{bucket}/s/cold.bin"
    client(s3_options).pipe({url: data, cold: b"c" * 1000})
    quick = {"retry_attempts": 2, "retry_base_delay": 0.01, "metadata_ttl": 0.1, "block_size": MiB}
    fs = make_fs(tmp_path, s3_options, **quick)
    assert fs.cat_file(url) == data
    fs.info(cold)  # its version is known, none of its blocks is cached
    checked = time.time()  # every answer was taken before this
    fs.engine.drain_writes()
    short = make_fs(tmp_path, s3_options, stale_if_error=1.0, **quick)
    off = make_fs(tmp_path, s3_options, stale_if_error=0, **quick)
    time.sleep(0.2)  # every answer is past metadata_ttl: a read must ask the origin first
    s3_server.stop()
    before = fs.origin.metadata.stale_reads()
    with caplog.at_level(logging.WARNING, logger="pcache.metadata"):
        assert fs.cat_file(url) == data
        with fs.open(url) as f:
            f.seek(MiB)
            assert f.read(10) == data[MiB:MiB + 10]
        assert fs.info(url)["size"] == len(data)
    assert fs.origin.metadata.stale_reads() - before == 3
    assert sum(url in r.getMessage() for r in caplog.records) == 1, "logged once per object"
    with pytest.raises(OriginUnavailableError, match=f"s3://{cold}"):
        fs.cat_file(cold)  # its blocks were never cached
    with pytest.raises(OriginUnavailableError, match=f"s3://{url}"):
        off.cat_file(url)  # stale_if_error=0: no stale reads
    # A fresh process reads the fully cached object from the persisted metadata and blocks.
    out = subprocess.run([sys.executable, "-c", STALE_READER, str(tmp_path), json.dumps(s3_options), url, cold],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    digest, error = out.stdout.splitlines()
    assert digest == hashlib.sha256(data).hexdigest() and f"s3://{cold}" in error
    time.sleep(max(0.0, 1.2 - (time.time() - checked)))
    with pytest.raises(OriginUnavailableError, match=f"s3://{url}"):
        short.cat_file(url)  # past metadata_ttl + stale_if_error: the outage is no longer hidden


# -- item 3: bounded failure ----------------------------------------------------------------------------
@pytest.mark.timeout(40)
def test_blackholed_origin_fails_info_and_reads_within_origin_timeout(tmp_path, blackhole) -> None:
    fs = make_fs(tmp_path, fake_options(blackhole), origin_timeout=3, retry_base_delay=0.01)
    started = time.monotonic()
    with pytest.raises(OriginUnavailableError, match="s3://bucket/meta.bin"):
        fs.cat_file("bucket/meta.bin")  # the HEAD never answers
    assert time.monotonic() - started < 3 + 5
    ref = ObjectRef(url=fs.url("bucket/data.bin"), version="0123abcd", size=3 * MiB)
    started = time.monotonic()
    with pytest.raises(OriginUnavailableError, match="s3://bucket/data.bin"):
        PCacheFile(fs, "bucket/data.bin", ref).read()  # the range GETs never answer
    assert time.monotonic() - started < 3 + 5


@pytest.mark.timeout(40)
def test_fusefs_answers_eio_within_origin_timeout(tmp_path, blackhole) -> None:
    pyfuse3 = pytest.importorskip("pyfuse3")
    import trio

    from fusefs.config import MountConfig
    from fusefs.namespace import ROOT_INODE, FileEntry, Namespace
    from fusefs.ops import ReadOnlyOperations

    fs = make_fs(tmp_path, fake_options(blackhole), origin_timeout=3, retry_base_delay=0.01)
    ns = Namespace()
    ns.apply({"f.bin": FileEntry(size=MiB, mtime_ns=0, version="0123abcd")})
    ops = ReadOnlyOperations(ns, fs, "bucket/p", MountConfig())
    node = ns.child(ROOT_INODE, "f.bin")
    assert node is not None
    info = trio.run(ops.open, node.ino, os.O_RDONLY, None)
    started = time.monotonic()
    with pytest.raises(pyfuse3.FUSEError) as raised:
        trio.run(ops.read, info.fh, 0, 128 * 1024)
    assert raised.value.errno == errno.EIO
    assert time.monotonic() - started < 3 + 5


def test_retry_call_stops_at_its_deadline() -> None:
    now = [0.0]
    calls = []

    def down() -> None:
        calls.append(now[0])
        now[0] += 1.0  # each try takes a second
        raise ConnectionError("refused")

    with pytest.raises(OriginUnavailableError, match="s3://b/k.*deadline"):
        retry_call(down, url="s3://b/k", policy=RetryPolicy(attempts=100, base_delay=0.5, max_delay=0.5),
                   sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0], deadline=5.0)
    assert 3 <= len(calls) <= 5 and max(calls) < 5.0  # no try (and no sleep) starts past the deadline


class _BadRequest(http.server.BaseHTTPRequestHandler):
    count = 0

    def do_GET(self) -> None:
        type(self).count += 1
        body = b"<Error><Code>InvalidArgument</Code></Error>"
        self.send_response(400)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_http_400_is_not_retried(tmp_path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BadRequest)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        fs = make_fs(tmp_path, fake_options(f"http://127.0.0.1:{server.server_address[1]}"), retry_base_delay=0.01)
        fetch = fs.origin.fetcher("bucket/k.bin", "0123abcd")
        with pytest.raises(OSError) as raised:
            fetch(0, 100)
        assert raised.value.errno == errno.EINVAL and "s3://bucket/k.bin" in str(raised.value)
        assert _BadRequest.count == 1
    finally:
        server.shutdown()
        server.server_close()


# -- item 9: cat_file offsets -----------------------------------------------------------------------------
def test_cat_file_offsets_follow_python_slices(tmp_path) -> None:
    data = os.urandom(1000)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "f.bin").write_bytes(data)
    fs = fsspec.filesystem("pcache", target_protocol="file", cache_dir=str(tmp_path / "c"),
                           skip_instance_cache=True, block_size=4096)
    path = str(tmp_path / "o" / "f.bin")
    for start, end in [(-5000, None), (-1000, None), (-10, None), (-10, -5), (None, -5), (-5000, -990),
                       (990, 5000), (1000, None), (5000, None), (10, 5), (None, -5000), (0, 0), (None, None)]:
        assert fs.cat_file(path, start=start, end=end) == data[start:end], (start, end)


# -- read your writes: staged files are listed -----------------------------------------------------------
def test_staged_files_appear_in_ls_find_and_glob(tmp_path, s3_options, bucket, monkeypatch) -> None:
    client(s3_options).pipe_file(f"{bucket}/ck/old.bin", b"o")
    fs = make_fs(tmp_path, s3_options, metadata_ttl=60)
    assert fs.ls(f"{bucket}/ck", detail=False) == [f"{bucket}/ck/old.bin"]  # remembered for 60 s
    monkeypatch.setattr(fs.writeback, "kick", lambda: None)  # no uploader: the writes stay staged
    try:
        for name, body in [("ck/new.bin", b"n" * 10), ("ck/sub/deep.bin", b"d"), ("other/x.bin", b"x")]:
            with fs.open(f"{bucket}/{name}", "wb") as f:
                f.write(body)
        check_staged_listings(fs, bucket)
    finally:  # leave nothing pending for a later pcache.flush() in this process to wait on
        for entry in fs.writeback.journal.pending():
            fs.writeback.journal.supersede(entry["id"])


def check_staged_listings(fs: PCacheFileSystem, bucket: str) -> None:
    assert fs.ls(f"{bucket}/ck", detail=False) == [f"{bucket}/ck/new.bin", f"{bucket}/ck/old.bin",
                                                  f"{bucket}/ck/sub"]
    assert {e["name"]: e["size"] for e in fs.ls(f"{bucket}/ck") if e["type"] == "file"} == {
        f"{bucket}/ck/new.bin": 10, f"{bucket}/ck/old.bin": 1}
    assert fs.ls(f"{bucket}/other", detail=False) == [f"{bucket}/other/x.bin"]  # not at the origin at all
    assert fs.find(f"{bucket}/ck") == [f"{bucket}/ck/new.bin", f"{bucket}/ck/old.bin", f"{bucket}/ck/sub/deep.bin"]
    assert fs.find(f"{bucket}/ck", maxdepth=1) == [f"{bucket}/ck/new.bin", f"{bucket}/ck/old.bin"]
    assert fs.glob(f"{bucket}/ck/*.bin") == [f"{bucket}/ck/new.bin", f"{bucket}/ck/old.bin"]
    assert fs.glob(f"{bucket}/ck/**/deep.bin") == [f"{bucket}/ck/sub/deep.bin"]
    assert fs.glob(f"{bucket}/*/x.bin") == [f"{bucket}/other/x.bin"]
    assert fs.isdir(f"{bucket}/other") and fs.isdir(f"{bucket}/ck/sub")


def test_new_options_load_from_toml_and_env(tmp_path, monkeypatch) -> None:
    from pcache import CacheConfig, ConfigError

    toml = tmp_path / "p.toml"
    toml.write_text("[pcache]\nstale_if_error = 0\norigin_timeout = 7.5\n")
    monkeypatch.setenv("PCACHE_STALE_IF_ERROR", "120")
    config = CacheConfig.load(str(toml), cache_dir=str(tmp_path))
    assert (config.stale_if_error, config.origin_timeout) == (120, 7.5)
    assert CacheConfig(cache_dir=str(tmp_path)).stale_if_error == 3600 and CacheConfig().origin_timeout == 60
    with pytest.raises(ConfigError, match="origin_timeout"):
        CacheConfig.load(cache_dir=str(tmp_path), origin_timeout=0)
