"""SigV4 signing for the hot S3 requests (listings, object reads, PUTs and part uploads).

Why not botocore for these: a no-op pass is nothing but ListObjectsV2 calls, and building a botocore
client costs ~0.2 s of imports and service-model loading per process, more than the signing work of the
whole pass. On the data path botocore SHA-256-hashes every uploaded byte on plain http (it ignores
``payload_signing_enabled`` there), a third full-content hash next to MD5 and xxh3; these requests are
signed ``UNSIGNED-PAYLOAD`` with a signed ``Content-MD5`` instead, which S3 checks. This is the one place
babel-sync signs requests itself, and only for path-style addressing on an explicit endpoint; every
other request, and every other site, goes through botocore.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import quote, urlsplit

_UNRESERVED = "-_.~"


def _enc(text: str, safe: str = _UNRESERVED) -> str:
    return quote(text, safe=safe)


class Signer:
    """Signs S3 requests with AWS Signature Version 4 (query-string or header form).

    Args:
        endpoint_url: ``http(s)://host[:port]`` of the S3 server.
        region: Signing region.
        key, secret, token: Credentials (``token`` may be None).
    """

    def __init__(self, endpoint_url: str, region: str, key: str, secret: str, token: str | None) -> None:
        parts = urlsplit(endpoint_url)
        self.base = f"{parts.scheme}://{parts.netloc}"
        self.host = parts.netloc
        self.region, self.key, self.token = region, key, token
        self._secret = secret
        self._keys: dict[str, bytes] = {}  # signing key per day

    def _signing_key(self, day: str) -> bytes:
        k = self._keys.get(day)
        if k is None:  # a new day (or the first call); a race only computes the same key twice
            k = hmac.new(f"AWS4{self._secret}".encode(), day.encode(), hashlib.sha256).digest()
            for part in (self.region, "s3", "aws4_request"):
                k = hmac.new(k, part.encode(), hashlib.sha256).digest()
            self._keys = {day: k}
        return k

    def _signature(self, stamp: str, request: str) -> str:
        scope = f"{stamp[:8]}/{self.region}/s3/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{hashlib.sha256(request.encode()).hexdigest()}"
        return hmac.new(self._signing_key(stamp[:8]), to_sign.encode(), hashlib.sha256).hexdigest()

    def sign(self, method: str, path: str, params: dict[str, str],
             headers: dict[str, str]) -> tuple[str, dict[str, str]]:
        """Sign ``method path?params`` in the Authorization header, payload unsigned.

        Args:
            path: Unencoded, starting with ``/`` (``/bucket/key``).
            params: Query parameters (unencoded; empty values allowed).
            headers: Extra headers to send and sign (e.g. ``Content-MD5``, ``If-Match``, ``Range``).

        Returns:
            (URL, headers to send).
        """
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        out = {**headers, "x-amz-content-sha256": "UNSIGNED-PAYLOAD", "x-amz-date": stamp}
        if self.token:
            out["x-amz-security-token"] = self.token
        signed = {k.lower(): " ".join(str(v).split()) for k, v in out.items()}
        signed["host"] = self.host
        names = ";".join(sorted(signed))
        canonical_query = "&".join(f"{_enc(k)}={_enc(v)}" for k, v in sorted(params.items()))
        canonical_path = _enc(path, safe="/" + _UNRESERVED)
        request = (f"{method}\n{canonical_path}\n{canonical_query}\n"
                   + "".join(f"{k}:{signed[k]}\n" for k in sorted(signed)) + f"\n{names}\nUNSIGNED-PAYLOAD")
        out["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.key}/{stamp[:8]}/{self.region}/s3/aws4_request, "
                                f"SignedHeaders={names}, Signature={self._signature(stamp, request)}")
        url = f"{self.base}{canonical_path}" + (f"?{canonical_query}" if canonical_query else "")
        return url, out

    def presign_get(self, path: str, params: dict[str, str], expires: int = 900) -> str:
        """The presigned URL of ``GET path?params`` (``path`` unencoded, starting with ``/``)."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        scope = f"{stamp[:8]}/{self.region}/s3/aws4_request"
        query = dict(params)
        query.update({"X-Amz-Algorithm": "AWS4-HMAC-SHA256", "X-Amz-Credential": f"{self.key}/{scope}",
                      "X-Amz-Date": stamp, "X-Amz-Expires": str(expires), "X-Amz-SignedHeaders": "host"})
        if self.token:
            query["X-Amz-Security-Token"] = self.token
        canonical_query = "&".join(f"{_enc(k)}={_enc(v)}" for k, v in sorted(query.items()))
        canonical_path = _enc(path, safe="/" + _UNRESERVED)
        request = f"GET\n{canonical_path}\n{canonical_query}\nhost:{self.host}\n\nhost\nUNSIGNED-PAYLOAD"
        return f"{self.base}{canonical_path}?{canonical_query}&X-Amz-Signature={self._signature(stamp, request)}"
