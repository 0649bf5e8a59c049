"""pcache: inspect, warm, flush, verify and garbage-collect a cache directory; serve a cache node.

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
from lingcore.probe import explain
from lingcore.storage import storage_options
from pcache import admin, devs3
from pcache.errors import ConfigError
from pcache.options import add_cache_options, cache_config

__all__ = ["add_cache_options", "build_parser", "cache_config", "main"]  # the two helpers: pcache.options

EXAMPLES = """examples:
  pcache stat --cache-dir /nvme/pcache
  pcache warm --endpoint-url http://127.0.0.1:8333 s3://datasets/pile/v1/
  pcache flush --cache-dir /nvme/pcache --timeout 600
  pcache verify --cache-dir /nvme/pcache
  pcache gc --cache-dir /nvme/pcache
  pcache dev-s3 --bucket datasets --bucket ckpt     # a local S3 endpoint to try things out
"""


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
    p.add_argument("--keep-done-days", type=float, default=7.0, help="forget upload records, and damaged index copies, older than this (default 7)")
    p = sub.add_parser("dev-s3", help="run the bundled SeaweedFS as a local S3 endpoint on 127.0.0.1 and print "
                                      "the AWS_* exports; Ctrl-C stops it")
    p.add_argument("--dir", default=os.environ.get("PCACHE_DEV_S3_DIR") or devs3.default_dir(),
                   help="data and credentials, kept across restarts (env PCACHE_DEV_S3_DIR; default %(default)s)")
    p.add_argument("--port", type=int, default=int(os.environ.get("PCACHE_DEV_S3_PORT") or devs3.DEFAULT_PORT),
                   help="S3 port on 127.0.0.1; port+10000 is its gRPC port (env PCACHE_DEV_S3_PORT; default "
                        "%(default)s)")
    p.add_argument("--bucket", action="append", default=[], metavar="NAME",
                   help="create this bucket if missing (repeat for several)")
    for command in sub.choices.values():
        command.add_argument("--log-level", help="DEBUG (errors with their traceback), INFO (default), WARNING "
                                                 "(env PCACHE_LOG_LEVEL)")
    return parser


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
    data = admin.node_stat(args.node, args.token_file)
    v = data.get
    lookups = sum(v(f"pcache_hits_{tier}", 0) for tier in ("memory", "disk", "peer")) + v("pcache_misses", 0)
    ratio = "n/a" if data["hit_ratio"] is None else f"{data['hit_ratio']:.1%}"
    human = "\n".join([
        f"node            {args.node}",
        f"disk tier       {int(v('pcache_disk_blocks', 0))} blocks, {_human(v('pcache_disk_bytes', 0))}",
        f"hit ratio       {ratio} ({int(lookups)} lookups)",
        f"origin reads    {_human(v('pcache_origin_bytes', 0))}",
        f"served to peers {_human(v('pcache_served_bytes', 0))}",
        f"request errors  {int(v('pcache_peer_request_errors', 0))}",
        f"pending uploads {int(v('pcache_upload_queue_depth', 0))} ({_human(v('pcache_upload_pending_bytes', 0))})",
        f"standby replicas {int(v('pcache_standby_replicas', 0))} ({_human(v('pcache_standby_replica_bytes', 0))})",
    ])
    _emit(args, data, human)
    return 0


def cmd_stat(args: argparse.Namespace) -> int:
    if args.node:
        return node_stat(args)
    config = cache_config(args)
    data = admin.stat(config)
    pending = admin.pending_uploads(config) if data["pending_uploads"] else []
    ratio = "n/a" if data["hit_ratio"] is None else f"{data['hit_ratio']:.1%}"
    human = "\n".join([
        f"cache dir       {config.cache_dir}",
        f"disk tier       {data['disk_blocks']} blocks, {_human(data['disk_bytes'])} of {_human(config.disk_bytes)}",
        f"memory tier     budget {_human(config.memory_bytes)} per process",
        f"hit ratio       {ratio} (memory {data['hits_memory']}, disk {data['hits_disk']}, peer {data['hits_peer']}, "
        f"misses {data['misses']})",
        f"origin reads    {_human(data['origin_bytes'])}; from peers {_human(data['peer_bytes'])}",
        f"evictions       {data['evictions']}; corrupt blocks dropped {data['corrupt_blocks']}",
        f"pending uploads {data['pending_uploads']} ({_human(data['pending_bytes'])})",
    ] + [f"  {e['url']} ({_human(e['size'])}){'  last error: ' + e['last_error'] if e.get('last_error') else ''}"
         for e in pending[:20]])
    _emit(args, data, human)
    return 0


def cmd_warm(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    tasks: dict[str, Any] = {}
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), disable=args.json or not sys.stderr.isatty()) as bar:

        def progress(url: str, done: int, total: int) -> None:
            if url not in tasks:
                tasks[url] = bar.add_task(f"warm {url}", total=total)
            bar.advance(tasks[url], done)

        config = cache_config(args)
        data = {"files": 0, "bytes": 0}
        for url in args.urls:  # one at a time, so a failure names its URL and says which case it is
            try:
                done = admin.warm(config, [url], args.endpoint_url, progress)
            except Exception as exc:
                shown = explain(exc, url, endpoint_url=args.endpoint_url)
                if shown is exc:
                    raise
                raise shown from exc
            data = {key: data[key] + done[key] for key in data}
    _emit(args, data, f"warmed {data['files']} file(s), {_human(data['bytes'])}")
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    data = admin.flush(cache_config(args), args.endpoint_url, args.prefix, args.timeout, args.adopt_replicas)
    lines = [f"uploaded {data['uploaded']} file(s); {data['still_pending']} still pending"]
    if data["replicas_adopted"] or data["replicas_dropped"] or data["replicas_failed"]:
        lines.append(f"peer replicas: {data['replicas_adopted']} adopted, {data['replicas_dropped']} already at the "
                     f"origin, {data['replicas_failed']} failed (kept)")
    if data["orphan_uploads_aborted"] or data["orphan_uploads_failed"]:
        lines.append(f"orphan multipart uploads: {data['orphan_uploads_aborted']} aborted, "
                     f"{data['orphan_uploads_failed']} object(s) unreachable (kept for the next flush or gc)")
    lines += [f"failed: {url}" for url in data["failed"]]
    _emit(args, data, "\n".join(lines))
    return 1 if data["still_pending"] or data["replicas_failed"] or data["orphan_uploads_failed"] else 0


def cmd_verify(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    with Progress(disable=args.json or not sys.stderr.isatty()) as bar:
        task = bar.add_task("verify", total=None)
        data = admin.verify(cache_config(args), progress=lambda k, total: bar.update(task, total=total, advance=k))
    corrupt = data["corrupt"]
    _emit(args, data, f"checked {data['checked']} block(s); {len(corrupt)} corrupt (dropped, will be refetched)"
          + "".join(f"\n  {p}" for p in corrupt))
    return 1 if corrupt else 0


def cmd_gc(args: argparse.Namespace) -> int:
    result = admin.gc(cache_config(args), args.keep_done_days, args.endpoint_url)
    _emit(args, result, ", ".join(f"{k}: {v}" for k, v in result.items()))
    return 1 if result["orphan_uploads_failed"] else 0


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


def cmd_dev_s3(args: argparse.Namespace) -> int:
    return devs3.run(args.dir, args.port, args.bucket)


COMMANDS = {"stat": cmd_stat, "warm": cmd_warm, "flush": cmd_flush, "verify": cmd_verify, "gc": cmd_gc,
            "serve": cmd_serve, "dev-s3": cmd_dev_s3}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_format = getattr(args, "log_format", None)
    setup_logging(args.log_level, json_format=(log_format == "json") if log_format else None)
    return run_command("pcache", COMMANDS, args,
                       (ConfigError, ValueError, FileNotFoundError, PermissionError, TimeoutError),
                       url_of=lambda a: getattr(a, "node", None))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
