"""S3 multipart uploads of staged write-back files: create (after a durable intent), parts, complete.

Shared by the background uploader (:mod:`pcache.uploader`, which uploads a closed file) and the writer's
streaming upload (:mod:`pcache.streaming`, which sends whole parts while the file is still being
written). Both cut a file into the same spans (part ``n`` is bytes ``[(n-1)*part_size, n*part_size)``),
so parts a writer streamed are exactly the parts the uploader would have sent, and the uploader resumes
a streamed upload by sending only the missing ones.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any

from fsspec.asyn import sync

from lingcore.retry import RetryPolicy, retry_call
from pcache.journal import Journal

# S3 user metadata recording when the uploaded write was closed (for a streamed upload: when its
# upload began): lets replica adoption tell an older write from a newer one by the writers' own clocks.
CREATED_METADATA = "pcache-created"

# Uploads of one URL are serialised by a stripe lock on the URL, across processes (see Uploader.upload_one).
URL_LOCK_STRIPES = 256


def created_metadata(created: float) -> dict[str, str]:
    """The S3 user metadata every object uploaded through pcache carries."""
    return {CREATED_METADATA: repr(float(created))}


def part_spans(size: int, part_size: int) -> list[tuple[int, int, int]]:
    """``(part number, offset, length)`` of every part of a ``size``-byte file."""
    return [(n + 1, off, min(part_size, size - off)) for n, off in enumerate(range(0, size, part_size))]


def create_upload(fs: Any, journal: Journal, entry: dict[str, Any], created: float,
                  policy: RetryPolicy) -> tuple[str, int]:
    """Journal the intent, then create a multipart upload of ``entry``'s object; return (upload id, creates).

    The intent is durable before the request leaves: a kill while CreateMultipartUpload is in flight, or
    after its reply but before anything else is journaled, leaves this record, and the next uploader or
    ``pcache flush``/``gc`` aborts whatever upload the origin created. ``creates`` counts the requests
    sent: more than one (a retried create whose reply was lost) may have left another upload behind.
    """
    bucket, key, _ = fs.split_path(entry["path"])
    journal.begin_multipart(entry)
    creates = 0

    def create() -> Any:
        nonlocal creates
        creates += 1
        return sync(fs.loop, fs._call_s3, "create_multipart_upload", Bucket=bucket, Key=key,
                    Metadata=created_metadata(created))

    upload_id = str(retry_call(create, url=entry["url"], policy=policy)["UploadId"])
    journal.note_multipart_id(entry["id"], upload_id)
    return upload_id, creates


def upload_part(fs: Any, path: str, upload_id: str, number: int, body: bytes, url: str,
                policy: RetryPolicy) -> dict[str, Any]:
    """Send part ``number`` (retried with backoff); return its ``{"PartNumber", "ETag"}``."""
    bucket, key, _ = fs.split_path(path)
    resp = retry_call(
        lambda: sync(fs.loop, fs._call_s3, "upload_part", Bucket=bucket, Key=key, UploadId=upload_id,
                     PartNumber=number, Body=body),
        url=f"{url} part {number}", policy=policy)
    return {"PartNumber": number, "ETag": resp["ETag"]}


def abort_upload(fs: Any, path: str, upload_id: str, url: str, policy: RetryPolicy) -> None:
    """Abort one multipart upload by its id (one already gone counts as aborted)."""
    bucket, key, _ = fs.split_path(path)
    with suppress(FileNotFoundError):
        retry_call(lambda: sync(fs.loop, fs._call_s3, "abort_multipart_upload", Bucket=bucket, Key=key,
                                UploadId=upload_id), url=url, policy=policy)


def finish_upload(fs: Any, entry: dict[str, Any], local: str, upload_id: str, part_size: int,
                  done: dict[int, dict[str, Any]], concurrency: int, policy: RetryPolicy) -> str | None:
    """Send the parts of ``local`` not in ``done`` (``concurrency`` at a time), then complete the upload.

    Returns:
        The object's ETag.
    """
    bucket, key, _ = fs.split_path(entry["path"])
    url = entry["url"]
    spans = [s for s in part_spans(entry["size"], part_size) if s[0] not in done]
    fd = os.open(local, os.O_RDONLY)

    def send(span: tuple[int, int, int]) -> dict[str, Any]:
        number, offset, length = span
        return upload_part(fs, entry["path"], upload_id, number, os.pread(fd, length, offset), url, policy)

    try:
        with ThreadPoolExecutor(concurrency) as pool:
            sent = {p["PartNumber"]: p for p in pool.map(send, spans)}
    finally:
        os.close(fd)
    parts = [{"PartNumber": n, "ETag": p["ETag"]} for n, p in sorted({**done, **sent}.items())]
    resp = retry_call(
        lambda: sync(fs.loop, fs._call_s3, "complete_multipart_upload", Bucket=bucket, Key=key,
                     UploadId=upload_id, MultipartUpload={"Parts": parts}),
        url=url, policy=policy)
    etag = resp.get("ETag")
    return str(etag) if etag else None
