"""Tar and ``.npy`` parsing for WebDataset shards, robust to arbitrary bytes.

:func:`scan_tar` walks ustar/GNU/pax headers without the ``tarfile`` module, because ``tarfile`` treats
a corrupt header in the middle of an archive as its end and silently drops every later member. Here a
bad header is a :class:`~loaders.errors.CorruptMemberError` (or, when skipping, a counted loss followed by
resynchronisation on the next valid header, like ``tar --ignore-zeros``).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import struct
from collections.abc import Callable
from typing import Any

import numpy as np

from lingcore.log import get_logger
from loaders.errors import CorruptMemberError, TruncatedDataError

log = get_logger(__name__)

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_NPY_MAGIC = b"\x93NUMPY"
MAX_NPY_HEADER = 1 << 16
_MAX_META = 1 << 20  # pax / GNU long-name records are tiny; a huge one is damage, not a name
_REGULAR = (b"0", b"\x00", b"7")
ReadFn = Callable[[int, int], Any]


@functools.lru_cache(maxsize=4096)
def _npy_dict(header: bytes) -> tuple[np.dtype[Any], int]:
    try:
        meta = ast.literal_eval(header.decode("latin1"))
        dtype = np.dtype(meta["descr"])
        shape = tuple(meta["shape"])
    except Exception as exc:  # literal_eval and np.dtype raise many types on garbage
        raise ValueError(f"bad .npy header {header[:80]!r}: {exc}") from None
    if len(shape) != 1 or not isinstance(shape[0], int) or shape[0] < 0:
        raise ValueError(f".npy shape {shape} is not 1-D")
    if dtype.kind not in "iu" or dtype.hasobject:
        raise ValueError(f".npy dtype {dtype} is not an integer token type")
    return dtype, shape[0]


def _npy_header_size(buf: bytes) -> int:
    """Return the total header size a ``.npy`` prefix announces (0 if it cannot tell)."""
    if len(buf) >= 12 and buf[:6] == _NPY_MAGIC:
        if buf[6] == 1:
            return 10 + int(struct.unpack_from("<H", buf, 8)[0])
        if buf[6] in (2, 3):
            return 12 + int(struct.unpack_from("<I", buf, 8)[0])
    return 0


def parse_npy_header(buf: bytes) -> tuple[np.dtype[Any], int, int]:
    """Parse a ``.npy`` header at the start of ``buf``.

    Returns:
        ``(dtype, token count, header length)``.

    Raises:
        ValueError: when ``buf`` does not start with a valid 1-D integer ``.npy`` header.
    """
    if len(buf) < 10 or buf[:6] != _NPY_MAGIC:
        raise ValueError("payload does not start with the .npy magic")
    major = buf[6]
    if major == 1:
        hlen, start = struct.unpack_from("<H", buf, 8)[0], 10
    elif major in (2, 3) and len(buf) >= 12:
        hlen, start = struct.unpack_from("<I", buf, 8)[0], 12
    else:
        raise ValueError(f"unsupported .npy version {major}")
    if hlen > MAX_NPY_HEADER or start + hlen > len(buf):
        raise ValueError(f".npy header of {hlen} bytes is truncated")
    dtype, count = _npy_dict(bytes(buf[start:start + hlen]))
    return dtype, count, start + hlen


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\x00", 1)[0].strip()
    return int(text, 8) if text else 0


def header_ok(hdr: bytes) -> bool:
    """Return True when a 512-byte tar header's checksum is right (unsigned or signed, like tarfile)."""
    try:
        stored = _number(hdr[148:156])
    except ValueError:
        return False
    unsigned = sum(hdr[:148]) + 256 + sum(hdr[156:])
    if stored == unsigned:
        return True
    # Some old tars summed the header as signed chars.
    high = sum(1 for b in hdr[:148] + hdr[156:] if b > 127)
    return stored == unsigned - 256 * high


def member_name_of(hdr: bytes) -> str:
    """Return the member name in a ustar header (prefix joined), undecodable bytes replaced."""
    name = hdr[:100].split(b"\x00", 1)[0]
    if hdr[257:262] == b"ustar" and hdr[345] != 0:
        name = hdr[345:500].split(b"\x00", 1)[0] + b"/" + name
    return name.decode("utf-8", "replace")


def _split_key(name: str) -> tuple[str, str]:
    # WebDataset's grouping: the key is the path up to the first dot of the base name.
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext


def scan_tar(read: ReadFn, size: int, url: str, on_error: str) -> tuple[np.ndarray, np.dtype[Any] | None, int]:
    """Find every ``.npy`` member of a tar by walking its headers.

    Args:
        read: ``read(offset, length)`` returning bytes of the tar.
        size: Size of the tar in bytes.
        url: The shard URL, named in errors.
        on_error: ``"raise"`` or ``"skip"``; skipped members are counted in the result.

    Returns:
        ``(rows, dtype, skipped)``: int64 rows of (header offset, payload offset, token offset, tokens).
    """
    rows: list[tuple[int, int, int, int]] = []
    dtype: np.dtype[Any] | None = None
    skipped = 0
    seen: set[str] = set()
    pax: dict[str, str] = {}
    long_name: str | None = None
    offset = 0

    def fail(error: Exception) -> None:
        nonlocal skipped
        if on_error != "skip":
            raise error
        skipped += 1
        log.warning("skipping corrupt member: %s", error, extra={"url": url})

    while offset + BLOCK <= size:
        hdr = bytes(read(offset, BLOCK))
        if hdr == _ZERO_BLOCK:
            return rows_array(rows), dtype, skipped
        name = long_name or pax.get("path") or member_name_of(hdr)
        problem = "" if header_ok(hdr) else "bad tar header checksum"
        member_size = -1
        if not problem:
            with contextlib.suppress(ValueError):  # stays -1: reported just below
                member_size = int(pax["size"]) if "size" in pax else _number(hdr[124:136])
            if member_size < 0:
                problem = "unparsable size field"
        if problem:
            fail(CorruptMemberError(url, name or f"<header at byte {offset}>", problem))
            offset = _resync(read, offset + BLOCK, size)
            long_name, pax = None, {}
            continue
        kind = hdr[156:157]
        hdr_offset = offset
        data = offset + BLOCK
        offset = data + -(-member_size // BLOCK) * BLOCK
        if data + member_size > size:
            fail(TruncatedDataError(url, f"member {name!r} runs past the end of the {size}-byte tar"))
            break
        if kind in (b"x", b"g", b"L"):
            if member_size > _MAX_META:
                fail(CorruptMemberError(url, name, f"{member_size}-byte extended header"))
                continue
            payload = bytes(read(data, member_size))
            if kind == b"L":
                long_name = payload.split(b"\x00", 1)[0].decode("utf-8", "replace")
            elif kind == b"x":
                pax = _pax_records(payload)
            continue
        long_name, pax = None, {}
        key, ext = _split_key(name)
        if kind not in _REGULAR or not (ext == "npy" or ext.endswith(".npy")) or key in seen:
            continue
        try:
            head = bytes(read(data, min(member_size, 256)))
            need = _npy_header_size(head)
            if len(head) < need <= min(member_size, MAX_NPY_HEADER + 12):  # a long header: read all of it
                head = bytes(read(data, need))
            member_dtype, count, hlen = parse_npy_header(head)
            if hlen + count * member_dtype.itemsize != member_size:
                raise ValueError(f"{count} tokens of {member_dtype} do not fill the {member_size}-byte payload")
            if dtype is not None and member_dtype != dtype:
                raise ValueError(f"dtype {member_dtype} differs from the shard's {dtype}")
        except ValueError as exc:
            fail(CorruptMemberError(url, name, str(exc)))
            continue
        dtype = member_dtype
        seen.add(key)
        rows.append((hdr_offset, data, data + hlen, count))
    if 0 < size - offset < BLOCK:
        fail(TruncatedDataError(url, f"tar ends inside a header block at byte {offset}"))
    return rows_array(rows), dtype, skipped


def _resync(read: ReadFn, offset: int, size: int) -> int:
    # After a corrupt header, skip to the next block that is a valid header (or the end marker), as
    # ``tar --ignore-zeros`` does: the damaged member is lost, the following ones are not.
    while offset + BLOCK <= size:
        block = bytes(read(offset, BLOCK))
        if block == _ZERO_BLOCK or header_ok(block):
            break
        offset += BLOCK
    return offset


def rows_array(rows: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Return member-table rows as an int64 ``(n, 4)`` array (also for ``n == 0``)."""
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def _pax_records(payload: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(payload):
        space = payload.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(payload[pos:space])
        except ValueError:
            break
        if length <= 0:
            break
        key, _, value = payload[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out
