"""``loaders pack``: tokenize text inputs into a corpus, in parallel, with a progress bar.

Inputs (local paths or fsspec URLs; directories are searched recursively, globs are expanded,
``.gz``/``.bz2``/``.xz``/``.zst`` are decompressed on the fly):

* ``*.jsonl``, ``*.ndjson``, ``*.json``: one JSON object per line, the document is its ``text_field``
  (``"text"`` by default); blank lines are skipped.
* ``*.txt``, ``*.text``, ``*.md``: by default one document per file (books, articles); with
  ``txt_mode="paragraph"`` one document per blank-line-separated paragraph.

Documents are cut into chunks of about 1 MiB. A ``tokenizer.json`` encodes each chunk in this process
with the ``tokenizers`` library's batch encoder, which runs on all cores (its own thread pool;
``RAYON_NUM_THREADS`` caps it) with the GIL released, while this thread reads and parses the next chunk
and writes the previous one: no worker start-up and no texts or ids pickled between processes. The byte
tokenizer is numpy code, so ``workers`` processes (``spawn``: no inherited threads or locks) run it.
Results are consumed in submission order, so the output is byte-identical for any worker count, and at
most ``2 * workers`` (tokenizer.json: 3) chunks are in flight, so memory stays bounded on any input size.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import multiprocessing
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import fsspec.utils
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

from lingcore.checksum import content_hash
from lingcore.versions import object_version
from loaders.errors import FormatError, InvalidParameterError
from loaders.formats._io import Location
from loaders.formats.tokenize import Encoder, TokenizerSpec, encode_chunk, init_worker, load_tokenizer
from loaders.formats.writer import DEFAULT_SHARD_SIZE, CorpusWriter, token_dtype

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TEXT_SUFFIXES = (".txt", ".text", ".md")
TXT_MODES = ("file", "paragraph")
ENGINES = ("local", "ray")
CHUNK_CHARS = 1 << 20
CHUNK_DOCS = 1024
OptionsFor = Callable[[str], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class InputFile:
    """One input file: where it is, how to parse it, how it is compressed, its stored size."""

    loc: Location
    kind: str
    compression: str | None
    size: int
    version: str = ""  # ETag, else size:mtime: a re-run resumes only over unchanged inputs


def _kind(path: str) -> tuple[str | None, str | None]:
    compression = fsspec.utils.infer_compression(path)
    stem = path.rsplit(".", 1)[0] if compression else path
    if stem.endswith(JSONL_SUFFIXES):
        return "jsonl", compression
    if stem.endswith(TEXT_SUFFIXES):
        return "txt", compression
    return None, compression


def expand_inputs(inputs: Sequence[str], options_for: OptionsFor | None = None) -> list[InputFile]:
    """Resolve input URLs, directories and globs to files, in a deterministic order.

    Raises:
        FileNotFoundError: an input does not exist or matches nothing, naming it.
        InvalidParameterError: an explicitly named file has an unknown extension.
    """
    files: list[InputFile] = []
    for url in inputs:
        loc = Location.from_url(url, options_for(url) if options_for else None)
        if any(c in url for c in "*?["):
            paths, explicit = sorted(loc.fs.glob(loc.path)), False
        elif loc.isdir():
            paths, explicit = sorted(loc.fs.find(loc.path)), False
        elif loc.exists():
            paths, explicit = [loc.path], True
        else:
            raise FileNotFoundError(f"input {url} does not exist")
        found = 0
        for path in paths:
            kind, compression = _kind(path)
            sub = Location(loc.fs, path, path if loc.local else loc.fs.unstrip_protocol(path), loc.local)
            if kind is None:
                if explicit:
                    raise InvalidParameterError("INPUT", f"{url}: expected {JSONL_SUFFIXES + TEXT_SUFFIXES} "
                                                         "(optionally compressed)")
                continue
            info = sub.info()
            files.append(InputFile(sub, kind, compression, int(info["size"]), object_version(info)))
            found += 1
        if not found:
            raise FileNotFoundError(f"input {url} holds no .jsonl or .txt files")
    return files


def iter_texts(f: InputFile, text_field: str = "text", txt_mode: str = "file", start: int = 0,
               end: int | None = None) -> Iterator[tuple[str, int]]:
    """Yield ``(document text, input bytes consumed)`` from one input file.

    ``start``/``end`` select the JSONL lines that *start* in bytes ``[start, end)`` of an uncompressed
    file, so byte ranges that tile a file yield each line exactly once (the Ray engine's input splits).

    Raises:
        FormatError: naming ``file:line`` for a bad JSON line or a missing/non-string text field, or the
            file for text that is not UTF-8.
    """
    if (start or end is not None) and (f.kind != "jsonl" or f.compression):
        raise InvalidParameterError("start", f"{f.loc.url}: only uncompressed JSONL files split into ranges")
    with f.loc.fs.open(f.loc.path, "rb", compression=f.compression) as fh:
        if f.kind == "jsonl":
            pos, lineno = start, 1 if start == 0 else 0  # 0: counted only when a message needs it
            if start:
                fh.seek(start - 1)
                pos += len(fh.readline()) - 1  # the rest of the line that started before the range
            for line in fh:
                if end is not None and pos >= end:
                    return
                here, pos = pos, pos + len(line)
                if not line.strip():
                    lineno += lineno > 0
                    continue
                number = lineno
                lineno += lineno > 0
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise FormatError(f"{f.loc.url}:{number or _line_at(f, here)}",
                                      f"not a JSON object: {exc}") from None
                text = obj.get(text_field) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    raise FormatError(f"{f.loc.url}:{number or _line_at(f, here)}",
                                      f"no string field {text_field!r} (use --text-field)")
                yield text, len(line)
            return
        raw = fh.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f.loc.url, f"not UTF-8 text: {exc}") from None
    if txt_mode == "file":
        yield text, len(raw)
        return
    paragraphs = [p.strip() for p in re.split(r"\n[ \t\r\f\v]*\n", text)]
    kept = [p for p in paragraphs if p]
    for i, paragraph in enumerate(kept):
        yield paragraph, (len(raw) if i == len(kept) - 1 else 0)


def _line_at(f: InputFile, offset: int) -> int:
    """The 1-based number of the line starting at byte ``offset`` (counted only for an error message)."""
    with f.loc.fs.open(f.loc.path, "rb") as fh:
        count, done = 1, 0
        while done < offset:
            block = fh.read(min(8 << 20, offset - done))
            if not block:
                break
            count, done = count + block.count(b"\n"), done + len(block)
    return count


def _chunks(files: list[InputFile], text_field: str, txt_mode: str) -> Iterator[tuple[list[str], int]]:
    texts: list[str] = []
    chars = consumed = 0
    for f in files:
        for text, used in iter_texts(f, text_field, txt_mode):
            texts.append(text)
            chars += len(text)
            consumed += used
            if chars >= CHUNK_CHARS or len(texts) >= CHUNK_DOCS:
                yield texts, consumed
                texts, chars, consumed = [], 0, 0
    if texts or consumed:
        yield texts, consumed


def _encoded_in_thread(chunks: Iterator[tuple[list[str], int]],
                       spec: TokenizerSpec) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """A ``tokenizer.json``: chunks encode on the library's threads while the caller reads the next one.

    Two chunks encode at once: the thread pool splits each chunk's documents, and the longest document of
    one chunk would otherwise leave the other threads idle until it is done.
    """
    encoder = Encoder(spec)
    with ThreadPoolExecutor(2, thread_name_prefix="pack-encode") as pool:
        pending: collections.deque[tuple[Future[tuple[np.ndarray, np.ndarray]], int]] = collections.deque()
        for texts, consumed in chunks:
            pending.append((pool.submit(encoder.encode, texts), consumed))
            if len(pending) >= 3:
                future, used = pending.popleft()
                yield (*future.result(), used)
        while pending:
            future, used = pending.popleft()
            yield (*future.result(), used)


def _encoded(chunks: Iterator[tuple[list[str], int]], spec: TokenizerSpec,
             workers: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    if spec.kind == "hf":
        yield from _encoded_in_thread(chunks, spec)
        return
    if workers <= 1:
        encoder = Encoder(spec)
        for texts, consumed in chunks:
            yield (*encoder.encode(texts), consumed)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker, initargs=(spec,)) as pool:
        pending: collections.deque[tuple[Future[tuple[np.ndarray, np.ndarray]], int]] = collections.deque()
        for texts, consumed in chunks:
            pending.append((pool.submit(encode_chunk, texts), consumed))
            if len(pending) >= 2 * workers:
                future, used = pending.popleft()
                yield (*future.result(), used)
        while pending:
            future, used = pending.popleft()
            yield (*future.result(), used)


def pack(inputs: Sequence[str], out: str, *, format: str, tokenizer: str = "bytes", text_field: str = "text",
         txt_mode: str = "file", shard_size: int | str = DEFAULT_SHARD_SIZE, workers: int = 1,
         eos_id: int | None = None, options_for: OptionsFor | None = None, progress: bool = True,
         overwrite: bool = False, engine: str = "local", ray_address: str | None = "auto") -> dict[str, Any]:
    """Tokenize ``inputs`` into a corpus at ``out``; return its ``index.json``.

    Args:
        inputs: Files, directories or globs (local or fsspec URLs).
        out: Output directory URL.
        format: ``"megatron"``, ``"wds"`` or ``"lmdb"``.
        tokenizer: ``"bytes"`` or the path/URL of a ``tokenizer.json``.
        text_field: JSONL field holding the text.
        txt_mode: ``"file"`` or ``"paragraph"`` (see the module docstring).
        shard_size: Token bytes per shard.
        workers: Byte-tokenizer processes (1: tokenize in this process). A ``tokenizer.json`` always
            encodes in this process, on the ``tokenizers`` library's threads (all cores).
        eos_id: EOS id for a ``tokenizer.json`` without a recognisable EOS token.
        options_for: Returns fsspec storage options for a URL (e.g. an S3 endpoint).
        progress: Show a progress bar on stderr.
        overwrite: Replace an existing corpus at ``out``.
        engine: ``"local"`` (a process pool of ``workers``) or ``"ray"`` (Ray tasks; byte-identical output).
        ray_address: With ``engine="ray"``: the cluster (``auto``: a running one, else a local one of
            ``workers`` CPUs).
    """
    if txt_mode not in TXT_MODES:
        raise InvalidParameterError("txt_mode", f"expected one of {TXT_MODES}, got {txt_mode!r}")
    if workers < 1:
        raise InvalidParameterError("workers", f"must be >= 1, got {workers}")
    if engine not in ENGINES:
        raise InvalidParameterError("engine", f"expected one of {ENGINES}, got {engine!r}")
    spec = load_tokenizer(tokenizer, eos_id=eos_id, storage_options=options_for(tokenizer) if options_for else None)
    files = expand_inputs(inputs, options_for)
    total = sum(f.size for f in files)
    columns = (TextColumn("[bold]pack"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TextColumn("{task.fields[docs]:,} docs, {task.fields[tokens]:,} tokens"), TimeRemainingColumn())
    # A re-run of the same inputs (same versions) and options may keep the shards an interrupted run finished.
    resume_key = content_hash(json.dumps({
        "inputs": [(f.loc.url, f.size, f.version) for f in files], "format": format,
        "tokenizer": spec.describe(), "text_field": text_field, "txt_mode": txt_mode,
        "shard_size": shard_size}, sort_keys=True).encode())
    if engine == "ray":
        from loaders.formats.raypack import pack_ray

        return pack_ray(files, out, spec=spec, format=format, dtype=token_dtype(spec.vocab_size, format),
                        shard_size=shard_size, text_field=text_field, txt_mode=txt_mode, resume_key=resume_key,
                        options_for=options_for, overwrite=overwrite, progress=progress, address=ray_address,
                        workers=workers)
    writer = CorpusWriter(out, format=format, dtype=token_dtype(spec.vocab_size, format), shard_size=shard_size,
                          tokenizer=spec.describe(), eos_id=spec.eos_id,
                          storage_options=options_for(out) if options_for else None, overwrite=overwrite,
                          resume_key=resume_key)
    with writer, Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task("pack", total=total, docs=0, tokens=0)
        done = 0
        for flat, lengths, consumed in _encoded(_chunks(files, text_field, txt_mode), spec, workers):
            writer.add_batch(flat, lengths)
            done += consumed
            bar.update(task, completed=min(done, total), docs=writer.documents, tokens=writer.tokens)
        index = writer.close()
        bar.update(task, completed=total)
    return index
