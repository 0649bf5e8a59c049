"""The background uploader: drains the write-back journal to the origin.

It runs as its own process (``python -m pcache.uploader``, spawned on demand by the writer) so upload
work never competes for the caller's GIL, and the same :func:`drain` serves ``pcache flush``. S3 targets
get multipart uploads with ``upload_concurrency`` parts in flight, each part retried with backoff;
other fsspec targets get ``put_file``. An uploader claims a file with an ``flock`` on its lock file,
so several uploaders (a respawned one, a ``pcache flush``) never send the same file twice at once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from fsspec.asyn import sync

from lingcore.checksum import hash_stream
from lingcore.files import unlink_quiet
from lingcore.log import get_logger, setup_logging
from lingcore.retry import RetryPolicy, retry_call
from pcache.cluster.auth import load_token
from pcache.cluster.replica import drop_remote, origin_mtime
from pcache.config import CacheConfig
from pcache.journal import Journal, merge_options, options_fingerprint
from pcache.locks import url_lock_key, url_locks
from pcache.multipart import CREATED_METADATA, create_upload, created_metadata, finish_upload
from pcache.orphans import abort_uploads_of
from pcache.streaming import stream_live
from pcache.targets import build_target_fs

log = get_logger("pcache.uploader")

class Uploader:
    """Uploads journal entries of one ``cache_dir``.

    Args:
        config: Cache settings (part size, concurrency, retries).
        secrets: Secret storage options by :func:`options_fingerprint`; entries without one use env/config
            credentials (``AWS_ACCESS_KEY_ID`` and friends).
        endpoint_url: Overrides the S3 endpoint recorded in the journal (``pcache flush --endpoint-url``).
    """

    def __init__(self, config: CacheConfig, secrets: dict[str, dict[str, Any]] | None = None,
                 endpoint_url: str | None = None) -> None:
        self.config = config
        self.endpoint_url = endpoint_url
        self.journal = Journal(config.cache_dir)
        self.secrets = secrets or {}
        self.policy = RetryPolicy(attempts=config.retry_attempts, base_delay=config.retry_base_delay)
        self.url_locks = url_locks(self.journal.dir)
        self._fs: dict[str, Any] = {}
        self.orphans = {"aborted": 0, "failed": 0, "busy": 0}  # what the last drain's orphan sweep did

    def _filesystem(self, entry: dict[str, Any]) -> Any:
        fp = options_fingerprint(entry["protocol"], entry["options"])
        if fp not in self._fs:
            options = merge_options(entry["options"], self.secrets.get(fp, {}))
            if self.endpoint_url and entry["protocol"] == "s3":
                options["client_kwargs"] = {**options.get("client_kwargs", {}), "endpoint_url": self.endpoint_url}
            self._fs[fp] = build_target_fs(entry["protocol"], options, skip_instance_cache=True)
        return self._fs[fp]

    def upload_one(self, entry: dict[str, Any]) -> bool | None:
        """Upload one entry unless another uploader is working on its URL.

        Uploads of one URL are serialised (a stripe lock on the URL, across processes) and only the
        newest write of a URL is ever sent: an older entry is superseded, so a slow or retried old
        write can never overwrite a newer one at the origin.

        Returns:
            True when it is durable at the origin (or superseded), False when the upload failed, None
            when another uploader holds its URL.
        """
        lock = self.url_locks.try_acquire(url_lock_key(entry["url"]))
        if lock is None:
            return None
        try:
            if stream_live(self.journal, entry["url"]):
                return None  # a writer is streaming this URL (pcache.streaming): it hands over at close()
            current = self.journal.get(entry["id"])
            try:
                self._sweep_url(entry["url"], current)
            except Exception as exc:  # noqa: BLE001 - never start a new upload while old ones may linger
                if current is not None:
                    self.journal.update(current["id"], last_error=f"{type(exc).__name__}: {exc}"[:500],
                                        attempts=current.get("attempts", 0) + 1)
                log.error("orphan multipart uploads of %s not aborted: %s", entry["url"], exc,
                          extra={"url": entry["url"]})
                return False
            if current is None:
                return True  # finished or superseded by another uploader meanwhile
            if self.journal.is_superseded(current):
                self.journal.supersede(current["id"])
                unlink_quiet(self.journal.data_path(current["id"]))
                self._drop_replica(current)
                log.info("skipped %s: superseded by a newer write", current["url"], extra={"url": current["url"]})
                return True
            try:
                etag = self._send(current)
            except Exception as exc:  # noqa: BLE001 - recorded, and the entry stays pending
                self.journal.update(current["id"], last_error=f"{type(exc).__name__}: {exc}"[:500],
                                    attempts=current.get("attempts", 0) + 1)
                log.error("upload of %s failed: %s", current["url"], exc, extra={"url": current["url"]})
                return False
            self.journal.complete(current["id"], etag)
            unlink_quiet(self.journal.data_path(current["id"]))
            self._drop_replica(current)
            log.info("uploaded %s (%d bytes)", current["url"], current["size"], extra={"url": current["url"]})
            return True
        finally:
            self.url_locks.release(lock)

    @staticmethod
    def _drop_replica(entry: dict[str, Any]) -> None:
        """The peer's standby copy is no longer needed once the origin has this write (or a newer one)."""
        replica = entry.get("replica")
        if not replica:
            return
        try:
            token = load_token(replica["token_file"])
        except Exception as exc:  # noqa: BLE001 - the peer's flush skips stale replicas anyway
            log.warning("cannot drop replica of %s: %s", entry["url"], exc, extra={"url": entry["url"]})
            return
        drop_remote(replica["peer"], token, entry["id"])

    def adopt_replicas(self) -> dict[str, int]:
        """Take over the standby replicas this node holds for other writers (``pcache flush``).

        A replica is adopted (becomes a pending upload here) unless the origin already has this content,
        or an object written at or after the replica was created; then it is dropped. The time check
        compares the writer's clock with the origin's, so clocks must agree to within the interval
        between two writes of one URL.

        Returns:
            ``{"adopted": n, "dropped": m, "failed": f}`` (failed ones stay standby replicas).
        """
        counts = {"adopted": 0, "dropped": 0, "failed": 0}
        for entry in self.journal.replicas():
            try:
                fs, path = self._filesystem(entry), entry["path"]
                try:
                    info = retry_call(partial(fs.info, path), url=entry["url"], policy=self.policy)
                except FileNotFoundError:
                    info = None
                at_origin = info is not None and self._origin_has(fs, entry, info)
            except Exception as exc:  # noqa: BLE001 - one bad replica must not stop the others (or the flush)
                counts["failed"] += 1
                log.error("replica of %s left as is: %s", entry["url"], exc, extra={"url": entry["url"]})
                continue
            if at_origin:
                self.journal.forget_replica(entry["id"])
                unlink_quiet(self.journal.data_path(entry["id"]))
                counts["dropped"] += 1
                log.info("replica of %s dropped: the origin already has it or a newer write",
                         entry["url"], extra={"url": entry["url"]})
            elif self.journal.adopt_replica(entry["id"]):
                counts["adopted"] += 1
                log.info("replica of %s adopted for upload (writer node %s)", entry["url"],
                         entry.get("source_node"), extra={"url": entry["url"]})
        return counts

    def _origin_has(self, fs: Any, entry: dict[str, Any], info: dict[str, Any]) -> bool:
        """True when the origin holds this write or a newer one of the same URL."""
        written = self._origin_created(fs, entry)
        if written is not None:  # uploaded through pcache: compare the writers' own creation times
            return written >= entry["created"]
        if info.get("size") == entry["size"]:
            with fs.open(entry["path"], "rb") as fh:
                if hash_stream(fh)[1] == entry["xxh3_128"]:
                    return True
        mtime = origin_mtime(info)
        return mtime is not None and mtime >= entry["created"]

    def _origin_created(self, fs: Any, entry: dict[str, Any]) -> float | None:
        """The ``pcache-created`` time an upload through pcache stored with the object (S3), if any."""
        if not hasattr(fs, "_call_s3"):
            return None
        bucket, key, _ = fs.split_path(entry["path"])
        head = retry_call(lambda: sync(fs.loop, fs._call_s3, "head_object", Bucket=bucket, Key=key),
                          url=entry["url"], policy=self.policy)
        value = (head.get("Metadata") or {}).get(CREATED_METADATA)
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None

    def _send(self, entry: dict[str, Any]) -> str | None:
        fs = self._filesystem(entry)
        local = self.journal.data_path(entry["id"])
        path, url = entry["path"], entry["url"]
        if hasattr(fs, "_call_s3") and (entry["size"] > self.config.upload_part_size or entry.get("stream")):
            etag = self._s3_multipart(fs, entry, local)
        elif hasattr(fs, "_call_s3"):
            bucket, key, _ = fs.split_path(path)
            with open(local, "rb") as fh:
                body = fh.read()
            resp = retry_call(lambda: sync(fs.loop, fs._call_s3, "put_object", Bucket=bucket, Key=key, Body=body,
                                           Metadata=created_metadata(entry["created"])), url=url, policy=self.policy)
            etag = resp.get("ETag")
        else:
            fs.makedirs(fs._parent(path), exist_ok=True)
            retry_call(lambda: fs.put_file(local, path), url=url, policy=self.policy)
            etag = None
        fs.invalidate_cache(path)
        size = retry_call(lambda: fs.info(path)["size"], url=url, policy=self.policy)
        if size != entry["size"]:
            raise OSError(f"{url}: origin has {size} bytes after upload, expected {entry['size']}")
        return etag.strip('"') if etag else None

    def _s3_multipart(self, fs: Any, entry: dict[str, Any], local: str) -> str | None:
        url, stream = entry["url"], entry.get("stream") or {}
        # A streamed upload (pcache.streaming) whose entry was not renamed since is resumed (the sweep kept it).
        if stream.get("upload_id") and stream.get("path") == entry["path"]:
            upload_id, creates, part_size = stream["upload_id"], 1, int(stream["part_size"])
            done, intent = {int(p["PartNumber"]): p for p in stream["parts"]}, stream["intent"]
        else:
            upload_id, creates = create_upload(fs, self.journal, entry, entry["created"], self.policy)
            part_size, done, intent = self.config.upload_part_size, {}, entry["id"]
        try:
            etag = finish_upload(fs, entry, local, upload_id, part_size, done, self.config.upload_concurrency,
                                 self.policy)
        except BaseException:
            if stream:  # the next attempt starts a fresh upload: this one is aborted just below
                self.journal.update(entry["id"], stream=None)
            try:  # every upload of the key, not just ours: a retried create may have made two
                self._abort_intents(self.journal.multipart_intents(url))
            except Exception as exc:  # noqa: BLE001 - the intent stays; flush or gc aborts it later
                log.warning("could not abort multipart upload of %s: %s", url, exc, extra={"url": url})
            raise
        if creates == 1:
            self.journal.end_multipart([intent])  # the one upload this intent created is complete
        else:  # a create whose reply was lost and was retried may have left another upload behind
            try:
                self._abort_intents(self.journal.multipart_intents(url))
            except Exception as exc:  # noqa: BLE001 - the upload itself succeeded; flush or gc retries this
                log.warning("multipart uploads of %s left for flush/gc to abort: %s", url, exc, extra={"url": url})
        return etag

    # -- orphan multipart uploads ---------------------------------------------------------------------
    def _abort_intents(self, intents: list[dict[str, Any]], keep: frozenset[str] = frozenset()) -> int:
        """Abort every multipart upload at the origin of the objects ``intents`` name, except the upload
        ids in ``keep``, then forget the intents.

        The caller holds the URL's stripe lock and has seen no live stream of it, so no uploader or writer
        of this ``cache_dir`` is sending that URL: every upload of the key but a handed-over stream's
        (``keep``) is an orphan. Returns how many were aborted.

        Raises:
            Exception: the origin's error when listing or aborting fails; the intents are kept.
        """
        aborted = 0
        swept: set[tuple[str, str]] = set()
        for intent in intents:
            fs, target = self._filesystem(intent), (options_fingerprint(intent["protocol"], intent["options"]),
                                                    intent["path"])
            if hasattr(fs, "_call_s3") and target not in swept:
                aborted += abort_uploads_of(fs, intent["path"], intent["url"], self.policy, keep=keep)
                swept.add(target)
            self.journal.end_multipart([intent["id"]])
        return aborted

    def _sweep_url(self, url: str, entry: dict[str, Any] | None) -> None:
        """Abort the orphans of ``url`` left by killed uploaders (the caller holds its stripe lock)."""
        if entry is not None and entry.get("upload_id") and not self.journal.multipart_intents(url):
            self.journal.begin_multipart(entry)  # a journal from before intents existed: same treatment
        self._sweep_intents(url)
        if entry is not None and entry.get("upload_id"):
            self.journal.update(entry["id"], upload_id=None)

    def _sweep_intents(self, url: str) -> int:
        """Abort the orphan uploads of ``url``, keeping the streamed upload that its newest pending write
        handed over (the uploader resumes it); return how many were aborted."""
        newest = self.journal.pending_for_url(url)
        stream = (newest or {}).get("stream") or {}
        keep_id = stream["intent"] if newest is not None and stream.get("upload_id") \
            and stream.get("path") == newest["path"] else None
        intents = [i for i in self.journal.multipart_intents(url) if i["id"] != keep_id]
        if not intents:
            return 0
        return self._abort_intents(intents, frozenset([stream["upload_id"]]) if keep_id else frozenset())

    def abort_orphans(self) -> dict[str, int]:
        """Abort every multipart upload that a killed uploader of this ``cache_dir`` may have left.

        Run by :meth:`drain` (so by ``pcache flush`` and :func:`pcache.flush`) and by ``pcache gc``.
        URLs that a live uploader holds are skipped: it sweeps them itself before it uploads.

        Returns:
            ``{"aborted": n, "failed": f, "busy": b}``: uploads aborted, objects whose origin could not be
            reached (their intents stay for the next run), objects held by a live uploader.
        """
        counts = {"aborted": 0, "failed": 0, "busy": 0}
        for url in dict.fromkeys(i["url"] for i in self.journal.multipart_intents()):
            lock = self.url_locks.try_acquire(url_lock_key(url))
            if lock is None:
                counts["busy"] += 1
                continue
            try:
                if stream_live(self.journal, url):
                    counts["busy"] += 1
                    continue
                counts["aborted"] += self._sweep_intents(url)
            except Exception as exc:  # noqa: BLE001 - one unreachable origin must not stop the others
                counts["failed"] += 1
                log.error("orphan multipart uploads of %s not aborted: %s", url, exc, extra={"url": url})
            finally:
                self.url_locks.release(lock)
        return counts

    def _writer_active(self, within_s: float) -> bool:
        """True while some writer's staged ``.tmp`` file changed in the last ``within_s`` seconds."""
        now = time.time()
        for name in os.listdir(self.journal.dir):
            if name.endswith(".tmp"):
                try:
                    if now - os.stat(os.path.join(self.journal.dir, name)).st_mtime < within_s:
                        return True
                except FileNotFoundError:
                    continue
        return False

    def drain(self, prefix: str | None = None, idle_exit: float = 0.0, max_rounds: int = 3,
              timeout: float | None = None) -> list[str]:
        """Abort orphan multipart uploads, then upload pending entries until none is left (waiting
        ``idle_exit`` s for new ones).

        Stops early, leaving entries pending, once ``timeout`` seconds have passed.

        Returns:
            URLs still pending because their upload failed ``max_rounds`` times in this run.
        """
        self.orphans = self.abort_orphans()
        failures: dict[str, int] = {}
        idle_since = time.monotonic()
        deadline = None if timeout is None else idle_since + timeout
        with ThreadPoolExecutor(self.config.upload_workers) as pool:
            while deadline is None or time.monotonic() < deadline:
                todo = [e for e in self.journal.pending(prefix) if failures.get(e["id"], 0) < max_rounds]
                if not todo:
                    if self._writer_active(idle_exit):
                        idle_since = time.monotonic()  # a file is still being written: work is coming
                    if time.monotonic() - idle_since >= idle_exit:
                        break
                    time.sleep(0.05)
                    continue
                results = list(pool.map(self.upload_one, todo))
                for entry, ok in zip(todo, results, strict=True):
                    if ok is False:
                        failures[entry["id"]] = failures.get(entry["id"], 0) + 1
                if False in results:
                    time.sleep(self.policy.delay(min(max(failures.values()), 6)))
                elif None in results:
                    time.sleep(0.1)  # another uploader holds some entries: poll until it finishes
                idle_since = time.monotonic()
        return [e["url"] for e in self.journal.pending(prefix) if failures.get(e["id"], 0) >= max_rounds]


def abort_orphan_uploads(config: CacheConfig, endpoint_url: str | None = None) -> dict[str, int]:
    """Abort the multipart uploads that killed uploaders of ``config.cache_dir`` left (``pcache gc``).

    Credentials come from the environment or the config, as for ``pcache flush``. See
    :meth:`Uploader.abort_orphans` for what is returned.
    """
    return Uploader(config, endpoint_url=endpoint_url).abort_orphans()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the spawned uploader; reads ``{"config": ..., "secrets": ...}`` JSON on stdin."""
    parser = argparse.ArgumentParser(prog="python -m pcache.uploader", description=__doc__)
    parser.add_argument("--stdin-json", action="store_true", help="read config and secrets from stdin")
    args = parser.parse_args(argv)
    # Ctrl-C in the trainer's terminal must not cut a checkpoint upload short; SIGTERM/SIGKILL still stop us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging()
    payload = json.load(sys.stdin) if args.stdin_json else {}
    config = CacheConfig(**payload.get("config", {}))
    if config.uploader_nice:
        os.nice(config.uploader_nice)  # background work yields the CPU to the trainer
    uploader = Uploader(config, payload.get("secrets", {}))
    failed = uploader.drain(idle_exit=config.uploader_idle_exit)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
