"""pcache: inspect, warm, flush, verify and garbage-collect a cache directory.

Every option also comes from PCACHE_<NAME> env vars or a TOML file (--config, [pcache]
table); flags win over env, env over the file. S3 endpoints and credentials follow the AWS tools:
--endpoint-url or AWS_ENDPOINT_URL, and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from lingcore.cli import run_command
from lingcore.log import setup_logging
from lingcore.storage import split_url, storage_options
from pcache.config import CacheConfig
from pcache.errors import ConfigError

EXAMPLES = """examples:
  pcache stat --cache-dir /nvme/pcache
  pcache warm --endpoint-url http://127.0.0.1:8333 s3://datasets/pile/v1/
  pcache flush --cache-dir /nvme/pcache --timeout 600
  pcache verify --cache-dir /nvme/pcache
  pcache gc --cache-dir /nvme/pcache
"""


def add_cache_options(p: argparse.ArgumentParser) -> None:
    """Add pcache's cache and storage flags to ``p`` (shared by every command that reads through pcache)."""
    p.add_argument("--cache-dir", help="cache directory (env PCACHE_CACHE_DIR; default ~/.cache/pcache)")
    p.add_argument("--config", help="TOML file with a [pcache] table (env PCACHE_CONFIG)")
    p.add_argument("--block-size", help="block size, e.g. 4MiB (env PCACHE_BLOCK_SIZE)")
    p.add_argument("--disk-bytes", help="disk tier budget, e.g. 500GiB (env PCACHE_DISK_BYTES)")
    p.add_argument("--memory-bytes", help="memory tier budget per process (env PCACHE_MEMORY_BYTES)")
    p.add_argument("--compression", choices=["none", "zstd"], help="compress blocks on disk")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL, else AWS)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--log-format", choices=["text", "json"], help="log format (env PCACHE_LOG_FORMAT)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pcache", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("stat", help="usage per tier, hit ratio and pending uploads")
    add_cache_options(p)
    p.add_argument("--node", help="show a running node's view instead (http://host:port)")
    p.add_argument("--token-file", default=os.environ.get("PCACHE_TOKEN_FILE"),
                   help="shared secret file, for --node (env PCACHE_TOKEN_FILE)")
    p = sub.add_parser("warm", help="prefetch objects or prefixes into the cache, with a progress bar")
    add_cache_options(p)
    p.add_argument("urls", nargs="+", metavar="URL", help="object or prefix, e.g. s3://bucket/shards/")
    p.add_argument("--peers", help="warm on these nodes instead (each block on its owner), comma-separated "
                                   "http://host:port (env PCACHE_PEERS)")
    p.add_argument("--token-file", default=os.environ.get("PCACHE_TOKEN_FILE"),
                   help="shared secret file, with --peers (env PCACHE_TOKEN_FILE)")
    p = sub.add_parser("flush", help="upload write-back files left in the journal (e.g. by a killed process)")
    add_cache_options(p)
    p.add_argument("--timeout", type=float, help="give up after this many seconds")
    p.add_argument("--prefix", help="only files under this origin URL")
    p.add_argument("--adopt-replicas", action="store_true",
                   help="also upload the standby replicas this node holds for other nodes (replicas=1), "
                        "unless the origin already has them or a newer write; use it once a writer's node "
                        "is lost, never while that writer may still be uploading")
    p = sub.add_parser("verify", help="re-check every block's checksum and drop corrupt blocks")
    add_cache_options(p)
    p = sub.add_parser("serve", help="run a cache node that serves blocks to peers (binds 127.0.0.1 by default)")
    add_cache_options(p)
    p.add_argument("--listen", default="127.0.0.1:9470", help="HOST:PORT to bind (default 127.0.0.1:9470)")
    p.add_argument("--token-file", default=os.environ.get("PCACHE_TOKEN_FILE"),
                   help="file with the secret shared by all nodes, mode 600 (env PCACHE_TOKEN_FILE)")
    p.add_argument("--origin-protocol", default="s3", help="fsspec protocol of the origin (default s3)")
    p.add_argument("--metrics-listen", help="HOST:PORT serving /metrics unsigned for Prometheus, or 'off' "
                                            "(env PCACHE_METRICS_LISTEN; default 127.0.0.1:9471)")
    p = sub.add_parser("gc", help="reconcile index and files, remove stale temp files, enforce the budget")
    add_cache_options(p)
    p.add_argument("--keep-done-days", type=float, default=7.0, help="forget upload records older than this")
    return parser


def cache_config(args: argparse.Namespace) -> CacheConfig:
    """Build the :class:`CacheConfig` from flags parsed by :func:`add_cache_options`, env and TOML."""
    return CacheConfig.load(args.config, cache_dir=args.cache_dir, block_size=args.block_size,
                            disk_bytes=args.disk_bytes, memory_bytes=args.memory_bytes,
                            compression=args.compression, peers=getattr(args, "peers", None),
                            token_file=getattr(args, "token_file", None) if getattr(args, "peers", None) else None)


def _emit(args: argparse.Namespace, data: dict[str, Any], human: str) -> None:
    print(json.dumps(data, indent=1) if args.json else human)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def node_stat(args: argparse.Namespace) -> int:
    """Print a remote node's metrics in human form (``pcache stat --node URL``)."""
    import http.client
    from urllib.parse import urlsplit

    from prometheus_client.parser import text_string_to_metric_families

    from pcache.cluster.auth import load_token, sign_request

    if not args.token_file:
        raise ConfigError("token_file", "pcache stat --node needs --token-file (or PCACHE_TOKEN_FILE)", "arguments")
    parts = urlsplit(args.node)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    conn.request("GET", "/metrics", headers=sign_request(load_token(args.token_file), "GET", "/metrics"))
    resp = conn.getresponse()
    body = resp.read().decode()
    if resp.status != 200:
        raise PermissionError(f"{args.node} answered {resp.status}: {body[:200]}")
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            label = "_".join(sample.labels.values())
            values[sample.name.removesuffix("_total") + (f"_{label}" if label else "")] = sample.value
    hits = sum(values.get(f"pcache_hits_{tier}", 0) for tier in ("memory", "disk", "peer"))
    lookups = hits + values.get("pcache_misses", 0)
    data = {"node": args.node, **values, "hit_ratio": hits / lookups if lookups else None}
    human = "\n".join([
        f"node            {args.node}",
        f"disk tier       {int(values.get('pcache_disk_blocks', 0))} blocks, {_human(values.get('pcache_disk_bytes', 0))}",
        f"hit ratio       {f'{hits / lookups:.1%}' if lookups else 'n/a'} ({int(lookups)} lookups)",
        f"origin reads    {_human(values.get('pcache_origin_bytes', 0))}",
        f"served to peers {_human(values.get('pcache_served_bytes', 0))}",
        f"request errors  {int(values.get('pcache_peer_request_errors', 0))}",
        f"pending uploads {int(values.get('pcache_upload_queue_depth', 0))} "
        f"({_human(values.get('pcache_upload_pending_bytes', 0))})",
        f"standby replicas {int(values.get('pcache_standby_replicas', 0))} "
        f"({_human(values.get('pcache_standby_replica_bytes', 0))})",
    ])
    _emit(args, data, human)
    return 0


def cmd_stat(args: argparse.Namespace) -> int:
    from pcache.diskstore import DiskStore
    from pcache.journal import Journal

    if args.node:
        return node_stat(args)

    config = cache_config(args)
    journal = Journal(config.cache_dir)
    store = DiskStore(config.cache_dir, config.disk_bytes, reserved=journal.pending_bytes)
    s = store.stats()
    pending = journal.pending()
    hits = s["hits_memory"] + s["hits_disk"] + s["hits_peer"]
    lookups = hits + s["misses"]
    data = {"cache_dir": config.cache_dir, "disk_blocks": s["blocks"], "disk_bytes": s["total"],
            "disk_budget": config.disk_bytes, "memory_budget_per_process": config.memory_bytes,
            "hits_memory": s["hits_memory"], "hits_disk": s["hits_disk"], "hits_peer": s["hits_peer"],
            "misses": s["misses"], "peer_bytes": s["peer_bytes"],
            "hit_ratio": (hits / lookups) if lookups else None, "origin_bytes": s["origin_bytes"],
            "evictions": s["evictions"], "corrupt_blocks": s["corrupt_blocks"],
            "pending_uploads": len(pending), "pending_bytes": sum(e["size"] for e in pending)}
    ratio = f"{data['hit_ratio']:.1%}" if lookups else "n/a"
    human = "\n".join([
        f"cache dir       {config.cache_dir}",
        f"disk tier       {s['blocks']} blocks, {_human(s['total'])} of {_human(config.disk_bytes)}",
        f"memory tier     budget {_human(config.memory_bytes)} per process",
        f"hit ratio       {ratio} (memory {s['hits_memory']}, disk {s['hits_disk']}, peer {s['hits_peer']}, "
        f"misses {s['misses']})",
        f"origin reads    {_human(s['origin_bytes'])}; from peers {_human(s['peer_bytes'])}",
        f"evictions       {s['evictions']}; corrupt blocks dropped {s['corrupt_blocks']}",
        f"pending uploads {len(pending)} ({_human(data['pending_bytes'])})",
    ] + [f"  {e['url']} ({_human(e['size'])}){'  last error: ' + e['last_error'] if e.get('last_error') else ''}"
         for e in pending[:20]])
    _emit(args, data, human)
    return 0


def cmd_warm(args: argparse.Namespace) -> int:
    import fsspec
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    config = cache_config(args)
    total_bytes = total_files = 0
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), disable=args.json or not sys.stderr.isatty()) as bar:
        for url in args.urls:
            protocol, path = split_url(url)
            fs = fsspec.filesystem("pcache", target_protocol=protocol,
                                   target_options=storage_options(protocol, args.endpoint_url),
                                   **{k: v for k, v in vars(config).items()})
            target = fs._target_path(path)
            info = fs.info(target)
            files = {target: info} if info["type"] == "file" else fs.find(target, detail=True)
            task = bar.add_task(f"warm {url}", total=sum(i["size"] for i in files.values()))
            for name, item in files.items():
                ref = fs.ref(name)
                if fs.peers is not None:
                    _warm_on_owners(fs, name, ref, lambda n, task=task: bar.advance(task, n))
                else:
                    fetch = fs.fetcher_for(name, ref)
                    step = config.block_size * config.fetch_workers
                    for off in range(0, ref.size, step):
                        chunk = fs.engine.get_range(ref, off, min(ref.size, off + step), fetch)
                        bar.advance(task, len(chunk))
                total_bytes += item["size"]
                total_files += 1
            fs.engine.disk.flush_hits()
    _emit(args, {"files": total_files, "bytes": total_bytes},
          f"warmed {total_files} file(s), {_human(total_bytes)}")
    return 0


def _warm_on_owners(fs: Any, name: str, ref: Any, advance: Any) -> None:
    """Cluster warm: each block is loaded by its owner node; nothing is copied to this machine."""
    from concurrent.futures import ThreadPoolExecutor

    bs = fs.config.block_size
    tier = fs.peers

    def one(index: int) -> None:
        if not tier.warm_block(name, ref.version, ref.size, index, bs):
            raise OSError(f"no peer could warm block {index} of {fs.url(name)}")
        advance(min(bs, ref.size - index * bs))

    with ThreadPoolExecutor(fs.config.fetch_workers) as pool:
        list(pool.map(one, range((ref.size + bs - 1) // bs)))


def cmd_flush(args: argparse.Namespace) -> int:
    from pcache.uploader import Uploader

    config = cache_config(args)
    uploader = Uploader(config, endpoint_url=args.endpoint_url)
    replicas = {"adopted": 0, "dropped": 0, "failed": 0}
    if args.adopt_replicas:
        replicas = uploader.adopt_replicas()
    before = uploader.journal.pending(args.prefix)
    failed = uploader.drain(args.prefix, timeout=args.timeout)
    done = len(before) - len(uploader.journal.pending(args.prefix))
    data = {"uploaded": done, "failed": failed, "still_pending": len(uploader.journal.pending(args.prefix)),
            "replicas_adopted": replicas["adopted"], "replicas_dropped": replicas["dropped"],
            "replicas_failed": replicas["failed"], "orphan_uploads_aborted": uploader.orphans["aborted"],
            "orphan_uploads_failed": uploader.orphans["failed"]}
    lines = [f"uploaded {done} file(s); {data['still_pending']} still pending"]
    if any(replicas.values()):
        lines.append(f"peer replicas: {replicas['adopted']} adopted, {replicas['dropped']} already at the origin, "
                     f"{replicas['failed']} failed (kept)")
    if uploader.orphans["aborted"] or uploader.orphans["failed"]:
        lines.append(f"orphan multipart uploads: {uploader.orphans['aborted']} aborted, "
                     f"{uploader.orphans['failed']} object(s) unreachable (kept for the next flush or gc)")
    lines += [f"failed: {url}" for url in failed]
    _emit(args, data, "\n".join(lines))
    return 1 if data["still_pending"] or replicas["failed"] or uploader.orphans["failed"] else 0


def cmd_verify(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from pcache.diskstore import DiskStore

    config = cache_config(args)
    store = DiskStore(config.cache_dir, config.disk_bytes, config.compression)
    n = sum(1 for _ in store.iter_block_files())
    with Progress(disable=args.json or not sys.stderr.isatty()) as bar:
        task = bar.add_task("verify", total=n)
        corrupt = store.verify(progress=lambda k: bar.advance(task, k))
    store.flush_hits()
    _emit(args, {"checked": n, "corrupt": corrupt},
          f"checked {n} block(s); {len(corrupt)} corrupt (dropped, will be refetched)"
          + "".join(f"\n  {p}" for p in corrupt))
    return 1 if corrupt else 0


def cmd_gc(args: argparse.Namespace) -> int:
    from pcache.diskstore import DiskStore
    from pcache.journal import Journal
    from pcache.uploader import abort_orphan_uploads

    config = cache_config(args)
    journal = Journal(config.cache_dir)
    store = DiskStore(config.cache_dir, config.disk_bytes, reserved=journal.pending_bytes)
    result = store.gc()
    orphans = abort_orphan_uploads(config, endpoint_url=args.endpoint_url)
    result["orphan_uploads_aborted"], result["orphan_uploads_failed"] = orphans["aborted"], orphans["failed"]
    result["orphan_staged"] = journal.remove_orphans()
    result["done_records_pruned"] = journal.prune_done(args.keep_done_days * 86400)
    _emit(args, result, ", ".join(f"{k}: {v}" for k, v in result.items()))
    return 1 if orphans["failed"] else 0


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import dataclasses

    import fsspec

    from pcache.cluster.auth import load_token
    from pcache.cluster.server import NodeServer

    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError("listen", f"expected HOST:PORT, got {args.listen!r}", "arguments")
    if not args.token_file:
        raise ConfigError("token_file", "pcache serve needs --token-file (or PCACHE_TOKEN_FILE)", "arguments")
    token = load_token(args.token_file)
    config = dataclasses.replace(cache_config(args), peers=(), token_file="")  # a node reads only its origin
    if args.metrics_listen is not None:  # the flag wins over env and the TOML file
        config = dataclasses.replace(config, metrics_listen=args.metrics_listen)
    fs = fsspec.filesystem("pcache", target_protocol=args.origin_protocol,
                           target_options=storage_options(args.origin_protocol, args.endpoint_url),
                           skip_instance_cache=True, **vars(config))
    node = NodeServer(fs, token, host.strip("[]"), int(port), metrics=config.metrics_address)

    def ready(n: NodeServer) -> None:
        metrics = f" metrics=http://{n.metrics_host}:{n.metrics_port}/metrics" if n.metrics_app else ""
        print(f"READY http://{n.host}:{n.port}{metrics}", flush=True)

    asyncio.run(node.serve(ready=ready))
    return 0


COMMANDS = {"stat": cmd_stat, "warm": cmd_warm, "flush": cmd_flush, "verify": cmd_verify, "gc": cmd_gc,
            "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(json_format=(args.log_format == "json") if args.log_format else None)
    return run_command("pcache", COMMANDS, args,
                       (ConfigError, ValueError, FileNotFoundError, PermissionError, TimeoutError))



if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
