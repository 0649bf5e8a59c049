"""Write-back replication (``replicas=1``): a checkpoint file also lives on one peer before ``close()``.

Flow, for a file staged by a writer process:

1. ``close()`` fsyncs the file locally, then streams it to the peer that rendezvous placement ranks first
   for its URL (``PUT /v1/replica``). The peer writes it to its own ``cache_dir``, checks size and
   xxh3-128, fsyncs, and records a *standby* replica in its journal before answering 201. A peer that
   turns out to share the writer's ``cache_dir`` (same node id) answers 409 and the next one is tried.
2. The writer's uploader sends the file to the origin, then tells the peer to drop the replica
   (``DELETE /v1/replica``).
3. If the writer's node is lost first, ``pcache flush`` on the peer *adopts* the replica: unless the
   origin already holds that object written at or after the replica's creation time, the replica becomes
   a pending upload of the peer. Standby replicas are never uploaded on their own, so a stale copy cannot
   overwrite a newer write whose writer is alive.

Only non-secret storage options travel; the peer uploads with its own credentials.
"""

from __future__ import annotations

import http.client
import json
import os
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

import xxhash

from lingcore.log import get_logger
from pcache.cluster.auth import sign_request
from pcache.cluster.placement import Placement

log = get_logger(__name__)

REPLICA_PATH = "/v1/replica"
_CHUNK = 1024 * 1024


def node_id(cache_dir: str) -> str:
    """Return the stable id of the node owning ``cache_dir`` (created on first use)."""
    path = os.path.join(cache_dir, "node_id")
    try:
        with open(path) as fh:
            return fh.read().strip()
    except FileNotFoundError:
        pass
    os.makedirs(cache_dir, exist_ok=True)
    new = uuid.uuid4().hex
    tmp = f"{path}.{new}.tmp"
    with open(tmp, "w") as fh:
        fh.write(new)
    try:
        os.link(tmp, path)  # first writer wins; a racing process reads the winner's id below
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    with open(path) as fh:
        return fh.read().strip()


def replica_query(entry: dict[str, Any], source_node: str) -> str:
    """The signed path-with-query of a replica PUT (the metadata is covered by the signature)."""
    params = {"source_id": entry["id"], "source_node": source_node, "url": entry["url"],
              "protocol": entry["protocol"], "path": entry["path"], "options": json.dumps(entry["options"]),
              "size": entry["size"], "xxh3_128": entry["xxh3_128"], "created": repr(entry["created"])}
    return f"{REPLICA_PATH}?{urlencode(params)}"


def _request(peer: str, token: bytes, method: str, query: str, timeout_s: float, read_timeout_s: float,
             body: Any = None, length: int | None = None) -> tuple[int, bytes]:
    parts = urlsplit(peer)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout_s,
                                      blocksize=_CHUNK)
    try:
        conn.connect()  # a dead peer is skipped within timeout_s
        conn.sock.settimeout(read_timeout_s)
        headers = sign_request(token, method, query)
        if length is not None:
            headers["Content-Length"] = str(length)
        conn.request(method, query, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def replicate(peers: tuple[str, ...], token: bytes, entry: dict[str, Any], data_path: str, self_node: str,
              timeout_s: float = 1.0, read_timeout_s: float = 60.0) -> str | None:
    """Store the staged file on one peer; return that peer's URL, or None if no peer took it."""
    query = replica_query(entry, self_node)
    key = xxhash.xxh3_128_digest(entry["url"].encode())
    for peer in Placement(peers).ranked(key):
        try:
            with open(data_path, "rb") as fh:
                status, body = _request(peer, token, "PUT", query, timeout_s, read_timeout_s, fh, entry["size"])
        except (OSError, http.client.HTTPException) as exc:
            log.warning("replica of %s not stored on %s: %r", entry["url"], peer, exc, extra={"peer": peer})
            continue
        if status == 201:
            return peer
        if status != 409:  # 409: that peer is this node itself
            log.warning("replica of %s refused by %s: HTTP %d %s", entry["url"], peer, status, body[:200],
                        extra={"peer": peer})
    return None


def drop_remote(peer: str, token: bytes, source_id: str, timeout_s: float = 1.0) -> bool:
    """Tell ``peer`` that upload ``source_id`` is durable at the origin, so its replica can go."""
    query = f"{REPLICA_PATH}?{urlencode({'source_id': source_id})}"
    try:
        status, _ = _request(peer, token, "DELETE", query, timeout_s, 10.0)
    except (OSError, http.client.HTTPException) as exc:
        log.warning("could not drop replica %s on %s: %r (its flush will skip it: the origin is newer)",
                    source_id, peer, exc, extra={"peer": peer})
        return False
    return status == 200


def origin_mtime(info: dict[str, Any]) -> float | None:
    """Modification time (epoch seconds) from an fsspec ``info`` dict: S3 ``LastModified`` or ``mtime``."""
    value = info.get("LastModified", info.get("mtime", info.get("last_modified")))
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None
