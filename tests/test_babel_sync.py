"""babel_sync between two real SeaweedFS servers: copies, no-op runs, changes, crashes, faults, readers."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import xxhash

from babel_sync import (
    SiteAuthError,
    SiteUnreachableError,
    SourceChangedError,
    Syncer,
    load_config,
    sync_once,
    verify,
)
from pcache.testing import ChaosProxy, SeaweedServer

MiB = 1 << 20
PY = sys.executable
_ids = itertools.count(1)


@pytest.fixture(scope="module")
def server_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """The second cluster's S3 endpoint (the first is the session-wide ``s3_server``)."""
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed-b"))
    server.start()
    yield server
    server.stop()


@dataclass
class Env:
    """Two sites (a on ``s3_server``, b on ``server_b``), a bucket on each and a config writer."""

    a: SeaweedServer
    b: SeaweedServer
    bucket_a: str
    bucket_b: str
    tmp: Path
    proxies: list[ChaosProxy] = field(default_factory=list)

    def write_config(self, rules: str, *, sync: str = "", endpoint_a: str | None = None,
                     endpoint_b: str | None = None, secret_b: str | None = None,
                     dest_prefix: str = "mirror/") -> Path:
        (self.tmp / "cred_a").write_text(f"[default]\naws_access_key_id = {self.a.access_key}\n"
                                         f"aws_secret_access_key = {self.a.secret_key}\n")
        (self.tmp / "cred_b").write_text(f"aws_access_key_id = {self.b.access_key}\n"
                                         f"aws_secret_access_key = {secret_b or self.b.secret_key}\n")
        text = f"""
[sync]
state_dir = "{self.tmp / 'state'}"
multipart_threshold_size = "8MiB"
min_part_size = "5MiB"
retry_base_delay = 0.02
progress = false
{sync}
[sites.a]
url = "s3://{self.bucket_a}"
endpoint_url = "{endpoint_a or self.a.endpoint_url}"
credentials_file = "cred_a"
[sites.b]
url = "s3://{self.bucket_b}/{dest_prefix}"
endpoint_url = "{endpoint_b or self.b.endpoint_url}"
credentials_file = "cred_b"
{rules}
"""
        if "listing_settle_seconds" not in sync:  # tests sync what they just wrote (one clock, no skew)
            text = text.replace("[sync]\n", "[sync]\nlisting_settle_seconds = 0\n", 1)
        path = self.tmp / "babel.toml"
        path.write_text(text)
        return path

    def proxy(self, server: SeaweedServer, **kwargs: Any) -> ChaosProxy:
        proxy = ChaosProxy(server.endpoint_url, **kwargs).start()
        self.proxies.append(proxy)
        return proxy

    def put(self, key: str, data: bytes) -> None:
        self.a.client().put_object(Bucket=self.bucket_a, Key=key, Body=data)

    def delete(self, key: str) -> None:
        self.a.client().delete_object(Bucket=self.bucket_a, Key=key)

    def src(self) -> dict[str, bytes]:
        return _read_all(self.a, self.bucket_a, "")

    def dst(self) -> dict[str, bytes]:
        return _read_all(self.b, self.bucket_b, "mirror/")

    def uploads(self) -> list[Any]:
        return self.b.client().list_multipart_uploads(Bucket=self.bucket_b).get("Uploads", [])


def _read_all(server: SeaweedServer, bucket: str, prefix: str) -> dict[str, bytes]:
    client = server.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix):]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


@pytest.fixture
def env(s3_server: SeaweedServer, server_b: SeaweedServer, tmp_path: Path) -> Iterator[Env]:
    n = next(_ids)
    e = Env(s3_server, server_b, s3_server.make_bucket(f"babel-a-{n}"), server_b.make_bucket(f"babel-b-{n}"),
            tmp_path)
    yield e
    for proxy in e.proxies:
        proxy.stop()
    s3_server.delete_bucket(e.bucket_a)
    server_b.delete_bucket(e.bucket_b)


DATASETS = """
[[rules]]
name = "datasets"
source = "a"
destinations = ["b"]
include = ["datasets/**"]
unit_marker = "_COMMITTED"
"""


def make_units(env: Env, units: int, small: int, small_size: int = 64 * 1024, big: int = 0,
               big_size: int = 12 * MiB, prefix: str = "datasets/v", seed: int = 0) -> dict[str, bytes]:
    rng = random.Random(seed)
    made = {}
    for u in range(units):
        for i in range(small):
            made[f"{prefix}{u}/part-{i:04d}"] = rng.randbytes(small_size)
        for i in range(big):
            made[f"{prefix}{u}/big-{i}"] = rng.randbytes(big_size)
        made[f"{prefix}{u}/_COMMITTED"] = json.dumps({"unit": u}).encode()
    for key, data in made.items():
        env.put(key, data)
    return made


def make_steps(env: Env, run: str, steps: range, small: int = 2) -> dict[str, bytes]:
    """Checkpoint units ``checkpoints/<run>/step_<n>/`` (files, then the marker, as a trainer writes them)."""
    made: dict[str, bytes] = {}
    for step in steps:
        files = {f"checkpoints/{run}/step_{step}/part-{i}": os.urandom(1024) for i in range(small)}
        files[f"checkpoints/{run}/step_{step}/_COMMITTED"] = b"{}"
        for key, data in files.items():
            env.put(key, data)
        made.update(files)
    return made


def assert_identical(env: Env, expected: dict[str, bytes]) -> None:
    dst = env.dst()
    copied = {k: v for k, v in dst.items() if not k.endswith("_BABEL_MANIFEST.json")}
    assert {k: xxhash.xxh3_128_hexdigest(v) for k, v in copied.items()} == \
        {k: xxhash.xxh3_128_hexdigest(v) for k, v in expected.items()}
    for key in (k for k in dst if k.endswith("_BABEL_MANIFEST.json")):
        unit = key.rpartition("/")[0]
        for rec in json.loads(dst[key])["files"]:
            assert rec["xxh3_128"] == xxhash.xxh3_128_hexdigest(dst[f"{unit}/{rec['path']}"])


def object_gets(proxy: ChaosProxy) -> list[str]:
    """Paths of GETs of objects (not listings: those are GETs of the bucket with a query)."""
    return [r.path for r in proxy.records() if r.method == "GET" and r.path.strip("/").count("/") >= 1]


# ---------------------------------------------------------------------- copy, no-op, changes
def test_full_copy_is_identical_and_skips_uncommitted_units(env: Env) -> None:
    made = make_units(env, units=3, small=8, big=1)
    env.put("datasets/incomplete/part-0", b"not committed yet")
    syncer = Syncer(load_config(env.write_config(DATASETS)))
    summary = sync_once(syncer)
    assert summary["ok"], summary["errors"]
    assert summary["units_published"] == 3
    assert summary["bytes_copied"] == sum(len(v) for v in made.values())
    assert_identical(env, made)
    assert env.uploads() == []


def test_noop_resync_moves_no_bytes_and_makes_no_head(env: Env) -> None:
    made = make_units(env, units=4, small=25)
    pa, pb = env.proxy(env.a), env.proxy(env.b)
    path = env.write_config(DATASETS, endpoint_a=pa.endpoint_url, endpoint_b=pb.endpoint_url)
    first = sync_once(Syncer(load_config(path)))
    assert first["ok"] and first["objects_copied"] == len(made)
    assert pa.count("HEAD") == pb.count("HEAD") == 0  # copies stream with If-Match, no HEAD either
    pa.reset_counts()
    pb.reset_counts()
    second = sync_once(Syncer(load_config(path)))  # a new process-equivalent: same state dir
    assert second["ok"]
    assert second["bytes_sent"] == second["bytes_copied"] == second["objects_copied"] == 0
    assert second["objects_skipped"] == len(made)
    for proxy in (pa, pb):
        assert proxy.count("HEAD") == 0
        assert object_gets(proxy) == []
        assert set(proxy.method_counts()) == {"GET"}  # listings only: no PUT, POST or DELETE


def test_awkward_keys_through_the_signed_requests(env: Env) -> None:
    """Listings, reads, PUTs and parts are signed by babel_sync.sigv4: keys that need URI encoding
    (space, +, =, &, %, unicode) and a multipart object must be accepted by the server and copied."""
    made = {f"datasets/odd dir+x/{name}": os.urandom(2048) for name in
            ("a b.bin", "plus+eq=amp&.bin", "pct%20lit.bin", "ünï-çødé.bin", "tilde~(1).bin")}
    made["datasets/odd dir+x/big & multi"] = os.urandom(11 * MiB)  # over the 8MiB threshold: parts
    made["datasets/odd dir+x/_COMMITTED"] = b"{}"
    for key, data in made.items():
        env.put(key, data)
    path = env.write_config(DATASETS)
    first = sync_once(Syncer(load_config(path)))
    assert first["ok"], first["errors"]
    assert_identical(env, made)
    second = sync_once(Syncer(load_config(path)))
    assert second["ok"] and second["bytes_sent"] == 0 and second["objects_skipped"] == len(made)


def test_one_percent_edits_renames_deletes_move_only_those(env: Env) -> None:
    made = make_units(env, units=1, small=200, small_size=16 * 1024)
    path = env.write_config(DATASETS.replace('unit_marker = "_COMMITTED"', "delete = true"))
    assert sync_once(Syncer(load_config(path)))["ok"]
    rng = random.Random(7)
    keys = sorted(k for k in made if "part-" in k)
    picked = rng.sample(keys, 6)
    edits, renames, deletes = picked[:2], picked[2:4], picked[4:]
    expected = dict(made)
    for key in edits:  # same size, new content: only the ETag tells
        data = bytearray(made[key])
        data[100] ^= 0xFF
        env.put(key, bytes(data))
        expected[key] = bytes(data)
    for key in renames:
        env.put(key + "-renamed", made[key])
        env.delete(key)
        expected[key + "-renamed"] = expected.pop(key)
    for key in deletes:
        env.delete(key)
        del expected[key]
    pa = env.proxy(env.a)
    path = env.write_config(DATASETS.replace('unit_marker = "_COMMITTED"', "delete = true"),
                            endpoint_a=pa.endpoint_url)
    summary = sync_once(Syncer(load_config(path)))
    assert summary["ok"], summary["errors"]
    moved = edits + [k + "-renamed" for k in renames] + ["datasets/v0/_COMMITTED"]
    assert sorted(p.split("/", 2)[2] for p in object_gets(pa)) == sorted(moved)
    assert summary["bytes_copied"] == sum(len(expected[k]) for k in moved)
    assert summary["objects_deleted"] == 4  # the deleted files and the renamed files' old names
    assert_identical(env, expected)


# ---------------------------------------------------------------------- crash safety
def _cli(config: Path, *args: str, env_extra: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen[str]:
    environ = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([PY, "-m", "babel_sync.cli", *args, "--config", str(config)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environ, **kwargs)


def _durable_bytes(env: Env, made: dict[str, bytes], prefix: str) -> int:
    """Bytes already at the destination: whole objects with the right content and uploaded parts."""
    client = env.b.client()
    dst = _read_all(env.b, env.bucket_b, prefix)
    total = sum(len(v) for k, v in dst.items() if made.get(k) == v and not k.endswith("_COMMITTED"))
    for up in env.uploads():
        parts = client.list_parts(Bucket=env.bucket_b, Key=up["Key"], UploadId=up["UploadId"]).get("Parts", [])
        total += sum(p["Size"] for p in parts)
    return total


def test_kill9_at_random_points_converges_without_orphan_uploads(env: Env) -> None:
    """Four rounds, each on a fresh destination prefix: kill -9 at a random point (two by time, two by
    bytes sent), then a run to completion that must converge, re-send at most 1.1x the bytes that were
    not durable, and leave no multipart upload behind. (Ten rounds repeated the same two kinds of kill
    at twice the cost of a ~2 s CLI start each.)"""
    made = make_units(env, units=2, small=8, small_size=256 * 1024, big=1, big_size=11 * MiB)
    total = sum(len(v) for v in made.values())
    rng = random.Random(1234)
    kinds = ["bytes", "time"] * 2
    rng.shuffle(kinds)
    killed = 0
    for round_no, kind in enumerate(kinds):
        prefix = f"round{round_no}/"
        path = env.write_config(DATASETS, dest_prefix=prefix,
                                sync='bandwidth_limit_bytes = "32MiB"\ntransfers = 4\npart_concurrency = 2')
        at = rng.randrange(MiB, total - MiB) if kind == "bytes" else rng.uniform(0.5, 1.0)
        proc = _cli(path, "once", env_extra={"BABEL_SYNC_CRASH_AFTER_BYTES": str(int(at))} if kind == "bytes" else {})
        if kind == "time":
            try:
                proc.wait(timeout=at)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=120)
        killed += proc.returncode == -signal.SIGKILL
        dst = _read_all(env.b, env.bucket_b, prefix)
        for unit in {k.rpartition("/")[0] for k in made}:  # never a marker over a partial unit
            if f"{unit}/_COMMITTED" in dst:
                assert all(dst.get(k) == v for k, v in made.items() if k.startswith(unit + "/"))
        undurable = total - _durable_bytes(env, made, prefix)
        proc = _cli(path, "once")
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        summary = json.loads(out)
        assert summary["ok"]
        # At most 1.1x what was not durable, plus one small file killed between its PUT and the
        # journal write, plus the markers.
        assert summary["bytes_sent"] <= 1.1 * undurable + 256 * 1024 + 4096, (summary, undurable)
        dst = _read_all(env.b, env.bucket_b, prefix)
        assert dst.keys() - made.keys() == {f"datasets/v{u}/_BABEL_MANIFEST.json" for u in range(2)}
        assert all(dst[k] == v for k, v in made.items())
        assert env.uploads() == []
    assert killed >= len(kinds) - 1, "the kill points must land while the copy is still running"


# ---------------------------------------------------------------------- faults
def test_ten_percent_503_converges(env: Env) -> None:
    made = make_units(env, units=2, small=20, big=1, big_size=10 * MiB)
    pa, pb = env.proxy(env.a, fail_ratio=0.1, seed=3), env.proxy(env.b, fail_ratio=0.1, seed=4)
    path = env.write_config(DATASETS, sync="retry_attempts = 10", endpoint_a=pa.endpoint_url,
                            endpoint_b=pb.endpoint_url)
    summary = sync_once(Syncer(load_config(path)))
    assert summary["ok"], summary["errors"]
    assert pa.count(include_injected=True) > pa.count(include_injected=False)
    assert any(r.injected for r in pb.records())
    assert_identical(env, made)
    assert env.uploads() == []


def test_reader_never_sees_an_incomplete_unit(env: Env) -> None:
    made = make_units(env, units=3, small=30, big=1, big_size=9 * MiB)
    path = env.write_config(DATASETS.replace('unit_marker = "_COMMITTED"', "delete = true"),
                            sync="transfers = 2")
    stop = threading.Event()
    violations: list[str] = []
    checked = [0]
    client = env.b.client()

    def etag(key: str) -> str | None:
        try:
            return str(client.head_object(Bucket=env.bucket_b, Key=key)["ETag"])
        except Exception:
            return None

    def reader() -> None:
        while not stop.is_set():
            listing = client.list_objects_v2(Bucket=env.bucket_b, Prefix="mirror/").get("Contents", [])
            keys = {o["Key"] for o in listing}
            for key in sorted(keys):
                if not key.endswith(("_COMMITTED", "_BABEL_MANIFEST.json")):
                    continue
                unit = key.rpartition("/")[0]
                before = (etag(f"{unit}/_COMMITTED"), etag(f"{unit}/_BABEL_MANIFEST.json"))
                if before[1] is None:
                    if before[0] is not None:
                        violations.append(f"marker without manifest: {unit}")
                    continue
                if before[0] is None:  # a manifest without its marker is an unpublished unit: never trusted
                    continue
                try:
                    manifest = json.loads(client.get_object(Bucket=env.bucket_b,
                                                            Key=f"{unit}/_BABEL_MANIFEST.json")["Body"].read())
                    bad = []
                    for rec in manifest["files"]:
                        if rec["path"] == "_COMMITTED":
                            continue
                        body = client.get_object(Bucket=env.bucket_b, Key=f"{unit}/{rec['path']}")["Body"].read()
                        if xxhash.xxh3_128_hexdigest(body) != rec["xxh3_128"]:
                            bad.append(rec["path"])
                except client.exceptions.NoSuchKey as exc:
                    bad = [str(exc)]
                after = (etag(f"{unit}/_COMMITTED"), etag(f"{unit}/_BABEL_MANIFEST.json"))
                # A unit that was unpublished while we read it is the writer's legitimate update.
                if bad and after == before:
                    violations.append(f"{unit}: {bad[:3]}")
                checked[0] += 1

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        syncer = Syncer(load_config(path))
        assert sync_once(syncer)["ok"]
        rng = random.Random(5)
        for key in rng.sample(sorted(k for k in made if "v1/part" in k), 10):
            env.put(key, rng.randbytes(64 * 1024))
        env.put("datasets/v1/big-0", rng.randbytes(9 * MiB))
        make_units(env, units=1, small=10, prefix="datasets/w")
        assert sync_once(syncer)["ok"]
        for key in [k for k in made if k.startswith("datasets/v0/")]:
            env.delete(key)
        assert sync_once(syncer)["ok"]
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert checked[0] > 0
    assert violations == []
    assert not any(k.startswith("datasets/v0/") for k in env.dst())


def test_source_change_during_copy_is_a_typed_error_and_nothing_is_published(env: Env) -> None:
    made = make_units(env, units=1, small=3, big=1, big_size=10 * MiB)
    syncer = Syncer(load_config(env.write_config(DATASETS)))
    rule = syncer.config.rule("datasets")
    plan = syncer.plan(rule, "b")
    env.put("datasets/v0/big-0", os.urandom(10 * MiB))  # the ETag moves after the listing
    from babel_sync.transfer import Stats

    errors: list[dict[str, Any]] = []
    syncer.execute([plan], Stats(), errors)
    assert [e["type"] for e in errors] == ["SourceChangedError"]
    assert errors[0]["url"].endswith(f"{env.bucket_a}/datasets/v0/big-0")
    assert issubclass(SourceChangedError, OSError)
    assert "datasets/v0/_COMMITTED" not in env.dst()
    assert env.uploads() == []
    summary = sync_once(syncer)
    assert summary["ok"], summary["errors"]
    assert_identical(env, {**made, "datasets/v0/big-0": env.src()["datasets/v0/big-0"]})


def test_unreachable_endpoint_names_the_url(env: Env) -> None:
    make_units(env, units=1, small=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    path = env.write_config(DATASETS, sync="retry_attempts = 2", endpoint_b=f"http://127.0.0.1:{port}")
    summary = sync_once(Syncer(load_config(path)))
    assert not summary["ok"]
    [err] = summary["errors"]
    assert err["type"] == SiteUnreachableError.__name__
    assert f"127.0.0.1:{port}" in err["error"] and "'b'" in err["error"]
    proc = _cli(path, "once")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and json.loads(out)["errors"][0]["type"] == "SiteUnreachableError"


def test_unauthorized_endpoint_is_a_typed_error_without_the_secret(env: Env) -> None:
    make_units(env, units=1, small=2)
    path = env.write_config(DATASETS, secret_b="wrong-secret-xyz")
    summary = sync_once(Syncer(load_config(path)))
    [err] = summary["errors"]
    assert err["type"] == SiteAuthError.__name__ and "site 'b'" in err["error"]
    assert "wrong-secret-xyz" not in json.dumps(summary)
    assert env.dst() == {}


# ---------------------------------------------------------------------- rules and commands
def test_keep_last_and_priority(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    make_steps(env, "run1", range(1, 6))
    make_units(env, units=2, small=3)
    rules = DATASETS.replace('unit_marker = "_COMMITTED"', 'priority = "low"') + """
[[rules]]
name = "ckpt"
source = "a"
destinations = ["b"]
include = ["checkpoints/run1/**"]
priority = "high"
keep_last = 3
"""
    syncer = Syncer(load_config(env.write_config(rules, sync="transfers = 1")))
    caplog.set_level("INFO", logger="babel_sync")
    assert sync_once(syncer)["ok"]
    order = [r.__dict__["unit"] for r in caplog.records if r.getMessage() == "published unit"]
    assert "checkpoints" in order[0] and "checkpoints" in order[2] and "datasets" in order[-1]
    steps = lambda: sorted({k.split("/")[2] for k in env.dst() if k.startswith("checkpoints/")})  # noqa: E731
    assert steps() == ["step_3", "step_4", "step_5"]
    make_steps(env, "run1", range(6, 7))
    assert sync_once(syncer)["ok"]
    assert steps() == ["step_4", "step_5", "step_6"]


def test_verify_finds_corruption_and_the_next_pass_recopies_only_it(env: Env) -> None:
    made = make_units(env, units=2, small=10)
    syncer = Syncer(load_config(env.write_config(DATASETS)))
    assert sync_once(syncer)["ok"]
    assert verify(syncer, "datasets", sample=1.0)["ok"]
    victim = "datasets/v1/part-0003"
    env.b.client().put_object(Bucket=env.bucket_b, Key=f"mirror/{victim}", Body=os.urandom(len(made[victim])))
    result = verify(syncer, "datasets", sample=1.0)
    assert not result["ok"] and victim in result["errors"][0]["url"]
    summary = sync_once(syncer)
    assert summary["ok"]
    assert summary["bytes_copied"] == len(made[victim]) + len(made["datasets/v1/_COMMITTED"])
    assert verify(syncer, "datasets", sample=1.0)["ok"]
    assert_identical(env, made)


def test_cli_once_with_env_credentials_and_server_side_copy(s3_server: SeaweedServer, tmp_path: Path) -> None:
    """The issue's TOML, credentials from the environment, both sites on one endpoint (server-side copy)."""
    n = next(_ids)
    src, dst = s3_server.make_bucket(f"babel-ss-a-{n}"), s3_server.make_bucket(f"babel-ss-b-{n}")
    client = s3_server.client()
    data = {f"datasets/v1/f{i}": os.urandom(50_000) for i in range(5)}
    data["datasets/v1/big"] = os.urandom(9 * MiB)
    data["datasets/v1/_COMMITTED"] = b"{}"
    for key, body in data.items():
        client.put_object(Bucket=src, Key=key, Body=body)
    config = tmp_path / "babel.toml"
    config.write_text(f"""
[sites.a]
url = "s3://{src}"                        # any fsspec root
endpoint_url = "{s3_server.endpoint_url}"   # storage options go beside url
[sites.b]
url = "s3://{dst}"
[[rules]]
name = "datasets"
source = "a"
destinations = ["b"]
include = ["datasets/**"]
unit_marker = "_COMMITTED"   # optional: what makes a directory a complete unit
""")
    environ = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
               "AWS_ENDPOINT_URL": s3_server.endpoint_url, "BABEL_STATE_DIR": str(tmp_path / "state"),
               "BABEL_MULTIPART_THRESHOLD_SIZE": "8MiB", "BABEL_MIN_PART_SIZE": "5MiB",
               "BABEL_LISTING_SETTLE_SECONDS": "0"}
    proc = _cli(config, "once", "--log-format", "json", env_extra=environ)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert summary["ok"] and summary["bytes_sent"] == len(data["datasets/v1/_COMMITTED"])  # server-side
    assert s3_server.secret_key not in out + err
    got = {k: client.get_object(Bucket=dst, Key=k)["Body"].read() for k in data}
    assert got == data
    status = _cli(config, "status", env_extra=environ)
    out, _ = status.communicate(timeout=60)
    [row] = json.loads(out)["rules"]
    assert row["in_sync"] and row["lag_seconds"] == 0 and row["last_error"] is None
    s3_server.delete_bucket(src)
    s3_server.delete_bucket(dst)


def test_daemon_syncs_serves_metrics_and_stops_on_sigterm(env: Env) -> None:
    made = make_units(env, units=1, small=5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = env.write_config(DATASETS)
    proc = _cli(path, "run", "--interval", "0.3", "--metrics-port", str(port), "--site", "b")
    try:
        deadline = time.monotonic() + 60
        while "datasets/v0/_COMMITTED" not in env.dst() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert_identical(env, made)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'babel_bytes_copied_total{dest="b",rule="datasets"}' in body
        assert "babel_lag_seconds" in body and "babel_queue_depth" in body
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def test_sync_options_are_frozen(env: Env) -> None:
    cfg = load_config(env.write_config(DATASETS))
    with pytest.raises(AttributeError):
        cfg.options.transfers = 3  # type: ignore[misc]
    assert replace(cfg.options, transfers=3).transfers == 3


def test_manifest_left_without_its_marker_is_unpublished_before_files_change(env: Env) -> None:
    """A kill between the manifest and marker writes leaves a manifest alone; it must go before files change."""
    made = make_units(env, units=1, small=3)
    syncer = Syncer(load_config(env.write_config(DATASETS)))
    assert sync_once(syncer)["ok"]
    env.b.client().delete_object(Bucket=env.bucket_b, Key="mirror/datasets/v0/_COMMITTED")
    made["datasets/v0/part-0001"] = os.urandom(64 * 1024)
    env.put("datasets/v0/part-0001", made["datasets/v0/part-0001"])
    [job] = syncer.plan(syncer.config.rule("datasets"), "b").jobs
    assert job.was_published and [o.key for o in job.copy] == ["datasets/v0/part-0001"]
    assert sync_once(syncer)["ok"]
    assert_identical(env, made)


def test_upload_completed_just_before_a_crash_is_not_sent_again(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The window between CompleteMultipartUpload and the journal update: the next pass re-reads the source
    for the content hash, checks the multipart ETag against the journaled parts, and sends nothing."""
    made = make_units(env, units=1, small=0, big=1, big_size=11 * MiB)
    syncer = Syncer(load_config(env.write_config(DATASETS)))
    real = syncer.journal.drop_upload

    def crash(*args: Any) -> None:
        raise RuntimeError("killed after CompleteMultipartUpload")

    monkeypatch.setattr(syncer.journal, "drop_upload", crash)
    first = sync_once(syncer)
    assert not first["ok"] and "killed after" in first["errors"][0]["error"]
    monkeypatch.setattr(syncer.journal, "drop_upload", real)
    second = sync_once(syncer)
    assert second["ok"], second["errors"]
    assert second["bytes_sent"] == len(made["datasets/v0/_COMMITTED"])
    assert second["bytes_resumed"] == 11 * MiB
    assert_identical(env, made)
    assert env.uploads() == []


def test_no_delete_after_a_listing_error(env: Env) -> None:
    made = make_units(env, units=2, small=3)
    rules = DATASETS.replace('unit_marker = "_COMMITTED"', "delete = true")
    assert sync_once(Syncer(load_config(env.write_config(rules))))["ok"]
    for key in [k for k in made if k.startswith("datasets/v0/")]:
        env.delete(key)  # a real deletion at the source...
    broken = env.proxy(env.a, fail_ratio=1.0)  # ...that must not propagate while the source cannot be listed
    path = env.write_config(rules, sync="retry_attempts = 2", endpoint_a=broken.endpoint_url)
    summary = sync_once(Syncer(load_config(path)))
    assert not summary["ok"] and summary["objects_deleted"] == 0
    assert summary["errors"][0]["type"] == "SiteUnreachableError"
    assert "datasets/v0/_COMMITTED" in env.dst()


# ---------------------------------------------------------------------- review fixes
CKPT = """
[[rules]]
name = "ckpt"
source = "a"
destinations = ["b"]
include = ["checkpoints/**"]
keep_last = 3
"""


def _markers(env: Env) -> list[str]:
    return sorted(k.rpartition("/")[0] for k in env.dst() if k.endswith("/_COMMITTED"))


def test_keep_last_keeps_old_units_when_the_new_ones_fail_or_the_pass_stops(env: Env) -> None:
    from babel_sync.transfer import Stats

    make_steps(env, "run1", range(1, 4))
    syncer = Syncer(load_config(env.write_config(CKPT)))
    assert sync_once(syncer)["ok"]
    make_steps(env, "run1", range(4, 7))
    plan = syncer.plan(syncer.config.rule("ckpt"), "b")
    assert plan.retire_units == [f"checkpoints/run1/step_{s}" for s in (1, 2, 3)]
    for step in (4, 5, 6):  # every new unit's copy fails: its source moves after the listing
        env.put(f"checkpoints/run1/step_{step}/part-0", b"rewritten")
    errors: list[dict[str, Any]] = []
    syncer.execute([plan], Stats(), errors)
    assert {e["type"] for e in errors} == {"SourceChangedError"}
    assert _markers(env) == [f"checkpoints/run1/step_{s}" for s in (1, 2, 3)]
    syncer.stopping.set()  # a stopped pass removes nothing either
    syncer.execute([syncer.plan(syncer.config.rule("ckpt"), "b")], Stats(), [])
    assert _markers(env) == [f"checkpoints/run1/step_{s}" for s in (1, 2, 3)]
    syncer.stopping.clear()
    assert sync_once(syncer)["ok"]
    assert _markers(env) == [f"checkpoints/run1/step_{s}" for s in (4, 5, 6)]


def test_keep_last_applies_per_parent_directory(env: Env) -> None:
    make_steps(env, "run1", range(1, 6), small=1)
    make_steps(env, "run2", range(1, 3), small=1)
    assert sync_once(Syncer(load_config(env.write_config(CKPT))))["ok"]
    assert _markers(env) == [*(f"checkpoints/run1/step_{s}" for s in (3, 4, 5)),
                             *(f"checkpoints/run2/step_{s}" for s in (1, 2))]


def _failing_deletes(syncer: Syncer, key: str, code: str, times: int) -> list[int]:
    """Make the destination's DeleteObjects report ``key`` in ``Errors`` (not deleting it) ``times`` times.

    SeaweedFS never answers per-key errors for an admin identity, so the real call is made for the other
    keys and the failure of ``key`` is injected into its real response.
    """
    client, calls = syncer.store("b").client, [0]
    client.__dict__.pop("delete_objects", None)  # an earlier injection
    real = client.delete_objects

    def delete_objects(**kwargs: Any) -> Any:
        objs = kwargs["Delete"]["Objects"]
        hit = [o for o in objs if o["Key"].endswith(key)]
        if not hit or calls[0] >= times:
            return real(**kwargs)
        calls[0] += 1
        rest = [o for o in objs if o not in hit]
        resp = real(**{**kwargs, "Delete": {**kwargs["Delete"], "Objects": rest}}) if rest else {}
        return {**resp, "Errors": [{"Key": hit[0]["Key"], "Code": code, "Message": "injected"}]}

    client.delete_objects = delete_objects
    return calls


def test_failed_marker_delete_is_a_typed_error_and_no_file_changes(env: Env) -> None:
    made = make_units(env, units=1, small=3)
    syncer = Syncer(load_config(env.write_config(DATASETS, sync="retry_attempts = 3")))
    assert sync_once(syncer)["ok"]
    env.put("datasets/v0/part-0001", b"new content")
    calls = _failing_deletes(syncer, "datasets/v0/_COMMITTED", "AccessDenied", times=99)
    summary = sync_once(syncer)
    assert not summary["ok"] and calls[0] == 1  # permanent: not retried
    [err] = summary["errors"]
    assert err["type"] == "DeleteError" and f"{env.bucket_b}/mirror/datasets/v0/_COMMITTED" in err["error"]
    assert_identical(env, made)  # the marker stayed, so nothing under it was touched
    calls = _failing_deletes(syncer, "datasets/v0/_COMMITTED", "InternalError", times=1)
    assert sync_once(syncer)["ok"] and calls[0] == 1  # transient: retried
    assert_identical(env, {**made, "datasets/v0/part-0001": b"new content"})


def test_interrupted_update_of_a_published_unit_recopies_only_changed_files(env: Env) -> None:
    from babel_sync.transfer import Stats

    made = make_units(env, units=1, small=4)
    syncer = Syncer(load_config(env.write_config(DATASETS)))
    assert sync_once(syncer)["ok"]
    env.put("datasets/v0/part-0001", b"edit 1")
    plan = syncer.plan(syncer.config.rule("datasets"), "b")
    env.put("datasets/v0/part-0001", b"edit 2")  # the copy fails after the unit was unpublished
    errors: list[dict[str, Any]] = []
    syncer.execute([plan], Stats(), errors)
    assert [e["type"] for e in errors] == ["SourceChangedError"]
    assert "datasets/v0/_COMMITTED" not in env.dst() and "datasets/v0/_BABEL_MANIFEST.json" not in env.dst()
    summary = sync_once(Syncer(load_config(env.write_config(DATASETS))))  # a fresh process: journal only
    assert summary["ok"], summary["errors"]
    assert summary["bytes_sent"] == len(b"edit 2") + len(made["datasets/v0/_COMMITTED"])
    assert_identical(env, {**made, "datasets/v0/part-0001": b"edit 2"})


def test_unit_whose_marker_is_newer_than_the_listing_waits_a_daemon_pass(env: Env) -> None:
    """A daemon pass (no waiting) leaves a fresh unit for its next pass, and says so: not in sync."""
    made = make_units(env, units=1, small=2)
    settle = env.write_config(DATASETS, sync="listing_settle_seconds = 3600")
    summary = sync_once(Syncer(load_config(settle)), wait=False)
    assert not summary["ok"] and summary["objects_copied"] == 0 and env.dst() == {}
    assert summary["units_held_back"] == 1 and summary["bytes_held_back"] == sum(len(v) for v in made.values())
    assert sync_once(Syncer(load_config(env.write_config(DATASETS))))["ok"]
    assert_identical(env, made)
