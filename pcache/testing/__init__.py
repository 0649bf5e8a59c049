"""Reusable test infrastructure: a real SeaweedFS S3 server, a fault-injecting proxy, pcache nodes.

Used by ``tests/conftest.py`` and ``bench/``; nothing here is imported by pcache at runtime.
"""

from pcache.testing.chaos import ChaosProxy, RequestRecord
from pcache.testing.nodes import NodeProcess, write_token
from pcache.testing.seaweed import SeaweedServer, SeaweedStartError, find_weed_binary

__all__ = ["ChaosProxy", "NodeProcess", "RequestRecord", "SeaweedServer", "SeaweedStartError", "find_weed_binary",
           "write_token"]
