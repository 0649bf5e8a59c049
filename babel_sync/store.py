"""S3 access for one site: parallel listing, ranged reads pinned by ETag, puts, multipart and copies.

botocore is used directly (not s3fs) because the engine needs every S3 verb (UploadPartCopy,
ListParts, ListMultipartUploads) and synchronous calls from its own thread pools. botocore's own
retries are off (``total_max_attempts = 1``): every call goes through the project's one retry helper,
so a 10% 503 rate costs one backoff loop, not nested ones.

On path-style endpoints the hot requests (listings, the ListMultipartUploads sweep, pinned GETs, PUTs
and part uploads) skip botocore: they are signed by :mod:`babel_sync.sigv4` and sent by
:mod:`babel_sync.s3http`. botocore is imported, and its client built, only on the first call that needs
it (multipart control, copies, deletes), so a no-op pass never loads it (~0.25 s per run).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import urllib3

from babel_sync.config import Site, SyncOptions
from babel_sync.errors import DeleteError, SiteAuthError, SiteUnreachableError, SourceChangedError
from babel_sync.s3http import HttpS3
from babel_sync.sigv4 import Signer
from lingcore.errors import OriginUnavailableError, StoreNotFoundError
from lingcore.retry import RetryPolicy, retry_call

T = TypeVar("T")
_CHUNK = 1 << 20
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
_TRANSIENT_CODES = {"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout", "OperationAborted"}
_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "NoSuchUpload", "NotFound", "404"}


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its key relative to the site root, size, ETag (unquoted) and mtime."""

    key: str
    size: int
    etag: str
    mtime: float


_SESSION: list[Any] = []
_SESSION_LOCK = threading.Lock()


def _client(**kwargs: Any) -> Any:
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


def _translate(exc: BaseException, url: str, site: Site, etag: str | None) -> BaseException:
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


class S3Store:
    """One site's bucket and prefix, with credentials, a connection pool and the retry policy.

    Args:
        site: The site.
        options: Sync options (timeouts, pool size, retries).
        limiter: Shared bandwidth limiter for data reads.
    """

    def __init__(self, site: Site, options: SyncOptions, limiter: RateLimiter | None = None) -> None:
        self.site = site
        bucket, _, prefix = site.root.partition("/")
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.policy = RetryPolicy(attempts=options.retry_attempts, base_delay=options.retry_base_delay)
        self.limiter = limiter or RateLimiter(0)
        self.listing_workers = options.listing_workers
        self.listing_depth = options.listing_depth
        self._options = options
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._signer = (Signer(site.endpoint_url, site.region, site.key, site.secret, site.token)
                        if site.endpoint_url and site.addressing_style == "path" and site.key and site.secret
                        else None)
        # Listings and (with a signer) the data path skip botocore; see babel_sync.s3http.
        self._http = HttpS3(bucket, self._signer,
                            options.transfers * (options.part_concurrency + 1) + options.listing_workers + 4,
                            urllib3.Timeout(connect=options.connect_timeout, read=options.read_timeout),
                            self.limiter)

    @property
    def client(self) -> Any:
        """The botocore S3 client, built on first use (a no-op pass never needs it)."""
        with self._client_lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> Any:
        import botocore.config

        options, site = self._options, self.site
        pool = options.transfers * (options.part_concurrency + 1) + options.listing_workers + 4
        config = botocore.config.Config(
            region_name=site.region, s3={"addressing_style": site.addressing_style,
                                      # botocore SHA-256-signs every uploaded byte on plain http, a
                                      # second full hash on a CPU-bound path; uploads carry Content-MD5
                                      # instead (an MD5 computed anyway for the ETag checks).
                                      "payload_signing_enabled": False}, signature_version="s3v4",
            retries={"total_max_attempts": 1, "mode": "standard"}, max_pool_connections=pool,
            connect_timeout=options.connect_timeout, read_timeout=options.read_timeout,
            request_checksum_calculation="when_required", response_checksum_validation="when_required")
        return _client(
            endpoint_url=site.endpoint_url, aws_access_key_id=site.key, aws_secret_access_key=site.secret,
            aws_session_token=site.token, config=config)

    # ------------------------------------------------------------------ plumbing
    def url(self, rel: str = "") -> str:
        """The ``s3://bucket/prefix/rel`` URL of a key relative to the site root."""
        return f"s3://{self.bucket}/{self.prefix}{rel}"

    def key(self, rel: str) -> str:
        """The bucket key of ``rel``."""
        return self.prefix + rel

    def call(self, fn: Callable[[], T], rel: str, etag: str | None = None) -> T:
        """Run one S3 operation through the shared retry helper with typed errors."""
        url = self.url(rel)

        def attempt() -> T:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - translated and classified
                new = _translate(exc, url, self.site, etag)
                if new is exc:
                    raise
                raise new from exc

        return retry_call(attempt, url=url, policy=self.policy)

    def check(self) -> None:
        """Make one cheap listing call, so an unreachable or unauthorized site fails before any work.

        Raises:
            SiteUnreachableError: naming the site, URL and endpoint.
            SiteAuthError: when the credentials are refused.
            FileNotFoundError: when the bucket does not exist.
        """
        try:
            self.call(lambda: self._list_page("", False, None, max_keys=1), "")
        except OriginUnavailableError as exc:
            raise SiteUnreachableError(self.site.name, self.site.url, self.site.endpoint_url, exc.__cause__) from exc

    # ------------------------------------------------------------------ listing
    def _presign_list(self, params: dict[str, Any]) -> str:
        if self._signer is not None:
            query = {"list-type": "2", "encoding-type": "url", "prefix": params["Prefix"],
                     "max-keys": str(params["MaxKeys"])}
            if "Delimiter" in params:
                query["delimiter"] = params["Delimiter"]
            if "ContinuationToken" in params:
                query["continuation-token"] = params["ContinuationToken"]
            return self._signer.presign_get(f"/{self.bucket}", query)
        return str(self.client.generate_presigned_url("list_objects_v2", Params=params, ExpiresIn=900))

    def _list_page(self, prefix: str, delimiter: bool, token: str | None, max_keys: int = 1000) -> dict[str, Any]:
        """One ListObjectsV2 page (see :meth:`HttpS3.list_page`)."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.key(prefix), "MaxKeys": max_keys}
        if delimiter:
            params["Delimiter"] = "/"
        if token:
            params["ContinuationToken"] = token
        return self._http.list_page(self._presign_list(params), self.url(prefix))

    def _list_level(self, prefix: str, delimiter: bool) -> tuple[list[ObjectInfo], list[str]]:
        objects: list[ObjectInfo] = []
        dirs: list[str] = []
        token: str | None = None
        while True:
            page = self.call(lambda t=token: self._list_page(prefix, delimiter, t), prefix)  # type: ignore[misc]
            for item in page["Contents"]:
                objects.append(ObjectInfo(item["Key"][len(self.prefix):], int(item["Size"]),
                                          str(item["ETag"]).strip('"'), item["LastModified"]))
            dirs.extend(p["Prefix"][len(self.prefix):] for p in page["CommonPrefixes"])
            if not page["IsTruncated"]:
                return objects, dirs
            token = page["NextContinuationToken"]

    def list_tree(self, prefixes: Iterable[str]) -> dict[str, ObjectInfo]:
        """List every object under ``prefixes`` (relative to the root) in parallel.

        The tree is split by delimiter for ``listing_depth`` levels and every sub-prefix is listed by
        its own worker, flat below that depth: wide trees list in parallel, deep ones in few calls.
        Any listing error propagates, so callers never act (delete) on a partial listing.
        """
        out: dict[str, ObjectInfo] = {}
        roots = sorted(set(prefixes))
        level = [p for p in roots if not any(p != q and p.startswith(q) for q in roots)]
        with ThreadPoolExecutor(self.listing_workers, thread_name_prefix="babel-list") as pool:
            for depth in range(self.listing_depth + 1):
                if not level:
                    break
                # Breadth first: one level per round, no worker ever waits on another (no pool deadlock).
                split = depth < self.listing_depth
                results = pool.map(lambda p, s=split: self._list_level(p, s and (p == "" or p.endswith("/"))),
                                   level)
                level = []
                for objects, dirs in results:
                    out.update((o.key, o) for o in objects)
                    level.extend(dirs)
        return out

    # ------------------------------------------------------------------ data
    def read(self, rel: str, etag: str, start: int | None = None, end: int | None = None,
             sink: Callable[[bytes | bytearray], None] | None = None) -> bytes | bytearray:
        """Read ``rel`` (or bytes ``[start, end)``), pinned to ``etag`` with ``If-Match``.

        Args:
            sink: Called with each chunk as it arrives (streaming hashes); the bytes are also returned.

        Raises:
            SourceChangedError: when the object no longer has ``etag``.
        """
        def attempt() -> bytes | bytearray:
            if self._signer is not None:
                return self._http.read(self.key(rel), etag, start, end, self.url(rel))
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(rel), "IfMatch": f'"{etag}"'}
            if start is not None and end is not None:
                kwargs["Range"] = f"bytes={start}-{end - 1}"
            resp = self.client.get_object(**kwargs)
            got = str(resp.get("ETag", "")).strip('"')
            if got and got != etag:  # servers that ignore If-Match
                resp["Body"].close()
                raise SourceChangedError(self.url(rel), etag)
            chunks: list[bytes] = []
            body = resp["Body"]
            try:
                while chunk := body.read(_CHUNK):
                    self.limiter.acquire(len(chunk))
                    chunks.append(chunk)
            finally:
                body.close()
            return b"".join(chunks)

        data = self.call(attempt, rel, etag)
        if sink is not None:
            sink(data)
        return data

    def get_small(self, rel: str) -> tuple[bytes, str]:
        """Read a small object (a manifest) whole; return (bytes, etag)."""
        def attempt() -> tuple[bytes, str]:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.key(rel))
            return resp["Body"].read(), str(resp.get("ETag", "")).strip('"')

        return self.call(attempt, rel)

    def head_etag(self, rel: str) -> str:
        """The current ETag of one object (crash recovery only: passes never HEAD objects)."""
        resp = self.call(lambda: self.client.head_object(Bucket=self.bucket, Key=self.key(rel)), rel)
        return str(resp.get("ETag", "")).strip('"')

    def put(self, rel: str, data: bytes | bytearray, md5: bytes | None = None) -> str:
        """Write ``data`` as one object; return its ETag. ``md5`` (digest) is sent as Content-MD5."""
        md5 = md5 if md5 is not None else hashlib.md5(data).digest()
        if self._signer is not None:
            return self.call(lambda: self._http.put(self.key(rel), data, md5, {}, self.url(rel)), rel)
        resp = self.call(lambda: self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=data,
                                                        ContentMD5=base64.b64encode(md5).decode()), rel)
        return str(resp.get("ETag", "")).strip('"')

    def delete(self, rels: Iterable[str]) -> None:
        """Delete objects, 1000 per request.

        Raises:
            DeleteError: naming the first object S3 could not delete. DeleteObjects answers 200 even
                when keys failed; those are listed in ``Errors``. Transient codes are retried (only the
                keys that failed) through the shared retry helper.
        """
        batch = list(rels)
        for i in range(0, len(batch), 1000):
            todo = [self.key(r) for r in batch[i:i + 1000]]
            try:
                self.call(lambda t=todo: self._delete_batch(t), batch[i])  # type: ignore[misc]
            except OriginUnavailableError as exc:  # transient codes until the last attempt
                if isinstance(exc.__cause__, DeleteError):
                    raise exc.__cause__ from None  # the typed error names the URL and code
                raise

    def _delete_batch(self, todo: list[str]) -> None:
        """One DeleteObjects call; ``todo`` shrinks to the keys that failed, so a retry sends only those."""
        resp = self.client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in todo], "Quiet": True})
        errs = resp.get("Errors") or []
        if not errs:
            return
        todo[:] = [str(e["Key"]) for e in errs if e.get("Key")] or todo
        first = errs[0]
        url = self.url(str(first.get("Key", ""))[len(self.prefix):])
        code = str(first.get("Code", ""))
        raise DeleteError(url, code, str(first.get("Message", "")), code in _TRANSIENT_CODES)

    def copy_from(self, src: S3Store, rel: str, dest_rel: str, etag: str,
                  part: tuple[str, int, int, int] | None = None) -> str:
        """Server-side copy of ``src``'s ``rel`` (pinned to ``etag``); ``part`` = (upload id, n, start, end)."""
        source = {"Bucket": src.bucket, "Key": src.key(rel)}
        if part is None:
            resp = self.call(lambda: self.client.copy_object(
                Bucket=self.bucket, Key=self.key(dest_rel), CopySource=source, CopySourceIfMatch=f'"{etag}"'),
                dest_rel, etag)
            return str(resp["CopyObjectResult"]["ETag"]).strip('"')
        upload_id, n, start, end = part
        resp = self.call(lambda: self.client.upload_part_copy(
            Bucket=self.bucket, Key=self.key(dest_rel), UploadId=upload_id, PartNumber=n, CopySource=source,
            CopySourceIfMatch=f'"{etag}"', CopySourceRange=f"bytes={start}-{end - 1}"), dest_rel, etag)
        return str(resp["CopyPartResult"]["ETag"]).strip('"')

    # ------------------------------------------------------------------ multipart
    def create_upload(self, rel: str) -> str:
        """Start a multipart upload; return its id."""
        resp = self.call(lambda: self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key(rel)), rel)
        return str(resp["UploadId"])

    def upload_part(self, rel: str, upload_id: str, n: int, data: bytes | bytearray, md5: bytes) -> str:
        """Upload part ``n`` with its Content-MD5 (digest); return its ETag."""
        if self._signer is not None:
            params = {"partNumber": str(n), "uploadId": upload_id}
            return self.call(lambda: self._http.put(self.key(rel), data, md5, params, self.url(rel)), rel)
        resp = self.call(lambda: self.client.upload_part(
            Bucket=self.bucket, Key=self.key(rel), UploadId=upload_id, PartNumber=n, Body=data,
            ContentMD5=base64.b64encode(md5).decode()), rel)
        return str(resp["ETag"]).strip('"')

    def complete_upload(self, rel: str, upload_id: str, etags: list[str]) -> str:
        """Complete a multipart upload from its part ETags (in part order); return the object ETag."""
        parts = {"Parts": [{"PartNumber": i + 1, "ETag": f'"{e}"'} for i, e in enumerate(etags)]}
        resp = self.call(lambda: self.client.complete_multipart_upload(
            Bucket=self.bucket, Key=self.key(rel), UploadId=upload_id, MultipartUpload=parts), rel)
        return str(resp.get("ETag", "")).strip('"')

    def abort_upload(self, rel: str, upload_id: str) -> None:
        """Abort a multipart upload; an upload that is already gone is fine."""
        with contextlib.suppress(FileNotFoundError):
            self.call(lambda: self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=self.key(rel), UploadId=upload_id), rel)

    def list_parts(self, rel: str, upload_id: str) -> dict[int, tuple[str, int]]:
        """Parts already stored for an upload: number -> (ETag, size); empty when the upload is gone."""
        out: dict[int, tuple[str, int]] = {}
        marker = 0
        while True:
            try:
                page = self.call(lambda m=marker: self.client.list_parts(  # type: ignore[misc]
                    Bucket=self.bucket, Key=self.key(rel), UploadId=upload_id, PartNumberMarker=m), rel)
            except FileNotFoundError:
                return {}
            for p in page.get("Parts", []):
                out[int(p["PartNumber"])] = (str(p["ETag"]).strip('"'), int(p["Size"]))
            if not page.get("IsTruncated"):
                return out
            marker = int(page["NextPartNumberMarker"])

    def list_uploads(self, prefix: str = "") -> list[tuple[str, str]]:
        """In-progress multipart uploads under ``prefix``: (relative key, upload id)."""
        out: list[tuple[str, str]] = []
        if self._signer is not None:
            params = {"prefix": self.key(prefix)}
            while True:
                page = self.call(lambda p=dict(params): self._http.uploads_page(p, self.url(prefix)),  # type: ignore[misc]
                                 prefix)
                out.extend((u["Key"][len(self.prefix):], u["UploadId"]) for u in page["Uploads"]
                           if u["Key"].startswith(self.prefix))
                if not page["IsTruncated"]:
                    return out
                params.update({"key-marker": page["NextKeyMarker"], "upload-id-marker": page["NextUploadIdMarker"]})
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.key(prefix)}
        while True:
            page = self.call(lambda kw=dict(kwargs): self.client.list_multipart_uploads(**kw), prefix)  # type: ignore[misc]
            out.extend((u["Key"][len(self.prefix):], u["UploadId"]) for u in page.get("Uploads", [])
                       if u["Key"].startswith(self.prefix))
            if not page.get("IsTruncated"):
                return out
            kwargs["KeyMarker"] = page.get("NextKeyMarker", "")
            kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker", "")
