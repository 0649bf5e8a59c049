"""Wire format between pcache nodes (HTTP/1.1).

``GET /v1/block?path=P&version=V&size=N&index=I`` returns block ``I`` of origin object ``P`` at version
``V`` (``N`` bytes long), fetching it from the origin on a miss; ``HEAD`` answers 200 when the node
already has the block and 404 otherwise. Responses carry ``X-Pcache-Checksum`` (xxh3-64, hex) so the
reader verifies what it got, and ``X-Pcache-Block``: the :func:`placement_key` of the block the node
served (with the node's own block size), so the reader also checks that the bytes belong to the block
it asked for. Paths are origin object paths and only ever become block *hashes* on the
node: no request path maps to a file system path. Every request except ``/healthz`` is signed (see
:mod:`pcache.cluster.auth`).
"""

from __future__ import annotations

from urllib.parse import urlencode

import xxhash

BLOCK_PATH = "/v1/block"
CHECKSUM_HEADER = "X-Pcache-Checksum"
BLOCK_HEADER = "X-Pcache-Block"


def placement_key(path: str, version: str, block_size: int, index: int) -> bytes:
    """The key every client and node places a block by (independent of how each reaches the origin)."""
    return xxhash.xxh3_128_digest(f"{path}\0{version}\0{block_size}\0{index}".encode())


def block_query(path: str, version: str, size: int, index: int, warm: bool = False) -> str:
    """Return the signed path-with-query for a block request (``warm``: load it, send nothing back)."""
    params: dict[str, object] = {"path": path, "version": version, "size": size, "index": index}
    if warm:
        params["warm"] = 1
    return f"{BLOCK_PATH}?{urlencode(params)}"
