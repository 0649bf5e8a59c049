"""The write-back journal: a synced LMDB environment in ``cache_dir/journal``.

``pending`` maps an upload id to its entry (origin URL, protocol, path, non-secret storage options,
size, xxh3-128, multipart upload id, last error). ``done`` maps a URL to what was uploaded (size, ETag,
xxh3-128), which :func:`pcache.commit` records in the marker. ``replicas`` holds *standby* copies that
peers' writers sent this node (``replicas=1``): they are not uploaded unless adopted (``pcache flush``
after the writer's node is lost), so a stale copy never races its writer's own upload. ``multipart`` holds
the *intent* of every S3 multipart upload an uploader starts, written before ``CreateMultipartUpload``
is sent and dropped once that upload is completed or aborted: an uploader killed at any point leaves
the intent behind, and the next uploader (or ``pcache flush``/``pcache gc``) aborts every multipart
upload of that key at the origin. Every write is fsynced: an entry that ``close()`` reported is on disk
before ``close()`` returns.

Secrets never enter the journal: :func:`split_secrets` strips them, and the uploader gets them from the
environment, the config, or its parent process's pipe.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

from lingcore.lmdb_env import open_env, transaction

# Over-matching is the safe side: an option wrongly treated as secret is only kept out of the journal
# (the uploader then takes it from the environment), while a missed one would land on disk.
_PENDING_BYTES = b"pending_bytes"
_SECRET_NAMES = {"sas", "passwd"}
_SECRET_PARTS = ("key", "secret", "token", "password", "credential", "private", "authorization",
                 "connection_string", "signature", "cookie")


def is_secret_option(name: str) -> bool:
    """Return True for storage-option names that carry credentials."""
    lowered = name.lower()
    return lowered in _SECRET_NAMES or any(part in lowered for part in _SECRET_PARTS)


def split_secrets(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split storage options into (public, secret), recursing into nested dicts like client_kwargs."""
    public: dict[str, Any] = {}
    secret: dict[str, Any] = {}
    for name, value in options.items():
        if is_secret_option(name):
            secret[name] = value
        elif isinstance(value, dict):
            pub, sec = split_secrets(value)
            public[name] = pub
            if sec:
                secret[name] = sec
        else:
            public[name] = value
    return public, secret


def merge_options(public: dict[str, Any], secret: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`split_secrets`."""
    out = dict(public)
    for name, value in secret.items():
        if isinstance(value, dict) and isinstance(out.get(name), dict):
            out[name] = merge_options(out[name], value)
        else:
            out[name] = value
    return out


def options_fingerprint(protocol: str, public: dict[str, Any]) -> str:
    """Identify a target store (protocol + non-secret options) without any secret in it."""
    return json.dumps([protocol, public], sort_keys=True, default=str)


def under_prefix(url: str, prefix: str | None) -> bool:
    """Return True when ``url`` is ``prefix`` itself or lies below it (path-component aware)."""
    if not prefix:
        return True
    prefix = prefix.rstrip("/")
    return url == prefix or url.startswith(prefix + "/")


class Journal:
    """Pending and completed uploads for one ``cache_dir`` (safe across processes)."""

    def __init__(self, cache_dir: str) -> None:
        self.dir = os.path.join(cache_dir, "writeback")
        os.makedirs(self.dir, exist_ok=True)
        # max_dbs leaves room: a named database cannot be added to an environment opened with fewer.
        self.env = open_env(os.path.join(cache_dir, "journal"), map_size=1 << 30, max_dbs=12, sync=True,
                            metasync=True, max_readers=1024)
        self.pending_db = self.env.open_db(b"pending")
        self.done_db = self.env.open_db(b"done")
        # Running total of pending bytes, kept in the same transactions as the entries: the disk tier
        # asks for it on every block it publishes, which must not decode the whole journal each time.
        self.meta_db = self.env.open_db(b"meta")
        self.replica_db = self.env.open_db(b"replicas")
        self.multipart_db = self.env.open_db(b"multipart")
        with transaction(self.env, write=True) as txn:
            # A journal written before the counter existed is counted once, here: seeding it lazily
            # inside a delete would recount after the delete and then subtract the entry a second time.
            if txn.get(_PENDING_BYTES, db=self.meta_db) is None:
                txn.put(_PENDING_BYTES, str(self._count_pending_bytes(txn)).encode(), db=self.meta_db)

    def data_path(self, upload_id: str) -> str:
        """Where the staged bytes of ``upload_id`` live."""
        return os.path.join(self.dir, f"{upload_id}.data")

    def add(self, entry: dict[str, Any]) -> None:
        """Record a staged file (durably; the data file must already be fsynced and renamed)."""
        with transaction(self.env, write=True) as txn:
            if txn.get(entry["id"].encode(), db=self.pending_db) is None:
                self._add_pending_bytes(txn, entry["size"])
            txn.put(entry["id"].encode(), json.dumps(entry).encode(), db=self.pending_db)

    def update(self, entry_id: str, **changes: Any) -> None:
        """Merge ``changes`` into a pending entry (no-op if it is gone)."""
        with transaction(self.env, write=True) as txn:
            raw = txn.get(entry_id.encode(), db=self.pending_db)
            if raw is not None:
                entry = json.loads(raw)
                entry.update(changes)
                txn.put(entry_id.encode(), json.dumps(entry).encode(), db=self.pending_db)

    def complete(self, upload_id: str, etag: str | None) -> None:
        """Move an entry from pending to done, in one durable transaction."""
        with transaction(self.env, write=True) as txn:
            raw = txn.get(upload_id.encode(), db=self.pending_db)
            if raw is None:
                return
            entry = json.loads(raw)
            done = {"size": entry["size"], "xxh3_128": entry["xxh3_128"], "etag": etag,
                    "created": entry["created"], "completed": time.time()}
            txn.put(entry["url"].encode(), json.dumps(done).encode(), db=self.done_db)
            txn.delete(upload_id.encode(), db=self.pending_db)
            self._add_pending_bytes(txn, -entry["size"])

    def pending(self, prefix: str | None = None) -> list[dict[str, Any]]:
        """Return pending entries whose URL lies under ``prefix`` (all when None), oldest first."""
        with transaction(self.env) as txn:
            entries = [json.loads(v) for _, v in txn.cursor(db=self.pending_db)]
        return sorted((e for e in entries if under_prefix(e["url"], prefix)), key=lambda e: e["created"])

    def pending_for_url(self, url: str) -> dict[str, Any] | None:
        """Return the newest pending entry for exactly ``url``, unless a newer write is already uploaded."""
        matches = [e for e in self.pending(url) if e["url"] == url]
        if not matches:
            return None
        with transaction(self.env) as txn:
            raw = txn.get(url.encode(), db=self.done_db)
        done_created = json.loads(raw).get("created", 0.0) if raw is not None else -1.0
        return matches[-1] if matches[-1]["created"] > done_created else None

    def is_superseded(self, entry: dict[str, Any]) -> bool:
        """True when a newer write of the same URL is pending or already uploaded."""
        newest = self.pending_for_url(entry["url"])
        return newest is None or newest["id"] != entry["id"]

    def supersede(self, entry_id: str) -> None:
        """Drop a pending entry that a newer write of its URL replaces (it is never uploaded)."""
        with transaction(self.env, write=True) as txn:
            raw = txn.get(entry_id.encode(), db=self.pending_db)
            if raw is not None:
                txn.delete(entry_id.encode(), db=self.pending_db)
                self._add_pending_bytes(txn, -json.loads(raw)["size"])

    def retarget(self, entry_id: str, url: str, path: str) -> list[str] | None:
        """Point a pending entry at another URL (a rename before its upload), in one durable transaction.

        Other pending writes of ``url`` are superseded in the same transaction (the rename replaces
        them, as ``os.replace`` does), and the entry becomes the newest write of ``url``. The caller holds
        the upload locks of both URLs, so no uploader is sending either. Returns the ids whose data files
        the caller must unlink, or None when the entry is no longer pending.
        """
        with transaction(self.env, write=True) as txn:
            raw = txn.get(entry_id.encode(), db=self.pending_db)
            if raw is None:
                return None
            drop = []
            for key, value in list(txn.cursor(db=self.pending_db)):
                other = json.loads(value)
                if other["url"] == url and other["id"] != entry_id:
                    txn.delete(key, db=self.pending_db)
                    self._add_pending_bytes(txn, -other["size"])
                    drop.append(str(other["id"]))
            entry = json.loads(raw)
            entry.update(url=url, path=path, created=time.time(), attempts=0, last_error=None)
            txn.put(entry_id.encode(), json.dumps(entry).encode(), db=self.pending_db)
        return drop

    def move_done(self, src_url: str, dst_url: str, etag: str | None) -> None:
        """Record that the uploaded ``src_url`` now lives at ``dst_url`` (a server-side copy + delete)."""
        with transaction(self.env, write=True) as txn:
            raw = txn.get(src_url.encode(), db=self.done_db)
            if raw is None:
                return
            record = json.loads(raw)
            record.update(etag=etag, created=time.time(), completed=time.time())
            txn.put(dst_url.encode(), json.dumps(record).encode(), db=self.done_db)
            txn.delete(src_url.encode(), db=self.done_db)

    # -- multipart upload intents (no orphan uploads) ---------------------------------------------------
    def begin_multipart(self, entry: dict[str, Any]) -> None:
        """Record, durably, that a multipart upload of ``entry`` is about to be created at the origin.

        Written *before* ``CreateMultipartUpload`` is sent: the origin may create the upload although
        the uploader dies before it learns the id, so the record names the object (URL, protocol,
        non-secret options, path), not an upload id.
        """
        record = {k: entry[k] for k in ("id", "url", "protocol", "path", "options")}
        record.update(started=time.time(), upload_id=None)
        with transaction(self.env, write=True) as txn:
            txn.put(entry["id"].encode(), json.dumps(record).encode(), db=self.multipart_db)

    def note_multipart_id(self, entry_id: str, upload_id: str) -> None:
        """Add the origin's upload id to an intent (informational: orphans are found by key)."""
        with transaction(self.env, write=True) as txn:
            raw = txn.get(entry_id.encode(), db=self.multipart_db)
            if raw is not None:
                record = json.loads(raw)
                record["upload_id"] = upload_id
                txn.put(entry_id.encode(), json.dumps(record).encode(), db=self.multipart_db)

    def multipart_intents(self, url: str | None = None) -> list[dict[str, Any]]:
        """Intents whose multipart uploads may still exist at the origin (of exactly ``url``, or all)."""
        with transaction(self.env) as txn:
            records = [json.loads(v) for _, v in txn.cursor(db=self.multipart_db)]
        return sorted((r for r in records if url is None or r["url"] == url), key=lambda r: r["started"])

    def end_multipart(self, entry_ids: list[str]) -> None:
        """Forget intents once no multipart upload of theirs can be left at the origin."""
        with transaction(self.env, write=True) as txn:
            for entry_id in entry_ids:
                txn.delete(entry_id.encode(), db=self.multipart_db)

    # -- standby replicas (cluster write-back, replicas=1) ------------------------------------------
    def add_replica(self, entry: dict[str, Any]) -> list[str]:
        """Record a standby replica whose data file is already durable at :meth:`data_path`.

        An older replica of the same URL is superseded (dropped) in the same transaction, and a newer
        one makes this one superseded at once. Returns the ids whose data files the caller must unlink.
        """
        drop: list[str] = []
        with transaction(self.env, write=True) as txn:
            for key, raw in list(txn.cursor(db=self.replica_db)):
                other = json.loads(raw)
                if other["url"] != entry["url"]:
                    continue
                if other["created"] > entry["created"]:
                    drop.append(entry["id"])
                    return drop
                txn.delete(key, db=self.replica_db)
                self._add_pending_bytes(txn, -other["size"])
                drop.append(other["id"])
            self._add_pending_bytes(txn, entry["size"])
            txn.put(entry["id"].encode(), json.dumps(entry).encode(), db=self.replica_db)
        return drop

    def replicas(self) -> list[dict[str, Any]]:
        """Standby replicas held for other nodes, oldest first."""
        with transaction(self.env) as txn:
            entries = [json.loads(v) for _, v in txn.cursor(db=self.replica_db)]
        return sorted(entries, key=lambda e: e["created"])

    def drop_replica(self, source_id: str) -> str | None:
        """Forget the replica of the writer's upload ``source_id``; return its local id (to unlink)."""
        with transaction(self.env, write=True) as txn:
            for key, raw in txn.cursor(db=self.replica_db):
                entry = json.loads(raw)
                if entry["source_id"] == source_id:
                    txn.delete(key, db=self.replica_db)
                    self._add_pending_bytes(txn, -entry["size"])
                    return str(entry["id"])
        return None

    def adopt_replica(self, replica_id: str) -> bool:
        """Turn a standby replica into a pending upload of this node, in one durable transaction."""
        with transaction(self.env, write=True) as txn:
            raw = txn.get(replica_id.encode(), db=self.replica_db)
            if raw is None:
                return False
            entry = json.loads(raw)
            txn.delete(replica_id.encode(), db=self.replica_db)
            pending = {k: v for k, v in entry.items() if k not in ("source_id", "source_node")}
            pending["attempts"] = 0
            txn.put(replica_id.encode(), json.dumps(pending).encode(), db=self.pending_db)
            # Bytes stay counted: they move from standby to pending.
        return True

    def forget_replica(self, replica_id: str) -> None:
        """Drop a standby replica by its local id (the origin already has it or something newer)."""
        with transaction(self.env, write=True) as txn:
            raw = txn.get(replica_id.encode(), db=self.replica_db)
            if raw is not None:
                txn.delete(replica_id.encode(), db=self.replica_db)
                self._add_pending_bytes(txn, -json.loads(raw)["size"])

    def _add_pending_bytes(self, txn: Any, delta: int) -> None:
        total = self._read_pending_bytes(txn)
        txn.put(_PENDING_BYTES, str(max(0, total + delta)).encode(), db=self.meta_db)

    def _read_pending_bytes(self, txn: Any) -> int:
        raw = txn.get(_PENDING_BYTES, db=self.meta_db)
        return int(raw) if raw is not None else self._count_pending_bytes(txn)

    def _count_pending_bytes(self, txn: Any) -> int:
        return sum(json.loads(v)["size"] for db in (self.pending_db, self.replica_db)
                   for _, v in txn.cursor(db=db))

    def pending_bytes(self) -> int:
        """Bytes staged here and not yet known durable at the origin: pending uploads plus standby
        replicas. The disk tier reserves them; they are never evicted."""
        with transaction(self.env) as txn:
            return self._read_pending_bytes(txn)

    def done(self, prefix: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield (url, record) of completed uploads under ``prefix``."""
        with transaction(self.env) as txn:
            items = [(k.decode(), json.loads(v)) for k, v in txn.cursor(db=self.done_db)]
        for url, rec in items:
            if under_prefix(url, prefix):
                yield url, rec

    def get(self, entry_id: str) -> dict[str, Any] | None:
        """Return the pending entry ``entry_id``, or None once it is done or superseded."""
        with transaction(self.env) as txn:
            raw = txn.get(entry_id.encode(), db=self.pending_db)
        return json.loads(raw) if raw is not None else None

    def references(self, entry_id: str) -> bool:
        """True when a pending upload or a standby replica owns the data file of ``entry_id``."""
        with transaction(self.env) as txn:
            return any(txn.get(entry_id.encode(), db=db) is not None for db in (self.pending_db, self.replica_db))

    def remove_orphans(self, age_s: float = 3600.0) -> int:
        """Delete staged files that no pending entry or replica refers to, once older than ``age_s`` seconds.

        The age guard matters: a writer renames its ``.data`` file into place *before* its journal
        entry commits, and a ``.tmp`` file belongs to a writer whose ``close()`` has not returned (small
        files sit in the writer's buffer until then, so their mtime says little). Each candidate is
        re-checked against the journal just before it is unlinked.
        """
        removed = 0
        now = time.time()
        for name in os.listdir(self.dir):
            stem, _, ext = name.partition(".")
            if ext not in ("data", "tmp"):
                continue
            path = os.path.join(self.dir, name)
            try:
                if now - os.stat(path).st_mtime <= age_s or self.references(stem):
                    continue
                os.unlink(path)
                removed += 1
            except FileNotFoundError:
                continue
        return removed

    def prune_done(self, older_than_s: float) -> int:
        """Forget completed-upload records older than ``older_than_s`` seconds."""
        cutoff = time.time() - older_than_s
        removed = 0
        with transaction(self.env, write=True) as txn:
            for key, value in list(txn.cursor(db=self.done_db)):
                if json.loads(value)["completed"] < cutoff:
                    txn.delete(key, db=self.done_db)
                    removed += 1
        return removed
