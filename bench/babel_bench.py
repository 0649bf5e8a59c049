"""babel_sync at scale (issue 17): listing, no-op re-sync, one large object, sampled verify, listing memory.

Between two real SeaweedFS servers (the runner's one is the source, this module starts the destination),
with a ChaosProxy in its own process between babel-sync and the source that waits 20 ms before every
response, as a region away would. Every baseline runs in the same run, on the same objects, through the
same proxy:

| measure | babel-sync | baseline | target |
|---|---|---|---|
| listing N objects, flat prefix | ``S3Store.list_tree`` (adaptive split, ``listing_workers``) | the same client's serial paginated listing | >= 20x |
| no-op re-sync of N objects | ``babel-sync once`` (a process) | ``rclone copy --checksum --transfers 8 --checkers 16`` | <= 0.25x the time |
| cold copy of one large object | ``babel-sync once`` | ``rclone copy`` of the same object | >= 1.5x |
| sampled verify of that file, RATE 0.01 | ``verify(sample=0.01)`` | ``verify --full`` (xxh3-128 of the whole file) | >= 30x |
| RSS growth per listed object at N | a process listing the N objects into its on-disk listing | the 300-byte budget | within |

N = ``BENCH_BABEL_OBJECTS`` (default 100,000: one unit of N empty files, ``noop/v1/f%06d``, created through
the filer, about 90 s per side), the large object is ``BENCH_BABEL_BIG_MB`` MiB (default 1024). The
destination of the no-op holds the same files and the manifest babel-sync writes (built here with
``babel_sync.units.make_manifest``), so the first pass only caches it. With N >= 100,000 a 10^6-key
listing from ``tests/listing_server.py`` (no proxy) adds an informational RSS row. Smoke run:
``BENCH_ONLY=babel BENCH_BABEL_OBJECTS=5000 BENCH_BABEL_BIG_MB=64 BENCH_REPEAT=1``.

``python -m bench.babel_bench rss`` is the listing process of the RSS rows (spec as JSON on stdin).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench._common import MiB, env_int, log, make_row, median, repeats, run_groups, selected, settle
from pcache.testing import SeaweedServer

NAME = "babel"
TARGETS = {"listing": 20.0, "noop": 4.0, "cold": 1.5, "verify": 30.0, "rss": 1.0}
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
LATENCY_S = 0.02
RSS_BUDGET = 300
EMPTY_MD5 = hashlib.md5(b"").hexdigest()


# -- helpers shared with bench.babel_mix_bench -------------------------------------------------------------
def babel_config(path: Path, a: SeaweedServer, b: SeaweedServer, src: str, dst: str, state: Path, include: str,
                 endpoint_a: str | None = None, sync: str = "") -> Path:
    """Write a babel-sync config copying ``include`` from ``a``'s bucket ``src`` to ``b``'s ``dst``."""
    (path.parent / "cred_a").write_text(f"aws_access_key_id={a.access_key}\naws_secret_access_key={a.secret_key}\n")
    (path.parent / "cred_b").write_text(f"aws_access_key_id={b.access_key}\naws_secret_access_key={b.secret_key}\n")
    path.write_text(f"""[sync]
state_dir = "{state}"
progress = false
{sync}
[sites.a]
url = "s3://{src}"
endpoint_url = "{endpoint_a or a.endpoint_url}"
credentials_file = "cred_a"
[sites.b]
url = "s3://{dst}"
endpoint_url = "{b.endpoint_url}"
credentials_file = "cred_b"
[[rules]]
name = "bench"
source = "a"
destinations = ["b"]
include = ["{include}"]
""")
    return path


def babel_cli(config: Path, command: str = "once") -> tuple[float, dict[str, Any]]:
    """Run ``babel-sync once`` as its own process; return (seconds, JSON summary)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "babel_sync.cli", command, "--config", str(config)],
                          capture_output=True, text=True, timeout=1800, cwd=REPO)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"babel-sync {command} failed ({proc.returncode}): {proc.stdout[-2000:]} "
                           f"{proc.stderr[-2000:]}")
    return seconds, json.loads(proc.stdout)


def rclone_env(a: SeaweedServer, b: SeaweedServer, endpoint_a: str | None = None) -> dict[str, str]:
    """rclone remotes ``A`` and ``B`` from the environment (credentials never on the command line)."""
    env = dict(os.environ)
    for name, srv, endpoint in (("A", a, endpoint_a or a.endpoint_url), ("B", b, b.endpoint_url)):
        env.update({f"RCLONE_CONFIG_{name}_TYPE": "s3", f"RCLONE_CONFIG_{name}_PROVIDER": "SeaweedFS",
                    f"RCLONE_CONFIG_{name}_ACCESS_KEY_ID": srv.access_key,
                    f"RCLONE_CONFIG_{name}_SECRET_ACCESS_KEY": srv.secret_key,
                    f"RCLONE_CONFIG_{name}_ENDPOINT": endpoint,
                    f"RCLONE_CONFIG_{name}_REGION": "us-east-1", f"RCLONE_CONFIG_{name}_FORCE_PATH_STYLE": "true"})
    return env


def rclone_copy(a: SeaweedServer, b: SeaweedServer, src: str, dst: str, prefix: str, endpoint_a: str | None = None,
                flags: tuple[str, ...] = ("--checksum", "--transfers", "8")) -> float:
    """Time ``rclone copy FLAGS A:src/prefix B:dst/prefix``."""
    t0 = time.perf_counter()
    subprocess.run([str(BIN / "rclone"), "copy", *flags, "--s3-no-check-bucket", f"A:{src}/{prefix}",
                    f"B:{dst}/{prefix}"], env=rclone_env(a, b, endpoint_a), check=True, capture_output=True,
                   timeout=1800)
    return time.perf_counter() - t0


# -- set-up ------------------------------------------------------------------------------------------------
def filer_put_many(server: SeaweedServer, bucket: str, keys: list[str], body: bytes = b"") -> None:
    """Create objects through the filer's HTTP API (twice the rate of signed S3 PUTs on 2 cores)."""
    import urllib3

    http = urllib3.PoolManager(maxsize=32)
    base = f"http://127.0.0.1:{server.ports['filer']}/buckets/{bucket}/"
    with ThreadPoolExecutor(32) as pool:
        bad = [s for s in pool.map(lambda k: http.request("PUT", base + k, body=body).status, keys) if s != 201]
    if bad:
        raise RuntimeError(f"filer PUT answered {bad[:3]} for {len(bad)} of {len(keys)} objects")


def _seed_destination(b: SeaweedServer, bucket: str, names: list[str], source_url: str) -> None:
    """Make the destination hold what a babel-sync copy of the unit leaves: files, manifest, marker."""
    import xxhash

    from babel_sync.units import make_manifest

    filer_put_many(b, bucket, [f"noop/v1/{n}" for n in names])
    empty = xxhash.xxh3_128_hexdigest(b"")
    files = [{"path": n, "size": 0, "etag": EMPTY_MD5, "dest_etag": EMPTY_MD5, "xxh3_128": empty} for n in names]
    files.append({"path": "_COMMITTED", "size": 2, "etag": hashlib.md5(b"{}").hexdigest(), "dest_etag": "",
                  "xxh3_128": xxhash.xxh3_128_hexdigest(b"{}")})
    client = b.client()
    client.put_object(Bucket=bucket, Key="noop/v1/_BABEL_MANIFEST.json",
                      Body=make_manifest("noop/v1", source_url, files))
    client.put_object(Bucket=bucket, Key="noop/v1/_COMMITTED", Body=b"{}")


def _proxy(server: SeaweedServer) -> Any:
    from bench.pcache_origin_bench import latency_proxy

    return latency_proxy(server, LATENCY_S)


def _rss_probe(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "bench.babel_bench", "rss"], input=json.dumps(spec),
                          capture_output=True, text=True, timeout=1200, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"rss probe failed: {proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout))


def _interleaved(runs: int, *fns: Callable[[], float]) -> list[list[float]]:
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for i, fn in enumerate(fns):
            settle()
            out[i].append(fn())
    return out


# -- the measures ------------------------------------------------------------------------------------------
def bench_scale(a: SeaweedServer, b: SeaweedServer, workdir: Path, endpoint: str) -> list[dict[str, Any]]:
    """Listing, RSS and no-op rows on one unit of N empty objects at the source (behind the proxy)."""
    from babel_sync.config import Site, SyncOptions
    from babel_sync.listdb import ListingStore
    from babel_sync.store import S3Store

    count = env_int("BENCH_BABEL_OBJECTS", 100_000)
    names = [f"f{i:06d}" for i in range(count - 1)]  # plus the marker: N objects
    a.make_bucket("babel-scale-src")
    b.make_bucket("babel-scale-dst")
    b.make_bucket("babel-scale-rclone")
    t0 = time.monotonic()
    filer_put_many(a, "babel-scale-src", [f"noop/v1/{n}" for n in names])
    a.client().put_object(Bucket="babel-scale-src", Key="noop/v1/_COMMITTED", Body=b"{}")
    _seed_destination(b, "babel-scale-dst", names, "s3://babel-scale-src/noop/v1")
    log(f"babel: {count} objects at the source and their copy at the destination in {time.monotonic() - t0:.0f}s")
    site = Site("a", "s3://babel-scale-src", endpoint, key=a.access_key, secret=a.secret_key)
    store = S3Store(site, SyncOptions())
    listings = ListingStore(str(workdir / "listing-state"))
    stats: list[Any] = []

    def parallel() -> float:
        listing = listings.new()
        t = time.perf_counter()
        stats.append(store.list_tree(["noop/v1/"], listing.add))
        seconds = time.perf_counter() - t
        assert listing.count == count, (listing.count, count)
        listings.release()
        return seconds

    def serial() -> float:
        t = time.perf_counter()
        n = store.list_serial("noop/v1/", lambda entries: None)
        assert n == count, (n, count)
        return time.perf_counter() - t

    par_s, ser_s = _interleaved(repeats(), parallel, serial)
    log(f"babel: listing {count}: parallel {median(par_s):.2f}s, serial {median(ser_s):.2f}s")
    rows = [make_row(module=NAME, key="listing", measure=f"listing {count} objects, flat prefix, 20 ms per response: "
                     "serial seconds / babel seconds", unit="1/s", values=[1 / s for s in par_s], seconds=par_s,
                     baseline="serial paginated listing (same client, same parser)",
                     baseline_values=[1 / s for s in ser_s], baseline_seconds=ser_s, target=TARGETS["listing"],
                     notes=f"listing_workers = {SyncOptions().listing_workers}; the chaos proxy (its own process) "
                           "waits 20 ms before every response",
                     extra={"stats": [vars(s) | {"per_worker": len(s.per_worker)} for s in stats]})]
    spec = {"endpoint": endpoint, "bucket": "babel-scale-src", "key": a.access_key, "secret": a.secret_key,
            "prefix": "noop/v1/", "warm": "noop/v1/f00000", "state": str(workdir / "rss-state")}
    rss = _rss_probe(spec)
    per = rss["growth"] / rss["objects"]
    log(f"babel: RSS growth listing {rss['objects']} objects: {per:.0f} bytes per object")
    rows.append(make_row(module=NAME, key="listing_rss", measure=f"RSS growth per listed object at {count} objects: "
                         f"budget ({RSS_BUDGET} B) / bytes per object", unit="bytes", values=[RSS_BUDGET],
                         baseline="peak RSS growth per listed object", baseline_values=[per],
                         target=TARGETS["rss"], notes="a fresh process lists through the proxy into its on-disk "
                         "listing; growth = peak RSS (VmHWM, reset after warm-up) minus RSS before", extra=rss))
    config = babel_config(workdir / "scale.toml", a, b, "babel-scale-src", "babel-scale-dst", workdir / "state-scale",
                          "noop/**", endpoint_a=endpoint)
    _, first = babel_cli(config)  # caches the manifest: later passes are listings only
    assert first["ok"] and first["bytes_sent"] == 0, first
    rclone_copy(a, b, "babel-scale-src", "babel-scale-dst", "noop", endpoint, ("--checksum", "--transfers", "8",
                                                                               "--checkers", "16"))
    passes: list[dict[str, Any]] = []

    def babel_noop() -> float:
        seconds, summary = babel_cli(config)
        assert summary["ok"] and summary["bytes_sent"] == 0 and summary["objects_skipped"] == count, summary
        passes.append(summary)
        return seconds

    def rclone_noop() -> float:
        return rclone_copy(a, b, "babel-scale-src", "babel-scale-dst", "noop", endpoint,
                           ("--checksum", "--transfers", "8", "--checkers", "16"))

    babel_s, rclone_s = _interleaved(repeats(), babel_noop, rclone_noop)
    log(f"babel: no-op of {count}: babel {median(babel_s):.2f}s, rclone {median(rclone_s):.2f}s")
    rows.append(make_row(module=NAME, key="noop", measure=f"no-op re-sync of {count} objects: rclone seconds / "
                         "babel seconds (issue: <= 0.25x the time, i.e. >= 4)", unit="1/s",
                         values=[1 / s for s in babel_s], seconds=babel_s,
                         baseline="rclone copy --checksum --transfers 8 --checkers 16 (no-op)",
                         baseline_values=[1 / s for s in rclone_s], baseline_seconds=rclone_s,
                         target=TARGETS["noop"], notes="both as processes, start-up included, source behind the "
                         "20 ms proxy; both compare every object against the same destination",
                         extra={"babel_pass_seconds": [p["seconds"] for p in passes]}))
    return rows


def bench_big(a: SeaweedServer, b: SeaweedServer, workdir: Path, endpoint: str) -> list[dict[str, Any]]:
    """Cold copy of one large object (babel vs rclone) and sampled vs full verify of the copy."""
    from babel_sync import Syncer, load_config, verify

    size = env_int("BENCH_BABEL_BIG_MB", 1024) * MiB
    a.make_bucket("babel-big-src")
    a.client().put_object(Bucket="babel-big-src", Key="big/blob", Body=os.urandom(size))
    a.client().put_object(Bucket="babel-big-src", Key="big/_COMMITTED", Body=b"{}")
    time.sleep(2.5)  # past listing_settle_seconds: a fresh marker would make babel-sync wait, rclone has no margin
    runs = repeats()
    babel_s: list[float] = []
    rclone_s: list[float] = []
    config = workdir / "big.toml"
    for r in range(runs):  # each run into fresh buckets: no tool finds the other's bytes
        for bucket in (f"babel-big-{r}", f"rclone-big-{r}"):
            b.make_bucket(bucket)
        config = babel_config(workdir / "big.toml", a, b, "babel-big-src", f"babel-big-{r}", workdir / f"state-big-{r}",
                              "big/**", endpoint_a=endpoint)
        settle()
        seconds, summary = babel_cli(config)
        assert summary["ok"] and summary["bytes_copied"] == size + 2, summary
        babel_s.append(seconds)
        settle()
        rclone_s.append(rclone_copy(a, b, "babel-big-src", f"rclone-big-{r}", "big", endpoint))
        log(f"babel: cold copy of {size // MiB} MiB #{r}: babel {babel_s[-1]:.1f}s "
            f"(parts in flight up to {summary['parts_in_flight_max']}), rclone {rclone_s[-1]:.1f}s")
        if r < runs - 1:
            b.delete_bucket(f"rclone-big-{r}")
    mb = size / 1e6
    rows = [make_row(module=NAME, key="cold_big", measure=f"cold copy of one {size // MiB} MiB object, MB/s",
                     unit="MB/s", values=[mb / s for s in babel_s], seconds=babel_s, nbytes=size,
                     baseline="rclone copy --checksum --transfers 8", baseline_values=[mb / s for s in rclone_s],
                     baseline_seconds=rclone_s, target=TARGETS["cold"],
                     notes="both as processes through the 20 ms proxy (which relays every byte in Python)")]
    syncer = Syncer(load_config(config))
    results: list[dict[str, Any]] = []

    def sampled() -> float:
        t = time.perf_counter()
        results.append(verify(syncer, "bench", sample=0.01, repair=False))
        return time.perf_counter() - t

    def full() -> float:
        t = time.perf_counter()
        out = verify(syncer, "bench", sample=1.0, repair=False)
        assert out["ok"], out
        return time.perf_counter() - t

    samp_s, full_s = _interleaved(runs, sampled, full)
    assert all(r["ok"] for r in results), results
    log(f"babel: verify {size // MiB} MiB: sampled 0.01 {median(samp_s):.3f}s, full {median(full_s):.2f}s")
    rows.append(make_row(module=NAME, key="verify", measure=f"verify of one {size // MiB} MiB file: full seconds / "
                         "sampled (RATE 0.01) seconds", unit="1/s", values=[1 / s for s in samp_s], seconds=samp_s,
                         baseline="verify --full (xxh3-128 of the whole file)", baseline_values=[1 / s for s in full_s],
                         baseline_seconds=full_s, target=TARGETS["verify"],
                         notes="in-process verify() at the destination (no proxy): listing, manifest GET, then "
                               "ranged reads", extra={"sampled": results}))
    return rows


def bench_million(workdir: Path) -> list[dict[str, Any]]:
    """RSS growth listing 10^6 keys from our ListObjectsV2 server (informational; no proxy)."""
    count = 1_000_000
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "listing_server.py"), f"flat:big/k:{count}"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdin is not None and server.stdout is not None
    try:
        endpoint = server.stdout.readline().split()[1]
        rss = _rss_probe({"endpoint": endpoint, "bucket": "bkt", "key": "AK", "secret": "SK", "prefix": "big/",
                          "warm": "big/k000000", "state": str(workdir / "rss-million")})
    finally:
        server.stdin.close()
        server.wait(timeout=60)
    per = rss["growth"] / rss["objects"]
    log(f"babel: RSS growth listing {rss['objects']} keys: {per:.0f} bytes per object")
    return [make_row(module=NAME, key="listing_rss_1m", measure="RSS growth per listed object at 10^6 keys "
                     f"(tests/listing_server.py): budget ({RSS_BUDGET} B) / bytes per object", unit="bytes",
                     values=[RSS_BUDGET], baseline="peak RSS growth per listed object", baseline_values=[per],
                     target=None, notes="informational: a local server, no latency", extra=rss)]


def run(server: SeaweedServer, workdir: Path) -> list[dict[str, Any]]:
    """Run the scale measures; starts the destination SeaweedFS server and the proxy itself."""
    if not selected("babel"):
        return []
    rows: list[dict[str, Any]] = []
    with SeaweedServer(workdir / "seaweed-b") as second, _proxy(server) as (endpoint, _counts):
        groups: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [
            ("scale", lambda: bench_scale(server, second, workdir, endpoint)),
            ("big", lambda: bench_big(server, second, workdir, endpoint))]
        if env_int("BENCH_BABEL_OBJECTS", 100_000) >= 100_000:
            groups.append(("million", lambda: bench_million(workdir)))
        rows = run_groups(NAME, groups, filtered=False)
    return rows


def _rss_main() -> int:
    """List ``spec.prefix`` into an on-disk listing; print the objects and the peak RSS growth (JSON)."""
    from babel_sync.config import Site, SyncOptions
    from babel_sync.listdb import ListingStore
    from babel_sync.store import S3Store

    def status(name: str) -> int:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(name))

    spec = json.loads(sys.stdin.read())
    site = Site("a", f"s3://{spec['bucket']}", spec["endpoint"], key=spec["key"], secret=spec["secret"])
    store = S3Store(site, SyncOptions())
    listings = ListingStore(spec["state"])
    store.list_tree([spec["warm"]], listings.new().add)  # imports, threads, connections, the LMDB map
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # peak RSS := current RSS
    before = status("VmRSS:")
    listing = listings.new(match=lambda key: True)
    stats = store.list_tree([spec["prefix"]], listing.add)
    print(json.dumps({"objects": listing.objects, "growth": status("VmHWM:") - before, "requests": stats.requests,
                      "seconds": stats.seconds}))
    return 0


if __name__ == "__main__" and sys.argv[1:] == ["rss"]:
    sys.exit(_rss_main())

__all__ = ["NAME", "babel_cli", "babel_config", "filer_put_many", "rclone_copy", "rclone_env", "run"]
