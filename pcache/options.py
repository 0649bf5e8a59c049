"""pcache's command-line options, shared by every command that reads through pcache (``pcache``, ``fusefs``).

One definition of the cache and storage flags, and one way to turn them into a :class:`CacheConfig`
(flags win over ``PCACHE_*`` env vars, env over the ``[pcache]`` table of ``--config``).
"""

from __future__ import annotations

import argparse

from pcache.config import CacheConfig


def add_cache_options(p: argparse.ArgumentParser) -> None:
    """Add pcache's cache and storage flags to ``p`` (shared by every command that reads through pcache)."""
    p.add_argument("--cache-dir", help="cache directory (env PCACHE_CACHE_DIR; default ~/.cache/pcache)")
    p.add_argument("--config", help="TOML file with a [pcache] table (env PCACHE_CONFIG)")
    p.add_argument("--block-size", help="block size, e.g. 4MiB (env PCACHE_BLOCK_SIZE)")
    p.add_argument("--disk-bytes", help="disk tier budget, e.g. 500GiB (env PCACHE_DISK_BYTES)")
    p.add_argument("--memory-bytes", help="memory tier budget per process (env PCACHE_MEMORY_BYTES)")
    p.add_argument("--compression", choices=["none", "zstd"], help="compress blocks on disk")
    p.add_argument("--direct-writes", action=argparse.BooleanOptionalAction, default=None,
                   help="write disk-tier blocks with O_DIRECT, bypassing the page cache (default on; env "
                        "PCACHE_DIRECT_WRITES)")
    p.add_argument("--stream-uploads", action=argparse.BooleanOptionalAction, default=None,
                   help="upload parts of large write-back files to S3 while they are written (default on; env "
                        "PCACHE_STREAM_UPLOADS)")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL, else AWS)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--log-format", choices=["text", "json"], help="log format (env PCACHE_LOG_FORMAT)")


def cache_config(args: argparse.Namespace) -> CacheConfig:
    """Build the :class:`CacheConfig` from flags parsed by :func:`add_cache_options`, env and TOML."""
    return CacheConfig.load(args.config, cache_dir=args.cache_dir, block_size=args.block_size,
                            disk_bytes=args.disk_bytes, memory_bytes=args.memory_bytes,
                            compression=args.compression, direct_writes=getattr(args, "direct_writes", None),
                            stream_uploads=getattr(args, "stream_uploads", None),
                            peers=getattr(args, "peers", None),
                            token_file=getattr(args, "token_file", None) if getattr(args, "peers", None) else None)
