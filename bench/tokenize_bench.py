"""Tokenize-and-pack throughput with a BPE ``tokenizer.json``: ``loaders pack`` against Megatron-LM's
``tools/preprocess_data.py`` approach, same input, same tokenizer, same machine, same run.

The input is real English text (:mod:`ling_train.realtext`: installed packages' READMEs and licenses,
the standard library's docstrings; up to 4 MiB of unique text, repeated to ``BENCH_TOKENIZE_MB``) as
JSONL, and a byte-level BPE tokenizer (``BENCH_TOKENIZE_VOCAB`` ids, default 8192) trained on it.

* **ours**: ``loaders.formats.pack.pack(..., format="megatron", tokenizer=tokenizer.json, workers=CPUs)``.
* **baseline**: ``preprocess_data.py`` re-created: ``multiprocessing.Pool(CPUs, initializer=...)`` and
  ``pool.imap(encoder.encode, fin, 32)`` over the JSONL lines, each worker ``json.loads`` one line and
  encodes its text (one ``Tokenizer.encode`` per document, EOD appended), the main process
  ``IndexedDatasetBuilder.add_document`` per document and ``finalize``, with the builder of the
  ``megatron-core`` package (``DType.optimal_dtype`` of the vocabulary). Megatron wraps the same file in
  its ``HuggingFaceTokenizer`` (``transformers``); calling ``tokenizers`` directly spares the baseline that
  layer, so the ratio is conservative. If ``megatron-core`` cannot be imported, a re-creation of its
  builder (the same ``.bin`` bytes and ``MMIDIDX`` ``.idx``) is used and the row says so.

Each side runs in a fresh Python process (as each tool does), timed inside it from opening the input to
the finished index, imports excluded (Megatron's own "Time to startup" excludes them too). The two sides
alternate, ``BENCH_REPEAT`` times. After the timings, the ``.bin`` token stream of each side is compared
byte for byte (ours: the shards concatenated), so no timing is of a wrong answer.

    python -m bench.tokenize_bench --smoke --results-dir /tmp/tok-results   # ~1 MB, one repeat
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import MB, MiB, env_int, error_row, log, make_row, median, repeats, selected

NAME = "tokenize"
TARGET = 1.5
MAX_UNIQUE = 4 * MiB


# -- the input -----------------------------------------------------------------------------------------

def make_input(workdir: Path, size_mb: int, vocab: int) -> dict[str, Any]:
    """Write ``input.jsonl`` (about ``size_mb`` MB of real text) and ``tokenizer.json``; describe them."""
    from ling_train.realtext import offline_texts

    texts = offline_texts(min(size_mb * MB, MAX_UNIQUE))
    jsonl, tok = workdir / "input.jsonl", workdir / "tokenizer.json"
    nbytes = docs = 0
    with open(jsonl, "w", encoding="utf-8") as fh:
        while nbytes < size_mb * MB:
            for text in texts:
                line = json.dumps({"text": text}) + "\n"
                fh.write(line)
                nbytes += len(line.encode())
                docs += 1
                if nbytes >= size_mb * MB:
                    break
    # A separate process trains the tokenizer: its thread pool must not exist in this one, whose
    # children (the baseline's pool) fork.
    subprocess.run([sys.executable, "-c", "import json, sys; from ling_train.realtext import train_bpe; "
                    "texts = [json.loads(l)['text'] for l in open(sys.argv[1])]; "
                    "train_bpe(texts, sys.argv[2], int(sys.argv[3]))", str(jsonl), str(tok), str(vocab)],
                   check=True, timeout=600)
    unique = sum(len(t.encode()) for t in texts)
    return {"jsonl": str(jsonl), "tokenizer": str(tok), "bytes": nbytes, "documents": docs,
            "unique_text_bytes": unique, "vocab": vocab}


# -- the baseline: Megatron-LM tools/preprocess_data.py, re-created ----------------------------------------

class MegatronEncoder:
    """``preprocess_data.py``'s ``Encoder``: a class attribute holds each worker's tokenizer."""

    tokenizer: Any = None
    eod: int = 0

    def __init__(self, tokenizer_path: str, json_keys: tuple[str, ...] = ("text",)) -> None:
        self.tokenizer_path, self.json_keys = tokenizer_path, json_keys

    def initializer(self) -> None:
        """Pool initializer: build this worker's tokenizer (``build_tokenizer`` in Megatron)."""
        from tokenizers import Tokenizer

        MegatronEncoder.tokenizer = Tokenizer.from_file(self.tokenizer_path)
        MegatronEncoder.eod = int(MegatronEncoder.tokenizer.token_to_id("<|endoftext|>"))

    def encode(self, json_line: str) -> tuple[dict[str, list[int]], dict[str, list[int]], int]:
        """One JSONL line -> (ids per key, sentence lengths per key, bytes), EOD appended."""
        data = json.loads(json_line)
        ids, lens = {}, {}
        for key in self.json_keys:
            text = data[key]
            sentences = text if isinstance(text, list) else [text]
            doc_ids: list[int] = []
            sentence_lens: list[int] = []
            for sentence in sentences:
                sentence_ids = MegatronEncoder.tokenizer.encode(sentence, add_special_tokens=False).ids
                if len(sentence_ids) > 0:
                    doc_ids.extend(sentence_ids)
                    sentence_lens.append(len(sentence_ids))
            if len(doc_ids) > 0:  # --append-eod
                doc_ids.append(MegatronEncoder.eod)
                sentence_lens[-1] += 1
            ids[key] = doc_ids
            lens[key] = sentence_lens
        return ids, lens, len(json_line)


class RecreatedBuilder:
    """megatron-core's ``IndexedDatasetBuilder`` byte format, for when the package cannot be imported:
    ``.bin`` the tokens in the builder's dtype, ``.idx`` the ``MMIDIDX`` header, version 1, dtype code,
    sequence and document counts, int32 lengths, int64 byte pointers, int64 document indices."""

    _CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7,
              np.uint16: 8}

    def __init__(self, bin_path: str, dtype: Any = np.int32) -> None:
        self.data_file = open(bin_path, "wb")  # noqa: SIM115 - closed in finalize, as the original
        self.dtype = dtype
        self.sequence_lengths: list[int] = []
        self.document_indices = [0]

    def add_document(self, tensor: Any, lengths: list[int]) -> None:
        np_array = np.array(tensor, dtype=self.dtype)
        self.data_file.write(np_array.tobytes(order="C"))
        self.sequence_lengths.extend(lengths)
        self.document_indices.append(len(self.sequence_lengths))

    def finalize(self, idx_path: str) -> None:
        self.data_file.close()
        lengths = np.array(self.sequence_lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(self.dtype).itemsize, out=pointers[1:])
        with open(idx_path, "wb") as fh:
            fh.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", self._CODES[self.dtype]))
            fh.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(self.document_indices)))
            fh.write(lengths.tobytes() + pointers.tobytes()
                     + np.array(self.document_indices, dtype=np.int64).tobytes())


def _megatron_builder() -> tuple[Any, Any, str]:
    """(builder class, optimal_dtype function, which) : megatron-core's, else the re-creation."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed": not used here
            from megatron.core.datasets import indexed_dataset
        return indexed_dataset.IndexedDatasetBuilder, indexed_dataset.DType.optimal_dtype, "megatron-core"
    except ImportError:
        return RecreatedBuilder, lambda n: np.uint16 if n is not None and n < 65500 else np.int32, "re-created"


def megatron_side(jsonl: str, tokenizer: str, out: str, workers: int) -> dict[str, Any]:
    """``Partition.process_json_file`` of ``preprocess_data.py`` for one key; return timings."""
    builder_cls, optimal_dtype, which = _megatron_builder()
    from tokenizers import Tokenizer

    t0, c0 = time.perf_counter(), _cpu_seconds()
    fin = open(jsonl, encoding="utf-8")  # noqa: SIM115 - as the original
    encoder = MegatronEncoder(tokenizer)
    vocab = Tokenizer.from_file(tokenizer).get_vocab_size()  # the tool builds the tokenizer here too
    pool = multiprocessing.get_context("fork").Pool(workers, initializer=encoder.initializer)
    encoded_docs = pool.imap(encoder.encode, fin, 32)
    builder = builder_cls(out + ".bin", dtype=optimal_dtype(vocab))
    total = 0
    for doc, sentence_lens, processed in encoded_docs:
        total += processed
        for key in doc:
            builder.add_document(doc[key], sentence_lens[key])
    fin.close()
    builder.finalize(out + ".idx")
    pool.close()
    pool.join()
    return {"seconds": time.perf_counter() - t0, "cpu_s": _cpu_seconds() - c0, "builder": which, "input_chars": total}


def ours_side(jsonl: str, tokenizer: str, out: str, workers: int) -> dict[str, Any]:
    """``loaders pack`` through its Python API, progress bar off; return timings."""
    from loaders.formats.pack import pack

    t0, c0 = time.perf_counter(), _cpu_seconds()
    index = pack([jsonl], out, format="megatron", tokenizer=tokenizer, workers=workers, progress=False,
                 overwrite=True, shard_size="1GiB")
    return {"seconds": time.perf_counter() - t0, "cpu_s": _cpu_seconds() - c0, "tokens": index["tokens"], "documents": index["documents"],
            "dtype": index["dtype"]}


def _cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (the baseline's pool workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


# -- the measurement ---------------------------------------------------------------------------------------

def _run_side(side: str, data: dict[str, Any], out: Path, workers: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.tokenize_bench", "--side", side, "--input", data["jsonl"],
           "--tokenizer", data["tokenizer"], "--out", str(out), "--workers", str(workers)]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    env.pop("TOKENIZERS_PARALLELISM", None)  # each side as a user runs it
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} side failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _token_stream(side: str, out: Path) -> bytes:
    if side == "megatron":
        return Path(str(out) + ".bin").read_bytes()
    return b"".join(p.read_bytes() for p in sorted(out.glob("*.bin")))


def bench_pack(data: dict[str, Any], workdir: Path, repeat: int, workers: int) -> list[dict[str, Any]]:
    """Alternate the two sides ``repeat`` times; check their token streams are identical."""
    ours_s: list[float] = []
    base_s: list[float] = []
    cpu: dict[str, list[float]] = {"ours": [], "megatron": []}
    info: dict[str, Any] = {}
    for i in range(repeat):
        order = ("ours", "megatron") if i % 2 == 0 else ("megatron", "ours")
        for side in order:
            out = workdir / f"{side}-{i}" if side == "ours" else workdir / f"megatron-{i}" / "data_text_document"
            out.parent.mkdir(parents=True, exist_ok=True)
            result = _run_side(side, data, out, workers)
            (ours_s if side == "ours" else base_s).append(result["seconds"])
            info[side] = result
            cpu[side].append(result["cpu_s"])
            log(f"tokenize: repeat {i + 1}/{repeat} {side}: {result['seconds']:.2f}s, {result['cpu_s']:.2f} CPU-s "
                f"({data['bytes'] / result['seconds'] / MB:.2f} MB/s)")
    last = repeat - 1
    ours_bytes = _token_stream("ours", workdir / f"ours-{last}")
    base_bytes = _token_stream("megatron", workdir / f"megatron-{last}" / "data_text_document")
    if ours_bytes != base_bytes:
        raise AssertionError(f"token streams differ: ours {len(ours_bytes)} bytes, megatron {len(base_bytes)} bytes")
    tokens = int(info["ours"]["tokens"])
    builder = info["megatron"]["builder"]
    notes = (f"{data['bytes'] / MB:.1f} MB JSONL of real English ({data['unique_text_bytes'] / MB:.1f} MB unique, "
             f"repeated), {data['documents']:,} documents, {tokens:,} tokens, BPE vocab {data['vocab']}; "
             f"{workers} workers/threads on {os.cpu_count()} CPUs; token streams identical (.bin bytes); "
             f"ours {tokens / median(ours_s):,.0f} tokens/s, baseline {tokens / median(base_s):,.0f} tokens/s; "
             f"CPU-s (all processes) ours {median(cpu['ours']):.2f}, baseline {median(cpu['megatron']):.2f}; "
             f"baseline builder: {builder}"
             + ("" if builder == "megatron-core" else " (megatron-core not importable: its byte format re-created)"))
    cpu_row = make_row(
        module=NAME, key="pack_bpe_cpu_vs_megatron_preprocess",
        measure="the same, MB per CPU-second of all its processes (what a loaded machine cannot skew)",
        unit="MB/CPU-s", values=[data["bytes"] / s / MB for s in cpu["ours"]],
        baseline="the same Megatron-LM approach, MB per CPU-second", target=None,
        baseline_values=[data["bytes"] / s / MB for s in cpu["megatron"]], nbytes=data["bytes"],
        seconds=cpu["ours"], baseline_seconds=cpu["megatron"],
        notes="user + system CPU of the side's process and its pool workers, from opening the input to the index")
    return [make_row(
        module=NAME, key="pack_bpe_vs_megatron_preprocess",
        measure="tokenize + pack JSONL with a BPE tokenizer.json (loaders pack, batch encoding, all cores)",
        unit="MB/s", values=[data["bytes"] / s / MB for s in ours_s],
        baseline=f"Megatron-LM preprocess_data.py approach (Pool.imap + encode per document + {builder} "
                 "IndexedDatasetBuilder)",
        baseline_values=[data["bytes"] / s / MB for s in base_s], target=TARGET, nbytes=data["bytes"],
        seconds=ours_s, baseline_seconds=base_s, notes=notes,
        extra={"tokens": tokens, "workers": workers, "cpu_s": cpu, "builder": builder, "input": {
            k: v for k, v in data.items() if k not in ("jsonl", "tokenizer")}}), cpu_row]


def run(server: Any, workdir: Path, *, smoke: bool = False) -> list[dict[str, Any]]:
    """Run the measure; ``server`` is unused (input and output are local files)."""
    del server
    if not selected("tokenize"):
        return []
    size_mb = 1 if smoke else env_int("BENCH_TOKENIZE_MB", 16)
    repeat = 1 if smoke else repeats()
    workers = os.cpu_count() or 1
    try:
        t0 = time.monotonic()
        data = make_input(workdir, size_mb, env_int("BENCH_TOKENIZE_VOCAB", 8192, minimum=300))
        log(f"tokenize: {data['bytes'] / MB:.1f} MB input, {data['documents']:,} documents, tokenizer trained "
            f"({time.monotonic() - t0:.1f}s)")
        return bench_pack(data, workdir, repeat, workers)
    except Exception:
        tb = traceback.format_exc()
        log(f"tokenize FAILED:\n{tb}")
        return [error_row(NAME, "pack", "tokenize + pack throughput", tb)]


def main(argv: list[str] | None = None) -> int:
    """``--side ours|megatron``: one timed run (the benchmark's child); else the whole module."""
    parser = argparse.ArgumentParser(prog="python -m bench.tokenize_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=("ours", "megatron"), help="(internal) run one side once")
    parser.add_argument("--input")
    parser.add_argument("--tokenizer")
    parser.add_argument("--out")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--smoke", action="store_true", help="about 1 MB of input, one repeat")
    parser.add_argument("--results-dir", type=Path, help="write tokenize.json here (default: only print)")
    args = parser.parse_args(argv)
    if args.side:
        fn = ours_side if args.side == "ours" else megatron_side
        print(json.dumps(fn(args.input, args.tokenizer, args.out, args.workers)))
        return 0
    with tempfile.TemporaryDirectory(prefix="tokenize-bench-") as tmp:
        rows = run(None, Path(tmp), smoke=args.smoke)
    if args.results_dir:
        from bench.report import markdown_table, write_json

        args.results_dir.mkdir(parents=True, exist_ok=True)
        write_json(args.results_dir / f"{NAME}.json", {"module": NAME, "smoke": args.smoke, "rows": rows})
        (args.results_dir / f"{NAME}.md").write_text(markdown_table(NAME, rows))
    for row in rows:
        print(json.dumps({k: row.get(k) for k in ("measure", "value", "baseline_value", "ratio", "target", "met",
                                                   "notes", "error")}, indent=1))
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
