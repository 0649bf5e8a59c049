"""The inode table: built from the origin listing, re-listed on ``--refresh``, inodes stable for the mount.

The listing is paginated by the origin filesystem (s3fs pages ListObjectsV2 1,000 keys at a time) and
issued in parallel, one recursive listing per top-level prefix, so a bucket with many top-level
directories lists in about the time of its largest one.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from lingcore.log import get_logger
from lingcore.retry import RetryPolicy, retry_call
from lingcore.versions import object_version

log = get_logger(__name__)

ROOT_INODE = 1


@dataclass(frozen=True)
class FileEntry:
    """One object as listed: immutable, so an open handle keeps the version it opened.

    Attributes:
        size: Bytes.
        mtime_ns: Modification time in nanoseconds since the epoch (0 when the store has none).
        version: ETag, else ``size:mtime`` (the same rule as pcache's block keys).
    """

    size: int
    mtime_ns: int
    version: str


@dataclass
class Node:
    """An inode: a directory (``entry`` None) or a file version.

    ``local`` marks what was created through a writable mount (files staged or uploaded by this mount,
    and directories made with ``mkdir``); everything listed at the origin stays read-only.
    """

    ino: int
    path: str
    entry: FileEntry | None = None
    children: dict[str, int] = field(default_factory=dict)
    local: bool = False

    @property
    def is_dir(self) -> bool:
        return self.entry is None


@dataclass(frozen=True)
class Changes:
    """What a re-listing changed; the daemon tells the kernel to forget these."""

    changed: tuple[int, ...] = ()          # files whose version changed (cached pages are stale)
    removed: tuple[tuple[int, str], ...] = ()  # (parent inode, name) no longer listed
    added: int = 0


def _mtime_ns(info: dict[str, Any]) -> int:
    value: Any = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    if isinstance(value, datetime):
        value = value.timestamp()
    try:
        return int(float(value) * 1e9)
    except (TypeError, ValueError):
        return 0


def list_origin(fs: Any, root: str, workers: int, policy: RetryPolicy, url: Callable[[str], str],
                progress: Callable[[int, int], None] | None = None) -> dict[str, FileEntry]:
    """List every file under ``root``: one listing of ``root``, then its sub-prefixes in parallel.

    Args:
        fs: The origin fsspec filesystem.
        root: Origin path of the mounted prefix (``bucket/prefix`` or ``/data``).
        workers: Sub-prefixes listed at once.
        policy: Retry policy for each listing call.
        url: Maps an origin path to its URL, for error messages.
        progress: Called with (prefixes listed, prefixes in all) as the listing goes.

    Returns:
        ``{relative path: FileEntry}``.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        OriginUnavailableError: a listing still failed after retries.
    """
    root = root.rstrip("/")
    fs.invalidate_cache(root)  # fsspec listing caches would hide changes from --refresh
    top = retry_call(lambda: fs.ls(root, detail=True), url=url(root), policy=policy)
    found: dict[str, dict[str, Any]] = {}
    dirs = []
    for info in top:
        if info.get("type") == "directory":
            dirs.append(info["name"])
        else:
            found[info["name"]] = info

    def walk(path: str) -> dict[str, Any]:
        return dict(retry_call(lambda: fs.find(path, detail=True), url=url(path), policy=policy))

    with ThreadPoolExecutor(max(1, min(workers, len(dirs)))) as pool:
        for done, part in enumerate(pool.map(walk, dirs), 1):
            found.update(part)
            if progress is not None:
                progress(done, len(dirs))
    out: dict[str, FileEntry] = {}
    prefix = root + "/" if root else ""
    for name, info in found.items():
        name = name.rstrip("/") if info.get("type") == "directory" else name
        if not name.startswith(prefix) or info.get("type") == "directory" or name.endswith("/"):
            continue  # directory markers and stray entries carry no data
        rel = posixpath.normpath(name[len(prefix):])
        if rel.startswith("..") or rel in (".", ""):
            continue
        out[rel] = FileEntry(int(info.get("size") or 0), _mtime_ns(info), object_version(info))
    return out


class Namespace:
    """Path <-> inode table. Inode numbers never change for a path while its kind stays the same."""

    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {ROOT_INODE: Node(ROOT_INODE, "")}
        self._by_path: dict[str, int] = {"": ROOT_INODE}
        self._next = ROOT_INODE + 1
        self.total_bytes = 0

    def get(self, ino: int) -> Node | None:
        return self.nodes.get(ino)

    def child(self, parent: int, name: str) -> Node | None:
        node = self.nodes.get(parent)
        if node is None or not node.is_dir:
            return None
        ino = node.children.get(name)
        return None if ino is None else self.nodes.get(ino)

    def _ino_for(self, path: str, is_dir: bool, version: str | None = None) -> int:
        ino = self._by_path.get(path)
        old = self.nodes.get(ino) if ino is not None else None
        # A new version gets a new inode: the kernel's page cache belongs to the inode, so a handle still
        # reading the old version must never fill pages that opens of the new version would be served.
        if (ino is None or old is None or old.is_dir != is_dir
                or (old.entry is not None and old.entry.version != version)):
            ino = self._next
            self._next += 1
        return ino

    def apply(self, listing: dict[str, FileEntry]) -> Changes:
        """Replace the table with ``listing``; keep the inode numbers of paths that are unchanged.

        A path whose kind or version changed gets a new inode (its old name is reported as removed).
        """
        files = {p: e for p, e in listing.items()}
        dirs = {""}
        for path in files:
            parent = posixpath.dirname(path)
            while parent not in dirs:
                dirs.add(parent)
                parent = posixpath.dirname(parent)
        for path in [p for p in files if p in dirs]:
            log.warning("%s is both an object and a prefix; showing the prefix", path)
            del files[path]
        nodes: dict[int, Node] = {}
        by_path: dict[str, int] = {}
        changed: list[int] = []
        for path in sorted(dirs):
            ino = ROOT_INODE if path == "" else self._ino_for(path, True)
            nodes[ino], by_path[path] = Node(ino, path), ino
        for path, entry in files.items():
            previous = self._by_path.get(path)
            ino = self._ino_for(path, False, entry.version)
            if previous is not None and previous != ino:
                changed.append(previous)  # the old version's inode: its pages and attributes are dropped
            nodes[ino], by_path[path] = Node(ino, path, entry), ino
        for path, ino in by_path.items():
            if path:
                nodes[by_path[posixpath.dirname(path)]].children[posixpath.basename(path)] = ino
        removed: list[tuple[int, str]] = []
        for path, ino in self._by_path.items():
            if path and by_path.get(path) != ino:
                parent_ino = self._by_path.get(posixpath.dirname(path))
                if parent_ino is not None:
                    removed.append((parent_ino, posixpath.basename(path)))
        added = sum(1 for p in by_path if p not in self._by_path)
        self.nodes, self._by_path = nodes, by_path
        self.total_bytes = sum(e.size for e in files.values())
        return Changes(tuple(changed), tuple(removed), added)

    # -- changes made through a writable mount (the daemon's event loop is the only caller) ------------
    def add(self, parent: int, name: str, entry: FileEntry | None) -> Node:
        """Create ``name`` in directory ``parent``: a local file (``entry``) or directory (None)."""
        parent_node = self.nodes[parent]
        path = posixpath.join(parent_node.path, name) if parent_node.path else name
        ino = self._next
        self._next += 1
        node = Node(ino, path, entry, local=True)
        self.nodes[ino], self._by_path[path] = node, ino
        parent_node.children[name] = ino
        self.total_bytes += entry.size if entry is not None else 0
        return node

    def resize(self, node: Node, size: int, mtime_ns: int) -> None:
        """Record a local file's new size (a write or truncate)."""
        if node.entry is not None:
            self.total_bytes += size - node.entry.size
            node.entry = FileEntry(size, mtime_ns, node.entry.version)

    def remove(self, parent: int, name: str) -> Node | None:
        """Drop ``name`` from directory ``parent``; return the node it named."""
        parent_node = self.nodes[parent]
        ino = parent_node.children.pop(name, None)
        node = self.nodes.pop(ino, None) if ino is not None else None
        if node is not None:
            self._by_path.pop(node.path, None)
            self.total_bytes -= node.entry.size if node.entry is not None else 0
        return node

    def move(self, parent: int, name: str, new_parent: int, new_name: str) -> Node:
        """Rename a file or an empty directory (an existing target must have been removed first)."""
        node = self.nodes[self.nodes[parent].children.pop(name)]
        self._by_path.pop(node.path, None)
        dest = self.nodes[new_parent]
        node.path = posixpath.join(dest.path, new_name) if dest.path else new_name
        dest.children[new_name] = node.ino
        self._by_path[node.path] = node.ino
        return node

    def lookup(self, path: str) -> Node | None:
        """The node at relative ``path`` ("" is the root), or None."""
        ino = self._by_path.get(path.strip("/"))
        return None if ino is None else self.nodes.get(ino)

    def path_of(self, parent: int, name: str) -> str:
        """Relative path ``name`` would have in directory ``parent``."""
        base = self.nodes[parent].path
        return posixpath.join(base, name) if base else name

    def ensure_dirs(self, path: str) -> int:
        """Inode of directory ``path``, creating missing (local) directories on the way."""
        ino = ROOT_INODE
        for part in [p for p in path.split("/") if p]:
            child = self.nodes[ino].children.get(part)
            ino = child if child is not None else self.add(ino, part, None).ino
        return ino
