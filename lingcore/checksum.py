"""The one place that computes checksums.

Blocks use xxh3-64 (fast enough to verify on every read from disk); whole files use xxh3-128, the
content hash that manifests and commit markers record.
"""

from __future__ import annotations

from typing import Any

import xxhash


def block_checksum(data: Any) -> int:
    """Return the xxh3-64 checksum of a block (any buffer-protocol object)."""
    return xxhash.xxh3_64_intdigest(data)


def verify_block_checksum(data: Any, expected: int) -> bool:
    """Return True when ``data`` matches the recorded xxh3-64 checksum."""
    return xxhash.xxh3_64_intdigest(data) == expected


def content_hasher() -> Any:
    """Return an incremental xxh3-128 hasher for whole-file content hashes."""
    return xxhash.xxh3_128()


def content_hash(data: Any) -> str:
    """Return the xxh3-128 hex digest of ``data``."""
    return xxhash.xxh3_128_hexdigest(data)


def hash_stream(fh: Any, chunk_size: int = 8 * 1024 * 1024) -> tuple[int, str]:
    """Return ``(bytes read, xxh3-128 hex)`` of a binary file object, read to its end in chunks."""
    hasher, size = content_hasher(), 0
    while chunk := fh.read(chunk_size):
        hasher.update(chunk)
        size += len(chunk)
    return size, hasher.hexdigest()
