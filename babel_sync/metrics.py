"""Prometheus metrics of babel-sync (own registry, served by ``babel-sync run`` on 127.0.0.1).

prometheus_client is imported on first use, not at import: ``babel-sync once`` serves no metrics, and a
no-op pass is short enough that the import (~0.1 s) was a visible share of it. The metric objects below
are stand-ins with the same ``labels(...).inc()/.set()`` calls; they record nothing until
:func:`enable` (called by :func:`serve`, or by a program that wants :data:`REGISTRY` filled in-process).
"""

from __future__ import annotations

import threading
from typing import Any

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {}
#: (attribute, kind, name, help, label names) of every metric.
_SPECS = (
    ("BYTES", "Counter", "babel_bytes_copied", "Bytes copied to destinations", ("rule", "dest")),
    ("OBJECTS", "Counter", "babel_objects_copied", "Objects copied to destinations", ("rule", "dest")),
    ("UNITS", "Counter", "babel_units_published", "Units published at destinations", ("rule", "dest")),
    ("ERRORS", "Counter", "babel_errors", "Errors (a unit not published, a failed listing)", ("rule", "dest")),
    ("LAG", "Gauge", "babel_lag_seconds", "Age of the oldest committed source unit not yet published (0 = in sync)",
     ("rule", "dest")),
    ("PENDING", "Gauge", "babel_pending_bytes", "Bytes of units waiting to be published", ("rule", "dest")),
    ("QUEUE", "Gauge", "babel_queue_depth", "File transfers waiting in the priority queue", ()),
    ("LAST_PASS", "Gauge", "babel_last_pass_timestamp_seconds", "End of the last pass", ()),
)


class _Noop:
    """What a disabled metric's ``labels()`` returns: accepts every update, records nothing."""

    def inc(self, amount: float = 1) -> None:
        """Ignored."""

    def set(self, value: float) -> None:
        """Ignored."""


_NOOP = _Noop()


class _Metric:
    """A metric that forwards to its prometheus_client object once metrics are enabled."""

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def _real(self) -> Any:
        return _STATE.get(self.attr)

    def labels(self, *values: str) -> Any:
        """The labelled child (or a no-op while metrics are disabled)."""
        real = self._real()
        return real.labels(*values) if real is not None else _NOOP

    def inc(self, amount: float = 1) -> None:
        """Increment (unlabelled counters)."""
        real = self._real()
        if real is not None:
            real.inc(amount)

    def set(self, value: float) -> None:
        """Set (unlabelled gauges)."""
        real = self._real()
        if real is not None:
            real.set(value)


BYTES, OBJECTS, UNITS, ERRORS, LAG, PENDING, QUEUE, LAST_PASS = (_Metric(spec[0]) for spec in _SPECS)


def enable() -> Any:
    """Create the registry and the metrics (idempotent); return the registry."""
    with _LOCK:
        if "REGISTRY" not in _STATE:
            import prometheus_client

            registry = prometheus_client.CollectorRegistry()
            for attr, kind, name, doc, labels in _SPECS:
                _STATE[attr] = getattr(prometheus_client, kind)(name, doc, list(labels), registry=registry)
            _STATE["REGISTRY"] = registry
        return _STATE["REGISTRY"]


def __getattr__(name: str) -> Any:
    """``metrics.REGISTRY``: the registry, created (and metrics enabled) on first access."""
    if name == "REGISTRY":
        return enable()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def serve(port: int, addr: str = "127.0.0.1") -> None:
    """Serve ``/metrics`` on ``addr:port`` (loopback by default) from a daemon thread."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=addr, registry=enable())
