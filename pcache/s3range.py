"""Fast ranged GETs from S3 for the block fetchers.

s3fs sends every request through one asyncio event loop thread, which caps a cold read at the speed
of that one thread. Block fetches need only "GET this byte range", so pcache presigns the object's
URL once (a local HMAC, no request) and sends plain HTTP/1.1 range requests from its fetch threads,
each with its own keep-alive connection; the socket reads release the GIL, so fetches really run in
parallel. Measured on SeaweedFS with 16 threads: about 2x s3fs's whole-object ``read()``.

Each GET carries ``If-Match`` with the ETag the reader pinned, so a block of a changed object is never
mixed into an older version: the origin answers 412 and the reader gets :class:`StaleObjectError`.
"""

from __future__ import annotations

import http.client
import os
import ssl
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from pcache.errors import StaleObjectError

_PRESIGN_SECONDS = 3600


class S3RangeReader:
    """Ranged GETs through presigned URLs of an s3fs filesystem.

    Args:
        fs: An ``s3fs.S3FileSystem`` (used only to presign; credentials never leave it).
        timeout: Socket timeout per request, in seconds.
    """

    def __init__(self, fs: Any, timeout: float = 60.0) -> None:
        self.fs = fs
        self.timeout = timeout
        self._urls: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        # Same TLS trust as botocore: client_kwargs["verify"] (False, or a CA bundle path), else AWS_CA_BUNDLE.
        verify = (getattr(fs, "client_kwargs", None) or {}).get("verify", os.environ.get("AWS_CA_BUNDLE", True))
        if verify is False:
            self._ssl = ssl._create_unverified_context()
        else:
            self._ssl = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)

    def _presigned(self, path: str, refresh: bool = False) -> str:
        now = time.monotonic()
        with self._lock:
            hit = self._urls.get(path)
        if hit is not None and not refresh and now - hit[0] < _PRESIGN_SECONDS / 2:
            return hit[1]
        url = self.fs.url(path, expires=_PRESIGN_SECONDS)
        with self._lock:
            if len(self._urls) > 10_000:
                self._urls.clear()
            self._urls[path] = (now, url)
        return url

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        if self._local.__dict__.get("pid") != os.getpid():
            # A forked child must not share the parent's keep-alive sockets: drop them (without closing,
            # which would only close the child's copy anyway) and connect afresh.
            self._local.__dict__.update(pid=os.getpid(), conns={})
        conns: dict[tuple[str, str], http.client.HTTPConnection] = self._local.__dict__["conns"]
        conn = conns.get((scheme, netloc))
        if conn is None:
            if scheme == "https":
                conn = http.client.HTTPSConnection(netloc, timeout=self.timeout, context=self._ssl)
            else:
                conn = http.client.HTTPConnection(netloc, timeout=self.timeout)
            conns[(scheme, netloc)] = conn
        return conn

    def _drop(self, scheme: str, netloc: str) -> None:
        conn = self._local.__dict__.get("conns", {}).pop((scheme, netloc), None)
        if conn is not None:
            conn.close()

    def get_range(self, path: str, start: int, end: int, etag: str | None = None) -> bytes:
        """Return bytes ``[start, end)`` of ``path``.

        Raises:
            FileNotFoundError: 404. PermissionError: 403 that a fresh signature does not fix.
            StaleObjectError: the ETag no longer matches (412). OSError: other failures (retryable).
        """
        url = f"s3://{path}"
        for attempt in range(2):
            parts = urlsplit(self._presigned(path, refresh=attempt > 0))
            conn = self._connection(parts.scheme, parts.netloc)
            headers = {"Range": f"bytes={start}-{end - 1}"}
            if etag:
                headers["If-Match"] = f'"{etag}"'
            try:
                conn.request("GET", f"{parts.path}?{parts.query}", headers=headers)
                resp = conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                self._drop(parts.scheme, parts.netloc)
                raise ConnectionError(f"GET {url} bytes {start}-{end - 1}: {exc!r}") from exc
            if resp.status in (200, 206):
                # A server may ignore Range and send the whole object (200): cut out what was asked.
                return body[start:end] if resp.status == 200 else body
            if resp.status == 403 and attempt == 0:
                continue  # the signature may have expired: presign again once
            if resp.status == 404:
                raise FileNotFoundError(f"no such object: {url}")
            if resp.status == 403:
                raise PermissionError(f"access denied to {url}: {body[:300]!r}")
            if resp.status == 412:
                raise StaleObjectError(url, etag or "?")
            if resp.status == 416:
                raise ValueError(f"range {start}-{end - 1} not satisfiable for {url}")
            raise OSError(f"GET {url} bytes {start}-{end - 1}: HTTP {resp.status} {body[:200]!r}")
        raise AssertionError("unreachable")
