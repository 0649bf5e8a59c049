"""No orphan multipart uploads: an uploader killed at any point of an S3 multipart upload leaves nothing
behind once ``pcache flush`` or ``pcache gc`` has run (real SeaweedFS, real uploader process, kill -9)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import s3fs

from pcache.journal import Journal

MiB = 1024 * 1024
PY = sys.executable
SIZE = 12 * MiB  # three 5 MiB-or-less parts: the multipart path

WRITER = textwrap.dedent("""
    import json, sys, time, fsspec
    cache_dir, url, options, size = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    fs = fsspec.filesystem("pcache", target_protocol="s3", target_options=options, cache_dir=cache_dir,
                           upload_part_size="5MiB", upload_concurrency=2, skip_instance_cache=True)
    with fs.open(url, "wb") as f:
        f.write(bytes(range(256)) * (size // 256))
    print("closed", flush=True)
    time.sleep(120)
""")


def payload() -> bytes:
    return bytes(range(256)) * (SIZE // 256)


def uploads_of(s3: s3fs.S3FileSystem, bucket: str, key: str) -> list[str]:
    listing = s3.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key)
    return [u["UploadId"] for u in listing.get("Uploads", []) if u["Key"] == key]


def start_writer(tmp_path, options, url: str) -> subprocess.Popen[str]:
    """A trainer that writes ``url`` through pcache; its background uploader is in its process group."""
    writer = subprocess.Popen([PY, "-c", WRITER, str(tmp_path / "c"), url, json.dumps(options), str(SIZE)],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert writer.stdout is not None and writer.stdout.readline().strip() == "closed"
    return writer


def kill_group(writer: subprocess.Popen[str]) -> None:
    os.killpg(writer.pid, signal.SIGKILL)  # writer and uploader die together, like a lost node
    writer.wait()


def pcache_cli(s3_server, tmp_path, *args: str) -> dict:
    env = dict(os.environ, AWS_ACCESS_KEY_ID=s3_server.access_key, AWS_SECRET_ACCESS_KEY=s3_server.secret_key)
    out = subprocess.run([PY, "-m", "pcache.cli", *args, "--cache-dir", str(tmp_path / "c"),
                          "--endpoint-url", s3_server.endpoint_url, "--json"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def recover_and_check(s3_server, s3_options, tmp_path, bucket: str, key: str, first: str) -> None:
    """Run ``first`` (flush or gc), then flush; no upload of ``key`` may remain and the file is whole."""
    s3 = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options)
    assert len(uploads_of(s3, bucket, key)) == 1, "the origin never created the upload; the test proved nothing"
    result = pcache_cli(s3_server, tmp_path, first)
    assert result["orphan_uploads_aborted"] == 1 and result["orphan_uploads_failed"] == 0, result
    if first == "gc":
        assert uploads_of(s3, bucket, key) == [], "gc left the orphan"
        result = pcache_cli(s3_server, tmp_path, "flush")
    assert result["uploaded"] == 1 and result["still_pending"] == 0, result
    s3.invalidate_cache()
    assert s3.cat_file(f"{bucket}/{key}") == payload()
    assert uploads_of(s3, bucket, key) == [], "orphan multipart upload left behind"
    assert Journal(str(tmp_path / "c")).multipart_intents() == []


@pytest.mark.parametrize("first", ["flush", "gc"])
def test_kill9_while_create_multipart_upload_is_in_flight(tmp_path, s3_server, s3_options, bucket, chaos_proxy,
                                                          first: str) -> None:
    proxy = chaos_proxy()
    key = "ckpt/step1/rank0.distcp"
    # S3 creates the upload; its reply (the upload id) is held back from the uploader, which is then killed.
    hold = proxy.hold("POST", f"/{bucket}/{key}", "uploads", stage="response")
    writer = start_writer(tmp_path, s3_server.storage_options(endpoint_url=proxy.endpoint_url), f"{bucket}/{key}")
    try:
        assert hold.wait(60), "the uploader never sent CreateMultipartUpload"
    finally:
        kill_group(writer)
        hold.release()
    recover_and_check(s3_server, s3_options, tmp_path, bucket, key, first)


def test_kill9_after_the_reply_before_the_upload_id_is_journaled(tmp_path, s3_server, s3_options, bucket,
                                                                 chaos_proxy) -> None:
    proxy = chaos_proxy()
    key = "ckpt/step2/rank0.distcp"
    hold = proxy.hold("POST", f"/{bucket}/{key}", "uploads", stage="response")
    writer = start_writer(tmp_path, s3_server.storage_options(endpoint_url=proxy.endpoint_url), f"{bucket}/{key}")
    journal = Journal(str(tmp_path / "c"))
    try:
        assert hold.wait(60), "the uploader never sent CreateMultipartUpload"
        # Holding the journal's LMDB writer lock: the uploader gets its reply but cannot record the id.
        txn = journal.env.begin(write=True)
        try:
            hold.release()
            time.sleep(1.0)  # the reply reaches the uploader, which then waits for the journal
            kill_group(writer)
        finally:
            txn.abort()
    finally:
        if writer.poll() is None:
            kill_group(writer)
        hold.release()
    recover_and_check(s3_server, s3_options, tmp_path, bucket, key, "flush")


def test_gc_aborts_uploads_of_an_intent_whose_entry_is_gone(tmp_path, s3_server, s3_options, bucket) -> None:
    """A superseded write's intent has no pending entry left; gc still finds its object and aborts."""
    key = "ckpt/step3/rank0.distcp"
    s3 = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options)
    orphan = s3.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
    other = s3.call_s3("create_multipart_upload", Bucket=bucket, Key=key + ".other")["UploadId"]
    public = {k: v for k, v in s3_options.items() if k not in ("key", "secret")}
    Journal(str(tmp_path / "c")).begin_multipart({"id": "gone", "url": f"s3://{bucket}/{key}", "protocol": "s3",
                                                  "path": f"{bucket}/{key}", "options": public})
    assert pcache_cli(s3_server, tmp_path, "gc")["orphan_uploads_aborted"] == 1
    assert uploads_of(s3, bucket, key) == []
    assert uploads_of(s3, bucket, key + ".other") == [other], "an upload of another key (same prefix) was aborted"
    assert orphan not in uploads_of(s3, bucket, key)
    assert Journal(str(tmp_path / "c")).multipart_intents() == []
    s3.call_s3("abort_multipart_upload", Bucket=bucket, Key=key + ".other", UploadId=other)


def test_unreachable_origin_keeps_the_intent_and_fails_gc(tmp_path, s3_options, bucket) -> None:
    key = "ckpt/step4/rank0.distcp"
    public = {k: v for k, v in s3_options.items() if k not in ("key", "secret")}
    Journal(str(tmp_path / "c")).begin_multipart({"id": "e1", "url": f"s3://{bucket}/{key}", "protocol": "s3",
                                                  "path": f"{bucket}/{key}", "options": public})
    env = dict(os.environ, AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y", PCACHE_RETRY_ATTEMPTS="2",
               PCACHE_RETRY_BASE_DELAY="0.01")
    out = subprocess.run([PY, "-m", "pcache.cli", "gc", "--cache-dir", str(tmp_path / "c"), "--endpoint-url",
                          "http://127.0.0.1:1", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert json.loads(out.stdout)["orphan_uploads_failed"] == 1
    assert [i["id"] for i in Journal(str(tmp_path / "c")).multipart_intents()] == ["e1"]
