"""ling-train: train a Ling MoE model from token corpora, checkpointing asynchronously through pcache.

Settings come from defaults < --config TOML ([ling_train] table) < LING_TRAIN_* environment < flags.
S3 endpoints and credentials follow the AWS tools (--endpoint-url or AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY). Under torchrun every rank runs this same command (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from ling_train.checkpoint import CheckpointError
from ling_train.config import PRESETS, TrainConfig, preset
from ling_train.interrupt import StopSignals, stop_report
from ling_train.model import count_params
from lingcore.errors import ConfigError, StoreAccessError
from lingcore.log import get_logger, setup_logging
from loaders import FormatError, InvalidParameterError

log = get_logger("ling_train")

EXAMPLES = """examples:
  ling-train params --preset ling-lite
  ling-train --preset tiny --data corpus/ --ckpt pcache::file:///tmp/ckpt --steps 200 --ckpt-every 50
  ling-train --data pcache::s3://datasets/wiki --ckpt pcache::s3://ckpt/run1 --steps 1000 --ckpt-every 100 --resume
  ling-train ckpt list pcache::s3://ckpt/run1

exit codes: 0 done; 1 a failure while training (e.g. a checkpoint could not be saved); 2 bad settings,
or data / checkpoint store unreachable, forbidden or not found (checked before step 1), or --resume with
nothing to resume; 130 / 143 stopped by SIGINT / SIGTERM at a step boundary (the last committed step and
the resume command are printed).
  torchrun --nproc-per-node 2 -m ling_train.cli --config train.toml
"""

_HELP = {
    "preset": f"model preset: {', '.join(PRESETS)}",
    "data": "corpus URL or path (repeat for several): local, FUSE path, pcache::s3://bucket/corpus",
    "ckpt": "checkpoint root URL, e.g. pcache::s3://bucket/run1 or pcache::file:///dir",
    "ckpt_every": "save every K steps (0: only at the end)",
    "resume": "continue from the newest committed checkpoint under --ckpt (exit 2 when there is none)",
    "resume_if_exists": "like --resume, but start from step 0 when nothing is committed under --ckpt",
    "log_file": "JSONL metrics file (one object per step)",
    "parallel": "ddp or fsdp (FSDP2 fully_shard) under torchrun",
    "snapshot_every": "keep the newest state of each rank in /dev/shm every K steps (0: off); a restart with "
                      "--resume-if-exists resumes from it when it is newer than the committed step",
    "job_id": "names the job's memory snapshots (default: derived from --ckpt)",
}


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ling-train", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="TOML", help="TOML file with a [ling_train] table")
    parser.add_argument("--log-level", default=None, help="DEBUG (errors with their traceback), INFO (default), "
                                                          "WARNING")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = _HELP.get(f.name, f"default {f.default!r}")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        elif f.name == "data":
            parser.add_argument(flag, action="append", metavar="URL", help=help_text)
        else:
            parser.add_argument(flag, default=None, metavar=f.name.upper(), help=help_text)
    return parser


def params_main(argv: Sequence[str]) -> int:
    """``ling-train params --preset P``: total and active parameters from the module shapes."""
    parser = argparse.ArgumentParser(prog="ling-train params",
                                     description="Print total and active (per-token) parameters of a preset, "
                                                 "counted from the module shapes on the meta device.")
    parser.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)}")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    try:
        total, active = count_params(preset(args.preset))
    except ConfigError as exc:
        print(f"ling-train params: {exc}", file=sys.stderr)
        return 2
    if args.json:
        import json

        print(json.dumps({"preset": args.preset, "total": total, "active": active}))
    else:
        def human(n: int) -> str:
            return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"

        print(f"preset {args.preset}: total {human(total)} ({total:,}), active {human(active)} ({active:,})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ling-train``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["params"]:
        return params_main(argv[1:])
    if argv[:1] in (["export-hf"], ["import-hf"]):
        from ling_train.hf_io import hf_main

        return hf_main(argv)
    if argv[:1] == ["ckpt"]:
        from ling_train.ckptcmd import ckpt_main

        return ckpt_main(argv[1:])
    args = _train_parser().parse_args(argv)
    setup_logging(args.log_level)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    stop = StopSignals()  # SIGINT/SIGTERM: stop at a step boundary, report, exit 130/143 without a traceback
    restore = stop.install()
    trainer, cfg = None, None
    try:
        cfg = TrainConfig.load(args.config, **overrides)
        from ling_train.preflight import preflight
        from ling_train.trainer import Trainer

        preflight(cfg)
        trainer = Trainer(cfg, stop=stop)
        result = trainer.run()
    except KeyboardInterrupt:  # before the loop, or a third signal
        if trainer is None or trainer.rank == 0:
            ckpt = trainer.ckpt if trainer is not None else None
            for line in stop_report(stop.name, trainer.step if trainer is not None else None,
                                    cfg.ckpt if cfg is not None else "",
                                    ckpt.last_committed_step if ckpt is not None else None, None, argv):
                print(line, file=sys.stderr)
        return stop.exit_code
    except (StoreAccessError, ConfigError, FormatError, InvalidParameterError, FileNotFoundError, ValueError) as exc:
        log.debug("ling-train refused to start", exc_info=exc)
        print(f"ling-train: {exc}", file=sys.stderr)
        return 2
    except (OSError, CheckpointError) as exc:
        log.debug("ling-train failed", exc_info=exc)
        print(f"ling-train: error: {exc}", file=sys.stderr)
        return 1
    finally:
        restore()
    if result.stopped_by is not None:
        if trainer.rank == 0:
            for line in stop_report(stop.name, result.final_step, cfg.ckpt, result.last_committed,
                                    result.abandoned_step, argv, result.finished_step):
                print(line, file=sys.stderr)
        return 128 + result.stopped_by
    if result.final_step and result.losses:
        last = result.losses[max(result.losses)]
        print(f"done: step {result.final_step}, last loss {last:.4f}, {result.tokens_per_s:,.0f} tokens/s, "
              f"{len(result.saves)} checkpoint(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
