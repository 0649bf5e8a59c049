"""Reusable test infrastructure: a real SeaweedFS S3 server, a fault-injecting proxy, pcache nodes.

Used by ``tests/conftest.py`` and ``bench/``; shipped code never imports it. The embedded S3 server
itself is a product part, :mod:`pcache.s3server`, re-exported here for the tests.
"""

from pcache.s3server import SeaweedServer, SeaweedStartError, find_weed_binary
from pcache.testing.chaos import ChaosProxy, RequestRecord
from pcache.testing.holds import Fault, Hold
from pcache.testing.nodes import NodeProcess, write_token

__all__ = ["ChaosProxy", "Fault", "Hold", "NodeProcess", "RequestRecord", "SeaweedServer", "SeaweedStartError", "find_weed_binary",
           "write_token"]
