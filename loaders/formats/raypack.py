"""``loaders pack --engine ray``: tokenization and shard writing as Ray tasks, byte-identical to the local engine.

The inputs are cut into *ranges* (:func:`~loaders.formats.raytasks.plan_ranges`: uncompressed JSONL split at
byte offsets, a line belonging to the range it starts in; other files whole, small ones grouped). One task
per range tokenizes it and returns its tokens (corpus dtype) and document lengths as two Ray objects. The
driver fetches only the lengths, in range order, and cuts shards with the local writer's rule (documents in
input order; a shard closes once it holds ``shard_size`` bytes of tokens), so shard boundaries, names and
bytes depend neither on the range size nor on the cluster. One task per shard writes it from the ranges'
token objects and publishes it (a per-attempt staging directory, then a rename or an upload checked by
size): a retried, duplicated or orphaned attempt never exposes a partial file, and identical attempts write
identical bytes.

``_PACKING`` lists what is done: ``shards`` is the finished prefix (what the local engine resumes from), and
``ray`` holds the range size, the document count of every range cut so far, the planned shards and the
finished shards beyond the prefix. A re-run with the same ``resume_key`` re-verifies every finished shard
(size and xxh3-128) and tokenizes only the ranges that unfinished shards need. Ray itself retries a task
whose worker process died (``max_retries``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from lingcore.config import parse_size
from lingcore.log import get_logger
from loaders.errors import InvalidParameterError
from loaders.formats._io import Location
from loaders.formats.corpus import INDEX_NAME
from loaders.formats.raytasks import (
    RANGE_MAX,
    RANGE_MIN,
    STAGING,
    OptionsFor,
    Piece,
    Plan,
    Planner,
    connect,
    import_ray,
    plan_ranges,
    tokenize_range,
    unwrap,
    write_shard,
)
from loaders.formats.tokenize import TokenizerSpec
from loaders.formats.writer import index_document, publish_index, read_packing, shard_intact, write_packing

log = get_logger(__name__)

MAX_RETRIES = 3  # per task, when its worker process dies (Ray's own retry)


def pack_ray(files: Sequence[Any], out_url: str, *, spec: TokenizerSpec, format: str, dtype: Any,
             shard_size: int | str, text_field: str, txt_mode: str, resume_key: str, options_for: OptionsFor,
             overwrite: bool, progress: bool, address: str | None = "auto", workers: int = 1,
             range_bytes: int | None = None) -> dict[str, Any]:
    """Pack ``files`` (``pack.InputFile``) into a corpus at ``out_url`` on a Ray cluster; return ``index.json``.

    Args:
        address: Ray cluster address (``auto``: a running one, else a local one of ``workers`` CPUs).
        range_bytes: Input bytes per tokenize task (default: ``$LOADERS_RAY_RANGE_BYTES``, else 1-64 MiB,
            about 4 tasks per cluster CPU). The output does not depend on it; a resumed job keeps its own.

    See :func:`loaders.formats.pack.pack` for the other arguments.
    """
    size = parse_size(shard_size, "shard_size")
    if size <= 0:
        raise InvalidParameterError("shard_size", f"must be > 0, got {shard_size!r}")
    out = Location.from_url(out_url, options_for(out_url) if options_for else None)
    index = out.child(INDEX_NAME)
    if index.exists() and not overwrite:
        raise FileExistsError(f"{index.url} exists; pass overwrite=True (--force) to replace the corpus")
    state = read_packing(out, resume_key, overwrite) or {}
    if index.exists():  # --force: the old index must never describe the new shards
        index.fs.rm_file(index.path)
    ray = import_ray()
    joined = connect(ray, address, workers)
    try:
        job = _Job(ray, files, out, spec=spec, format=format, dtype=np.dtype(dtype), shard_size=size,
                   text_field=text_field, txt_mode=txt_mode, resume_key=resume_key, options_for=options_for)
        return job.run(state, range_bytes, progress)
    finally:
        if joined:
            ray.shutdown()


class _Job:
    def __init__(self, ray: Any, files: Sequence[Any], out: Location, *, spec: TokenizerSpec, format: str,
                 dtype: np.dtype[Any], shard_size: int, text_field: str, txt_mode: str, resume_key: str,
                 options_for: OptionsFor) -> None:
        self.ray, self.files, self.out, self.spec = ray, list(files), out, spec
        self.format, self.dtype, self.shard_size = format, dtype, shard_size
        self.text_field, self.txt_mode, self.key, self.options_for = text_field, txt_mode, resume_key, options_for
        self.inputs = [(f.loc.url, f.kind, f.compression, f.size, f.version) for f in self.files]
        self.tokenize = ray.remote(num_cpus=1, num_returns=2, max_retries=MAX_RETRIES)(tokenize_range)
        self.write = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(write_shard)
        self.refs: dict[int, tuple[Any, Any]] = {}  # range -> (tokens, lengths) objects
        self.done: dict[str, dict[str, Any]] = {}  # finished shard entries by name
        self.planned: list[Plan] = []
        self.range_docs: list[int] = []

    # -- state -----------------------------------------------------------------------------------------
    def _resume(self, state: dict[str, Any], range_bytes: int) -> tuple[int, int, int]:
        """Load an interrupted run's state; return (range bytes, first range to cut, documents to skip in it)."""
        prior = state.get("ray") if isinstance(state.get("ray"), dict) else None
        prefix = list(state.get("shards", []))
        if prior is not None:
            range_bytes = int(prior["range_bytes"])
            self.range_docs = [int(n) for n in prior["range_docs"]]
            planned = [dict(p) for p in prior["planned"]]
            candidates = prefix + list(prior["finished"])
        else:  # a local engine's state: its finished shards are a prefix, no range is known yet
            planned, candidates = [dict(p) for p in prefix], prefix
        by_name = {p["name"]: p for p in planned}
        wanted = [c for c in candidates if c.get("name") in by_name
                  and (c["first_document"], c["documents"]) == (by_name[c["name"]]["first_document"],
                                                                  by_name[c["name"]]["documents"])]
        with ThreadPoolExecutor(8) as pool:  # hashing is I/O on a remote output: in parallel
            intact = list(pool.map(lambda c: shard_intact(self.out, c), wanted))
        self.done = {c["name"]: c for c, ok in zip(wanted, intact, strict=True) if ok}
        if prior is None:  # without range counts only the verified prefix is known to be cut right
            kept = 0
            while kept < len(planned) and planned[kept]["name"] in self.done:
                kept += 1
            planned = planned[:kept]
        starts = np.concatenate([[0], np.cumsum(self.range_docs, dtype=np.int64)])
        for p in planned:
            first, documents = int(p["first_document"]), int(p["documents"])
            spans = [] if p["name"] in self.done else _spans(starts, first, documents)
            self.planned.append(Plan(p["name"], first, documents, int(p["tokens"]), spans))
        cut = sum(p.documents for p in self.planned)
        r0 = int(np.searchsorted(starts[1:], cut, side="right")) if cut < starts[-1] else len(self.range_docs)
        del self.range_docs[r0:]
        if self.done:
            log.info("resuming an interrupted pack: %d finished shards verified and kept, %d planned shards to "
                     "write again", len(self.done), len(self.planned) - len(self.done), extra={"url": self.out.url})
        return range_bytes, r0, cut - int(starts[min(r0, len(starts) - 1)])

    def _save(self) -> None:
        prefix = []
        for plan in self.planned:
            if plan.name not in self.done:
                break
            prefix.append(self.done[plan.name])
        beyond = [e for name, e in self.done.items() if name not in {p["name"] for p in prefix}]
        write_packing(self.out, {"key": self.key, "format": self.format, "shards": prefix, "engine": "ray",
                                 "ray": {"range_bytes": self.range_bytes, "range_docs": self.range_docs,
                                         "planned": [p.record() for p in self.planned], "finished": beyond}})

    # -- tasks -----------------------------------------------------------------------------------------
    def _tokenized(self, r: int) -> tuple[Any, Any]:
        if r not in self.refs:
            self.refs[r] = self.tokenize.remote(self.spec_ref, self.inputs, self.ranges[r], self.text_field,
                                                self.txt_mode, self.dtype.name, self.options_for)
        return self.refs[r]

    def _submit(self, plan: Plan) -> Any:
        parts = [ref for r, _, _ in plan.spans for ref in self._tokenized(r)]
        spans = [(lo, hi) for _, lo, hi in plan.spans]
        return self.write.remote(self.out.url, self.options_for, self.format, self.dtype.name, plan.name,
                                 plan.first_document, spans, *parts)

    def _where(self, plan: Plan) -> str:
        """The input file and line a shard's documents start at (for a failure message)."""
        from loaders.formats.pack import _line_at

        piece: Piece = self.ranges[plan.spans[0][0]][0]
        f = self.files[piece.file]
        line = _line_at(f, piece.start) if piece.start else 1
        return f"{f.loc.url}:{line} (range {plan.spans[0][0]}, its document {plan.spans[0][1]})"

    # -- main loop -------------------------------------------------------------------------------------
    def run(self, state: dict[str, Any], range_bytes: int | None, progress: bool) -> dict[str, Any]:
        ray = self.ray
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        total = sum(f.size for f in self.files)
        default = min(RANGE_MAX, max(RANGE_MIN, total // (4 * cpus) + 1))
        knob = int(os.environ.get("LOADERS_RAY_RANGE_BYTES") or 0)
        self.range_bytes, r0, skip = self._resume(state, range_bytes or knob or default)
        self.ranges = plan_ranges(self.files, self.range_bytes)
        range_size = [sum((self.files[p.file].size if p.end is None else p.end) - p.start for p in rng)
                      for rng in self.ranges]
        self.spec_ref = ray.put(self.spec)
        if self.out.local:
            os.makedirs(self.out.path, exist_ok=True)
        self._save()
        planner = Planner(self.shard_size, self.dtype.itemsize, len(self.planned),
                          sum(p.documents for p in self.planned))
        writing = {self._submit(p): p for p in self.planned if p.name not in self.done}
        reading: dict[Any, int] = {}
        ready: dict[int, np.ndarray] = {}
        cut_r, next_r, window, planning = r0, r0, 2 * cpus + 2, True
        columns = (TextColumn("[bold]pack (ray)"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TextColumn("{task.fields[shards]}"), TimeRemainingColumn())
        reused = len(self.done)
        with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
            task = bar.add_task("pack", total=total, completed=sum(range_size[:r0]), shards="")
            while planning or writing:
                while planning and next_r < len(self.ranges) and next_r - cut_r < window:
                    reading[self._tokenized(next_r)[1]] = next_r
                    next_r += 1
                plans: list[Plan] = []
                while cut_r in ready:  # cut shards in range order, whatever order tokenization finished in
                    lengths = ready.pop(cut_r)
                    drop = min(skip, int(lengths.size))  # documents already in planned shards
                    skip -= drop
                    plans += planner.feed(cut_r, lengths, drop)
                    self.range_docs.append(int(lengths.size))
                    cut_r += 1
                if planning and cut_r == len(self.ranges):
                    plans += planner.finish()
                    planning = False
                if plans:
                    self.planned += plans
                    self._save()  # the cut (range counts, planned shards) is recorded with what it produced
                    writing.update({self._submit(p): p for p in plans})
                keep = {r for r, _, _ in planner.spans}  # the open shard's ranges
                for r in [r for r in self.refs if r < cut_r and r not in keep]:
                    del self.refs[r]  # submitted tasks keep what they need alive
                if not writing and not reading:
                    continue
                done, _ = ray.wait([*reading, *writing], num_returns=1)
                done, _ = ray.wait([*reading, *writing], num_returns=len(reading) + len(writing), timeout=0)
                finished = False
                for ref in done:
                    if ref in reading:
                        r = reading.pop(ref)
                        ready[r] = unwrap(ray, ref)
                        bar.advance(task, range_size[r])
                        continue
                    plan = writing.pop(ref)
                    try:
                        self.done[plan.name] = unwrap(ray, ref)
                    except Exception:
                        log.error("shard %s failed; its documents start at %s", plan.name, self._where(plan),
                                  extra={"url": self.out.url})
                        raise
                    finished = True
                if finished:
                    self._save()
                bar.update(task, shards=f"{len(self.done)}/{len(self.planned)}{'+' if planning else ''} shards")
        if not self.planned:  # as CorpusWriter: an empty corpus would be an empty shard
            raise InvalidParameterError("documents", f"no documents to write to {self.out.url}")
        shards = [self.done[p.name] for p in self.planned]
        index = index_document(format=self.format, dtype=self.dtype, tokenizer=self.spec.describe(),
                               eos_id=self.spec.eos_id, shard_size=self.shard_size, shards=shards)
        publish_index(self.out, index)
        if self.out.local:
            shutil.rmtree(os.path.join(self.out.path, STAGING), ignore_errors=True)
        log.info("packed with Ray: %d shards written, %d reused from an interrupted run", len(shards) - reused, reused,
                 extra={"url": self.out.url})
        return index


def _spans(starts: np.ndarray, first: int, documents: int) -> list[tuple[int, int, int]]:
    """Where documents ``[first, first + documents)`` are: (range, first, end) within each range."""
    spans = []
    r = int(np.searchsorted(starts[1:], first, side="right"))
    end = first + documents
    while first < end:
        hi = min(end, int(starts[r + 1]))
        spans.append((r, first - int(starts[r]), hi - int(starts[r])))
        first, r = hi, r + 1
    return spans



__all__ = ["pack_ray"]
