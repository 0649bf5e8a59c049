"""Block keys and object references: the identity of every cached byte.

A block key is ``xxh3_128(origin identity, version, block size, block index)``. The origin identity is
the endpoint plus the URL, so equal paths on two stores never share blocks; the version is the ETag
(else ``size:mtime``), so a rewritten object gets new keys; the block size sets the boundaries. Every
tier (memory, disk, peers) and every process that shares a ``cache_dir`` (DataLoader workers, the
fusefs daemon, the trainer) uses this one formula, so they share blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import xxhash


@dataclass(frozen=True)
class ObjectRef:
    """One version of one origin object.

    Attributes:
        url: Origin identity (protocol, endpoint and path), part of every block key.
        version: ETag, or ``size:mtime`` when the store has no ETag; a new version means new keys.
        size: Object size in bytes.
    """

    url: str
    version: str
    size: int


def block_key(obj: ObjectRef, index: int, block_size: int) -> bytes:
    """Return the 16-byte key of block ``index`` of ``obj`` (block size included: it sets boundaries)."""
    return xxhash.xxh3_128_digest(f"{obj.url}\0{obj.version}\0{block_size}\0{index}".encode())
