"""Parking chosen requests at the chaos proxy, to kill a client at an exact point of a protocol."""

from __future__ import annotations

import threading
from urllib.parse import parse_qs

__all__ = ["Hold"]


class Hold:
    """Requests the proxy parks until :meth:`release` (see :meth:`ChaosProxy.hold`).

    Attributes:
        method: Method to match, or None for any.
        path: URL-decoded path to match exactly, or None for any.
        query: A query parameter that must be present (e.g. ``"uploads"`` for CreateMultipartUpload),
            or None for any.
        stage: ``"request"`` parks before forwarding (the origin has not seen it); ``"response"`` parks
            after the origin answered, before the answer is relayed (the origin acted, the client
            does not know yet).
        times: How many matching requests to park; later ones pass.
        arrived: Set once a matching request is parked.
        held: How many requests have been parked so far.
    """

    def __init__(self, method: str | None, path: str | None, query: str | None, stage: str, times: int) -> None:
        if stage not in ("request", "response"):
            raise ValueError(f"Hold stage must be 'request' or 'response', got {stage!r}")
        self.method, self.path, self.query, self.stage, self.times = method, path, query, stage, times
        self.arrived = threading.Event()
        self.held = 0
        self._released = threading.Event()

    def _matches(self, method: str, path: str, query: str, stage: str) -> bool:
        return (stage == self.stage and self.held < self.times and (self.method is None or method == self.method)
                and (self.path is None or path == self.path)
                and (self.query is None or self.query in parse_qs(query, keep_blank_values=True)))

    def wait(self, timeout: float = 30.0) -> bool:
        """Wait until a matching request is parked; return False on timeout."""
        return self.arrived.wait(timeout)

    def release(self) -> None:
        """Let every parked request (and any later match) go on."""
        self._released.set()
