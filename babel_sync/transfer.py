"""Copying one object between sites: single PUT, multipart with resumable parts, or server-side copy.

The content digests (xxh3-128 of the file, xxh3-64 per chunk: :mod:`babel_sync.digest`) are computed
from the bytes as they stream through (parts are hashed in order as they complete), never by a second
read of the source. Every part and every single PUT is checked against its MD5 ETag, so a corrupted
transfer is re-sent and then reported. Large objects are sharded adaptively (:mod:`babel_sync.shard`).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import signal
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from babel_sync.config import SyncOptions
from babel_sync.digest import ContentDigest
from babel_sync.errors import IntegrityError, SourceChangedError
from babel_sync.journal import Journal
from babel_sync.shard import PartBudget, part_size
from babel_sync.store import ObjectInfo, S3Store

MiB = 1 << 20
_MD5 = re.compile(r"^[0-9a-f]{32}$")
#: Testing knob: SIGKILL this process once it has sent this many bytes (crash-safety tests).
CRASH_ENV = "BABEL_SYNC_CRASH_AFTER_BYTES"


class Stats:
    """Thread-safe counters of one pass."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values: dict[str, int] = {}
        crash = os.environ.get(CRASH_ENV, "")
        self._crash_after = int(crash) if crash.isdigit() else 0

    def add(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``."""
        with self.lock:
            self.values[name] = self.values.get(name, 0) + n
            sent = self.values.get("bytes_sent", 0)
        if self._crash_after and name == "bytes_sent" and sent >= self._crash_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def get(self, name: str) -> int:
        """Current value of ``name``."""
        with self.lock:
            return self.values.get(name, 0)

    def peak(self, name: str, value: int) -> None:
        """Raise counter ``name`` to ``value`` if it is larger (a high-water mark)."""
        with self.lock:
            self.values[name] = max(self.values.get(name, 0), value)


def _check_md5(digest: bytes, etag: str, url: str, what: str) -> None:
    if _MD5.match(etag) and digest.hex() != etag:
        raise IntegrityError(url, f"{what}: MD5 of the bytes does not match ETag {etag}")


class Transfer:
    """Copies objects from ``src`` to ``dst`` for one (rule, destination).

    Args:
        src, dst: The two stores.
        dest_id: The destination's journal identity.
        journal: Crash-safe state.
        options: Part sizes, threshold, concurrency.
        stats: Counters of the pass.
        parts: Pool that runs part transfers (shared by every file of the pass).
        budget: Part slots and bytes shared by every file of the pass.
    """

    def __init__(self, src: S3Store, dst: S3Store, dest_id: str, journal: Journal, options: SyncOptions,
                 stats: Stats, parts: ThreadPoolExecutor, budget: PartBudget | None = None) -> None:
        self.src, self.dst, self.dest_id = src, dst, dest_id
        self.journal, self.options, self.stats, self.parts = journal, options, stats, parts
        self.budget = budget or PartBudget(options)
        self.server_side = src.site.same_store(dst.site)

    def copy(self, info: ObjectInfo) -> dict[str, Any]:
        """Copy one object; return its manifest record (without the unit-relative path).

        A corrupt transfer (MD5 mismatch) is re-sent once; a second mismatch raises.

        Raises:
            SourceChangedError: the source ETag moved during the copy.
            IntegrityError: the destination does not match the source after a re-transfer.
        """
        try:
            return self._copy_once(info)
        except IntegrityError:
            self.stats.add("integrity_retries")
            return self._copy_once(info)

    def _copy_once(self, info: ObjectInfo) -> dict[str, Any]:
        if self.server_side:
            return self._server_side(info)
        if info.size < self.options.multipart_threshold_size:
            digest = ContentDigest(info.size, self.options.verify_chunk_size)
            data = self.src.read(info.key, info.etag, sink=digest.update)
            if len(data) != info.size:
                raise SourceChangedError(self.src.url(info.key), info.etag)
            md5 = hashlib.md5(data).digest()  # one MD5: checks the source ETag, is sent as Content-MD5
            _check_md5(md5, info.etag, self.src.url(info.key), "source read")
            dest_etag = self.dst.put(info.key, data, md5)
            self.stats.add("bytes_sent", len(data))
            _check_md5(md5, dest_etag, self.dst.url(info.key), "destination write")
            return {"size": info.size, "etag": info.etag, "dest_etag": dest_etag, **digest.fields()}
        return self._multipart(info)

    # ------------------------------------------------------------------ multipart
    def _completed(self, info: ObjectInfo, upload_id: str, psize: int) -> tuple[dict[int, str], str] | None:
        """Detect an upload that was completed just before a kill (its journal record still exists).

        Every part was journaled before CompleteMultipartUpload was sent, so the object's multipart
        ETag (MD5 of the part MD5s, ``-N``) can be checked against the journal without sending data.
        """
        acked = self.journal.parts(upload_id)
        count = math.ceil(info.size / psize)
        if sorted(acked) != list(range(1, count + 1)):
            return None
        etags = [acked[n]["etag"] for n in range(1, count + 1)]
        if not all(_MD5.match(e) for e in etags):
            return None
        expected = hashlib.md5(b"".join(bytes.fromhex(e) for e in etags)).hexdigest() + f"-{count}"
        try:
            current = self.dst.head_etag(info.key)  # crash-recovery path only; never in a no-op pass
        except FileNotFoundError:
            return None
        return ({n: etags[n - 1] for n in range(1, count + 1)}, current) if current == expected else None

    def _start_upload(self, info: ObjectInfo, psize: int) -> tuple[str, dict[int, str], str | None]:
        """Resume a journaled upload of this exact source version, or start a new one.

        Returns:
            (upload id, durable parts: number -> ETag, the object's ETag when the upload had already
            completed). A part S3 lists with the expected size is durable even if the kill came before
            our journal write; its bytes are re-read (for the content hash) and checked against that
            ETag, never re-sent unless the check fails.
        """
        key = Journal.mpu_key(self.dest_id, info.key)
        rec = self.journal.get(key)
        if rec is not None:
            same = (rec["src_etag"], rec["size"], rec["part_size"]) == (info.etag, info.size, psize)
            stored = self.dst.list_parts(info.key, rec["upload_id"]) if same else {}
            if stored:
                durable = {n: etag for n, (etag, size) in stored.items()
                           if size == min(psize, info.size - (n - 1) * psize)}
                return rec["upload_id"], durable, None
            done = self._completed(info, rec["upload_id"], psize) if same else None
            if done is not None:
                return rec["upload_id"], done[0], done[1]
            self.dst.abort_upload(info.key, rec["upload_id"])
            self.journal.drop_upload(self.dest_id, info.key, rec["upload_id"])
        upload_id = self.dst.create_upload(info.key)
        self.journal.put(key, {"upload_id": upload_id, "src_etag": info.etag, "size": info.size,
                               "part_size": psize})
        return upload_id, {}, None

    def _part(self, info: ObjectInfo, upload_id: str, n: int, start: int, end: int,
              durable: str | None) -> tuple[bytes | bytearray | None, str]:
        self.budget.acquire(end - start)  # bounds the part bytes all files hold at once
        self.stats.peak("parts_in_flight_max", self.budget.in_flight)
        try:
            return self._part_io(info, upload_id, n, start, end, durable)
        finally:
            self.budget.release(end - start)

    def _part_io(self, info: ObjectInfo, upload_id: str, n: int, start: int, end: int,
                 durable: str | None) -> tuple[bytes | bytearray | None, str]:
        if self.server_side:
            if durable is not None:
                return None, durable
            etag = self.dst.copy_from(self.src, info.key, info.key, info.etag, (upload_id, n, start, end))
            self.journal.put(Journal.part_key(upload_id, n), {"etag": etag, "size": end - start})
            return None, etag
        data = self.src.read(info.key, info.etag, start, end)  # one ranged read per part, in parallel
        if len(data) != end - start:
            raise SourceChangedError(self.src.url(info.key), info.etag)
        md5 = hashlib.md5(data).digest()
        if durable is not None and (not _MD5.match(durable) or md5.hex() == durable):
            self.stats.add("bytes_resumed", len(data))
            return data, durable  # already stored: read only to extend the content hash
        etag = self.dst.upload_part(info.key, upload_id, n, data, md5)
        self.stats.add("bytes_sent", len(data))
        _check_md5(md5, etag, self.dst.url(info.key), f"part {n}")
        self.journal.put(Journal.part_key(upload_id, n), {"etag": etag, "size": len(data)})
        return data, etag

    def _multipart(self, info: ObjectInfo) -> dict[str, Any]:
        psize = part_size(info.size, self.options)
        upload_id, durable, completed = self._start_upload(info, psize)
        digest = ContentDigest(info.size, self.options.verify_chunk_size)
        etags: list[str] = []
        window: deque[Future[tuple[bytes | bytearray | None, str]]] = deque()
        bounds = [(i + 1, off, min(off + psize, info.size)) for i, off in enumerate(range(0, info.size, psize))]
        ctl = self.budget.window(len(bounds))
        try:
            for n, start, end in bounds:
                window.append(self.parts.submit(self._part, info, upload_id, n, start, end, durable.get(n)))
                while len(window) >= ctl.size or (n == len(bounds) and window):
                    data, etag = window.popleft().result()
                    if data is not None:
                        digest.update(data)  # in part order: the same digests as one sequential read
                    etags.append(etag)
                    ctl.done(psize)
            dest_etag = completed or self.dst.complete_upload(info.key, upload_id, etags)
        except SourceChangedError:
            for fut in window:
                fut.cancel()
            self.dst.abort_upload(info.key, upload_id)
            self.journal.drop_upload(self.dest_id, info.key, upload_id)
            raise
        except BaseException:
            for fut in window:
                fut.cancel()
            raise  # the journaled upload is resumed by the next pass, or aborted by its sweep
        finally:
            self.budget.finish()
        self.journal.drop_upload(self.dest_id, info.key, upload_id)
        fields = self._dest_digest(info.key, dest_etag, info.size) if self.server_side else digest.fields()
        return {"size": info.size, "etag": info.etag, "dest_etag": dest_etag, **fields}

    # ------------------------------------------------------------------ server side
    def _dest_digest(self, key: str, etag: str, size: int) -> dict[str, Any]:
        """Digest a server-side copy by reading it back once at the destination (which also verifies it)."""
        digest = ContentDigest(size, self.options.verify_chunk_size)
        step = max(self.options.max_part_size, 64 * MiB)
        for off in range(0, size, step):
            digest.update(self.dst.read(key, etag, off, min(off + step, size)))
        self.stats.add("bytes_verified", size)
        return digest.fields()

    def _server_side(self, info: ObjectInfo) -> dict[str, Any]:
        if info.size >= self.options.multipart_threshold_size:
            return self._multipart(info)
        dest_etag = self.dst.copy_from(self.src, info.key, info.key, info.etag)
        if _MD5.match(info.etag) and dest_etag != info.etag:
            raise IntegrityError(self.dst.url(info.key), f"copy has ETag {dest_etag}, source {info.etag}")
        return {"size": info.size, "etag": info.etag, "dest_etag": dest_etag,
                **self._dest_digest(info.key, dest_etag, info.size)}
