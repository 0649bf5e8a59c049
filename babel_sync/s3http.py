"""S3 requests on one urllib3 pool, without botocore: listings, pinned reads, PUTs and part uploads.

Why: botocore's per-request machinery (events, serializers, its response parser) was most of babel-sync's
GIL time on the data path, it SHA-256-hashes every uploaded byte on plain http, and building a client
costs ~0.2 s per process, a third of a no-op pass. Requests are signed by :mod:`babel_sync.sigv4`
(``UNSIGNED-PAYLOAD`` plus a signed ``Content-MD5``, which S3 checks). Failures are raised as botocore
``ClientError`` (imported only then) so the store maps every path to the same typed errors.
"""

from __future__ import annotations

import base64
import contextlib
import html
import re
import threading
from datetime import datetime
from typing import Any
from urllib.parse import unquote_plus as unquote  # S3 url-encodes a space as "+"
from xml.etree import ElementTree

import urllib3

from babel_sync.errors import SourceChangedError
from babel_sync.listing import Entry, Page
from babel_sync.sigv4 import Signer

_CHUNK = 1 << 20


def _parse_time(text: str) -> float:
    """Seconds since the epoch of an S3 ``LastModified`` (``2026-01-02T03:04:05.000Z``)."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def http_error(status: int, body: bytes, operation: str) -> BaseException:
    """A botocore ``ClientError`` for a failed request, so the store's translation treats it alike."""
    import botocore.exceptions

    code = msg = ""
    if body:
        with contextlib.suppress(ElementTree.ParseError):
            root = ElementTree.fromstring(body)
            code, msg = root.findtext("Code") or "", root.findtext("Message") or ""
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code or str(status), "Message": msg}, "ResponseMetadata": {"HTTPStatusCode": status}},
        operation)


def _ns(root: ElementTree.Element) -> str:
    return root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""


_CONTENTS = re.compile(rb"<Contents>(.*?)</Contents>", re.DOTALL)
_FIELD = re.compile(rb"<(Key|ETag|Size|LastModified)>([^<]*)</")
_PREFIX = re.compile(rb"<CommonPrefixes>\s*<Prefix>([^<]*)</Prefix>")
_TRUNCATED = re.compile(rb"<IsTruncated>\s*true\s*</IsTruncated>", re.IGNORECASE)
_TOKEN = re.compile(rb"<NextContinuationToken>([^<]*)</NextContinuationToken>")


def _text(raw: bytes, url_encoded: bool) -> str:
    """An XML text node: entities resolved, then (``encoding-type=url`` answers) URL-decoded."""
    text = raw.decode()
    if "&" in text:
        text = html.unescape(text)
    if url_encoded and ("%" in text or "+" in text):
        text = unquote(text)
    return text


def parse_list_page(data: bytes, strip: int = 0) -> Page:
    """Parse a ListObjectsV2 answer into a :class:`~babel_sync.listing.Page`.

    Field order inside ``<Contents>`` differs between servers (SeaweedFS puts ``LastModified`` last), so
    each block's fields are collected by name. Keys are URL-decoded only when the answer says
    ``<EncodingType>url</EncodingType>`` (a server that ignores ``encoding-type`` sends them raw).
    """
    encoded = b"<EncodingType>url</EncodingType>" in data
    times: dict[bytes, float] = {}  # a page shares a few distinct timestamps
    entries: list[Entry] = []
    for block in _CONTENTS.finditer(data):  # one block at a time: no second copy of the page
        fields = dict(_FIELD.findall(block.group(1)))
        if b"Key" not in fields:
            raise http_error(200, b"", "ListObjectsV2")
        stamp = fields.get(b"LastModified", b"")
        mtime = times.get(stamp)
        if mtime is None:
            mtime = times[stamp] = _parse_time(stamp.decode())
        etag = fields.get(b"ETag", b"")
        if b"&" in etag:
            etag = html.unescape(etag.decode()).encode()
        entries.append(Entry(_text(fields[b"Key"], encoded)[strip:], int(fields.get(b"Size") or 0),
                             etag.strip(b'"').decode(), mtime))
    prefixes = [_text(m, encoded)[strip:] for m in _PREFIX.findall(data)]
    token = _TOKEN.search(data)
    return Page(entries, prefixes, bool(_TRUNCATED.search(data)),
                html.unescape(token.group(1).decode()) if token else None)


class HttpS3:
    """One bucket's connection pool and (for path-style endpoints) its signer.

    Args:
        bucket: The bucket.
        signer: Signs requests; None when the site needs botocore (virtual addressing, no endpoint):
            then only :meth:`list_page` is used, with URLs presigned by botocore.
        pool_size: Connections kept (every transfer thread and part in flight holds one).
        timeout: Connect/read timeouts.
        limiter: ``acquire(n)`` per chunk read (the shared bandwidth limit).
    """

    def __init__(self, bucket: str, signer: Signer | None, pool_size: int, timeout: urllib3.Timeout,
                 limiter: Any) -> None:
        self.bucket, self.signer, self.limiter = bucket, signer, limiter
        self._http = urllib3.PoolManager(maxsize=pool_size)
        self._timeout = timeout
        self._parse_gate = threading.BoundedSemaphore(4)

    def request(self, method: str, key: str | None, params: dict[str, str], headers: dict[str, str],
                where: str, body: bytes | bytearray | None = None, operation: str = "") -> Any:
        """Send one signed request (``key`` None = the bucket); the urllib3 response, body unread, on 2xx."""
        assert self.signer is not None
        path = f"/{self.bucket}" if key is None else f"/{self.bucket}/{key}"
        url, hdrs = self.signer.sign(method, path, params, headers)
        return self._send(method, url, hdrs, body, where, operation)

    def _send(self, method: str, url: str, headers: dict[str, str] | None, body: bytes | bytearray | None,
              where: str, operation: str) -> Any:
        try:
            resp = self._http.request(method, url, headers=headers, body=body,  # type: ignore[arg-type]
                                      retries=False, timeout=self._timeout, preload_content=False)
        except urllib3.exceptions.HTTPError as exc:
            raise ConnectionError(f"{where}: {_scrub(exc)}") from exc
        if resp.status >= 300:
            try:
                data = resp.read()
            except urllib3.exceptions.HTTPError:
                data = b""
            resp.release_conn()
            raise http_error(resp.status, data, operation)
        return resp

    def _body(self, resp: Any, where: str) -> bytes:
        try:
            return bytes(resp.read())
        except urllib3.exceptions.HTTPError as exc:
            raise ConnectionError(f"{where}: {_scrub(exc)}") from exc
        finally:
            resp.release_conn()

    def read(self, key: str, etag: str, start: int | None, end: int | None, where: str) -> bytes | bytearray:
        """GET pinned by If-Match, read into one buffer (no per-chunk copies, no join)."""
        headers = {"If-Match": f'"{etag}"'}
        if start is not None and end is not None:
            headers["Range"] = f"bytes={start}-{end - 1}"
        resp = self.request("GET", key, {}, headers, where, operation="GetObject")
        got = str(resp.headers.get("ETag", "")).strip('"')
        if got and got != etag:  # servers that ignore If-Match
            resp.release_conn()
            raise SourceChangedError(where, etag)
        length = resp.headers.get("Content-Length")
        if length is None or not self.limiter.rate:
            # Unthrottled: one read into one (uninitialised) buffer, the least CPU per byte;
            # a short body raises (IncompleteRead) and the retry helper sends the GET again.
            data = self._body(resp, where)
            self.limiter.acquire(len(data))
            return data
        # Throttled: chunk by chunk, so the shared limiter paces every reader.
        buf = bytearray(int(length))
        view = memoryview(buf)
        pos = 0
        try:
            while pos < len(buf):
                n = resp.readinto(view[pos:pos + _CHUNK])
                if not n:
                    break  # a short body: the caller's size check reports it
                self.limiter.acquire(n)
                pos += n
        except urllib3.exceptions.HTTPError as exc:
            raise ConnectionError(f"{where}: {_scrub(exc)}") from exc
        finally:
            resp.release_conn()
        return buf if pos == len(buf) else buf[:pos]

    def get(self, key: str, where: str) -> tuple[bytes, str]:
        """GET a whole (small) object, unpinned; return (bytes, ETag)."""
        resp = self.request("GET", key, {}, {}, where, operation="GetObject")
        return self._body(resp, where), str(resp.headers.get("ETag", "")).strip('"')

    def put(self, key: str, data: bytes | bytearray, md5: bytes, params: dict[str, str], where: str) -> str:
        """PUT an object (or, with ``partNumber``/``uploadId`` params, a part) with Content-MD5; its ETag."""
        headers = {"Content-MD5": base64.b64encode(md5).decode(), "Content-Length": str(len(data))}
        resp = self.request("PUT", key, params, headers, where, data, "UploadPart" if params else "PutObject")
        self._body(resp, where)
        return str(resp.headers.get("ETag", "")).strip('"')

    def list_page(self, url: str, where: str, strip: int = 0) -> Page:
        """One ListObjectsV2 page from a presigned URL; keys lose their first ``strip`` characters.

        Parsed with regular expressions over the bytes (see :func:`parse_list_page`): ElementTree plus
        ``findtext`` per field cost 4x as much CPU, which bounds a parallel listing of 10^6 keys.
        """
        resp = self._send("GET", url, None, None, where, "ListObjectsV2")
        # Pages whose answer has arrived wait here with their bytes in the socket, not in this process:
        # parsing is GIL-bound anyway, and 32 parsed pages at once were most of a listing's peak memory.
        with self._parse_gate:
            data = self._body(resp, where)
            if not data:
                raise http_error(200, data, "ListObjectsV2")
            return parse_list_page(data, strip)

    def uploads_page(self, params: dict[str, str], where: str) -> dict[str, Any]:
        """One ListMultipartUploads page (every pass sweeps for orphan uploads)."""
        resp = self.request("GET", None, {**params, "uploads": "", "encoding-type": "url"}, {}, where,
                            operation="ListMultipartUploads")
        root = ElementTree.fromstring(self._body(resp, where))
        ns = _ns(root)
        uploads = [{"Key": unquote(u.findtext(f"{ns}Key") or ""), "UploadId": u.findtext(f"{ns}UploadId") or ""}
                   for u in root.iter(f"{ns}Upload")]
        return {"Uploads": uploads, "IsTruncated": (root.findtext(f"{ns}IsTruncated") or "").lower() == "true",
                "NextKeyMarker": unquote(root.findtext(f"{ns}NextKeyMarker") or ""),
                "NextUploadIdMarker": root.findtext(f"{ns}NextUploadIdMarker") or ""}


_QUERY = re.compile(r"\?[^\s'\")]*")


def _scrub(exc: BaseException) -> str:
    """The error's text without query strings: urllib3 puts the request URL in its messages, and a
    presigned URL carries the signature and any session token."""
    return _QUERY.sub("?<query removed>", str(exc))
