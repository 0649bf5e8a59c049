"""HMAC authentication of peer requests.

Every peer request carries ``X-Pcache-Date`` (unix seconds) and ``X-Pcache-Signature``: the hex
HMAC-SHA256, under the shared secret, of ``METHOD\\nPATH\\nDATE``. A node checks the signature before
routing anything; a missing, malformed, stale (outside ``max_skew_s``) or wrong signature is refused.
The secret comes from a token file and is never logged; errors name the file, not its contents.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import time
from collections.abc import Mapping

DATE_HEADER = "X-Pcache-Date"
SIGNATURE_HEADER = "X-Pcache-Signature"
MIN_TOKEN_BYTES = 16


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
    return hmac.new(secret, f"{method.upper()}\n{path}\n{date}".encode(), hashlib.sha256).hexdigest()


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
    date = headers.get(DATE_HEADER)
    signature = headers.get(SIGNATURE_HEADER)
    if not date or not signature:
        raise AuthError("request is not signed")
    try:
        stamp = int(date)
    except ValueError:
        raise AuthError("malformed signature date") from None
    if abs((time.time() if now is None else now) - stamp) > max_skew_s:
        raise AuthError("stale signature (check the clocks of the two nodes)")
    if not hmac.compare_digest(signature, _mac(secret, method, path, date)):
        raise AuthError("invalid signature")
