"""Reusable test infrastructure: a real SeaweedFS S3 server and a fault-injecting proxy.

Used by ``tests/conftest.py`` and ``bench/``; nothing here is imported by pcache at runtime.
"""

from pcache.testing.chaos import ChaosProxy, RequestRecord
from pcache.testing.seaweed import SeaweedServer, SeaweedStartError, find_weed_binary

__all__ = ["ChaosProxy", "RequestRecord", "SeaweedServer", "SeaweedStartError", "find_weed_binary"]
