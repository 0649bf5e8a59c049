"""Administration of a cache directory and of cache nodes, as a library (the ``pcache`` CLI's commands).

Each function returns the data the CLI prints (its ``--json`` form) and raises typed errors; none prints.
Progress is reported through optional callbacks, so a caller may draw a bar or ignore it.

- :func:`stat` and :func:`pending_uploads`: usage per tier, hit ratio, what waits for upload
- :func:`warm`: load objects or prefixes into the cache (or, with ``peers``, on their owner nodes)
- :func:`flush`: upload write-back files left in the journal, optionally adopting peer replicas
- :func:`verify`: re-check every block's checksum, dropping corrupt blocks
- :func:`gc`: reconcile index and files, remove stale temporaries and orphans, enforce the budget
- :class:`NodeClient` and :func:`node_stat`: a running node's metrics over the signed HTTP protocol
"""

from __future__ import annotations

import http.client
import os
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import fsspec

from lingcore.log import get_logger
from lingcore.storage import split_url, storage_options
from pcache.cluster.auth import load_token, sign_request
from pcache.config import CacheConfig
from pcache.diskstore import DiskStore
from pcache.errors import ConfigError
from pcache.fs import PCacheFileSystem
from pcache.journal import Journal
from pcache.keys import ObjectRef

log = get_logger(__name__)

# progress(url, bytes just done, total bytes of url)
WarmProgress = Callable[[str, int, int], None]
# progress(blocks just checked, total blocks)
VerifyProgress = Callable[[int, int], None]


def _open_store(config: CacheConfig) -> tuple[Journal, DiskStore]:
    journal = Journal(config.cache_dir)
    return journal, DiskStore(config.cache_dir, config.disk_bytes, reserved=journal.pending_bytes)


def stat(config: CacheConfig) -> dict[str, Any]:
    """Usage of the cache directory: disk tier, budgets, hits per tier, origin bytes, pending uploads."""
    journal, store = _open_store(config)
    s = store.stats()
    pending = journal.pending()
    hits = s["hits_memory"] + s["hits_disk"] + s["hits_peer"]
    lookups = hits + s["misses"]
    return {"cache_dir": config.cache_dir, "disk_blocks": s["blocks"], "disk_bytes": s["total"],
            "disk_budget": config.disk_bytes, "memory_budget_per_process": config.memory_bytes,
            "hits_memory": s["hits_memory"], "hits_disk": s["hits_disk"], "hits_peer": s["hits_peer"],
            "misses": s["misses"], "peer_bytes": s["peer_bytes"],
            "hit_ratio": (hits / lookups) if lookups else None, "origin_bytes": s["origin_bytes"],
            "evictions": s["evictions"], "corrupt_blocks": s["corrupt_blocks"],
            "pending_uploads": len(pending), "pending_bytes": sum(e["size"] for e in pending)}


def pending_uploads(config: CacheConfig, prefix: str | None = None) -> list[dict[str, Any]]:
    """Journal entries not yet durable at the origin (``url``, ``size``, ``last_error`` when one failed)."""
    return Journal(config.cache_dir).pending(prefix)


def warm(config: CacheConfig, urls: Iterable[str], endpoint_url: str | None = None,
         progress: WarmProgress | None = None) -> dict[str, int]:
    """Load every object under ``urls`` into the cache; with ``config.peers``, each block on its owner node.

    Returns:
        ``{"files": count, "bytes": total size}``.

    Raises:
        FileNotFoundError: a URL names nothing.
        OSError: the origin (or, for a cluster warm, every owner of a block) failed.
    """
    total_bytes = total_files = 0
    for url in urls:
        protocol, path = split_url(url)
        fs: PCacheFileSystem = fsspec.filesystem("pcache", target_protocol=protocol,
                                                 target_options=storage_options(protocol, endpoint_url),
                                                 **vars(config))
        target = fs.origin_path(path)
        info = fs.info(target)
        files = {target: info} if info["type"] == "file" else fs.find(target, detail=True)
        size = sum(i["size"] for i in files.values())

        def advance(n: int, url: str = url, size: int = size) -> None:
            if progress is not None:
                progress(url, n, size)

        advance(0)
        for name, item in files.items():
            ref = fs.ref_for(name)
            if fs.peers is not None:
                _warm_on_owners(fs, name, ref, advance)
            else:
                fetch = fs.fetcher_for(name, ref)
                step = config.block_size * config.fetch_workers
                for off in range(0, ref.size, step):
                    advance(len(fs.engine.get_range(ref, off, min(ref.size, off + step), fetch)))
            total_bytes += item["size"]
            total_files += 1
        fs.engine.drain_writes()  # warm means "on disk" once this returns, not only at process exit
        fs.engine.disk.flush_hits()
    return {"files": total_files, "bytes": total_bytes}


def _warm_on_owners(fs: PCacheFileSystem, name: str, ref: ObjectRef, advance: Callable[[int], None]) -> None:
    """Cluster warm: each block is loaded by its owner node; nothing is copied to this machine."""
    bs = fs.config.block_size
    tier = fs.peers
    assert tier is not None

    def one(index: int) -> None:
        if not tier.warm_block(name, ref.version, ref.size, index, bs):
            raise OSError(f"no peer could warm block {index} of {fs.url(name)}")
        advance(min(bs, ref.size - index * bs))

    with ThreadPoolExecutor(fs.config.fetch_workers) as pool:
        list(pool.map(one, range((ref.size + bs - 1) // bs)))


def flush(config: CacheConfig, endpoint_url: str | None = None, prefix: str | None = None,
          timeout: float | None = None, adopt_replicas: bool = False) -> dict[str, Any]:
    """Upload what the journal holds (under ``prefix``), e.g. after a killed process.

    ``adopt_replicas`` first adopts the standby replicas this node keeps for other nodes: only once a
    writer's node is lost, never while that writer may still be uploading.

    Returns:
        ``uploaded``, ``failed`` (URLs), ``still_pending``, and ``replicas_adopted``, ``replicas_dropped``
        (already at the origin), ``replicas_failed`` (kept), ``orphan_uploads_aborted`` (multipart uploads
        of a killed uploader), ``orphan_uploads_failed`` (objects whose origin could not be reached).
    """
    from pcache.uploader import Uploader

    uploader = Uploader(config, endpoint_url=endpoint_url)
    replicas = uploader.adopt_replicas() if adopt_replicas else {"adopted": 0, "dropped": 0, "failed": 0}
    before = uploader.journal.pending(prefix)
    failed = uploader.drain(prefix, timeout=timeout)
    still = len(uploader.journal.pending(prefix))
    return {"uploaded": len(before) - still, "failed": failed, "still_pending": still,
            "replicas_adopted": replicas["adopted"], "replicas_dropped": replicas["dropped"],
            "replicas_failed": replicas["failed"], "orphan_uploads_aborted": uploader.orphans["aborted"],
            "orphan_uploads_failed": uploader.orphans["failed"]}


def verify(config: CacheConfig, progress: VerifyProgress | None = None) -> dict[str, Any]:
    """Re-check every disk block's checksum; corrupt blocks are dropped (the next read refetches them).

    Returns:
        ``{"checked": blocks, "corrupt": [paths of dropped block files]}``.
    """
    store = DiskStore(config.cache_dir, config.disk_bytes, config.compression)
    total = sum(1 for _ in store.iter_block_files())
    corrupt = store.verify(progress=(lambda k: progress(k, total)) if progress is not None else None)
    store.flush_hits()
    return {"checked": total, "corrupt": corrupt}


def gc(config: CacheConfig, keep_done_days: float = 7.0, endpoint_url: str | None = None) -> dict[str, Any]:
    """Reconcile index and block files, remove stale temporaries and orphaned staged files, abort the
    multipart uploads a killed uploader left at the origin, enforce the disk budget, and forget upload
    records and damaged index copies older than ``keep_done_days``; return the counts (``orphan_uploads_failed`` > 0: an origin
    could not be reached, and its intents are kept for the next run)."""
    from pcache.uploader import abort_orphan_uploads

    journal, store = _open_store(config)
    result: dict[str, Any] = dict(store.gc())
    orphans = abort_orphan_uploads(config, endpoint_url=endpoint_url)
    result["orphan_uploads_aborted"], result["orphan_uploads_failed"] = orphans["aborted"], orphans["failed"]
    result["orphan_staged"] = journal.remove_orphans()
    result["done_records_pruned"] = journal.prune_done(keep_done_days * 86400)
    result["corrupt_copies_pruned"] = prune_corrupt_copies(config.cache_dir, keep_done_days * 86400)
    return result


def prune_corrupt_copies(cache_dir: str, older_than_s: float) -> int:
    """Delete the damaged index and metadata copies (``*.corrupt-<time>[-<pid>]``) older than ``older_than_s``.

    A rebuild moves the damaged files aside instead of deleting them, so they can be inspected; without
    this, a cache that keeps getting damaged (a bad disk) would fill up with them.
    """
    now, pruned = time.time(), 0
    for name in os.listdir(cache_dir):
        stem, _, rest = name.partition(".corrupt-")
        if stem not in ("index", "metadata") or not rest[:10].isdigit():
            continue
        if now - int(rest.split("-")[0]) < older_than_s:
            continue
        shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)
        log.info("removed damaged copy %s", os.path.join(cache_dir, name), extra={"path": cache_dir})
        pruned += 1
    return pruned


class NodeClient:
    """Signed requests to one running cache node (``pcache serve``), for administration.

    Args:
        url: The node, ``http://host:port``.
        token_file: The secret shared by the nodes (checked when the client is built).
        timeout: Socket timeout per request, in seconds.

    Raises:
        ConfigError: no ``token_file``.
    """

    def __init__(self, url: str, token_file: str | None, timeout: float = 10.0) -> None:
        if not token_file:
            raise ConfigError("token_file", "a node request needs --token-file (or PCACHE_TOKEN_FILE)", "arguments")
        self.url, self.timeout = url, timeout
        self._token = load_token(token_file)

    def get(self, path: str) -> str:
        """GET ``path`` (with query) and return the body.

        Raises:
            PermissionError: the node answered anything but 200 (refused signature, unknown path, ...).
            OSError: the node could not be reached.
        """
        parts = urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=self.timeout)
        try:
            conn.request("GET", path, headers=sign_request(self._token, "GET", path))
            resp = conn.getresponse()
            body = resp.read().decode()
        finally:
            conn.close()
        if resp.status != 200:
            raise PermissionError(f"{self.url} answered {resp.status}: {body[:200]}")
        return body

    def metrics(self) -> dict[str, float]:
        """The node's Prometheus metrics, by name (``_total`` dropped, label values appended with ``_``)."""
        from prometheus_client.parser import text_string_to_metric_families

        values: dict[str, float] = {}
        for family in text_string_to_metric_families(self.get("/metrics")):
            for sample in family.samples:
                label = "_".join(sample.labels.values())
                values[sample.name.removesuffix("_total") + (f"_{label}" if label else "")] = sample.value
        return values


def node_stat(node: str, token_file: str | None) -> dict[str, Any]:
    """A running node's view: its metrics plus ``node`` and ``hit_ratio`` (None before any lookup)."""
    values = NodeClient(node, token_file).metrics()
    hits = sum(values.get(f"pcache_hits_{tier}", 0) for tier in ("memory", "disk", "peer"))
    lookups = hits + values.get("pcache_misses", 0)
    return {"node": node, **values, "hit_ratio": hits / lookups if lookups else None}
