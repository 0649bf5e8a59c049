"""A small real HTTP server answering S3 ListObjectsV2 over a generated key set, in AWS byte order.

SeaweedFS takes minutes to hold 10^5 objects on the 2-core test machine; this server holds any number
of (zero-byte) keys at once, so the listing memory test can list 10^5 of them in seconds. It speaks the
wire protocol babel-sync's client sends (``list-type=2`` with ``prefix``, ``start-after``,
``continuation-token``, ``max-keys``, ``delimiter``, ``encoding-type=url``), in S3's byte order, which
SeaweedFS (path-component order) cannot show. Signatures are not checked; it binds 127.0.0.1 only.

Run ``python tests/listing_server.py SPEC [SPEC...]`` where SPEC is ``flat:PREFIX:N`` (keys
``PREFIX`` + 7-digit numbers) or ``file:PATH`` (one key per line); it prints ``READY <url>`` and
serves until stdin closes.
"""

from __future__ import annotations

import bisect
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

_ETAG = "d41d8cd98f00b204e9800998ecf8427e"
_STAMP = "2026-01-02T03:04:05.000Z"


class KeySet:
    """Sorted keys (byte order) and ListObjectsV2 pagination over them."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = sorted(set(keys), key=lambda k: k.encode())
        self._raw = [k.encode() for k in self.keys]

    def _past(self, common: str) -> int:
        """Index of the first key after every key under ``common`` (which ends with the delimiter)."""
        return bisect.bisect_left(self._raw, (common[:-1] + chr(ord(common[-1]) + 1)).encode())

    def page(self, prefix: str, after: str | None, max_keys: int, delimiter: str | None,
             resumed: bool = False) -> dict[str, Any]:
        """One page: contents, common prefixes, truncated, and the last key or prefix returned.

        ``resumed``: ``after`` is a continuation token, which may name a common prefix already returned.
        """
        if after is None or after < prefix:
            i = bisect.bisect_left(self._raw, prefix.encode())
        elif resumed and delimiter and after.endswith(delimiter):
            i = self._past(after)
        else:
            i = bisect.bisect_right(self._raw, after.encode())
        contents: list[str] = []
        prefixes: list[str] = []
        last = None
        while i < len(self.keys) and len(contents) + len(prefixes) < max_keys:
            key = self.keys[i]
            if not key.startswith(prefix):
                break
            cut = key.find(delimiter, len(prefix)) if delimiter else -1
            if cut >= 0:
                common = key[: cut + len(delimiter or "")]
                prefixes.append(common)
                last = common
                i = self._past(common)  # every key under it is rolled up into it
                continue
            contents.append(key)
            last = key
            i += 1
        truncated = i < len(self.keys) and self.keys[i].startswith(prefix)
        return {"contents": contents, "prefixes": prefixes, "truncated": truncated, "last": last}


def _xml(page: dict[str, Any], prefix: str, encode: bool) -> bytes:
    enc = (lambda s: quote(s, safe="/")) if encode else (lambda s: s)
    parts = ['<?xml version="1.0" encoding="UTF-8"?>',
             '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">',
             f"<Prefix>{enc(prefix)}</Prefix><IsTruncated>{'true' if page['truncated'] else 'false'}</IsTruncated>"]
    for key in page["contents"]:
        parts.append(f"<Contents><Key>{enc(key)}</Key><LastModified>{_STAMP}</LastModified>"
                     f"<ETag>&quot;{_ETAG}&quot;</ETag><Size>0</Size><StorageClass>STANDARD</StorageClass>"
                     "</Contents>")
    for common in page["prefixes"]:
        parts.append(f"<CommonPrefixes><Prefix>{enc(common)}</Prefix></CommonPrefixes>")
    if page["truncated"] and page["last"] is not None:
        parts.append(f"<NextContinuationToken>{quote(page['last'])}</NextContinuationToken>")
    if encode:
        parts.append("<EncodingType>url</EncodingType>")
    parts.append("</ListBucketResult>")
    return "".join(parts).encode()


def make_handler(keys: KeySet) -> type[BaseHTTPRequestHandler]:
    """The request handler class serving ``keys`` (every bucket holds the same keys)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def do_GET(self) -> None:
            query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query, keep_blank_values=True).items()}
            if query.get("list-type") != "2":
                self._send(400, b"<Error><Code>NotImplemented</Code></Error>")
                return
            token = query.get("continuation-token")
            after = unquote(token) if token else query.get("start-after") or None
            prefix = query.get("prefix", "")
            page = keys.page(prefix, after, min(1000, int(query.get("max-keys", "1000"))), query.get("delimiter"),
                             resumed=bool(token))
            self._send(200, _xml(page, prefix, query.get("encoding-type") == "url"))

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def serve(keys: list[str]) -> ThreadingHTTPServer:
    """Start serving ``keys`` on a free loopback port in a background thread; return the server."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(KeySet(keys)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    return server


def _keys(specs: list[str]) -> list[str]:
    out: list[str] = []
    for spec in specs:
        kind, _, rest = spec.partition(":")
        if kind == "flat":
            prefix, _, count = rest.rpartition(":")
            out += [f"{prefix}{i:07d}" for i in range(int(count))]
        elif kind == "file":
            with open(rest, encoding="utf-8") as fh:
                out += [line.rstrip("\n") for line in fh if line.strip()]
        else:
            raise SystemExit(f"unknown key spec {spec!r}: expected flat:PREFIX:N or file:PATH")
    return out


def main(argv: list[str]) -> int:
    """Serve the keys of ``argv`` until stdin closes."""
    server = serve(_keys(argv))
    print(f"READY http://127.0.0.1:{server.server_address[1]}", flush=True)
    sys.stdin.read()
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
