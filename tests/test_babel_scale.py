"""babel_sync at the report's scale: once right after a commit, one unit convention, adaptive sharding and
sampled CRC verification, between two real SeaweedFS servers (fixtures from test_babel_sync)."""
# ruff: noqa: F811 - the tests take the imported fixtures (env, server_b) as arguments

from __future__ import annotations

import json
import os
import random
import threading
import time

import numpy as np
import pytest
import xxhash
from test_babel_sync import DATASETS, Env, MiB, assert_identical, env, make_units, server_b  # noqa: F401

from babel_sync import Syncer, load_config, sync_once, verify
from babel_sync.cli import main
from babel_sync.shard import PartBudget, Window
from lingcore.marker import parse_marker

DEFAULT_MARGIN = "listing_settle_seconds = 2.0"  # the default; Env.write_config sets 0 unless told
MINIMAL_RULE = """
[[rules]]
name = "datasets"
source = "a"
destinations = ["b"]
include = ["datasets/**"]
"""


def test_once_right_after_a_commit_copies_the_unit_with_the_default_margin(
        env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    made = make_units(env, units=2, small=3)
    config = env.write_config(DATASETS, sync=DEFAULT_MARGIN)
    summary = sync_once(Syncer(load_config(config)))  # the markers are younger than the margin
    assert summary["ok"], summary["errors"]
    assert summary["units_waited"] >= 1  # held back by the first listing, waited out, planned again
    assert summary["units_published"] == 2 and summary["units_held_back"] == 0
    assert_identical(env, made)
    capsys.readouterr()
    assert main(["status", "--config", str(config)]) == 0
    [row] = json.loads(capsys.readouterr().out)["rules"]
    assert row["in_sync"] and row["held_units"] == 0


def test_packed_dataset_is_a_unit_under_the_minimal_config(env: Env) -> None:
    """`loaders pack` writes the commit marker after index.json; a corpus whose pack is running is skipped."""
    from loaders import write_corpus

    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 250, size=int(n), dtype=np.uint16) for n in rng.integers(50, 400, size=300)]
    opts = env.a.storage_options()
    write_corpus(f"s3://{env.bucket_a}/datasets/v1", docs, format="megatron", shard_size="16KiB",
                 storage_options=opts)
    write_corpus(f"s3://{env.bucket_a}/datasets/v2", docs[:50], format="wds", storage_options=opts)
    env.put("datasets/v2/_PACKING", b"{}")  # a pack re-run over v2 is under way: not complete
    summary = sync_once(Syncer(load_config(env.write_config(MINIMAL_RULE, sync=DEFAULT_MARGIN))))
    assert summary["ok"], summary["errors"]
    src = {k: v for k, v in env.src().items() if k.startswith("datasets/v1/")}
    assert {"datasets/v1/index.json", "datasets/v1/_COMMITTED"} <= set(src)
    assert_identical(env, src)  # v1 whole, nothing of v2
    marker = parse_marker(src["datasets/v1/_COMMITTED"])
    assert marker is not None
    listed = {f["path"]: f for f in marker["files"]}
    assert set(listed) == {k.removeprefix("datasets/v1/") for k in src if not k.endswith("_COMMITTED")}
    for path, rec in listed.items():
        assert rec["xxh3_128"] == xxhash.xxh3_128_hexdigest(src[f"datasets/v1/{path}"])


def test_one_large_object_copies_with_at_least_transfers_parts_in_flight(env: Env) -> None:
    """transfers = 8 and part_concurrency = 2: a lone large object still gets 8 ranged parts at once."""
    made = {"datasets/v0/big": os.urandom(48 * MiB), "datasets/v0/_COMMITTED": b"{}"}
    for key, data in made.items():
        env.put(key, data)
    proxy = env.proxy(env.b)
    hold = proxy.hold("PUT", None, "partNumber", stage="request", times=8)  # UploadPart requests
    config = env.write_config(DATASETS, sync="part_concurrency = 2\ntransfers = 8", endpoint_b=proxy.endpoint_url)
    result: dict[str, object] = {}
    worker = threading.Thread(target=lambda: result.update(sync_once(Syncer(load_config(config)))))
    worker.start()
    deadline = time.monotonic() + 30
    while hold.held < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    parked = hold.held
    hold.release()
    worker.join(120)
    assert parked == 8  # eight parts of one object were in flight at the same time
    assert result["ok"], result
    assert int(result["parts_in_flight_max"]) >= 8  # type: ignore[call-overload]
    assert_identical(env, made)


def test_part_window_adapts_to_the_observed_throughput() -> None:
    now = [0.0]
    win = Window(4, 12, clock=lambda: now[0])

    def round_at(rate: float) -> int:
        for _ in range(win.size):
            now[0] += 1 / rate
            win.done(1)
        return win.size

    assert round_at(100) == 4  # the first round only sets the reference
    sizes = [round_at(100 * 2 ** i) for i in range(1, 9)]
    assert sizes == sorted(sizes) and sizes[0] == 5 and sizes[-1] == 12  # faster rounds widen it, up to the pool
    assert round_at(25600) == 12  # steady: unchanged
    assert [round_at(r) for r in (1000, 300, 100, 30, 10, 3)][-2:] == [4, 4]  # slower rounds narrow it, not below 4


def test_part_budget_bounds_the_bytes_in_memory() -> None:
    from babel_sync import SyncOptions

    budget = PartBudget(SyncOptions(max_inflight_bytes=10 * MiB))
    budget.acquire(8 * MiB)
    got = threading.Event()
    waiter = threading.Thread(target=lambda: (budget.acquire(8 * MiB), got.set()))
    waiter.start()
    assert not got.wait(0.3)  # 16 MiB would not fit in 10
    budget.release(8 * MiB)
    assert got.wait(10)
    waiter.join()
    assert budget.peak == 1 and budget.slots == 8 and budget.pool == 16


def test_sampled_verify_finds_a_flipped_range_at_the_documented_rate(env: Env) -> None:
    """RATE 0.25 over 16 chunks checks 4: a run finds one bad chunk with probability 4/16 (docs), and
    reads 4 chunks of the file, not all of it; --full finds it every time."""
    chunk = 64 * 1024
    data = os.urandom(16 * chunk)
    env.put("datasets/v0/blob", data)
    env.put("datasets/v0/_COMMITTED", b"{}")
    syncer = Syncer(load_config(env.write_config(DATASETS, sync='verify_chunk_size = "64KiB"')))
    assert sync_once(syncer)["ok"]
    # Corrupt chunk 5 at the destination where metadata cannot see it: the bytes change and the
    # manifest's ETag follows (a writer or disk fault that S3's own checks let through).
    bad = bytearray(data)
    bad[5 * chunk + 100:5 * chunk + 300] = bytes(b ^ 0xFF for b in bad[5 * chunk + 100:5 * chunk + 300])
    client, bucket = env.b.client(), env.bucket_b
    etag = client.put_object(Bucket=bucket, Key="mirror/datasets/v0/blob", Body=bytes(bad))["ETag"].strip('"')
    man_key = "mirror/datasets/v0/_BABEL_MANIFEST.json"
    manifest = json.loads(client.get_object(Bucket=bucket, Key=man_key)["Body"].read())
    for rec in manifest["files"]:
        if rec["path"] == "blob":
            assert len(rec["chunks"]) == 16 * 16 and rec["chunk_size"] == chunk
            rec["dest_etag"] = etag
    client.put_object(Bucket=bucket, Key=man_key, Body=json.dumps(manifest).encode())
    found = 0
    for seed in range(100):
        result = verify(syncer, "datasets", sample=0.25, repair=False, rng=random.Random(seed))
        assert result["chunks_verified"] == 4, result  # 0.25 of the file's bytes
        found += not result["ok"]
        if not result["ok"]:
            assert "chunk 5 " in result["errors"][0]["error"]
    assert 12 <= found <= 40, found  # binomial(100, 0.25): mean 25, standard deviation 4.3
    for _ in range(3):
        result = verify(syncer, "datasets", sample=1.0, repair=False)
        assert not result["ok"] and result["errors"][0]["url"].endswith("datasets/v0/blob")
