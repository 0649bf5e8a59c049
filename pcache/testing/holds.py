"""Chosen requests at the chaos proxy: parked (to kill a client at an exact point of a protocol) or failed
(to inject an error into exactly the request a test is about)."""

from __future__ import annotations

import threading
from urllib.parse import parse_qs

__all__ = ["Fault", "Hold"]


def _request_matches(want_method: str | None, want_path: str | None, want_query: str | None,
                     method: str, path: str, query: str) -> bool:
    """Whether a request matches a rule's method, exact path and required query parameter (None: any)."""
    return ((want_method is None or method == want_method) and (want_path is None or path == want_path)
            and (want_query is None or want_query in parse_qs(query, keep_blank_values=True)))


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
        return (stage == self.stage and self.held < self.times
                and _request_matches(self.method, self.path, self.query, method, path, query))

    def wait(self, timeout: float = 30.0) -> bool:
        """Wait until a matching request is parked; return False on timeout."""
        return self.arrived.wait(timeout)

    def release(self) -> None:
        """Let every parked request (and any later match) go on."""
        self._released.set()


class Fault:
    """Requests the proxy answers with its injected error instead of forwarding (see :meth:`ChaosProxy.fail`).

    Attributes:
        method: Method to match, or None for any.
        path: URL-decoded path to match exactly, or None for any.
        query: A query parameter that must be present (``"list-type"`` for ListObjectsV2), or None for any.
        skip: How many matching requests pass before the first one fails.
        times: How many matching requests fail after those (None: every one until :meth:`cancel`).
        seen: Matching requests so far (passed or failed).
        failed: Matching requests answered with the injected error so far.
    """

    def __init__(self, method: str | None, path: str | None, query: str | None, skip: int,
                 times: int | None) -> None:
        self.method, self.path, self.query, self.skip, self.times = method, path, query, skip, times
        self.seen = 0
        self.failed = 0
        self.active = True

    def _take(self, method: str, path: str, query: str) -> bool:
        """Count a request; return True if it is to fail. The proxy calls this under its lock."""
        if not self.active or not _request_matches(self.method, self.path, self.query, method, path, query):
            return False
        self.seen += 1
        if self.seen > self.skip and (self.times is None or self.failed < self.times):
            self.failed += 1
            return True
        return False

    def cancel(self) -> None:
        """Let every later matching request through."""
        self.active = False
