"""The pieces of ``loaders pack --engine ray`` (driver in :mod:`loaders.formats.raypack`): ranges, tasks, planner.

The inputs are cut into *ranges* (uncompressed JSONL split at byte offsets, a line belonging to the range it
starts in; other files whole, small ones grouped), about ``range_bytes`` of input each. One task per range
tokenizes it and returns its tokens (corpus dtype) and document lengths as two Ray objects. The driver
takes only the lengths, in range order, and cuts shards with the local writer's rule (documents in input
order, a shard closes once it holds ``shard_size`` bytes of tokens), so shard boundaries, names and contents
do not depend on the range size or the cluster. One task per shard then writes it from the ranges' token
objects and publishes it (:func:`~loaders.formats.writer.publish_shard`: a per-attempt staging directory,
then rename or upload), so a retried or duplicated attempt never exposes a partial file.

``_PACKING`` lists what is done: ``shards`` is the finished prefix (what the local engine resumes from), and
``ray`` holds the range size, the document count of every range the driver has cut, the planned shards and
the finished shards beyond the prefix. A re-run with the same ``resume_key`` verifies the finished shards
(size and xxh3-128) and tokenizes only the ranges that unfinished shards need. Ray retries a task whose
worker died (``max_retries``); the output is the same whichever attempt wins.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lingcore.log import get_logger
from loaders.errors import InvalidParameterError, MissingDependencyError
from loaders.formats._io import Location
from loaders.formats.tokenize import Encoder, TokenizerSpec
from loaders.formats.writer import new_shard_writer, publish_shard

log = get_logger(__name__)

STAGING = "_staging"  # per-attempt shard staging of a local output (same file system: publish is a rename)
RANGE_MIN, RANGE_MAX = 1 << 20, 64 << 20
OptionsFor = Callable[[str], dict[str, Any]] | None


@dataclasses.dataclass(frozen=True)
class Piece:
    """Bytes ``[start, end)`` of input file ``file`` (``end`` None: to the end of the file)."""

    file: int
    start: int = 0
    end: int | None = None


def plan_ranges(files: Sequence[Any], range_bytes: int) -> list[list[Piece]]:
    """Cut ``files`` (``pack.InputFile``) into ranges of about ``range_bytes`` input bytes, in input order."""
    ranges: list[list[Piece]] = []
    group: list[Piece] = []
    size = 0
    for i, f in enumerate(files):
        if f.kind == "jsonl" and not f.compression and f.size > range_bytes:
            if group:
                ranges.append(group)
                group, size = [], 0
            starts = list(range(0, f.size, range_bytes))
            ranges += [[Piece(i, a, b)] for a, b in zip(starts, starts[1:], strict=False)]
            ranges.append([Piece(i, starts[-1], None)])  # to the end, as the local engine reads it
            continue
        group.append(Piece(i))
        size += f.size
        if size >= range_bytes:
            ranges.append(group)
            group, size = [], 0
    if group:
        ranges.append(group)
    return ranges


# -- tasks (plain functions, wrapped with ray.remote by the driver) ------------------------------------
_ENCODERS: dict[str, Encoder] = {}


def _input(entry: tuple[str, str, str | None, int, str], options_for: OptionsFor) -> Any:
    from loaders.formats.pack import InputFile  # pack imports this module

    url, kind, compression, size, version = entry
    return InputFile(Location.from_url(url, options_for(url) if options_for else None), kind, compression, size,
                     version)


def tokenize_range(spec: TokenizerSpec, inputs: list[tuple[str, str, str | None, int, str]], pieces: list[Piece],
                   text_field: str, txt_mode: str, dtype: str, options_for: OptionsFor) -> tuple[np.ndarray, np.ndarray]:
    """Task: the tokens (in ``dtype``) and document lengths of one range."""
    from loaders.formats.pack import iter_texts

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one task per CPU already
    key = f"{spec.kind}:{spec.eos_id}:{hash(spec.content)}"
    encoder = _ENCODERS.get(key)
    if encoder is None:
        encoder = _ENCODERS[key] = Encoder(spec)
    flats, lengths = [], []
    for piece in pieces:
        f = _input(inputs[piece.file], options_for)
        texts = [text for text, _ in iter_texts(f, text_field, txt_mode, piece.start, piece.end)]
        for i in range(0, len(texts), 1024):
            flat, lens = encoder.encode(texts[i:i + 1024])
            flats.append(flat)
            lengths.append(lens)
    flat = np.concatenate(flats) if flats else np.zeros(0, np.int64)
    info = np.iinfo(np.dtype(dtype))
    if flat.size and (int(flat.min()) < info.min or int(flat.max()) > info.max):
        raise InvalidParameterError("tokens", f"ids in [{int(flat.min())}, {int(flat.max())}] do not fit dtype {dtype}")
    return flat.astype(dtype), (np.concatenate(lengths) if lengths else np.zeros(0, np.int64))


def write_shard(out_url: str, options_for: OptionsFor, format: str, dtype: str, name: str, first_document: int,
                spans: list[tuple[int, int]], *parts: np.ndarray) -> dict[str, Any]:
    """Task: write shard ``name`` from documents ``spans[i]`` of range ``i`` (``parts``: tokens, lengths, …)."""
    out = Location.from_url(out_url, options_for(out_url) if options_for else None)
    tmp = None
    if out.local:  # a fresh directory per attempt: a retried or orphaned attempt never shares a file
        stage = os.path.join(out.path, STAGING, uuid.uuid4().hex)
        os.makedirs(stage)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="loaders-ray-")
        stage = tmp.name
    try:
        writer = new_shard_writer(format, stage, name, np.dtype(dtype), first_document)
        for (lo, hi), flat, lengths in zip(spans, parts[0::2], parts[1::2], strict=True):
            ends = np.cumsum(lengths)
            begin = int(ends[lo - 1]) if lo else 0
            writer.add_batch(flat[begin:int(ends[hi - 1]) if hi else 0], lengths[lo:hi])
        return publish_shard(out, stage, writer, first_document)
    finally:
        if tmp is not None:
            tmp.cleanup()
        else:
            shutil.rmtree(stage, ignore_errors=True)


# -- driver ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Plan:
    """A shard cut by the driver: its name, documents, and where they are (range, first, end)."""

    name: str
    first_document: int
    documents: int
    tokens: int
    spans: list[tuple[int, int, int]]

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "first_document": self.first_document, "documents": self.documents,
                "tokens": self.tokens}


class Planner:
    """Cuts documents, fed range by range in order, into shards with the local writer's rule."""

    def __init__(self, shard_size: int, itemsize: int, index: int, first_document: int) -> None:
        self.shard_size, self.itemsize = shard_size, itemsize
        self.index, self.first = index, first_document
        self.spans: list[tuple[int, int, int]] = []
        self.nbytes = self.documents = self.tokens = 0

    def feed(self, r: int, lengths: np.ndarray, skip: int = 0) -> list[Plan]:
        plans = []
        ends = np.cumsum(lengths[skip:] * self.itemsize)
        doc = 0
        while doc < ends.size:
            base = int(ends[doc - 1]) if doc else 0
            # take documents until the shard reaches shard_size (the last one may overshoot): CorpusWriter's rule
            take = int(np.searchsorted(ends[doc:], base + self.shard_size - self.nbytes, side="left")) + 1
            take = min(take, ends.size - doc)
            self.spans.append((r, skip + doc, skip + doc + take))
            added = int(ends[doc + take - 1]) - base
            self.nbytes += added
            self.tokens += added // self.itemsize
            self.documents += take
            doc += take
            if self.nbytes >= self.shard_size:
                plans.append(self._emit())
        return plans

    def finish(self) -> list[Plan]:
        return [self._emit()] if self.documents else []

    def _emit(self) -> Plan:
        plan = Plan(f"shard-{self.index:05d}", self.first, self.documents, self.tokens, self.spans)
        self.index, self.first = self.index + 1, self.first + self.documents
        self.spans, self.nbytes, self.documents, self.tokens = [], 0, 0, 0
        return plan


def import_ray() -> Any:
    """Return the ``ray`` module, or raise :class:`MissingDependencyError`."""
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("ray", "--engine ray") from None
    return ray


def connect(ray: Any, address: str | None, workers: int) -> bool:
    """Join the cluster at ``address`` (``auto``: a running one, else start a local one); True if we must leave it."""
    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "logging_level": "warning", "log_to_driver": False}
    if address and address != "local":
        try:
            ray.init(address=address, **quiet)
            return True
        except ConnectionError:
            if address != "auto":
                raise
    ray.init(num_cpus=workers, _node_ip_address="127.0.0.1", **quiet)
    return True


def unwrap(ray: Any, ref: Any) -> Any:
    """``ray.get(ref)``, raising the task's own exception (typed, one line) instead of Ray's wrapper."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise


__all__ = ["Piece", "Plan", "Planner", "connect", "import_ray", "plan_ranges", "tokenize_range", "unwrap",
           "write_shard"]
