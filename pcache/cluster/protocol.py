"""Wire format between pcache nodes (HTTP/1.1).

``GET /v1/block?path=P&version=V&size=N&index=I`` returns block ``I`` of origin object ``P`` at version
``V`` (``N`` bytes long), fetching it from the origin on a miss; ``HEAD`` answers 200 when the node
already has the block and 404 otherwise. Responses carry ``X-Pcache-Checksum`` (xxh3-64, hex) so the
reader verifies what it got. Paths are origin object paths and only ever become block *hashes* on the
node: no request path maps to a file system path. Every request except ``/healthz`` is signed (see
:mod:`pcache.cluster.auth`).
"""

from __future__ import annotations

from urllib.parse import urlencode

BLOCK_PATH = "/v1/block"
CHECKSUM_HEADER = "X-Pcache-Checksum"


def block_query(path: str, version: str, size: int, index: int, warm: bool = False) -> str:
    """Return the signed path-with-query for a block request (``warm``: load it, send nothing back)."""
    params: dict[str, object] = {"path": path, "version": version, "size": size, "index": index}
    if warm:
        params["warm"] = 1
    return f"{BLOCK_PATH}?{urlencode(params)}"
