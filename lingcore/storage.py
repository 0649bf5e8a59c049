"""Storage options shared by every CLI that talks to S3 (pcache, fusefs, babel-sync).

Honours ``--endpoint-url`` and the AWS tools' standard environment: ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN`` and ``AWS_REGION``. Credentials are
left to botocore's own chain when present in the environment, so they never pass through our code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any


def split_url(url: str) -> tuple[str, str]:
    """Return (protocol, path) of a URL: ``s3://b/k`` -> (``s3``, ``b/k``); a bare path is ``file``."""
    url = url.split("::")[-1]
    if "://" not in url:
        return "file", os.path.abspath(url)
    protocol, path = url.split("://", 1)
    return ("s3" if protocol == "s3a" else protocol), path


def storage_options(protocol: str, endpoint_url: str | None = None,
                    env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Return fsspec storage options for ``protocol`` from flags and the standard environment."""
    env = os.environ if env is None else env
    if protocol != "s3":
        return {}
    client: dict[str, Any] = {}
    endpoint = endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        client["endpoint_url"] = endpoint
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        client["region_name"] = region
    return {"client_kwargs": client} if client else {}


def url_storage_options(url: str, endpoint_url: str | None = None,
                        env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Return the fsspec options to open ``url``, from flags and the standard environment.

    A chained URL (``pcache::s3://b/k``) takes each layer's options under its protocol name
    (``{"s3": {...}}``); at the top level fsspec would hand them to the outer layer, and pcache would
    reject ``client_kwargs`` as a config field.
    """
    protocol = split_url(url)[0]
    target = storage_options(protocol, endpoint_url, env)
    if "::" in url and target:
        return {protocol: target}
    return target
