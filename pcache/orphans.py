"""Find and abort the S3 multipart uploads in progress for one object key.

S3 names no owner of an upload that a client could match (ListMultipartUploads returns key, id and
start time), so the uploader decides *when* a key's uploads are all orphans (see
:meth:`pcache.uploader.Uploader.abort_orphans`); this module only lists and aborts them.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from fsspec.asyn import sync

from lingcore.log import get_logger
from lingcore.retry import RetryPolicy, retry_call

log = get_logger("pcache.uploader")


def multipart_uploads(fs: Any, bucket: str, key: str, url: str, policy: RetryPolicy) -> list[str]:
    """Ids of the multipart uploads in progress for exactly ``key`` (the listing is by prefix)."""
    ids: list[str] = []
    markers: dict[str, str] = {}
    for _ in range(1000):  # a server whose markers never advance must not loop forever
        try:
            page = retry_call(partial(sync, fs.loop, fs._call_s3, "list_multipart_uploads", Bucket=bucket,
                                      Prefix=key, **markers), url=url, policy=policy)
        except FileNotFoundError:
            break  # no such bucket: no upload can be left in it
        uploads = page.get("Uploads") or []
        ids += [u["UploadId"] for u in uploads if u.get("Key") == key]
        if not page.get("IsTruncated") or not uploads:
            break
        nxt = {"KeyMarker": page.get("NextKeyMarker") or uploads[-1]["Key"],
               "UploadIdMarker": page.get("NextUploadIdMarker") or uploads[-1]["UploadId"]}
        if nxt == markers:
            break
        markers = nxt
    return ids


def abort_uploads_of(fs: Any, path: str, url: str, policy: RetryPolicy, keep: frozenset[str] = frozenset()) -> int:
    """Abort every multipart upload of the object at ``path`` on the s3fs filesystem ``fs``, except the
    upload ids in ``keep`` (a streamed upload that the uploader resumes, see :mod:`pcache.streaming`).

    Returns:
        How many were aborted (one completed or aborted meanwhile is skipped).

    Raises:
        OriginUnavailableError, PermissionError: when listing or aborting fails.
    """
    bucket, key, _ = fs.split_path(path)
    aborted = 0
    for upload_id in multipart_uploads(fs, bucket, key, url, policy):
        if upload_id in keep:
            continue
        try:
            retry_call(partial(sync, fs.loop, fs._call_s3, "abort_multipart_upload", Bucket=bucket, Key=key,
                               UploadId=upload_id), url=url, policy=policy)
        except FileNotFoundError:
            continue  # completed or aborted meanwhile
        aborted += 1
        log.info("aborted orphan multipart upload %s of %s", upload_id, url, extra={"url": url})
    return aborted
