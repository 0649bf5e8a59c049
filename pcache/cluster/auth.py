"""HMAC authentication of peer requests.

Every peer request carries ``X-Pcache-Date`` (unix seconds) and ``X-Pcache-Signature``: the hex
HMAC-SHA256, under the shared secret, of ``METHOD\\nPATH\\nDATE``. A node checks the signature before
routing anything; a missing, malformed, stale (outside ``max_skew_s``) or wrong signature is refused.
Headers are checked for shape before any arithmetic or comparison: the date is 1 to 16 ASCII digits,
the signature 64 hex digits, each header present once. Anything else (huge numbers, non-ASCII, empty,
duplicated) is an :class:`AuthError`, never another exception, so a node answers 401 and never 500.
The secret comes from a token file and is never logged; errors name the file, not its contents.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import stat
import time
from collections.abc import Mapping

DATE_HEADER = "X-Pcache-Date"
SIGNATURE_HEADER = "X-Pcache-Signature"
MIN_TOKEN_BYTES = 16
# ASCII only: int() and str.isdigit() also accept other scripts' digits, "_" and surrounding spaces.
# 16 digits is far beyond any clock and keeps int() and the skew arithmetic away from huge numbers.
_DATE_RE = re.compile(r"[0-9]{1,16}")
_SIGNATURE_RE = re.compile(r"[0-9a-fA-F]{64}")


class AuthError(PermissionError):
    """A request failed authentication; the message says why without revealing the secret."""


def load_token(path: str) -> bytes:
    """Read a shared secret from ``path``.

    Raises:
        ValueError: naming the file, when it is missing, unreadable, too short (< 16 bytes after
            stripping whitespace), or readable by group or others.
    """
    try:
        info = os.stat(path)
        with open(path, "rb") as fh:
            token = fh.read().strip()
    except OSError as exc:
        raise ValueError(f"token file {path!r} cannot be read: {exc.strerror or exc}") from None
    if len(token) < MIN_TOKEN_BYTES:
        raise ValueError(f"token file {path!r} holds {len(token)} bytes; at least {MIN_TOKEN_BYTES} are needed")
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"token file {path!r} is accessible by group or others; run: chmod 600 {path}")
    return token


def _mac(secret: bytes, method: str, path: str, date: str) -> str:
    # surrogatepass: a server may hand over a path decoded with surrogate escapes (undecodable bytes);
    # it must be signed or refused, never crash the check.
    message = f"{method.upper()}\n{path}\n{date}".encode("utf-8", "surrogatepass")
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def _single(headers: Mapping[str, str], name: str) -> str | None:
    """The one value of header ``name``; a header sent twice is refused, not silently first-wins."""
    getall = getattr(headers, "getall", None)  # a multidict (aiohttp's headers) keeps repeats
    values = list(getall(name, [])) if getall is not None else [v for v in [headers.get(name)] if v is not None]
    if len(values) > 1:
        raise AuthError(f"{name} header sent {len(values)} times")
    return values[0] if values else None


def sign_request(secret: bytes, method: str, path: str, now: float | None = None) -> dict[str, str]:
    """Return the headers that authenticate ``METHOD path`` (path includes any query string)."""
    date = str(int(time.time() if now is None else now))
    return {DATE_HEADER: date, SIGNATURE_HEADER: _mac(secret, method, path, date)}


def verify_request(secret: bytes, method: str, path: str, headers: Mapping[str, str],
                   max_skew_s: float = 60.0, now: float | None = None) -> None:
    """Check a request's signature.

    Raises:
        AuthError: when the signature is missing, malformed, stale or wrong.
    """
    date = _single(headers, DATE_HEADER)
    signature = _single(headers, SIGNATURE_HEADER)
    if not date or not signature:
        raise AuthError("request is not signed")
    if not _DATE_RE.fullmatch(date):
        raise AuthError("malformed signature date")
    if not _SIGNATURE_RE.fullmatch(signature):
        raise AuthError("malformed signature")
    if abs((time.time() if now is None else now) - int(date)) > max_skew_s:
        raise AuthError("stale signature (check the clocks of the two nodes)")
    # Both sides are ASCII hex by now: compare_digest raises TypeError on non-ASCII str.
    if not hmac.compare_digest(signature.lower().encode(), _mac(secret, method, path, date).encode()):
        raise AuthError("invalid signature")
