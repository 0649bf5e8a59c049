"""The peer tier of the read path: ask the block's owner node, then the next owner, then give up.

Liveness and slowness are told apart. Every peer's ``/healthz`` is probed every ``health_interval_s``
with a ``timeout_s`` (1 s) deadline, and connecting has the same deadline: a dead or hung peer is
skipped within about a second. A live owner may take longer to answer, since its first request for a
block includes its own origin fetch, so reading a response may take up to ``read_timeout_s``. A
killed peer's connections are reset at once and fail immediately. A block whose checksum does not match is treated as a miss
and counted, and so is an answer for another block than the one asked for (``X-Pcache-Block``, e.g. a
node with another block size). Returning None sends the reader to the origin.
"""

from __future__ import annotations

import http.client
import os
import threading
import time
from urllib.parse import urlsplit

from lingcore.checksum import block_checksum
from lingcore.log import get_logger
from pcache.cluster.auth import sign_request
from pcache.cluster.placement import Placement
from pcache.cluster.protocol import BLOCK_HEADER, CHECKSUM_HEADER, block_query, placement_key

log = get_logger(__name__)


class PeerTier:
    """Client side of the cluster for one process.

    Args:
        peers: Node URLs (``http://host:port``).
        token: Shared secret.
        timeout_s: Per-request socket timeout.
        tries: How many owners to ask before falling back to the origin.
        health_interval_s: Seconds between health checks of each peer.
    """

    def __init__(self, peers: tuple[str, ...], token: bytes, timeout_s: float = 1.0, tries: int = 2,
                 health_interval_s: float = 0.5, read_timeout_s: float = 30.0) -> None:
        self.peers, self.token, self.timeout_s, self.tries = peers, token, timeout_s, tries
        self.read_timeout_s = read_timeout_s
        self.health_interval_s = health_interval_s
        self._dead: dict[str, float] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self.counters = {"peer_hits": 0, "peer_errors": 0, "peer_checksum_errors": 0}
        self._stop = threading.Event()
        self._checker = threading.Thread(target=self._health_loop, name="pcache-peer-health", daemon=True)
        self._checker.start()

    def alive(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(p for p in self.peers if p not in self._dead)

    def _mark_dead(self, peer: str, why: str) -> None:
        with self._lock:
            fresh = peer not in self._dead
            self._dead[peer] = time.monotonic()
            self.counters["peer_errors"] += 1
        if fresh:
            log.warning("peer %s skipped: %s", peer, why, extra={"peer": peer})

    def _conn(self, peer: str) -> http.client.HTTPConnection:
        if self._local.__dict__.get("pid") != os.getpid():
            self._local.__dict__.update(pid=os.getpid(), conns={})
        conns: dict[str, http.client.HTTPConnection] = self._local.__dict__["conns"]
        if peer not in conns:
            parts = urlsplit(peer)
            conns[peer] = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=self.timeout_s)
        return conns[peer]

    def _drop(self, peer: str) -> None:
        conn = self._local.__dict__.get("conns", {}).pop(peer, None)
        if conn is not None:
            conn.close()

    def get_block(self, path: str, version: str, size: int, index: int, block_size: int) -> bytes | None:
        """Return the block from its owner (or the next owner), or None to use the origin."""
        placement = Placement(self.alive())
        if not placement.nodes:
            return None
        query = block_query(path, version, size, index)
        key = placement_key(path, version, block_size, index)
        for peer in placement.ranked(key)[: self.tries]:
            # On a checksum mismatch the same owner is asked once more with verify=1: it then checks its
            # copy, drops it if corrupt and refetches, so the cluster still fetches the block once.
            for attempt in (query, f"{query}&verify=1"):
                body, status = self._get(peer, attempt, key)
                if status == "ok":
                    with self._lock:
                        self.counters["peer_hits"] += 1
                    return body
                if status != "mismatch":
                    break
        return None

    def _get(self, peer: str, query: str, key: bytes) -> tuple[bytes | None, str]:
        """One signed GET of the block ``key``; returns (body, "ok") or (None, "mismatch" | "failed")."""
        conn = self._conn(peer)
        try:
            if conn.sock is None:
                conn.connect()  # within timeout_s
                conn.sock.settimeout(self.read_timeout_s)  # type: ignore[attr-defined]
            conn.request("GET", query, headers=sign_request(self.token, "GET", query))
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self._drop(peer)
            self._mark_dead(peer, repr(exc))
            return None, "failed"
        if resp.status != 200:
            with self._lock:
                self.counters["peer_errors"] += 1
            if resp.status == 401:
                log.error("peer %s refused our signature (token mismatch?)", peer, extra={"peer": peer})
            return None, "failed"
        if resp.getheader(CHECKSUM_HEADER) != f"{block_checksum(body):016x}":
            with self._lock:
                self.counters["peer_checksum_errors"] += 1
            log.warning("peer %s sent a block that fails its checksum (%s)", peer, query, extra={"peer": peer})
            return None, "mismatch"
        if resp.getheader(BLOCK_HEADER) != key.hex():
            with self._lock:
                self.counters["peer_errors"] += 1
            log.error("peer %s answered %s with another block (%s): is its block_size different?", peer, query,
                      resp.getheader(BLOCK_HEADER), extra={"peer": peer})
            return None, "failed"
        return body, "ok"

    def warm_block(self, path: str, version: str, size: int, index: int, block_size: int) -> bool:
        """Ask the block's owner to load it (from the origin if needed); return True when it has it."""
        placement = Placement(self.alive())
        if not placement.nodes:
            return False
        query = block_query(path, version, size, index, warm=True)
        for peer in placement.ranked(placement_key(path, version, block_size, index))[: self.tries]:
            conn = self._conn(peer)
            try:
                if conn.sock is None:
                    conn.connect()
                    conn.sock.settimeout(self.read_timeout_s)  # type: ignore[attr-defined]
                conn.request("GET", query, headers=sign_request(self.token, "GET", query))
                resp = conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException) as exc:
                self._drop(peer)
                self._mark_dead(peer, repr(exc))
                continue
            if resp.status == 204:
                return True
        return False

    def close(self) -> None:
        """Stop health checks (the owning filesystem is gone)."""
        self._stop.set()

    def _health_loop(self) -> None:
        while not self._stop.wait(self.health_interval_s):
            for peer in self.peers:
                parts = urlsplit(peer)
                conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port,
                                                  timeout=self.timeout_s)
                try:
                    conn.request("GET", "/healthz")
                    healthy = conn.getresponse().status == 200
                except (OSError, http.client.HTTPException) as exc:
                    healthy, why = False, repr(exc)
                finally:
                    conn.close()
                with self._lock:
                    was_dead = peer in self._dead
                    if healthy:
                        self._dead.pop(peer, None)
                if healthy and was_dead:
                    log.info("peer %s is back", peer, extra={"peer": peer})
                elif not healthy and not was_dead:
                    self._mark_dead(peer, f"health check failed: {why}")
