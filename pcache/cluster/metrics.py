"""Prometheus metrics of a cache node, computed at scrape time from the engine, disk index and journal.

A custom collector (not module-level counters) reads the numbers the node already keeps, so there is
one source of truth, and the figures of other processes sharing the ``cache_dir`` (the shared index's
counters) are included.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class NodeCollector:
    """Collects a node's metrics on each scrape."""

    def __init__(self, node: Any) -> None:
        self.node = node

    def collect(self) -> Iterator[Any]:
        fs = self.node.fs
        shared = fs.engine.disk.stats()
        pending = fs.writeback.journal.pending()
        replicas = fs.writeback.journal.replicas()
        hits = CounterMetricFamily("pcache_hits", "Block reads served from a cache tier (shared index)",
                                   labels=["tier"])
        hits.add_metric(["memory"], shared["hits_memory"])
        hits.add_metric(["disk"], shared["hits_disk"])
        hits.add_metric(["peer"], shared["hits_peer"])  # reads of processes using this cache_dir as a client
        yield hits
        yield CounterMetricFamily("pcache_misses", "Blocks fetched from the origin", value=shared["misses"])
        yield CounterMetricFamily("pcache_origin_bytes", "Bytes fetched from the origin",
                                  value=shared["origin_bytes"])
        yield CounterMetricFamily("pcache_served_bytes", "Block bytes this node served to peers",
                                  value=self.node.served_bytes)
        yield CounterMetricFamily("pcache_peer_request_errors", "Peer requests refused or failed",
                                  value=self.node.request_errors)
        yield CounterMetricFamily("pcache_corrupt_blocks", "Blocks dropped for a checksum mismatch",
                                  value=shared["corrupt_blocks"])
        yield CounterMetricFamily("pcache_stale_reads", "Opens and listings served from cached metadata while "
                                  "the origin was unreachable (stale_if_error)", value=fs.origin.metadata.stale_reads())
        yield GaugeMetricFamily("pcache_disk_bytes", "Bytes of clean blocks on disk", value=shared["total"])
        yield GaugeMetricFamily("pcache_disk_blocks", "Clean blocks on disk", value=shared["blocks"])
        yield GaugeMetricFamily("pcache_upload_queue_depth", "Write-back files not yet durable at the origin",
                                value=len(pending))
        yield GaugeMetricFamily("pcache_upload_pending_bytes", "Write-back bytes not yet durable",
                                value=sum(e["size"] for e in pending))
        yield GaugeMetricFamily("pcache_standby_replicas", "Write-back files held for other nodes (replicas=1)",
                                value=len(replicas))
        yield GaugeMetricFamily("pcache_standby_replica_bytes", "Bytes of standby replicas held for other nodes",
                                value=sum(e["size"] for e in replicas))


def render(node: Any) -> bytes:
    """Return the node's metrics in the Prometheus text format."""
    registry = CollectorRegistry()
    registry.register(NodeCollector(node))
    return generate_latest(registry)
