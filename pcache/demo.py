"""``make demo``: pcache end to end on an embedded SeaweedFS S3 server.

1. Start SeaweedFS on loopback and upload a synthetic dataset (shards of random tokens).
2. Read every shard through pcache cold (from S3), then warm (from the cache), and compare bytes.
3. Write a checkpoint through write-back, commit it, and show the marker's manifest.
4. Stop the S3 server and read the dataset again: the cache still serves it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import fsspec
import s3fs
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

import pcache
from lingcore.checksum import content_hasher
from pcache.s3server import SeaweedServer

MiB = 1024 * 1024


def _progress(console: Console) -> Progress:
    return Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), console=console)


def read_all(fs: fsspec.AbstractFileSystem, paths: list[str], label: str, console: Console) -> tuple[float, str]:
    """Read every path sequentially in 8 MiB chunks; return (seconds, xxh3-128 of everything)."""
    digest = content_hasher()  # fast enough not to hide the cache's own speed (sha256 capped it)
    total = sum(fs.info(p)["size"] for p in paths)
    started = time.perf_counter()
    with _progress(console) as bar:
        task = bar.add_task(label, total=total)
        for path in paths:
            with fs.open(path, "rb") as f:
                while chunk := f.read(8 * MiB):
                    digest.update(chunk)
                    bar.advance(task, len(chunk))
    return time.perf_counter() - started, digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pcache.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8, help="number of dataset shards")
    parser.add_argument("--shard-mb", type=int, default=32, help="size of each shard in MiB")
    parser.add_argument("--workdir", help="where SeaweedFS and the cache live (default: a temp dir)")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="pcache-demo-")
    console.rule("[bold]pcache demo")
    console.print(f"work dir: {workdir}")
    with SeaweedServer(os.path.join(workdir, "seaweedfs")) as server:
        console.print(f"SeaweedFS S3 on {server.endpoint_url}")
        bucket = server.make_bucket("demo-datasets")
        s3 = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options())
        paths = []
        with _progress(console) as bar:
            task = bar.add_task("upload dataset", total=args.shards * args.shard_mb * MiB)
            for i in range(args.shards):
                path = f"{bucket}/corpus/v1/shard-{i:05d}.bin"
                s3.pipe_file(path, os.urandom(args.shard_mb * MiB))
                paths.append(path)
                bar.advance(task, args.shard_mb * MiB)
        fs = fsspec.filesystem("pcache", target_protocol="s3", target_options=server.storage_options(),
                               cache_dir=os.path.join(workdir, "cache"), memory_bytes="64MiB")
        _, origin_digest = read_all(s3, paths, "plain s3fs   ", console)
        cold_s, cold_digest = read_all(fs, paths, "pcache cold  ", console)
        warm_s, warm_digest = read_all(fs, paths, "pcache warm  ", console)
        assert cold_digest == warm_digest == origin_digest, "pcache returned different bytes"

        ckpt = f"{bucket}/checkpoints/run1/step_000100"
        started = time.perf_counter()
        for rank in range(2):
            with fs.open(f"{ckpt}/rank{rank}.distcp", "wb") as f:
                f.write(os.urandom(16 * MiB))
        close_s = time.perf_counter() - started
        marker = pcache.commit(f"s3://{ckpt}", timeout=300)
        manifest = json.loads(s3.cat_file(marker.removeprefix("s3://")))

        server.stop()
        outage_s, outage_digest = read_all(fs, paths, "origin DOWN  ", console)
        assert outage_digest == origin_digest
        server.start()

        fs.engine.disk.flush_hits()
        stats = fs.engine.disk.stats()
        size = args.shards * args.shard_mb * MiB
        table = Table(title="pcache demo results")
        table.add_column("step")
        table.add_column("result", justify="right")
        table.add_row("dataset", f"{args.shards} shards, {size / MiB:.0f} MiB, bytes identical to S3")
        table.add_row("cold read (S3 -> cache)", f"{size / MiB / cold_s:.0f} MiB/s")
        table.add_row("warm read (cache)", f"{size / MiB / warm_s:.0f} MiB/s")
        table.add_row("read with S3 stopped", f"{size / MiB / outage_s:.0f} MiB/s, correct bytes")
        table.add_row("checkpoint close() (2 x 16 MiB)", f"{32 / close_s:.0f} MiB/s, fsynced locally")
        table.add_row("commit marker", f"{marker} ({len(manifest['files'])} files)")
        table.add_row("disk tier", f"{stats['blocks']} blocks, {stats['total'] / MiB:.0f} MiB")
        table.add_row("origin bytes read", f"{stats['origin_bytes'] / MiB:.0f} MiB (each block once)")
        console.print(table)
    console.print("[green]demo finished[/green]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
