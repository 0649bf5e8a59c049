"""Rendezvous (HRW) placement of cache blocks on peer nodes.

Each (node, key) pair gets a pseudo-random weight; a key's owners are the nodes with the highest
weights, in order. Adding or removing a node moves only the keys whose top owner changes, an expected
1/N of them, so a node joining moves at most about 1/(N+1) of the keys, inside the 1.25/N bound, and
no key moves between two nodes that both stayed. Pure functions: no state, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import xxhash


def _weight(node: str, key: bytes) -> int:
    return xxhash.xxh3_64_intdigest(key, seed=xxhash.xxh3_64_intdigest(node.encode()))


def owners(key: bytes, nodes: Iterable[str], count: int = 1) -> list[str]:
    """Return the ``count`` nodes that own ``key``, best first (fewer if there are fewer nodes)."""
    ranked = sorted(nodes, key=lambda node: (_weight(node, key), node), reverse=True)
    return ranked[:count]


@dataclass(frozen=True)
class Placement:
    """Placement over a fixed member list (for example the healthy peers at one moment).

    Attributes:
        nodes: Member URLs, e.g. ``("http://10.0.0.1:9000", ...)``; order does not matter.
    """

    nodes: Sequence[str]

    def owner(self, key: bytes) -> str:
        """The primary owner of ``key``."""
        if not self.nodes:
            raise ValueError("placement has no nodes")
        return owners(key, self.nodes, 1)[0]

    def ranked(self, key: bytes) -> list[str]:
        """Every node, in the order a reader should try them for ``key``."""
        return owners(key, self.nodes, len(self.nodes))

    def without(self, dead: Iterable[str]) -> Placement:
        """The placement after dropping ``dead`` nodes (readers fall back to the next owner)."""
        gone = set(dead)
        return Placement(tuple(n for n in self.nodes if n not in gone))
