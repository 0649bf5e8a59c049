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
import hashlib
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import urllib3

from babel_sync.config import Site, SyncOptions
from babel_sync.errors import DeleteError, SiteUnreachableError, SourceChangedError
from babel_sync.listing import Entry, ListingStats, Page, ParallelLister, list_serial
from babel_sync.s3http import HttpS3
from babel_sync.s3util import TRANSIENT_CODES, RateLimiter, botocore_client, translate
from babel_sync.sigv4 import Signer
from lingcore.errors import OriginUnavailableError
from lingcore.retry import RetryPolicy, retry_call

T = TypeVar("T")
_CHUNK = 1 << 20
#: One listed object (key relative to the site root, size, unquoted ETag, mtime): a listing entry.
ObjectInfo = Entry


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
        return botocore_client(
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
                new = translate(exc, url, self.site, etag)
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
            self.call(lambda: self.page("", None, None, False, 1), "")
        except OriginUnavailableError as exc:
            raise SiteUnreachableError(self.site.name, self.site.url, self.site.endpoint_url, exc.__cause__) from exc

    # ------------------------------------------------------------------ listing
    def _presign_list(self, params: dict[str, Any]) -> str:
        if self._signer is not None:
            query = {"list-type": "2", "encoding-type": "url", "prefix": params["Prefix"],
                     "max-keys": str(params["MaxKeys"])}
            for name, arg in (("delimiter", "Delimiter"), ("continuation-token", "ContinuationToken"),
                              ("start-after", "StartAfter")):
                if arg in params:
                    query[name] = params[arg]
            return self._signer.presign_get(f"/{self.bucket}", query)
        return str(self.client.generate_presigned_url("list_objects_v2", Params=params, ExpiresIn=900))

    def page(self, prefix: str, start_after: str | None, token: str | None, delimiter: bool,
             max_keys: int = 1000) -> Page:
        """One ListObjectsV2 page under ``prefix``; keys (and ``start_after``) relative to the site root."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.key(prefix), "MaxKeys": max_keys}
        if delimiter:
            params["Delimiter"] = "/"
        if token:
            params["ContinuationToken"] = token
        elif start_after:
            params["StartAfter"] = self.key(start_after)
        return self._http.list_page(self._presign_list(params), self.url(prefix), len(self.prefix))

    def list_tree(self, prefixes: Iterable[str], sink: Callable[[list[Entry]], None]) -> ListingStats:
        """List every object under ``prefixes`` (relative to the root) into ``sink``, in parallel.

        The key space is split adaptively (:mod:`babel_sync.listing`) with ``listing_workers`` requests
        in flight; pages go to ``sink`` as they arrive. Any listing error propagates, so callers never
        act (delete) on a partial listing.
        """
        lister = ParallelLister(self.page, self.listing_workers, sink,
                                lambda fn, prefix: self.call(fn, prefix))
        return lister.run(prefixes)

    def list_serial(self, prefix: str, sink: Callable[[list[Entry]], None]) -> int:
        """A plain paginated listing of ``prefix``, one page at a time (the benchmark's baseline)."""
        return list_serial(lambda *a: self.call(lambda: self.page(*a), prefix), prefix, sink)

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
            if self._signer is not None:  # no botocore client just for a manifest (verify, first passes)
                return self._http.get(self.key(rel), self.url(rel))
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
        raise DeleteError(url, code, str(first.get("Message", "")), code in TRANSIENT_CODES)

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
