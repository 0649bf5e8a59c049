"""Object versions: the one string that says "this exact content" for any fsspec ``info()`` dict."""

from __future__ import annotations

from typing import Any


def object_version(info: dict[str, Any]) -> str:
    """Return a version string for an ``info()`` dict: the ETag, else ``size:mtime``."""
    for key in ("ETag", "etag", "md5Hash", "VersionId"):
        value = info.get(key)
        if value:
            return str(value).strip('"')
    mtime: Any = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return f"{info.get('size')}:{mtime}"
