"""``make demo``: the whole stack end to end on two embedded SeaweedFS clusters.

1. Start SeaweedFS S3 servers for cluster A and cluster B (loopback).
2. Train a byte-level BPE tokenizer on real English text already on the machine (the installed packages'
   READMEs and licenses, the standard library's docstrings: :mod:`ling_train.realtext`) and pack that text
   with it into Megatron shards on A (``loaders pack``); the model's vocabulary comes from the corpus.
3. Mount A's dataset with fusefs when it works here; otherwise read it through ``pcache::s3://`` (said so).
4. Train ``tiny`` for a few hundred steps, checkpointing asynchronously through pcache to A.
5. ``babel-sync once`` replicates the dataset and the committed checkpoints to B (a plain fsspec copy,
   labelled as a fallback, when babel_sync is missing or fails).
6. Resume training from B's copy and show that the loss continues.

Prints a summary (tokens/s, checkpoint stall against a synchronous save, bytes synced), writes a PNG loss
curve (log axis, skipped steps marked) and prints its full path, and stops everything it started.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ling_train.checkpoint import CheckpointManager
from ling_train.config import TrainConfig
from ling_train.corpus import write_jsonl
from ling_train.realtext import offline_texts, train_bpe
from ling_train.trainer import Trainer, TrainResult
from lingcore.files import write_private
from lingcore.marker import MARKER_NAME
from loaders.formats.pack import pack
from pcache.s3server import SeaweedServer

BUCKET = "data"
DATASET = "datasets/demo-v1"
RUN = "checkpoints/demo-run"
MiB = 1024 * 1024


def _use_cluster(server: SeaweedServer) -> None:
    """Point the AWS environment (what every CLI and our storage options read) at ``server``."""
    os.environ.update({"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key,
                       "AWS_ENDPOINT_URL": server.endpoint_url, "AWS_REGION": "us-east-1"})


def _credentials_file(path: Path, server: SeaweedServer) -> str:
    write_private(path, f"[default]\naws_access_key_id = {server.access_key}\n"
                        f"aws_secret_access_key = {server.secret_key}\n".encode())
    return str(path)


def _try_fusefs(console: Console, work: Path, server: SeaweedServer) -> tuple[str | None, str]:
    """Mount A's dataset with fusefs; return (mountpoint or None, what happened)."""
    if importlib.util.find_spec("fusefs.cli") is None or not os.path.exists("/dev/fuse"):
        return None, "fusefs or /dev/fuse not available"
    mnt = work / "mnt-a"
    mnt.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "fusefs.cli", "mount", f"s3://{BUCKET}/{DATASET}", str(mnt),
           "--endpoint-url", server.endpoint_url, "--cache-dir", str(work / "cache-fuse")]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None, "fusefs mount timed out"
    if proc.returncode != 0:
        return None, f"fusefs mount failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"
    if not (mnt / "index.json").exists():
        _umount(mnt)
        return None, "fusefs mounted but index.json is not visible"
    return str(mnt), f"mounted s3://{BUCKET}/{DATASET} at {mnt} with fusefs"


def _umount(mnt: Path | str) -> None:
    with contextlib.suppress(Exception):
        subprocess.run([sys.executable, "-m", "fusefs.cli", "umount", str(mnt)], capture_output=True, timeout=60)


def _train(cfg: TrainConfig) -> tuple[TrainResult, Trainer]:
    trainer = Trainer(cfg)
    return trainer.run(), trainer


def _babel_toml(work: Path, a: SeaweedServer, b: SeaweedServer) -> Path:
    path = work / "babel.toml"
    # The default settle margin: `babel-sync once` waits out a marker written just before its listing and
    # copies that unit in the same pass. Datasets from `loaders pack` carry the same _COMMITTED marker
    # as checkpoints (written after index.json), so both rules use the default unit_marker.
    path.write_text(f"""[sites.a]
url = "s3://{BUCKET}"
endpoint_url = "{a.endpoint_url}"
credentials_file = "{_credentials_file(work / 'creds-a', a)}"

[sites.b]
url = "s3://{BUCKET}"
endpoint_url = "{b.endpoint_url}"
credentials_file = "{_credentials_file(work / 'creds-b', b)}"

[[rules]]
name = "checkpoints"
source = "a"
destinations = ["b"]
include = ["checkpoints/**"]
unit_marker = "{MARKER_NAME}"
priority = 10

[[rules]]
name = "datasets"
source = "a"
destinations = ["b"]
include = ["datasets/**"]
""")
    return path


def _fallback_copy(a: SeaweedServer, b: SeaweedServer) -> int:
    """Plain fsspec copy of the dataset and committed checkpoints, markers last; return bytes copied."""
    import s3fs

    src = s3fs.S3FileSystem(skip_instance_cache=True, **a.storage_options())
    dst = s3fs.S3FileSystem(skip_instance_cache=True, **b.storage_options())
    copied = 0
    files = sorted(src.find(f"{BUCKET}/datasets")) + sorted(src.find(f"{BUCKET}/checkpoints"))
    last = {MARKER_NAME, "index.json", "latest"}
    for path in [p for p in files if p.rsplit("/", 1)[-1] not in last] + \
                [p for p in files if p.rsplit("/", 1)[-1] in last]:
        data = src.cat_file(path)
        dst.pipe_file(path, data)
        copied += len(data)
    return copied


def _sync(console: Console, work: Path, a: SeaweedServer, b: SeaweedServer) -> tuple[int, str]:
    """Step 5; return (bytes synced, how)."""
    if importlib.util.find_spec("babel_sync.cli") is not None:
        cmd = [sys.executable, "-m", "babel_sync.cli", "once", "--config", str(_babel_toml(work, a, b)),
               "--state-dir", str(work / "babel-state")]
        console.print(f"$ babel-sync once --config {work / 'babel.toml'}")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        if proc.returncode == 0:
            with contextlib.suppress(ValueError):
                summary = json.loads(proc.stdout[proc.stdout.find("{"):])
                console.print(f"babel-sync summary: {json.dumps(summary)[:400]}")
                return _summary_bytes(summary), "babel-sync once"
            return -1, "babel-sync once (no JSON summary)"
        console.print(f"[yellow]babel-sync once failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    else:
        console.print("[yellow]babel_sync is not installed in this tree")
    console.print("[yellow]FALLBACK: copying with a plain fsspec copy (markers last) instead of babel-sync")
    return _fallback_copy(a, b), "FALLBACK fsspec copy"


def _summary_bytes(summary: Any) -> int:
    """Bytes copied from a babel-sync JSON summary (top level or summed over rules)."""
    if isinstance(summary, dict):
        for key in ("bytes_copied", "copied_bytes"):
            if isinstance(summary.get(key), int):
                return int(summary[key])
        copied = summary.get("copied")
        if isinstance(copied, dict) and isinstance(copied.get("bytes"), int):
            return int(copied["bytes"])
        return sum(_summary_bytes(v) for v in summary.values() if isinstance(v, (dict, list)))
    if isinstance(summary, list):
        return sum(_summary_bytes(v) for v in summary)
    return 0


def _plot(path: Path, first: TrainResult, second: TrainResult, title: str) -> bool:
    """Loss per step on a log axis, both jobs, the resume point, and every skipped step marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import ScalarFormatter
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for result, label in ((first, "cluster A (trained)"), (second, "cluster B (resumed from synced checkpoint)")):
        steps = sorted(result.losses)
        ax.plot(steps, [result.losses[s] for s in steps], label=label, linewidth=0.8, alpha=0.8)
    merged = {**first.losses, **second.losses}
    ema, smooth = None, []
    for step in sorted(merged):  # the trend through per-batch noise (documents differ a lot in difficulty)
        ema = merged[step] if ema is None else 0.9 * ema + 0.1 * merged[step]
        smooth.append(ema)
    ax.plot(sorted(merged), smooth, color="black", linewidth=1.5, label="moving average (EMA 0.9)")
    skipped = [(s, r.losses[s]) for r in (first, second) for s, status in r.statuses.items()
               if status != "ok" and s in r.losses]
    if skipped:
        ax.scatter([s for s, _ in skipped], [v for _, v in skipped], marker="x", color="red", zorder=3,
                   label=f"skipped step ({len(skipped)})")
    ax.axvline(second.start_step, color="grey", linestyle=":", label="resume")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m ling_train.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps on cluster A")
    parser.add_argument("--resume-steps", type=int, default=100, help="more steps after resuming on cluster B")
    parser.add_argument("--ckpt-every", type=int, default=100)
    parser.add_argument("--text-mb", type=float, default=4.0, help="MiB of real English text to collect and pack")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE tokenizer vocabulary")
    parser.add_argument("--workdir", help="default: a new temp dir (kept: PNG, metrics, summary)")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ling-demo-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    console.rule("[bold]ling_train demo: two clusters, async checkpoints, sync, resume")
    console.print(f"work dir: {work}")
    t_start = time.perf_counter()
    mount: str | None = None
    saved_env = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                                                "AWS_REGION")}
    a = SeaweedServer(work / "seaweed-a")
    b = SeaweedServer(work / "seaweed-b")
    try:
        console.rule("1. start SeaweedFS clusters A and B")
        a.start()
        b.start()
        a.make_bucket(BUCKET)
        b.make_bucket(BUCKET)
        console.print(f"cluster A: {a.endpoint_url}   cluster B: {b.endpoint_url}")

        console.rule("2. train a BPE tokenizer on real English text, pack the text with it on A")
        _use_cluster(a)
        texts = offline_texts(int(args.text_mb * MiB))
        text_bytes = sum(len(t.encode()) for t in texts)
        console.print(f"collected {len(texts):,} documents, {text_bytes / MiB:.2f} MiB of English text "
                      "(installed packages' READMEs and licenses, the standard library's docstrings)")
        jsonl = work / "corpus.jsonl"
        write_jsonl(str(jsonl), texts)
        tokenizer = train_bpe(texts, str(work / "tokenizer.json"), args.vocab_size)
        console.print(f"trained a byte-level BPE tokenizer ({args.vocab_size} ids): {tokenizer}")
        index = pack([str(jsonl)], f"s3://{BUCKET}/{DATASET}", format="megatron", tokenizer=tokenizer,
                     shard_size="1MiB", overwrite=True, progress=True)
        console.print(f"packed {index['documents']:,} documents, {index['tokens']:,} tokens "
                      f"({text_bytes / max(1, index['tokens']):.2f} bytes/token), {len(index['shards'])} shards "
                      f"-> s3://{BUCKET}/{DATASET}")

        console.rule("3. dataset access on A")
        mount, how = _try_fusefs(console, work, a)
        data_url = mount or f"pcache::s3://{BUCKET}/{DATASET}"
        if mount is None:
            console.print(f"[yellow]fusefs not used ({how}); FALLBACK: reading through {data_url}")
        else:
            console.print(how)

        console.rule(f"4. train tiny for {args.steps} steps on A, async checkpoints every {args.ckpt_every}")
        # One intra-op thread: on 2 shared cores, OpenMP threads that wait for a descheduled peer made steps
        # several times slower than one thread.
        common = {"preset": "tiny", "batch_size": 8, "seq_len": 128, "log_every": 25, "ckpt_every": args.ckpt_every,
                  "keep_last": 3, "lr": 3e-3, "warmup_steps": 20, "threads": 1}
        total = args.steps + args.resume_steps  # one LR schedule over both jobs; job A stops at args.steps
        cfg_a = TrainConfig.load(data=(data_url,), ckpt=f"pcache::s3://{BUCKET}/{RUN}", steps=total, stop_at=args.steps,
                                 cache_dir=str(work / "cache-a"), log_file=str(work / "metrics-a.jsonl"), **common)
        res_a, trainer_a = _train(cfg_a)
        stalls = [s.stall for s in res_a.saves[:-1]] or [s.stall for s in res_a.saves]
        durable = [s.committed for s in res_a.saves]
        assert trainer_a.ckpt is not None
        sync_s, _ = trainer_a.ckpt.save_synchronously("sync-baseline", trainer_a.state())
        mgr_a = CheckpointManager(cfg_a.ckpt, cache_dir=str(work / "cache-a"))
        console.print(f"committed on A: {mgr_a.committed_steps()} (keep last 3)")

        console.rule("5. replicate the dataset and committed checkpoints to B")
        synced, sync_how = _sync(console, work, a, b)

        console.rule(f"6. resume on B from its copy, {args.resume_steps} more steps")
        if mount is not None:
            _umount(mount)
            mount = None
        _use_cluster(b)
        cfg_b = TrainConfig.load(data=(f"pcache::s3://{BUCKET}/{DATASET}",), ckpt=f"pcache::s3://{BUCKET}/{RUN}",
                                 steps=total, resume=True, cache_dir=str(work / "cache-b"),
                                 log_file=str(work / "metrics-b.jsonl"), **common)
        res_b, _ = _train(cfg_b)
        if res_b.start_step != args.steps:
            console.print(f"[red]resume started at step {res_b.start_step}, expected {args.steps}")
            return 1
        before = sum(res_a.losses[s] for s in range(args.steps - 9, args.steps + 1)) / 10
        after = sum(res_b.losses[s] for s in range(args.steps + 1, args.steps + 11)) / 10

        png = work / "ling_demo_loss.png"
        plotted = _plot(png, res_a, res_b, f"ling_train tiny, {index['tokens'] / 1e6:.2f}M tokens of real English "
                        f"(BPE vocab {index['vocab_size']:,}): train on A, sync, resume on B")
        table = Table(title="ling_train demo summary")
        table.add_column("measure")
        table.add_column("value", justify="right")
        table.add_row("data access (step 3)", "fusefs mount" if data_url != f"pcache::s3://{BUCKET}/{DATASET}"
                      else "pcache::s3:// (fusefs fallback)")
        table.add_row("training throughput on A", f"{res_a.tokens_per_s:,.0f} tokens/s (CPU)")
        nbytes = res_a.saves[-1].nbytes if res_a.saves else 0
        table.add_row("checkpoint size", f"{nbytes / MiB:.1f} MiB per checkpoint")
        stall = sum(stalls) / max(1, len(stalls))
        table.add_row("async checkpoint stall (mean)", f"{stall * 1000:.1f} ms")
        table.add_row("synchronous save, same state + destination", f"{sync_s * 1000:.1f} ms")
        table.add_row("stall / synchronous save", f"{stall / sync_s:.3f}x")
        table.add_row("snapshot -> committed at origin (mean)", f"{sum(durable) / max(1, len(durable)):.2f} s")
        table.add_row(f"bytes synced A -> B ({sync_how})", f"{synced / MiB:.1f} MiB" if synced >= 0 else "n/a")
        table.add_row("loss: last 10 steps on A", f"{before:.4f}")
        table.add_row("loss: first 10 steps resumed on B", f"{after:.4f}")
        table.add_row("anomalies (spikes / NaN)", f"{res_a.counts['spikes'] + res_b.counts['spikes']} / "
                      f"{res_a.counts['nonfinite_loss'] + res_b.counts['nonfinite_loss']}")
        table.add_row("corpus", f"{index['tokens']:,} BPE tokens (vocab {index['vocab_size']:,}) of real text")
        table.add_row("skipped steps (anomaly guard)", str(sum(status != "ok" for r in (res_a, res_b)
                                                               for status in r.statuses.values())))
        table.add_row("wall time", f"{time.perf_counter() - t_start:.0f} s")
        console.print(table)
        if plotted:
            print(f"loss curve: {png}", flush=True)  # stdout, whole: a path a terminal must not wrap or cut
        else:
            console.print("[yellow]matplotlib is missing: no loss curve (make demo installs it)")
        (work / "summary.json").write_text(json.dumps({
            "tokens_per_s": res_a.tokens_per_s, "stall_s": stall, "sync_save_s": sync_s, "bytes_synced": synced,
            "sync": sync_how, "loss_before": before, "loss_after": after, "data": data_url,
            "tokens": index["tokens"], "vocab_size": index["vocab_size"], "png": str(png) if plotted else None},
            indent=1))
        console.print("[green]demo finished[/green]")
        return 0
    finally:
        if mount is not None:
            _umount(mount)
        a.stop()
        b.stop()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for name in ("seaweed-a", "seaweed-b", "cache-a", "cache-b", "cache-fuse", "babel-state", "creds-a", "creds-b"):
            target = work / name
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)


def cli() -> int:
    """``python -m ling_train.demo`` (``make demo``): :func:`main`, with Ctrl-C a one-line exit 130."""
    try:
        return main()
    except KeyboardInterrupt:  # main's cleanup (servers, mounts, env) has run by now
        print("ling_train demo: interrupted; servers stopped, mounts removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
