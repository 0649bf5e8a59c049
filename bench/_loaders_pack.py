"""The ``pack`` group of the loaders benchmarks: ``loaders pack --engine ray`` against the local engine.

Input: ``BENCH_PACK_MB`` MiB (default 48; 4 in smoke mode) of synthetic JSONL (seeded; documents of 20-800
words drawn from a 5000-word vocabulary) in 8 files, tokenized with a byte-level BPE ``tokenizer.json``
(vocabulary 8000) trained on a sample of it, written as Megatron shards of 8 MiB. Every system packs the
same input to a fresh directory: ``--engine local --workers 1`` (tokenizes in-process), ``--engine local
--workers 2`` (a spawned process pool, started inside the timing, as every ``loaders pack`` run pays it),
and ``--engine ray`` on a local Ray cluster of 2 CPUs started before the timings (as a job finds a running
cluster; one untimed job first, so its workers have imported the code). ``TOKENIZERS_PARALLELISM=false``
everywhere, so a worker is one core. Throughput = input bytes / wall seconds of ``pack()``; each repeat
times the three in rotated order; every output's shards are compared byte for byte with the first one's.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from bench._common import MiB, env_int, log, make_row, mbps, median, settle
from loaders.formats.pack import pack

SYSTEMS = ("local-w1", "local-w2", "ray-2")


def make_input(root: Path, mib: int) -> tuple[list[str], str]:
    """Write the JSONL files and a trained BPE ``tokenizer.json``; return (inputs, tokenizer path)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    rng = random.Random(20240601)
    words = ["".join(rng.choice("etaoinshrdlucmfwypvbgkjqxz") for _ in range(rng.randint(1, 11)))
             for _ in range(5000)]
    root.mkdir(parents=True)
    files, target = [], mib * MiB // 8
    for i in range(8):
        path = root / f"part-{i}.jsonl"
        with open(path, "w") as fh:
            written = 0
            while written < target:
                line = json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(20, 800)))}) + "\n"
                fh.write(line)
                written += len(line)
        files.append(str(path))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    sample = [" ".join(rng.choices(words, k=200)) for _ in range(3000)]
    tok.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=8000, special_tokens=["<unk>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(root / "tokenizer.json"))
    return files, str(root / "tokenizer.json")


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def bench_pack(workdir: Path, repeat: int, smoke: bool) -> list[dict[str, Any]]:
    """Pack throughput of the Ray engine (2 CPUs) against the local engine with 1 and 2 workers."""
    import ray

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # set before Ray starts: its workers inherit it
    inputs, tokenizer = make_input(workdir / "pack-input", env_int("BENCH_PACK_MB", 4 if smoke else 48))
    nbytes = sum(os.path.getsize(p) for p in inputs)
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="warning",
             log_to_driver=False)
    cluster_s = time.perf_counter() - t0
    common = {"format": "megatron", "tokenizer": tokenizer, "shard_size": "8MiB", "progress": False}
    runs = {"local-w1": {"workers": 1}, "local-w2": {"workers": 2}, "ray-2": {"engine": "ray"}}
    seconds: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    reference: dict[str, bytes] | None = None
    try:
        pack(inputs[:1], str(workdir / "pack-warm"), engine="ray", **common)  # untimed: worker imports
        for r in range(repeat):
            for system in SYSTEMS[r % 3:] + SYSTEMS[:r % 3]:
                out = workdir / f"pack-{system}-{r}"
                settle()
                t1 = time.perf_counter()
                index = pack(inputs, str(out), **common, **runs[system])
                seconds[system].append(time.perf_counter() - t1)
                shards = _shards(out)
                if reference is None:
                    reference = shards
                elif shards != reference:
                    raise AssertionError(f"{system}: output differs from the first run's")
                log(f"loaders/pack/{r}: {system:8s} {mbps(nbytes, seconds[system][-1]):6.1f} MB/s "
                    f"({index['tokens'] / 1e6:.1f}M tokens, {len(index['shards'])} shards)")
                shutil.rmtree(out)
    finally:
        ray.shutdown()
    note = (f"{nbytes / 1e6:.0f} MB of JSONL in 8 files, byte-level BPE (vocab 8000), Megatron shards of 8 MiB; "
            "TOKENIZERS_PARALLELISM=false; wall time of pack(); local --workers 2 includes starting its spawned "
            "pool (as every run does), Ray's 2-CPU local cluster was started before the timings "
            f"({cluster_s:.1f}s, untimed) and ran one untimed job; outputs of every run byte-identical")
    rows = []
    ray_mbps = [mbps(nbytes, s) for s in seconds["ray-2"]]
    for base, target, label in (("local-w1", 1.6, "--engine local --workers 1"),
                                ("local-w2", 0.9, "--engine local --workers 2")):
        rows.append(make_row(
            module="loaders", key=f"pack_ray2_vs_{base.replace('-', '_')}",
            measure="pack throughput, --engine ray with 2 workers (input MB/s)", unit="MB/s", nbytes=nbytes,
            values=ray_mbps, seconds=seconds["ray-2"], baseline=f"{label}, same input and options",
            baseline_values=[mbps(nbytes, s) for s in seconds[base]], baseline_seconds=seconds[base],
            target=target, notes=note, extra={"ray_cluster_start_s": cluster_s}))
    rows.append(make_row(
        module="loaders", key="pack_local_w2_vs_w1",
        measure="pack throughput, --engine local --workers 2 (how far this machine scales to 2 workers)",
        unit="MB/s", nbytes=nbytes, values=[mbps(nbytes, s) for s in seconds["local-w2"]],
        seconds=seconds["local-w2"], baseline="--engine local --workers 1, same input and options",
        baseline_values=[mbps(nbytes, s) for s in seconds["local-w1"]], baseline_seconds=seconds["local-w1"],
        target=None, notes="control for the two rows above: the local engine's own scaling on this machine "
                           "(2 free cores would give close to 2x less pool start-up)"))
    log(f"loaders/pack: ray {median(ray_mbps):.1f} MB/s, local w1 "
        f"{median([mbps(nbytes, s) for s in seconds['local-w1']]):.1f}, w2 "
        f"{median([mbps(nbytes, s) for s in seconds['local-w2']]):.1f}")
    return rows
