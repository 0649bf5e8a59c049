"""Real English text that is on every machine with this project installed, and a BPE tokenizer trained on it.

No download: the texts are the package descriptions (``*.dist-info/METADATA`` bodies), licenses and
documentation files (``*.md``, ``*.rst``, ``*.txt``) of the installed packages, then the docstrings of
Python's standard library. Files are read in sorted order, exact duplicates (after whitespace
normalisation) are dropped, and files that are not prose (data tables, requirement lists) are skipped,
so the same environment always gives the same corpus.

    python -m ling_train.realtext --out docs.jsonl --max-mb 4
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

from lingcore.checksum import content_hash

MiB = 1024 * 1024
EOS_TOKEN = "<|endoftext|>"
DOC_SUFFIXES = (".md", ".rst", ".txt")
LICENSE_PREFIXES = ("license", "licence", "copying", "notice", "authors")
# dist-info / egg-info bookkeeping that happens to end in .txt: lists of names, not prose
NOT_PROSE = {"entry_points.txt", "top_level.txt", "requires.txt", "dependency_links.txt", "sources.txt",
             "namespace_packages.txt", "api_tests.txt", "installer.txt"}
MAX_FILE_BYTES = 512 * 1024  # bigger files in site-packages are data (word lists, tables), not documents
SKIP_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}


def _prose(text: str) -> bool:
    """Mostly letters and spaces: a license or a README, not a table of numbers or hashes."""
    if len(text) < 200:
        return False
    sample = text[:20000]
    wordish = sum(ch.isalpha() or ch == " " for ch in sample)
    return wordish / len(sample) >= 0.75


def _read(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _package_files(purelib: Path) -> Iterator[tuple[Path, str]]:
    """(path, kind) of the package descriptions, licenses and documentation files, in sorted order."""
    for root, dirs, files in os.walk(purelib):
        dirs.sort()
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        in_meta = root.endswith((".dist-info", ".egg-info")) or ".dist-info/" in root + "/"
        for name in sorted(files):
            low = name.lower()
            if in_meta and name == "METADATA":
                yield Path(root, name), "metadata"
            elif low.startswith(LICENSE_PREFIXES) or (low.endswith(DOC_SUFFIXES) and low not in NOT_PROSE):
                yield Path(root, name), "doc"


def _metadata_body(text: str) -> str:
    """The long description of a METADATA file: what follows the header block."""
    _, sep, body = text.partition("\n\n")
    return body if sep else ""


def _docstrings(stdlib: Path) -> Iterator[str]:
    """Module, class and function docstrings of the standard library, one document per module."""
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_STDLIB_DIRS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            source = _read(Path(root, name))
            if source is None:
                continue
            try:
                tree = ast.parse(source)
            except (SyntaxError, ValueError):
                continue
            nodes = (n for n in ast.walk(tree)
                     if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
            text = "\n\n".join(d for d in (ast.get_docstring(n) for n in nodes) if d)
            if text:
                yield text


def _candidates(purelib: Path, stdlib: Path) -> Iterator[str]:
    for path, kind in _package_files(purelib):
        text = _read(path)
        if text is not None:
            yield _metadata_body(text) if kind == "metadata" else text
    yield from _docstrings(stdlib)


def offline_texts(max_bytes: int = 4 * MiB, *, purelib: str | None = None, stdlib: str | None = None) -> list[str]:
    """Deduplicated English documents from the installed packages and the standard library.

    Args:
        max_bytes: Stop once the documents hold this many UTF-8 bytes.
        purelib: site-packages to read (default: this interpreter's ``purelib``).
        stdlib: standard library to read docstrings from (default: this interpreter's ``stdlib``).
    """
    paths = sysconfig.get_paths()
    seen: set[str] = set()
    docs: list[str] = []
    total = 0
    for raw in _candidates(Path(purelib or paths["purelib"]), Path(stdlib or paths["stdlib"])):
        text = raw.strip()
        if not _prose(text):
            continue
        key = content_hash(" ".join(text.split()).encode())
        if key in seen:
            continue
        seen.add(key)
        docs.append(text)
        total += len(text.encode())
        if total >= max_bytes:
            break
    return docs


def train_bpe(texts: Sequence[str], path: str, vocab_size: int = 4096) -> str:
    """Train a byte-level BPE tokenizer (``tokenizers``) on ``texts`` and save it as ``path``; return path.

    Its EOS token is ``<|endoftext|>``, which ``loaders pack`` finds by itself.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ling_train.realtext --out docs.jsonl``: write the texts as JSONL for ``loaders pack``."""
    parser = argparse.ArgumentParser(prog="python -m ling_train.realtext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSONL file to write ({\"text\": ...} per line)")
    parser.add_argument("--max-mb", type=float, default=4.0, help="stop after this many MiB of text (default 4)")
    args = parser.parse_args(argv)
    texts = offline_texts(int(args.max_mb * MiB))
    with open(args.out, "w", encoding="utf-8") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}) + "\n")
    nbytes = sum(len(t.encode()) for t in texts)
    print(f"wrote {len(texts):,} documents, {nbytes / MiB:.2f} MiB of text to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
