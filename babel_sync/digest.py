"""Content digests of a copied file: the xxh3-128 of the whole file and an xxh3-64 per chunk.

Both are computed from the bytes as they stream through a copy (in file order), never by a second read
of the source. The per-chunk checksums go into the manifest, so ``babel-sync verify --sample RATE`` can
check randomly chosen ranges of a destination file without the source and without reading the rest.

Chunks are ``verify_chunk_size`` bytes (default 1 MiB), doubled for very large files so that no file has
more than :data:`MAX_CHUNKS` chunks (the manifest holds 16 hex digits per chunk). A file no larger than
one chunk has no chunk list: its whole-file hash is its only chunk.
"""

from __future__ import annotations

from typing import Any

from lingcore.checksum import block_checksum, content_hasher

MAX_CHUNKS = 65536


def chunk_size(size: int, base: int) -> int:
    """The chunk size for a file of ``size`` bytes: ``base``, doubled until at most MAX_CHUNKS chunks."""
    chunk = max(1, base)
    while size > chunk * MAX_CHUNKS:
        chunk *= 2
    return chunk


def chunk_count(size: int, chunk: int) -> int:
    """Chunks of a ``size``-byte file (the last one may be short)."""
    return max(1, -(-size // chunk))


class ContentDigest:
    """Streaming xxh3-128 of a whole file plus xxh3-64 of each chunk; feed the bytes in file order.

    Args:
        size: The file's size (sets the chunk size).
        base_chunk: ``verify_chunk_size``.
    """

    def __init__(self, size: int, base_chunk: int) -> None:
        self._hasher = content_hasher()
        self.chunk = chunk_size(size, base_chunk)
        self._chunked = size > self.chunk
        self._sums: list[int] = []
        self._tail = bytearray()

    def update(self, data: Any) -> None:
        """Add the next bytes of the file."""
        self._hasher.update(data)
        if not self._chunked:
            return
        view = memoryview(data).cast("B")
        if self._tail:
            need = self.chunk - len(self._tail)
            self._tail += view[:need]
            view = view[need:]
            if len(self._tail) < self.chunk:
                return
            self._sums.append(block_checksum(self._tail))
            self._tail = bytearray()
        whole = len(view) - len(view) % self.chunk
        for off in range(0, whole, self.chunk):
            self._sums.append(block_checksum(view[off:off + self.chunk]))
        if whole < len(view):
            self._tail += view[whole:]

    def fields(self) -> dict[str, Any]:
        """The manifest fields: ``xxh3_128`` and, for files larger than a chunk, ``chunk_size`` and
        ``chunks`` (16 hex digits per chunk, in order)."""
        out: dict[str, Any] = {"xxh3_128": self._hasher.hexdigest()}
        if self._chunked:
            sums = self._sums + ([block_checksum(self._tail)] if self._tail else [])
            out.update(chunk_size=self.chunk, chunks="".join(f"{s:016x}" for s in sums))
        return out


def chunk_sum(record: dict[str, Any], index: int) -> int | None:
    """The recorded xxh3-64 of chunk ``index`` of a manifest record, or None when it has no chunk list."""
    chunks = record.get("chunks")
    if not isinstance(chunks, str) or len(chunks) < 16 * (index + 1):
        return None
    return int(chunks[16 * index:16 * (index + 1)], 16)


__all__ = ["MAX_CHUNKS", "ContentDigest", "chunk_count", "chunk_size", "chunk_sum"]
