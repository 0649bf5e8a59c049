"""Memory snapshots: the newest training state of each rank in POSIX shared memory (``/dev/shm``).

A segment outlives the training process (not the node): a process restarted on the same node with the
same command line after kill -9 resumes from it in a fraction of the time a load from the origin takes.
The design follows DLRover's Flash Checkpoint (state in shared memory, persisted at a breakpoint); the
code is ours.

One segment per rank and job, ``/dev/shm/ling-shm-<job>-r<rank>``, where ``<job>`` is a hash of
``--job-id`` or, without one, of the checkpoint URL with its credentials and query removed (so no secret
reaches a file name). Layout::

    [header of slot 0: 2 KiB][header of slot 1: 2 KiB][payload 0: capacity][payload 1: capacity]

A payload is one ``torch.save`` of the rank's state (:func:`full_state`). A write goes to the slot that
does not hold the newest snapshot: its header is zeroed first, then the payload is written (hashed as
it goes, xxh3-128), then the header last, with a generation one above the other slot's. A kill at any
moment leaves the other slot intact and this one empty or failing its checksum: never a torn snapshot
that validates. Reading validates magic, format version, the header's own checksum, job, rank, world
size, the file size (truncation) and the payload checksum; a slot failing any of them is logged with
the case and ignored.
"""

from __future__ import annotations

import contextlib
import glob
import io
import mmap
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, cast

import torch

from lingcore.checksum import content_hash, content_hasher
from lingcore.log import get_logger

log = get_logger(__name__)

SHM_DIR_ENV = "LING_SHM_DIR"  # another tmpfs directory than /dev/shm (tests)
PREFIX = "ling-shm-"
MAGIC = b"LINGSHM\x00"
VERSION = 1
HEADER = 2048  # bytes reserved per slot header
_FIELDS = struct.Struct("<8sIIQQIIQQ32s32s")  # magic version slot gen step rank world length capacity job sum
_ALIGN = 1 << 20  # capacities are whole MiB, with room to grow, so most writes reuse the pages


def job_hash(ckpt: str = "", job_id: str = "") -> str:
    """The 32-hex identity of a job: ``job_id`` when given, else the checkpoint URL without credentials.

    Raises:
        ValueError: with neither (a memory snapshot needs an identity to be found again).
    """
    if job_id:
        key = "id:" + job_id
    elif ckpt:
        # user:password@ and a query (a signed URL's token) never count, nor reach the name.
        key = "url:" + re.sub(r"//[^/@]*@", "//", ckpt.split("?", 1)[0]).rstrip("/")
    else:
        raise ValueError("a memory snapshot needs --job-id or --ckpt to identify its job")
    return content_hash(key.encode())


def shm_dir() -> str:
    """Where segments live: ``$LING_SHM_DIR``, else ``/dev/shm``."""
    return os.environ.get(SHM_DIR_ENV) or "/dev/shm"


def segment_path(job: str, rank: int) -> str:
    """The segment of ``rank`` of job ``job`` (a :func:`job_hash`)."""
    return os.path.join(shm_dir(), f"{PREFIX}{job[:16]}-r{rank:05d}")


def job_segments(job: str | None) -> list[str]:
    """Every segment of job ``job`` (all ranks), or of every job of ours when ``job`` is None."""
    pattern = f"{PREFIX}{job[:16]}-r*" if job else f"{PREFIX}*"
    return sorted(glob.glob(os.path.join(shm_dir(), pattern)))


def remove_segments(paths: list[str]) -> list[str]:
    """Unlink ``paths``; return those removed (a missing one is skipped)."""
    removed = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    return removed


@dataclass
class _Header:
    slot: int
    gen: int
    step: int
    rank: int
    world: int
    length: int
    capacity: int
    job: str
    checksum: str


class _Full(Exception):
    """The payload outgrew the slot."""


class _SlotWriter:
    """A write-only file object over one slot's payload area, hashing what passes through (for torch.save)."""

    def __init__(self, fd: int, offset: int, capacity: int) -> None:
        self.fd, self.offset, self.capacity, self.pos = fd, offset, capacity, 0
        self.hasher = content_hasher()
        self.full = False  # set before raising: torch.save's C++ writer may re-wrap the exception

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.pos + len(view) > self.capacity:
            self.full = True
            raise _Full
        done = 0
        while done < len(view):  # pwrite may write less than asked
            done += os.pwrite(self.fd, view[done:], self.offset + self.pos + done)
        self.hasher.update(view)
        self.pos += len(view)
        return len(view)

    def flush(self) -> None:
        """Nothing to flush: tmpfs pages are the segment."""


class _ViewReader(io.RawIOBase):
    """A seekable read-only file over a memoryview, for torch.load (io.BytesIO would copy the payload)."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self.view, self.pos = view, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset + (0, self.pos, len(self.view))[whence]
        return self.pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), len(self.view) - self.pos))
        memoryview(buffer).cast("B")[:n] = self.view[self.pos:self.pos + n]
        self.pos += n
        return n


class Segment:
    """The memory snapshot of one rank of one job (see the module docstring).

    Args:
        job: The job's :func:`job_hash`.
        rank: This rank.
        world: The world size the snapshot is for (one of another world size is never loaded).
    """

    def __init__(self, job: str, rank: int, world: int) -> None:
        self.job, self.rank, self.world = job, rank, world
        self.path = segment_path(job, rank)
        self._verified: set[tuple[int, int, str]] = set()  # (slot, generation, checksum) of intact payloads

    # -- writing -------------------------------------------------------------------------------------
    def write(self, step: int, state: dict[str, Any]) -> int:
        """Store ``state`` as the newest snapshot (step ``step``); return the payload bytes."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return self._write_fresh(step, state)
        try:
            size = os.fstat(fd).st_size
            capacity = (size - 2 * HEADER) // 2
            headers = [h for h in (self._header(fd, s, size, quiet=True) for s in (0, 1)) if h is not None]
            newest = max(headers, key=lambda h: h.gen) if headers else None
            slot = 1 - newest.slot if newest is not None else 0
            gen = newest.gen + 1 if newest is not None else 1
            if capacity <= 0 or size != 2 * HEADER + 2 * capacity:  # not a layout of ours: start over
                raise _Full
            # Empty first: a kill during the payload must leave this slot empty, not "corrupt".
            os.pwrite(fd, bytes(HEADER), slot * HEADER)
            writer = _SlotWriter(fd, 2 * HEADER + slot * capacity, capacity)
            try:
                torch.save(state, cast(IO[bytes], writer))
            except Exception:
                if writer.full:
                    raise _Full from None
                raise
            os.pwrite(fd, self._pack(slot, gen, step, writer.pos, capacity, writer.hasher.hexdigest()), slot * HEADER)
            return writer.pos
        except _Full:
            return self._write_fresh(step, state)
        finally:
            os.close(fd)

    def _write_fresh(self, step: int, state: dict[str, Any]) -> int:
        """A new segment (first snapshot, or one that outgrew its slots): written aside, then renamed over
        the old one, so a kill leaves the old segment or the complete new one."""
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getbuffer()
        capacity = -(-(len(data) * 5 // 4 + 1) // _ALIGN) * _ALIGN
        tmp = f"{self.path}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, 2 * HEADER + 2 * capacity)
            writer = _SlotWriter(fd, 2 * HEADER, capacity)
            writer.write(data)
            os.pwrite(fd, self._pack(0, 1, step, writer.pos, capacity, writer.hasher.hexdigest()), 0)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        return len(data)

    def _pack(self, slot: int, gen: int, step: int, length: int, capacity: int, checksum: str) -> bytes:
        body = _FIELDS.pack(MAGIC, VERSION, slot, gen, step, self.rank, self.world, length, capacity,
                            self.job.encode(), checksum.encode())
        return body + content_hash(body).encode()

    # -- reading -------------------------------------------------------------------------------------
    def _reject(self, slot: int, case: str, quiet: bool) -> None:
        if not quiet:
            log.warning("memory snapshot %s slot %d ignored: %s", self.path, slot, case)

    def _header(self, fd: int, slot: int, size: int, quiet: bool = False) -> _Header | None:
        """Slot ``slot``'s header when it validates (everything but the payload checksum), else None."""
        if size < 2 * HEADER:
            self._reject(slot, f"truncated (file of {size} bytes, shorter than its headers)", quiet)
            return None
        raw = os.pread(fd, HEADER, slot * HEADER)
        n = _FIELDS.size
        if not raw.strip(b"\0"):
            return None  # empty: never written, or a write was interrupted before its header
        if raw[:8] != MAGIC:
            self._reject(slot, "corrupt (bad magic: not a ling-train memory snapshot)", quiet)
            return None
        if content_hash(raw[:n]).encode() != raw[n:n + 32]:
            self._reject(slot, "corrupt (header checksum mismatch)", quiet)
            return None
        _, version, s, gen, step, rank, world, length, capacity, job, checksum = _FIELDS.unpack(raw[:n])
        h = _Header(s, gen, step, rank, world, length, capacity, job.decode(), checksum.decode())
        if version != VERSION:
            self._reject(slot, f"format version {version} (this version reads {VERSION})", quiet)
        elif h.job != self.job:
            self._reject(slot, f"other job ({h.job[:16]}, this job is {self.job[:16]})", quiet)
        elif h.rank != self.rank or h.slot != slot:
            self._reject(slot, f"other rank ({h.rank}, this is rank {self.rank})", quiet)
        elif h.world != self.world:
            self._reject(slot, f"other world size ({h.world} ranks, this run has {self.world})", quiet)
        elif size != 2 * HEADER + 2 * capacity or length > capacity:
            self._reject(slot, f"truncated (file of {size} bytes, step {step} needs "
                               f"{2 * HEADER + 2 * capacity})", quiet)
        else:
            return h
        return None

    def scan(self, newest_only: bool = False) -> dict[int, int]:
        """The intact snapshots: ``{step: slot}`` of the slots whose header and payload checksum validate
        (only the newest intact one with ``newest_only``). Each rejected slot is logged, naming the case."""
        found: dict[int, int] = {}
        for h, view in self._slots():
            found[h.step] = h.slot
            view.release()
            if newest_only:
                break
        return found

    def load(self, step: int) -> dict[str, Any] | None:
        """The state of snapshot ``step`` (verified again as it is read), or None when it is not intact."""
        for _, view in self._slots(step):
            with view:  # one copy, from the mapping straight into the tensors' storage
                reader = cast(IO[bytes], _ViewReader(view))
                state: dict[str, Any] = torch.load(reader, map_location="cpu", weights_only=True)
            return state
        return None

    def _slots(self, step: int | None = None) -> Iterator[tuple[_Header, memoryview]]:
        """The intact slots (of ``step`` only, when given; those are not logged when rejected), with a view
        of their payload mapped from the segment (no copy); the caller releases each view."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            size = os.fstat(fd).st_size
            found = [self._header(fd, slot, size, quiet=step is not None) for slot in (0, 1)]
            headers = sorted((h for h in found if h is not None), key=lambda h: -h.gen)  # newest first
            with mmap.mmap(fd, 0, prot=mmap.PROT_READ) if size else contextlib.nullcontext() as mapped:
                for h in headers:
                    if step is not None and h.step != step:
                        continue
                    view = memoryview(mapped)[2 * HEADER + h.slot * h.capacity:][:h.length]  # type: ignore[arg-type]
                    key = (h.slot, h.gen, h.checksum)
                    # Verified by scan() just before (one writer per segment, and it is not running): a
                    # second pass over the payload would only cost time.
                    if key in self._verified:
                        yield h, view
                        continue
                    if content_hash(view) != h.checksum:
                        view.release()
                        self._reject(h.slot, f"corrupt (checksum mismatch in the payload of step {h.step})", False)
                        continue
                    self._verified.add(key)
                    yield h, view
        finally:
            os.close(fd)

    def remove(self) -> None:
        """Unlink the segment (a missing one is fine)."""
        remove_segments([self.path])
