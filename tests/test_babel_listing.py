"""babel_sync's parallel metadata prefetch: adaptive key-space splitting, complete and spread over workers.

SeaweedFS (path-component order, its own ``StartAfter`` rules) for the 20,000-key flat prefix and the
skewed tree; our small ListObjectsV2 server (``tests/listing_server.py``, S3's byte order) for awkward
names and for the 10^5-object memory budget.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import urllib3

from babel_sync.config import Site, SyncOptions
from babel_sync.listing import Entry
from babel_sync.store import S3Store
from pcache.testing import SeaweedServer

HERE = Path(__file__).parent
FLAT = [f"flat/k{i:07d}" for i in range(20_000)]
SKEW = ([f"skew/big/f{i:05d}" for i in range(2_500)]  # one large directory
        + [f"skew/mid/{d}/f{i:03d}" for d in "abcde" for i in range(300)]
        + [f"skew/small{i:03d}/f{j}" for i in range(100) for j in range(5)]  # many small ones
        + [f"skew/deep/a/b/c/d/f{i}" for i in range(40)] + [f"skew/top{i}" for i in range(20)]
        + [f"skew/big.v{i}" for i in range(20)] + [f"skew/big-{i}/x" for i in range(20)])  # sort around big/


@pytest.fixture(scope="module")
def tree(s3_server: SeaweedServer) -> Iterator[str]:
    """A bucket holding FLAT and SKEW (empty objects, created through the filer: 2x faster than S3 PUTs)."""
    bucket = s3_server.make_bucket("babel-listing-tree")
    http = urllib3.PoolManager(maxsize=32)
    base = f"http://127.0.0.1:{s3_server.ports['filer']}/buckets/{bucket}/"
    with ThreadPoolExecutor(32) as pool:
        statuses = set(pool.map(lambda k: http.request("PUT", base + k, body=b"").status, FLAT + SKEW))
    assert statuses == {201}
    yield bucket
    s3_server.delete_bucket(bucket)


def _store(endpoint: str, bucket: str, key: str, secret: str, workers: int = 8) -> S3Store:
    return S3Store(Site("a", f"s3://{bucket}", endpoint, key=key, secret=secret),
                   SyncOptions(listing_workers=workers, retry_base_delay=0.01))


def _parallel(store: S3Store, prefix: str) -> tuple[list[str], object]:
    got: list[Entry] = []
    stats = store.list_tree([prefix], got.extend)
    return [e.key for e in got], stats


@pytest.mark.parametrize("prefix,expected", [("flat/", FLAT), ("skew/", SKEW)], ids=["flat-20000", "skewed-tree"])
def test_listing_is_complete_and_spread_over_the_workers(s3_server: SeaweedServer, tree: str, prefix: str,
                                                         expected: list[str]) -> None:
    store = _store(s3_server.endpoint_url, tree, s3_server.access_key, s3_server.secret_key)
    keys, stats = _parallel(store, prefix)
    serial: list[Entry] = []
    store.list_serial(prefix, serial.extend)
    assert sorted(e.key for e in serial) == sorted(expected)  # the serial listing sees them all
    assert set(keys) == set(expected)  # so does the split one (a range may list a key twice, never skip one)
    assert len(keys) - len(set(keys)) < len(expected) // 5  # names sorting around a directory (big-, big.)
    per_worker = stats.per_worker  # type: ignore[attr-defined]
    assert stats.splits >= 1 and len(per_worker) >= 4, stats  # type: ignore[attr-defined]
    assert max(per_worker.values()) <= stats.requests // 2, stats  # type: ignore[attr-defined]
    assert stats.max_in_flight >= 4, stats  # type: ignore[attr-defined]
    if prefix == "skew/":
        assert stats.probes >= 1, stats  # the keys have a delimiter: directories become boundaries  # type: ignore[attr-defined]


def test_byte_order_server_with_awkward_names() -> None:
    """S3 lists in byte order ('a-x' < 'a.x' < 'a/x'), SeaweedFS does not: ranges must hold under both."""
    sys.path.insert(0, str(HERE))
    from listing_server import serve

    rng = random.Random(7)
    keys = {"r/" + "".join(rng.choice("ab-./0Z é+%") for _ in range(rng.randint(1, 9))) for _ in range(12_000)}
    keys = {k for k in keys if "//" not in k and not k.endswith("/")}
    server = serve(sorted(keys))
    try:
        store = _store(f"http://127.0.0.1:{server.server_address[1]}", "bkt", "AK", "SK")
        got, stats = _parallel(store, "r/")
        assert set(got) == keys and stats.splits >= 1  # type: ignore[attr-defined]
    finally:
        server.shutdown()


def test_listing_100k_objects_stays_within_the_rss_budget(tmp_path: Path) -> None:
    """Listings stream to disk: the peak RSS grows by at most 300 bytes per listed object."""
    count = 100_000
    server = subprocess.Popen([sys.executable, str(HERE / "listing_server.py"), f"flat:big/k:{count}"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdin is not None
    try:
        ready = server.stdout.readline().split()
        assert ready and ready[0] == "READY", ready
        # The benchmark's listing process: warm up, reset the peak RSS, list into an on-disk listing.
        spec = {"endpoint": ready[1], "bucket": "bkt", "key": "AK", "secret": "SK", "prefix": "big/",
                "warm": "big/k000000", "state": str(tmp_path / "state")}
        probe = subprocess.run([sys.executable, "-m", "bench.babel_bench", "rss"], input=json.dumps(spec),
                               capture_output=True, text=True, timeout=240, cwd=HERE.parent)
        assert probe.returncode == 0, probe.stderr[-3000:]
        result = json.loads(probe.stdout)
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    assert result["objects"] == count
    assert result["growth"] / count <= 300, result
