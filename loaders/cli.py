"""loaders: pack text into token corpora (Megatron .bin/.idx, WebDataset tar, LMDB) and inspect them.

Inputs and outputs are local paths or fsspec URLs (s3://, pcache::s3://, ...). S3 endpoints and
credentials follow the AWS tools: --endpoint-url or AWS_ENDPOINT_URL, and AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from lingcore.errors import ConfigError, StoreAccessError
from lingcore.log import get_logger, setup_logging
from lingcore.probe import check_writable, diagnose, explain
from lingcore.storage import split_url, url_storage_options
from loaders.errors import FormatError, InvalidParameterError, MissingDependencyError
from loaders.formats.corpus import FORMATS, probe_corpus
from loaders.formats.inspect import inspect_corpus
from loaders.formats.pack import ENGINES, TXT_MODES, pack
from loaders.formats.writer import DEFAULT_SHARD_SIZE

log = get_logger("loaders")

EXAMPLES = """examples:
  loaders pack data/*.jsonl --out corpus/ --format megatron --workers 8
  loaders pack s3://raw/web/ --out s3://bucket/web-v1 --format megatron --engine ray --ray-address auto
  loaders pack books/ --out s3://bucket/books-v1 --format wds --shard-size 256MiB --endpoint-url http://127.0.0.1:8333
  loaders pack wiki.jsonl.zst --out corpus-lmdb --format lmdb --tokenizer tok/tokenizer.json
  loaders inspect corpus/
  loaders inspect pcache::s3://bucket/books-v1 --json
"""


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``loaders`` command."""
    parser = argparse.ArgumentParser(prog="loaders", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("pack", help="tokenize JSONL / text files into a sharded corpus with index.json")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="file, directory or glob: .jsonl/.ndjson/.json or .txt/.text/.md, optionally .gz/.zst/...")
    p.add_argument("--out", required=True, metavar="URL", help="output directory (local path or fsspec URL)")
    p.add_argument("--format", required=True, choices=FORMATS, help="shard format")
    p.add_argument("--tokenizer", default="bytes",
                   help="'bytes' (default: byte-level, EOS=1) or PATH/tokenizer.json (Hugging Face tokenizers)")
    p.add_argument("--eos-id", type=int, help="EOS id for a tokenizer.json without a known EOS token")
    p.add_argument("--text-field", default="text", help="JSONL field holding the document text (default text)")
    p.add_argument("--txt-mode", choices=TXT_MODES, default="file",
                   help="plain text: one document per file (default) or per blank-line-separated paragraph")
    p.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE,
                   help=f"token bytes per shard, e.g. 256MiB (default {DEFAULT_SHARD_SIZE})")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="byte-tokenizer processes (default: CPUs, at most 8; a tokenizer.json encodes in batches "
                        "on all cores, RAYON_NUM_THREADS caps them); with --engine ray, the CPUs of a local "
                        "cluster it starts")
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: this machine (default); ray: Ray tasks on a cluster (pip install "
                        "'ling-storage[ray]'), same output")
    p.add_argument("--ray-address", default="auto", metavar="ADDRESS",
                   help="Ray cluster for --engine ray: 'auto' (default: a running cluster, else a local one), "
                        "'local', or HOST:PORT")
    p.add_argument("--force", action="store_true", help="replace an existing corpus at --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the written index.json")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL, else AWS)")
    p.add_argument("--log-level", help="DEBUG (errors with their traceback), INFO (default), WARNING")
    p = sub.add_parser("inspect", help="print statistics and verify checksums, pointers and every document")
    p.add_argument("url", metavar="URL", help="corpus directory, Megatron prefix, or shard")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-verify", action="store_true", help="statistics only: skip checksums and reads")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL, else AWS)")
    p.add_argument("--log-level", help="DEBUG (errors with their traceback), INFO (default), WARNING")
    return parser


def _options_for(endpoint_url: str | None) -> Any:
    def options(url: str) -> dict[str, Any]:
        return url_storage_options(url, endpoint_url)
    return options


def _print_report(report: dict[str, Any]) -> None:
    tok = report.get("tokenizer") or {}
    print(f"corpus       {report['url']}")
    print(f"format       {report['format']} ({report['dtype']}), {len(report['shards'])} shards")
    print(f"documents    {report['documents']:,}")
    print(f"tokens       {report['tokens']:,} (per document: min {report['length_min']:,}, "
          f"mean {report['length_mean']:,.1f}, max {report['length_max']:,})")
    if tok:
        print(f"tokenizer    {tok.get('kind')} {tok.get('source', '')} vocab {tok.get('vocab_size')}, "
              f"eos {report.get('eos_id')}")
    print(f"fingerprint  {report['fingerprint']}")
    if report["skipped"]:
        print(f"skipped      {report['skipped']} corrupt members")
    print("verified     " + ("OK: checksums, index structure, counts and every document"
                             if report["verified"] else "no (--no-verify)"))
    print("tokens per document:")
    histogram = report["histogram"]
    peak = max(count for _, _, count in histogram)
    for low, high, count in histogram:
        bar = "#" * max(1, round(40 * count / peak))
        print(f"  [{low:>9,}, {high:>9,})  {count:>12,}  {bar}")


def _remote(url: str) -> bool:
    return split_url(url)[0] != "file"


def _pack(args: argparse.Namespace) -> int:
    # Bounded probes first: an unreachable store, a refused secret or a missing bucket is one line naming
    # the URL within seconds, not a retry storm or a half-written corpus later.
    for url in args.inputs:
        problem = diagnose(url, url_storage_options(url, args.endpoint_url)) if _remote(url) else None
        if problem is not None:
            raise problem
    if _remote(args.out):
        check_writable(args.out, url_storage_options(args.out, args.endpoint_url))
    index = pack(args.inputs, args.out, format=args.format, tokenizer=args.tokenizer, text_field=args.text_field,
                 txt_mode=args.txt_mode, shard_size=args.shard_size, workers=args.workers, eos_id=args.eos_id,
                 options_for=_options_for(args.endpoint_url), progress=not args.quiet and not args.json,
                 overwrite=args.force, engine=args.engine, ray_address=args.ray_address)
    if args.json:
        print(json.dumps(index, indent=1))
    else:
        print(f"wrote {index['documents']:,} documents, {index['tokens']:,} tokens ({index['dtype']}) in "
              f"{len(index['shards'])} {index['format']} shards to {args.out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    if _remote(args.url):  # bounded: unreachable, forbidden or missing within seconds, one line
        probe_corpus(args.url, storage_options=_options_for(args.endpoint_url)(args.url))
    report = inspect_corpus(args.url, verify=not args.no_verify,
                            storage_options=_options_for(args.endpoint_url)(args.url))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_report(report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``loaders`` command; return the exit status.

    1 with a message naming the file when a corpus or an input is bad; 2 when the store cannot be used
    (unreachable, forbidden, not found: one line naming the URL); 130 when interrupted.
    """
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return _pack(args) if args.command == "pack" else _inspect(args)
    except KeyboardInterrupt:
        hint = (f"; finished shards stay listed in {args.out}/_PACKING and the same command finishes the rest"
                if args.command == "pack" else "")
        print(f"loaders {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - store failures become one line; anything else keeps its traceback
        url = args.out if args.command == "pack" else args.url
        shown = explain(exc, url, url_storage_options(url, args.endpoint_url))
        if not isinstance(shown, (FormatError, InvalidParameterError, ConfigError, MissingDependencyError, OSError)):
            raise
        log.debug("loaders %s failed", args.command, exc_info=exc)
        print(f"loaders {args.command}: error: {shown}", file=sys.stderr)
        return 2 if isinstance(shown, StoreAccessError) else 1


if __name__ == "__main__":
    raise SystemExit(main())
