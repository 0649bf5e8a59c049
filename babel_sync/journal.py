"""The crash-safe state of one babel-sync installation, in LMDB (``state_dir/journal``).

Records, all JSON values:

- ``mpu:<dest>\\0<key>``: an in-flight multipart upload (id, source ETag, size, part size), written
  before the first part is sent, so a kill -9 can resume it or abort it (never orphan it).
- ``part:<upload id>:<n>``: a part that S3 acknowledged (ETag, size): durable bytes not re-sent.
- ``done:<dest>\\0<key>``: a file copied into a unit that is not yet published (source ETag, size,
  destination ETag, xxh3-128), so a resumed run does not copy it again.
- ``man:<dest>\\0<unit>``: the last manifest published for a unit and the marker/manifest ETags it
  was published with, so a no-op pass needs no GET at all.
- ``fp:<dest>\\0<unit>``: fingerprints of the unit's source and destination listings (and its marker and
  manifest ETags) from the last pass that found it in sync: the same fingerprints mean in sync again.
- ``status:<rule>\\0<dest>``: lag, pending bytes and the last error, for ``babel-sync status``.

Records survive a kill -9 as soon as their transaction commits; the file is synced after every pass.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from typing import Any

from babel_sync.errors import LockedError
from lingcore.lmdb_env import open_env, transaction


def _k(*parts: str) -> bytes:
    return "\0".join(parts).encode()


class Journal:
    """The LMDB state in ``state_dir`` (created if missing)."""

    def __init__(self, state_dir: str) -> None:
        self.dir = os.path.abspath(os.path.expanduser(state_dir))
        os.makedirs(self.dir, exist_ok=True)
        # No fsync per commit: a committed record is in the page cache, so it survives kill -9 of this
        # process; only an OS crash can drop the newest records, and then the pass re-sends a little
        # more and the upload sweep aborts uploads the journal lost. (A synced commit per copied file
        # capped copies of small files at ~200/s.) :meth:`flush` syncs at the end of every pass.
        self.env = open_env(os.path.join(self.dir, "journal"), map_size=1 << 30, max_dbs=0, sync=False)
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ process lock
    def lock(self) -> None:
        """Take the state directory for this process (released when the process dies, even by kill -9).

        Raises:
            LockedError: when another babel-sync process holds it.
        """
        fd = os.open(os.path.join(self.dir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(self.dir) from None
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release :meth:`lock`."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def flush(self) -> None:
        """Force the journal to disk."""
        self.env.sync(True)

    # ------------------------------------------------------------------ generic
    def put(self, key: bytes, value: Any) -> None:
        """Store one JSON record durably."""
        with transaction(self.env, write=True) as txn:
            txn.put(key, json.dumps(value).encode())

    def get(self, key: bytes) -> Any:
        """Return one record or None."""
        with transaction(self.env) as txn:
            raw = txn.get(key)
        return None if raw is None else json.loads(raw)

    def delete(self, *keys: bytes) -> None:
        """Remove records (missing ones are fine)."""
        with transaction(self.env, write=True) as txn:
            for key in keys:
                txn.delete(key)

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, Any]]:
        """Yield (key, record) for every key starting with ``prefix`` (a snapshot)."""
        with transaction(self.env) as txn:
            cur = txn.cursor()
            items = []
            if cur.set_range(prefix):
                for key, raw in cur:
                    if not key.startswith(prefix):
                        break
                    items.append((bytes(key), json.loads(raw)))
        yield from items

    # ------------------------------------------------------------------ typed records
    @staticmethod
    def mpu_key(dest: str, key: str) -> bytes:
        """Key of a multipart-upload record."""
        return b"mpu:" + _k(dest, key)

    @staticmethod
    def part_key(upload_id: str, n: int) -> bytes:
        """Key of an acknowledged part."""
        return f"part:{upload_id}:{n:06d}".encode()

    def parts(self, upload_id: str) -> dict[int, dict[str, Any]]:
        """Acknowledged parts of an upload: number -> record."""
        prefix = f"part:{upload_id}:".encode()
        return {int(k[len(prefix):]): v for k, v in self.scan(prefix)}

    def drop_upload(self, dest: str, key: str, upload_id: str) -> None:
        """Forget an upload and its parts (after complete or abort)."""
        with transaction(self.env, write=True) as txn:
            txn.delete(self.mpu_key(dest, key))
            prefix = f"part:{upload_id}:".encode()
            cur = txn.cursor()
            if cur.set_range(prefix):
                while cur.key().startswith(prefix):
                    if not cur.delete():
                        break

    def uploads(self, dest: str) -> list[tuple[str, dict[str, Any]]]:
        """Every journaled multipart upload for destination ``dest``: (key, record)."""
        prefix = b"mpu:" + _k(dest, "")
        return [(k[len(prefix):].decode(), v) for k, v in self.scan(prefix)]

    @staticmethod
    def done_key(dest: str, key: str) -> bytes:
        """Key of a copied-but-unpublished file."""
        return b"done:" + _k(dest, key)

    @staticmethod
    def manifest_key(dest: str, unit: str) -> bytes:
        """Key of a unit's cached manifest."""
        return b"man:" + _k(dest, unit)

    @staticmethod
    def fingerprint_key(dest: str, unit: str) -> bytes:
        """Key of a unit's listing fingerprints from the last pass that found it in sync."""
        return b"fp:" + _k(dest, unit)

    def clear_done(self, dest: str, unit: str) -> None:
        """Forget the copied-file records of a unit once it is published."""
        prefix = b"done:" + _k(dest, unit.rstrip("/") + "/")
        keys = [k for k, _ in self.scan(prefix)]
        if keys:
            self.delete(*keys)

    def set_status(self, rule: str, dest: str, **fields: Any) -> None:
        """Merge ``fields`` into a rule/destination status record."""
        key = b"status:" + _k(rule, dest)
        with transaction(self.env, write=True) as txn:
            raw = txn.get(key)
            rec = json.loads(raw) if raw else {}
            rec.update(fields)
            txn.put(key, json.dumps(rec).encode())

    def statuses(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Every status record by (rule, destination)."""
        out = {}
        for key, rec in self.scan(b"status:"):
            rule, _, dest = key[len(b"status:"):].decode().partition("\0")
            out[(rule, dest)] = rec
        return out
