"""Logging setup shared by every CLI and daemon: human lines by default, JSON lines on request.

Set ``PCACHE_LOG_FORMAT=json`` (or pass ``json_format=True``) for structured logs. Extra fields passed
with ``logger.info("msg", extra={"url": ...})`` appear as keys in the JSON object.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats each record as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str | None = None, json_format: bool | None = None) -> None:
    """Configure the root logger once for a CLI or daemon process."""
    level = (level or os.environ.get("PCACHE_LOG_LEVEL") or "INFO").upper()
    if json_format is None:
        json_format = os.environ.get("PCACHE_LOG_FORMAT", "").lower() == "json"
    handler = logging.StreamHandler(sys.stderr)
    if json_format:
        handler.setFormatter(JsonFormatter())
    else:
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        fmt.converter = time.gmtime
        handler.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # At DEBUG these libraries log request headers and presigned URLs (signatures, session tokens):
    # secrets never reach our logs, whatever level the user asks for.
    for name in SECRET_BEARING_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).getEffectiveLevel()))


#: Third-party loggers that print credentials at DEBUG; :func:`setup_logging` keeps them at WARNING.
SECRET_BEARING_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3transfer", "urllib3", "s3fs", "fsspec")


def get_logger(name: str) -> logging.Logger:
    """Return the project logger for ``name``."""
    return logging.getLogger(name)
