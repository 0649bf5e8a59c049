"""Prometheus metrics of babel-sync (own registry, served by ``babel-sync run`` on 127.0.0.1)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

REGISTRY = CollectorRegistry()
BYTES = Counter("babel_bytes_copied", "Bytes copied to destinations", ["rule", "dest"], registry=REGISTRY)
OBJECTS = Counter("babel_objects_copied", "Objects copied to destinations", ["rule", "dest"], registry=REGISTRY)
UNITS = Counter("babel_units_published", "Units published at destinations", ["rule", "dest"], registry=REGISTRY)
ERRORS = Counter("babel_errors", "Errors (a unit not published, a failed listing)", ["rule", "dest"],
                 registry=REGISTRY)
LAG = Gauge("babel_lag_seconds", "Age of the oldest committed source unit not yet published (0 = in sync)",
            ["rule", "dest"], registry=REGISTRY)
PENDING = Gauge("babel_pending_bytes", "Bytes of units waiting to be published", ["rule", "dest"],
                registry=REGISTRY)
QUEUE = Gauge("babel_queue_depth", "File transfers waiting in the priority queue", registry=REGISTRY)
LAST_PASS = Gauge("babel_last_pass_timestamp_seconds", "End of the last pass", registry=REGISTRY)


def serve(port: int, addr: str = "127.0.0.1") -> None:
    """Serve ``/metrics`` on ``addr:port`` (loopback by default) from a daemon thread."""
    start_http_server(port, addr=addr, registry=REGISTRY)
