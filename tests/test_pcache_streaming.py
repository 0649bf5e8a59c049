"""Streaming upload: parts of a write-back file go to S3 while it is written (real SeaweedFS, chaos proxy,
real uploader process, kill -9)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import fsspec
import pytest
import s3fs
import xxhash

from pcache.config import CacheConfig
from pcache.journal import Journal

MiB = 1024 * 1024
PART = 5 * MiB
PY = sys.executable


def data(size: int, seed: int = 0) -> bytes:
    return ((bytes([seed % 256]) + os.urandom(4095)) * (size // 4096 + 1))[:size]


def pcache_fs(tmp_path, options: dict[str, Any], cache: str = "c", **config: Any) -> Any:
    config = {"upload_part_size": "5MiB", "upload_concurrency": 2, "retry_base_delay": 0.02, **config}
    return fsspec.filesystem("pcache", target_protocol="s3", target_options=options, cache_dir=str(tmp_path / cache),
                             skip_instance_cache=True, **config)


def raw(s3_options: dict[str, Any]) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True, **s3_options)


def uploads_of(s3: s3fs.S3FileSystem, bucket: str, key: str) -> list[str]:
    listing = s3.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key)
    return [u["UploadId"] for u in listing.get("Uploads", []) if u["Key"] == key]


def parts_at_origin(s3: s3fs.S3FileSystem, bucket: str, key: str) -> int:
    return sum(len(s3.call_s3("list_parts", Bucket=bucket, Key=key, UploadId=u).get("Parts", []))
               for u in uploads_of(s3, bucket, key))


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def assert_origin_has(s3: s3fs.S3FileSystem, path: str, payload: bytes) -> None:
    s3.invalidate_cache()
    got = s3.cat_file(path)
    assert len(got) == len(payload) and xxhash.xxh3_128_hexdigest(got) == xxhash.xxh3_128_hexdigest(payload)


def test_parts_are_uploaded_before_close_and_the_uploader_completes_that_upload(
        tmp_path, s3_server, s3_options, bucket, chaos_proxy, proxy_options) -> None:
    proxy = chaos_proxy()
    fs = pcache_fs(tmp_path, proxy_options(proxy))
    key, payload = "ckpt/step1/rank0.distcp", data(3 * PART + 123)
    s3 = raw(s3_options)
    with fs.open(f"{bucket}/{key}", "wb") as f:
        f.write(payload[: 2 * PART + 1])  # two whole parts staged (in 8 MiB chunks: 8 MiB are)
        f.flush()
        wait_for(lambda: parts_at_origin(s3, bucket, key) >= 1, "a part at the origin while the file is open")
        f.write(payload[2 * PART + 1:])
    fs.flush(timeout=120)
    assert_origin_has(s3, f"{bucket}/{key}", payload)
    # One upload, created by the writer's stream and completed by the uploader (not a second, whole one).
    assert proxy.count("POST", f"/{bucket}/{key}") == 2  # CreateMultipartUpload + CompleteMultipartUpload
    assert proxy.count("PUT", f"/{bucket}/{key}") == 4  # each part exactly once
    assert uploads_of(s3, bucket, key) == []
    journal = Journal(str(tmp_path / "c"))
    assert journal.multipart_intents() == [] and journal.pending() == []
    done = dict(journal.done())[f"s3://{bucket}/{key}"]
    assert done["xxh3_128"] == xxhash.xxh3_128_hexdigest(payload)
    assert done["etag"] == s3.info(f"{bucket}/{key}")["ETag"].strip('"')


@pytest.mark.parametrize("how", ["exception", "discard"])
def test_discard_aborts_the_streamed_upload(tmp_path, s3_options, bucket, how: str) -> None:
    fs = pcache_fs(tmp_path, s3_options)
    key, s3 = f"ckpt/{how}/rank0.distcp", raw(s3_options)
    f = fs.open(f"{bucket}/{key}", "wb")
    with pytest.raises(RuntimeError) if how == "exception" else contextlib.nullcontext(), f:
        f.write(data(3 * PART))
        wait_for(lambda: parts_at_origin(s3, bucket, key) >= 1, "a streamed part")
        if how == "exception":
            raise RuntimeError("the save failed")
        f.discard()
    assert uploads_of(s3, bucket, key) == [], "the streamed upload was left behind"
    assert not s3.exists(f"{bucket}/{key}")
    fs.flush(timeout=60)
    assert Journal(str(tmp_path / "c")).multipart_intents() == []
    assert not s3.exists(f"{bucket}/{key}")


def test_503s_while_streaming_are_retried(tmp_path, s3_options, bucket, chaos_proxy, proxy_options) -> None:
    proxy = chaos_proxy()
    key, payload = "ckpt/503/rank0.distcp", data(4 * PART)
    fault = proxy.fail("PUT", f"/{bucket}/{key}", "partNumber", times=3)
    fs = pcache_fs(tmp_path, proxy_options(proxy))
    s3 = raw(s3_options)
    with fs.open(f"{bucket}/{key}", "wb") as f:
        f.write(payload[: 3 * PART])
        wait_for(lambda: parts_at_origin(s3, bucket, key) >= 1, "a streamed part despite the 503s")
        f.write(payload[3 * PART:])
    assert fault.failed == 3
    fs.flush(timeout=120)
    assert_origin_has(s3, f"{bucket}/{key}", payload)
    assert proxy.count("POST", f"/{bucket}/{key}") == 2, "the streamed upload was not the one completed"
    assert uploads_of(s3, bucket, key) == []


def test_a_stream_that_gives_up_falls_back_to_the_whole_file(tmp_path, s3_options, bucket, chaos_proxy,
                                                             proxy_options) -> None:
    proxy = chaos_proxy()
    key, payload = "ckpt/fallback/rank0.distcp", data(3 * PART + 7)
    # The stream's first part fails on both of its attempts; later parts (the uploader's) go through.
    fault = proxy.fail("PUT", f"/{bucket}/{key}", "partNumber", times=2)
    fs = pcache_fs(tmp_path, proxy_options(proxy), upload_concurrency=1, retry_attempts=2)
    s3 = raw(s3_options)
    with fs.open(f"{bucket}/{key}", "wb") as f:
        f.write(payload[: 2 * PART + 1])
        wait_for(lambda: fault.failed == 2, "the stream's failed attempts")
        f.write(payload[2 * PART + 1:])
    fs.flush(timeout=120)
    assert_origin_has(s3, f"{bucket}/{key}", payload)
    assert proxy.count("POST", f"/{bucket}/{key}", include_injected=True) == 3  # 2 creates, 1 complete
    assert uploads_of(s3, bucket, key) == [], "the failed stream's upload was not aborted"
    assert Journal(str(tmp_path / "c")).multipart_intents() == []


WRITER = textwrap.dedent("""
    import json, sys, time, fsspec
    cache_dir, path, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    fs = fsspec.filesystem("pcache", target_protocol="s3", target_options=options, cache_dir=cache_dir,
                           upload_part_size="5MiB", upload_concurrency=2, skip_instance_cache=True)
    f = fs.open(path, "wb")
    f.write(b"x" * (16 * 1024 * 1024))
    print("written", flush=True)
    time.sleep(120)  # killed here, mid-file: close() never comes
""")


def pcache_cli(s3_server, tmp_path, *args: str) -> dict[str, Any]:
    env = dict(os.environ, AWS_ACCESS_KEY_ID=s3_server.access_key, AWS_SECRET_ACCESS_KEY=s3_server.secret_key)
    out = subprocess.run([PY, "-m", "pcache.cli", *args, "--cache-dir", str(tmp_path / "c"),
                          "--endpoint-url", s3_server.endpoint_url, "--json"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@pytest.mark.parametrize("first", ["flush", "gc"])
def test_kill9_mid_write_leaves_nothing_once_flush_or_gc_ran(tmp_path, s3_server, s3_options, bucket,
                                                             first: str) -> None:
    key, s3 = f"ckpt/kill-{first}/rank0.distcp", raw(s3_options)
    writer = subprocess.Popen([PY, "-c", WRITER, str(tmp_path / "c"), f"{bucket}/{key}", json.dumps(s3_options)],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "written"
        wait_for(lambda: parts_at_origin(s3, bucket, key) >= 1, "a streamed part of the open file")
    finally:
        os.killpg(writer.pid, signal.SIGKILL)  # the writer and its uploader, like a lost node
        writer.wait()
    assert len(uploads_of(s3, bucket, key)) == 1
    result = pcache_cli(s3_server, tmp_path, first)
    assert result["orphan_uploads_aborted"] == 1 and result["orphan_uploads_failed"] == 0, result
    assert uploads_of(s3, bucket, key) == []
    assert not s3.exists(f"{bucket}/{key}")
    assert Journal(str(tmp_path / "c")).multipart_intents() == []


@pytest.mark.parametrize("last", ["first_opened", "second_opened"])
def test_overlapping_rewrites_keep_the_last_closed(tmp_path, s3_options, bucket, last: str) -> None:
    fs = pcache_fs(tmp_path, s3_options)
    key, s3 = "ckpt/latest.distcp", raw(s3_options)
    one, two = data(3 * PART, seed=1), data(3 * PART + 5, seed=2)
    f1 = fs.open(f"{bucket}/{key}", "wb")
    f1.write(one)
    wait_for(lambda: parts_at_origin(s3, bucket, key) >= 1, "the first write's parts")
    f2 = fs.open(f"{bucket}/{key}", "wb")
    f2.write(two)
    wait_for(lambda: len(uploads_of(s3, bucket, key)) == 2, "both writes streaming")
    first, second = (f2, f1) if last == "first_opened" else (f1, f2)
    first.close()
    second.close()
    fs.flush(timeout=120)
    assert_origin_has(s3, f"{bucket}/{key}", one if last == "first_opened" else two)
    assert uploads_of(s3, bucket, key) == [], "the superseded write's streamed upload was left behind"
    assert Journal(str(tmp_path / "c")).multipart_intents() == []


def test_a_stream_waits_for_the_upload_of_an_older_write(tmp_path, s3_options, bucket, chaos_proxy,
                                                        proxy_options) -> None:
    """The uploader is completing write 1 when write 2 of the same URL starts streaming: write 2's upload is
    created only after write 1's is done (never swept by it), and write 2 wins."""
    proxy = chaos_proxy()
    fs = pcache_fs(tmp_path, proxy_options(proxy))
    key, s3 = "ckpt/order.distcp", raw(s3_options)
    one, two = data(2 * PART + 1, seed=1), data(3 * PART, seed=2)
    hold = proxy.hold("POST", f"/{bucket}/{key}", "uploadId")  # write 1's CompleteMultipartUpload
    with fs.open(f"{bucket}/{key}", "wb") as f:
        f.write(one)
    try:
        assert hold.wait(60), "the uploader never completed write 1"
        with fs.open(f"{bucket}/{key}", "wb") as f:
            f.write(two)
            time.sleep(0.5)  # write 2's stream would create its upload now if it did not wait
            assert len(uploads_of(s3, bucket, key)) == 1, "write 2 created an upload while write 1 was sent"
    finally:
        hold.release()
    fs.flush(timeout=120)
    assert_origin_has(s3, f"{bucket}/{key}", two)
    assert uploads_of(s3, bucket, key) == []


def test_small_files_and_streaming_off_use_the_after_close_path(tmp_path, s3_options, bucket, chaos_proxy,
                                                                proxy_options) -> None:
    proxy = chaos_proxy()
    s3 = raw(s3_options)
    small, big = data(PART), data(3 * PART)
    fs = pcache_fs(tmp_path, proxy_options(proxy))
    with fs.open(f"{bucket}/small", "wb") as f:
        f.write(small)
    off = pcache_fs(tmp_path, proxy_options(proxy), cache="off", stream_uploads=False)
    with off.open(f"{bucket}/off", "wb") as f:
        f.write(big)
        time.sleep(1.0)
        assert uploads_of(s3, bucket, "off") == []
    fs.flush(timeout=120)
    off.flush(timeout=120)
    assert proxy.count("POST", f"/{bucket}/small") == 0 and proxy.count("PUT", f"/{bucket}/small") == 1
    assert_origin_has(s3, f"{bucket}/small", small)
    assert_origin_has(s3, f"{bucket}/off", big)


def test_local_origins_are_uploaded_after_close(tmp_path) -> None:
    fs = fsspec.filesystem("pcache", target_protocol="file", cache_dir=str(tmp_path / "c"), skip_instance_cache=True,
                           upload_part_size="5MiB")
    payload = data(3 * PART)
    target = str(tmp_path / "origin" / "big.bin")
    with fs.open(target, "wb") as f:
        f.write(payload)
    fs.flush(timeout=60)
    with open(target, "rb") as fh:
        assert fh.read() == payload


def test_stream_uploads_option_from_toml_env_and_flags(tmp_path, monkeypatch) -> None:
    from pcache.cli import build_parser
    from pcache.options import cache_config

    assert CacheConfig(cache_dir=str(tmp_path)).stream_uploads is True
    toml = tmp_path / "p.toml"
    toml.write_text("[pcache]\nstream_uploads = false\n")
    assert CacheConfig.load(str(toml), cache_dir=str(tmp_path)).stream_uploads is False
    monkeypatch.setenv("PCACHE_STREAM_UPLOADS", "false")
    assert CacheConfig.load(cache_dir=str(tmp_path)).stream_uploads is False
    args = build_parser().parse_args(["flush", "--cache-dir", str(tmp_path), "--stream-uploads"])
    assert cache_config(args).stream_uploads is True


def test_an_entry_renamed_while_its_stream_runs_lands_at_the_new_name(tmp_path, s3_server, s3_options, bucket,
                                                                       chaos_proxy, proxy_options) -> None:
    """A pending entry whose URL changes (a rename of a staged file) while its stream still sends parts: the
    stream's upload of the old key is never completed, and flush/gc abort it."""
    from pcache.streaming import stream_live

    proxy = chaos_proxy()
    fs = pcache_fs(tmp_path, proxy_options(proxy))
    old, new, payload, s3 = "ckpt/save.tmp", "ckpt/save.distcp", data(3 * PART + 1), raw(s3_options)
    hold = proxy.hold("PUT", f"/{bucket}/{old}", "partNumber")  # keeps the stream live until released
    with fs.open(f"{bucket}/{old}", "wb") as f:
        f.write(payload)
    journal = Journal(str(tmp_path / "c"))
    try:
        assert hold.wait(60), "the stream sent no part"
        (entry,) = journal.pending()
        journal.update(entry["id"], url=f"s3://{bucket}/{new}", path=f"{bucket}/{new}")
    finally:
        hold.release()
    fs.flush(timeout=120)
    wait_for(lambda: not stream_live(journal, f"s3://{bucket}/{old}"), "the stream to finish")
    assert_origin_has(s3, f"{bucket}/{new}", payload)
    assert not s3.exists(f"{bucket}/{old}")
    pcache_cli(s3_server, tmp_path, "gc")
    assert uploads_of(s3, bucket, old) == [] and uploads_of(s3, bucket, new) == []
    assert journal.multipart_intents() == []


def test_a_forked_child_does_not_keep_a_stream_live(tmp_path, s3_options, bucket) -> None:
    """A DataLoader-style fork while a stream runs: the child must not hold the stream's flock, or
    uploaders would treat the URL as busy for as long as the child lives."""
    from pcache.streaming import stream_live

    fs = pcache_fs(tmp_path, s3_options)
    key, s3 = "ckpt/fork.distcp", raw(s3_options)
    url, journal = f"s3://{bucket}/{key}", Journal(str(tmp_path / "c"))
    f = fs.open(f"{bucket}/{key}", "wb")
    f.write(data(3 * PART))
    wait_for(lambda: parts_at_origin(s3, bucket, key) >= 1, "a streamed part")
    assert stream_live(journal, url)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child (its at-fork hooks have run) only lives on, holding whatever it kept
        os.write(ready_w, b"x")
        time.sleep(30)
        os._exit(0)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"x"
        f._stream._release()  # the parent's stream lets go (as at hand-over), the child still runs
        assert not stream_live(journal, url), "the forked child kept the stream's flock"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
        f.discard()
    assert uploads_of(s3, bucket, key) == []


def test_parts_are_sent_from_a_thread_niced_like_the_uploader(tmp_path, s3_options, bucket) -> None:
    # The parts' CPU (signing, checksums) must yield to the writer's own work (training steps), as the
    # niced uploader process does: the stream's event loop runs on a thread of its own at uploader_nice.
    import threading

    fs = pcache_fs(tmp_path, s3_options)  # uploader_nice 10 (one loop per process: the first config's)
    key, payload = "nice/big.bin", data(2 * PART + 5)
    with fs.open(f"{bucket}/{key}", "wb") as f:
        f.write(payload)
    fs.flush(timeout=120)
    assert_origin_has(raw(s3_options), f"{bucket}/{key}", payload)
    loop_threads = [t for t in threading.enumerate() if t.name == "pcache-stream-io"]
    assert len(loop_threads) == 1
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert os.getpriority(os.PRIO_PROCESS, loop_threads[0].native_id) == min(19, mine + 10)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # the writer is not niced
