"""Prometheus metrics of a mount daemon (served on 127.0.0.1 with ``--metrics-port``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, start_http_server

READS = Counter("fusefs_reads", "FUSE read requests answered")
READ_BYTES = Counter("fusefs_read_bytes", "Bytes returned to FUSE reads")
ERRORS = Counter("fusefs_errors", "FUSE requests answered with an error", ["errno"])
OPENS = Counter("fusefs_opens", "Files opened")
REFRESHES = Counter("fusefs_refreshes", "Re-listings of the origin", ["result"])
INODES = Gauge("fusefs_inodes", "Inodes in the table (files and directories)")
BYTES = Gauge("fusefs_bytes", "Total bytes of the files in the table")


def serve_metrics(port: int) -> None:
    """Serve ``/metrics`` on 127.0.0.1:``port`` from a background thread (never on other interfaces)."""
    start_http_server(port, addr="127.0.0.1")

# Writable mounts (--writable): what was written through the mount, and where it is on its way.
STAGED_BYTES = Counter("fusefs_staged_bytes", "Bytes written through the mount into staged files")
UPLOADED_BYTES = Counter("fusefs_uploaded_bytes", "Bytes of files written through the mount now durable at the origin")
PENDING_BYTES = Gauge("fusefs_pending_bytes", "Bytes staged in the cache directory, not yet durable at the origin")
COMMITS = Counter("fusefs_commits", "fusefs commit requests", ["result"])
