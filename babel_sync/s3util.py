"""Shared pieces of the S3 store: the botocore session, the bandwidth limiter and error translation.

botocore is imported only inside these functions: a no-op pass never needs it.
"""

from __future__ import annotations

import errno
import threading
import time
from typing import Any

from babel_sync.config import Site
from babel_sync.errors import SiteAuthError, SourceChangedError
from lingcore.errors import StoreNotFoundError

_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
TRANSIENT_CODES = {"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout", "OperationAborted"}
_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "NoSuchUpload", "NotFound", "404"}


_SESSION: list[Any] = []
_SESSION_LOCK = threading.Lock()


def botocore_client(**kwargs: Any) -> Any:
    """An S3 client from the one botocore session of the process (under a lock: sessions are not
    thread-safe). Creating a client loads ~0.3 s of service-model JSON per session, a third of a no-op
    pass when every store had its own session."""
    import botocore.session

    with _SESSION_LOCK:
        if not _SESSION:
            _SESSION.append(botocore.session.Session())
        return _SESSION[0].create_client("s3", **kwargs)


class RateLimiter:
    """A token bucket shared by every transfer thread (``bandwidth_limit_bytes`` per second; 0 = off)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def acquire(self, n: int) -> None:
        """Block until ``n`` more bytes fit under the rate."""
        if self.rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + n / self.rate
        if start > now:
            time.sleep(start - now)


def translate(exc: BaseException, url: str, site: Site, etag: str | None) -> BaseException:
    """Map botocore errors to the typed errors the retry helper classifies (permanent or transient)."""
    import botocore.exceptions

    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if status == 412 or code == "PreconditionFailed":
            return SourceChangedError(url, etag or "?")
        if status in (401, 403) or code in _AUTH_CODES:
            return SiteAuthError(site.name, url, site.endpoint_url, f"{code or status} {err.get('Message', '')}")
        if code == "NoSuchBucket":  # the same one-line "not found" every CLI gives (lingcore.probe)
            where = f" at endpoint {site.endpoint_url}" if site.endpoint_url else ""
            bucket = url.split("://", 1)[-1].split("/", 1)[0]
            return StoreNotFoundError(url, f"bucket {bucket!r} does not exist{where}", site.endpoint_url)
        if status == 404 or code in _MISSING_CODES:
            return FileNotFoundError(errno.ENOENT, f"{url}: {code or 'not found'}")
        if 400 <= status < 500 and status not in (408, 429) and code not in ("SlowDown", "RequestTimeout"):
            return OSError(errno.EINVAL, f"{url}: {code} {err.get('Message', '')}")  # a bad request: permanent
        return exc
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return ConnectionError(f"{url}: {exc}")
    return exc
