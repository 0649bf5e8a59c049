"""Origin filesystems and paths: build the fsspec filesystem behind pcache and reduce URLs to its paths.

Kept apart from :mod:`pcache.fs` so the uploader process and other tools can build an origin without the
block cache.
"""

from __future__ import annotations

from typing import Any

import fsspec


def build_target_fs(protocol: str, options: dict[str, Any], skip_instance_cache: bool = False,
                    origin_timeout: float | None = None) -> Any:
    """Build the origin filesystem. For S3, s3fs and botocore try each call once, so
    :func:`lingcore.retry.retry_call` is the one retry layer (stacked retries multiply: s3fs's 5 tries
    x botocore's attempts x ours); s3fs keeps no listing cache (pcache's metadata plane has a TTL, s3fs's
    has none); and botocore's connect and read timeouts are at most ``origin_timeout``. Explicit user
    options win."""
    if protocol not in ("s3", "s3a"):
        return fsspec.filesystem(protocol, skip_instance_cache=skip_instance_cache, **options)
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
    if origin_timeout is not None:
        # s3fs's defaults (5 s connect, 15 s read), clipped: one request may not outlive the whole call.
        config.setdefault("connect_timeout", min(5.0, origin_timeout))
        config.setdefault("read_timeout", min(15.0, origin_timeout))
    fs = fsspec.filesystem(protocol, skip_instance_cache=skip_instance_cache,
                           **{"use_listings_cache": False, **options, "config_kwargs": config})
    fs.retries = 1  # s3fs keeps this as a class attribute, not a constructor option
    return fs


def endpoint_of(target_options: dict[str, Any]) -> str:
    """The S3 endpoint named in fsspec storage options ('' when none is)."""
    client = target_options.get("client_kwargs") or {}
    return str(client.get("endpoint_url") or target_options.get("endpoint_url") or "")


def strip_url(path: str) -> str:
    """Reduce ``pcache::s3://b/k``, ``pcache://b/k`` or ``s3://b/k`` to the target path ``b/k``."""
    path = path.split("::")[-1]
    if path.startswith("pcache://"):
        path = path[len("pcache://"):]
    if "://" in path:
        path = path.split("://", 1)[1]
    return path.rstrip("/") or path
