"""Shared helpers used by every package: retry with backoff, checksums, config loading, logging.

There is exactly one implementation of each here; other packages import them instead of re-writing.
"""

from pcache._util.checksum import block_checksum, content_hash, content_hasher, verify_block_checksum
from pcache._util.config import load_config, parse_size
from pcache._util.log import get_logger, setup_logging
from pcache._util.retry import RetryPolicy, retry_call

__all__ = [
    "RetryPolicy",
    "block_checksum",
    "content_hash",
    "content_hasher",
    "get_logger",
    "load_config",
    "parse_size",
    "retry_call",
    "setup_logging",
    "verify_block_checksum",
]
