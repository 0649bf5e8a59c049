"""Token corpus formats: round trips, Megatron byte compatibility, webdataset interop, bad input, fuzzing."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import pickle
import shutil
import struct
import tarfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loaders.errors import (
    CorpusNotFoundError,
    CorruptIndexError,
    CorruptMemberError,
    EmptyShardError,
    FormatError,
    InvalidParameterError,
    LegacyFormatError,
    TruncatedDataError,
    TruncatedIndexError,
    UnknownDtypeError,
    UnsupportedVersionError,
)
from loaders.formats import open_corpus, parse_index, write_corpus
from loaders.formats._io import HANDLES
from loaders.formats._tar import scan_tar

FORMATS = ["megatron", "wds", "lmdb"]


@pytest.fixture(autouse=True)
def _lmdb_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # remote LMDB shards are copied into this cache; keep it inside the test's tmp dir
    monkeypatch.setenv("LOADERS_CACHE_DIR", str(tmp_path / "cache"))


def random_docs(n: int = 300, high: int = 60000, dtype: Any = np.uint16, seed: int = 0) -> list[np.ndarray]:
    """Documents of random lengths, including several of length 1."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 400, size=n)
    lengths[::37] = 1
    return [rng.integers(0, high, size=int(k)).astype(dtype) for k in lengths]


def read_all(corpus: Any) -> list[np.ndarray]:
    return [shard.read(d) for shard in corpus.shards for d in range(len(shard.lengths))]


# --- independent Megatron MMIDIDX v1 writer and reader, from the documented layout only ---------------

def indep_write_megatron(prefix: Path, docs: list[np.ndarray], code: int, dtype: Any) -> None:
    itemsize = np.dtype(dtype).itemsize
    with open(f"{prefix}.bin", "wb") as fh:
        for doc in docs:
            fh.write(np.asarray(doc, dtype=dtype).astype(np.dtype(dtype).newbyteorder("<")).tobytes())
    n = len(docs)
    lengths = [len(d) for d in docs]
    pointers, pos = [], 0
    for length in lengths:
        pointers.append(pos)
        pos += length * itemsize
    with open(f"{prefix}.idx", "wb") as fh:
        fh.write(b"MMIDIDX\x00\x00")
        fh.write(struct.pack("<Q", 1))
        fh.write(struct.pack("<B", code))
        fh.write(struct.pack("<Q", n))
        fh.write(struct.pack("<Q", n + 1))
        fh.write(struct.pack(f"<{n}i", *lengths))
        fh.write(struct.pack(f"<{n}q", *pointers))
        fh.write(struct.pack(f"<{n + 1}q", *range(n + 1)))


def indep_read_megatron(prefix: str) -> tuple[int, list[list[int]]]:
    raw = Path(prefix + ".idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", raw, 9)
    (code,) = struct.unpack_from("<B", raw, 17)
    n, m = struct.unpack_from("<QQ", raw, 18)
    assert version == 1 and len(raw) == 34 + 12 * n + 8 * m
    lengths = struct.unpack_from(f"<{n}i", raw, 34)
    pointers = struct.unpack_from(f"<{n}q", raw, 34 + 4 * n)
    doc_idx = struct.unpack_from(f"<{m}q", raw, 34 + 12 * n)
    assert list(doc_idx) == list(range(n + 1))
    fmt = {8: "H", 4: "i"}[code]
    size = struct.calcsize(fmt)
    data = Path(prefix + ".bin").read_bytes()
    docs = [list(struct.unpack_from(f"<{k}{fmt}", data, p)) for k, p in zip(lengths, pointers, strict=True)]
    assert pointers[-1] + lengths[-1] * size == len(data)
    return code, docs


# --- round trips --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip(tmp_path: Path, fmt: str) -> None:
    docs = random_docs()
    index = write_corpus(str(tmp_path / "c"), docs, format=fmt, shard_size="20KiB", eos_id=1)
    assert index["documents"] == len(docs) and len(index["shards"]) > 2
    assert index["tokens"] == sum(d.size for d in docs)
    for url in (str(tmp_path / "c"), (tmp_path / "c").as_uri()):  # mmap path, then ranged fsspec path
        with open_corpus(url) as corpus:
            assert corpus.format == fmt and corpus.dtype == np.uint16 and corpus.index is not None
            out = read_all(corpus)
            assert len(out) == len(docs)
            for got, want in zip(out, docs, strict=True):
                assert got.dtype == np.uint16 and np.array_equal(got, want)
            shard = corpus.shards[1]
            full = shard.read(3)
            assert np.array_equal(shard.read(3, 1, 4), full[1:4])
            assert np.array_equal(shard.read(3, 2), full[2:])
            assert shard.read(3, 5, 5).size == 0
            with pytest.raises(IndexError, match="out of range"):
                shard.read(len(shard.lengths))
            assert shard.lengths.dtype == np.int64


@pytest.mark.parametrize(("fmt", "dtype"), [("megatron", np.int32), ("wds", np.uint32), ("lmdb", np.uint32)])
def test_round_trip_large_vocab(tmp_path: Path, fmt: str, dtype: Any) -> None:
    docs = random_docs(50, high=200_000, dtype=dtype)
    write_corpus(str(tmp_path / "c"), docs, format=fmt, dtype=dtype)
    with open_corpus(str(tmp_path / "c")) as corpus:
        assert corpus.dtype == dtype
        assert all(np.array_equal(a, b) for a, b in zip(read_all(corpus), docs, strict=True))


def test_fingerprint_changes_with_data(tmp_path: Path) -> None:
    write_corpus(str(tmp_path / "c"), random_docs(20), format="megatron")
    first = open_corpus(str(tmp_path / "c")).fingerprint
    assert open_corpus(str(tmp_path / "c")).fingerprint == first
    with pytest.raises(FileExistsError, match="index.json"):
        write_corpus(str(tmp_path / "c"), random_docs(20, seed=1), format="megatron")
    write_corpus(str(tmp_path / "c"), random_docs(20, seed=1), format="megatron", overwrite=True)
    assert open_corpus(str(tmp_path / "c")).fingerprint != first


def _child_sum(shard: Any) -> int:
    return int(sum(int(shard.read(d).astype(np.int64).sum()) for d in range(len(shard.lengths))))


@pytest.mark.parametrize("fmt", FORMATS)
def test_readers_survive_pickle_and_fork(tmp_path: Path, fmt: str) -> None:
    docs = random_docs(40)
    write_corpus(str(tmp_path / "c"), docs, format=fmt)
    corpus = open_corpus(str(tmp_path / "c"))
    shard = corpus.shards[0]
    expected = _child_sum(shard)  # the parent has the shard open when it forks
    assert _child_sum(pickle.loads(pickle.dumps(shard))) == expected
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_child_sum, (shard,)).get(timeout=60) == expected
    assert _child_sum(shard) == expected


def test_errors_pickle() -> None:
    for error in (CorruptMemberError("a.tar", "m.npy", "bad"), LegacyFormatError("x.idx"),
                  UnsupportedVersionError("x.idx", 3), CorpusNotFoundError("s3://b/c"),
                  InvalidParameterError("on_error", "bad")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error) and copy.__dict__ == error.__dict__


@pytest.mark.parametrize("fmt", FORMATS)
def test_open_handles_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    write_corpus(str(tmp_path / "c"), random_docs(120), format=fmt, shard_size="1KiB")
    corpus = open_corpus(str(tmp_path / "c"))
    assert len(corpus.shards) > 30
    monkeypatch.setattr(HANDLES, "capacity", 4)
    fds = Path("/proc/self/fd")
    before = len(list(fds.iterdir())) if fds.exists() else 0
    for shard in corpus.shards:
        assert int(shard.read(0).size) == int(shard.lengths[0])
        assert len(HANDLES) <= 4
    if fds.exists():  # evicted shards' files and mappings are released, not just forgotten
        assert len(list(fds.iterdir())) <= before + 3 * 4
    assert [len(s.lengths) for s in corpus.shards] == [len(x) for x in corpus.load_lengths()]
    corpus.close()


# --- Megatron byte compatibility and foreign layouts --------------------------------------------------

def test_independent_megatron_writer_is_read(tmp_path: Path) -> None:
    docs = random_docs(120)
    indep_write_megatron(tmp_path / "a", docs[:60], 8, np.uint16)
    indep_write_megatron(tmp_path / "b", docs[60:], 8, np.uint16)
    with open_corpus(str(tmp_path / "a")) as corpus:  # a prefix
        assert corpus.format == "megatron" and corpus.index is None and corpus.dtype == np.uint16
        assert all(np.array_equal(x, y) for x, y in zip(read_all(corpus), docs[:60], strict=True))
    with open_corpus(str(tmp_path / "b.idx")) as corpus:
        assert len(corpus.shards[0].lengths) == 60
    with open_corpus(str(tmp_path)) as corpus:  # a directory of pairs, in name order
        assert len(corpus.shards) == 2
        assert all(np.array_equal(x, y) for x, y in zip(read_all(corpus), docs, strict=True))
    big = [d.astype(np.int32) * 3 for d in docs[:10]]
    indep_write_megatron(tmp_path / "i32", big, 4, np.int32)
    assert np.array_equal(open_corpus(str(tmp_path / "i32")).shards[0].read(9), big[9])
    mixed = open_corpus(str(tmp_path))  # a, b (uint16) and i32 (int32) side by side
    with pytest.raises(CorruptIndexError, match=r"i32\.idx.*dtype"):
        mixed.shards[2].read(0)


def test_our_megatron_files_read_independently(tmp_path: Path) -> None:
    docs = random_docs(80)
    write_corpus(str(tmp_path / "c"), docs, format="megatron", shard_size="1GiB")
    code, got = indep_read_megatron(str(tmp_path / "c" / "shard-00000"))
    assert code == 8
    assert got == [d.tolist() for d in docs]


def test_webdataset_reads_our_shards(tmp_path: Path) -> None:
    import webdataset as wds

    docs = random_docs(60)
    index = write_corpus(str(tmp_path / "c"), docs, format="wds", shard_size="8KiB")
    urls = [str(tmp_path / "c" / s["files"]["tar"]["path"]) for s in index["shards"]]
    assert len(urls) > 1
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [f"{i:012d}" for i in range(len(docs))]
    for sample, doc in zip(samples, docs, strict=True):
        assert sample["npy"].dtype == np.uint16 and np.array_equal(sample["npy"], doc)


def test_foreign_tar_directory_is_scanned(tmp_path: Path) -> None:
    docs = random_docs(50)
    write_corpus(str(tmp_path / "c"), docs, format="wds", shard_size="8KiB")
    for extra in [*tmp_path.glob("c/*.members.npy"), tmp_path / "c" / "index.json"]:
        extra.unlink()
    with open_corpus(str(tmp_path / "c")) as corpus:
        assert corpus.index is None and len(corpus.shards) > 1
        assert all(np.array_equal(x, y) for x, y in zip(read_all(corpus), docs, strict=True))
    single = open_corpus(str(tmp_path / "c" / "shard-00000.tar"))
    assert np.array_equal(single.shards[0].read(0), docs[0])


def test_remote_output_and_lmdb_copy(tmp_path: Path) -> None:
    docs = random_docs(30)
    url = (tmp_path / "remote").as_uri()
    write_corpus(url, docs, format="lmdb", shard_size="4KiB")  # staged locally, uploaded via fsspec
    assert (tmp_path / "remote" / "index.json").exists()
    with open_corpus(url) as corpus:
        assert all(np.array_equal(x, y) for x, y in zip(read_all(corpus), docs, strict=True))
    assert list((tmp_path / "cache" / "lmdb").iterdir())  # remote LMDB is copied into the cache


# --- bad input ----------------------------------------------------------------------------------------

def _megatron(tmp_path: Path, n: int = 20) -> Path:
    indep_write_megatron(tmp_path / "m", random_docs(n), 8, np.uint16)
    return tmp_path / "m"


def test_truncated_bin(tmp_path: Path) -> None:
    prefix = _megatron(tmp_path)
    with open(f"{prefix}.bin", "r+b") as fh:
        fh.truncate(os.path.getsize(f"{prefix}.bin") - 3)
    with pytest.raises(TruncatedDataError, match=r"m\.bin"):
        open_corpus(str(prefix))
    write_corpus(str(tmp_path / "c"), random_docs(20), format="megatron")
    path = tmp_path / "c" / "shard-00000.bin"
    path.write_bytes(path.read_bytes()[:-10])
    corpus = open_corpus(str(tmp_path / "c"))
    with pytest.raises(TruncatedDataError, match=r"shard-00000\.bin"):
        corpus.shards[0].read(0)


@pytest.mark.parametrize(("mutate", "error", "match"), [
    (lambda b: b"TNTIDX\x00\x00" + b[8:], LegacyFormatError, "legacy"),
    (lambda b: b"NOTANIDX!" + b[9:], CorruptIndexError, "MMIDIDX"),
    (lambda b: b[:9] + struct.pack("<Q", 2) + b[17:], UnsupportedVersionError, "version 2"),
    (lambda b: b[:17] + b"\x0c" + b[18:], UnknownDtypeError, "dtype code 12"),
    (lambda b: b[:-5], TruncatedIndexError, "bytes"),
    (lambda b: b[:20], TruncatedIndexError, "header"),
    (lambda b: b[:18] + struct.pack("<Q", 10**15) + b[26:], TruncatedIndexError, "announces"),
    (lambda b: b[:34] + struct.pack("<i", -4) + b[38:], CorruptIndexError, "negative"),
    (lambda b: b + b"\x00" * 3, CorruptIndexError, "accounts"),
    (lambda b: b"", EmptyShardError, "empty"),
    (lambda b: b[:18] + struct.pack("<QQ", 0, 1) + struct.pack("<q", 0), EmptyShardError, "no sequences"),
])
def test_bad_idx(tmp_path: Path, mutate: Any, error: type[Exception], match: str) -> None:
    prefix = _megatron(tmp_path)
    idx = Path(f"{prefix}.idx")
    idx.write_bytes(mutate(idx.read_bytes()))
    with pytest.raises(error, match=match) as info:
        open_corpus(str(prefix))
    assert "m.idx" in str(info.value)


def test_pointer_mismatch_names_file(tmp_path: Path) -> None:
    prefix = _megatron(tmp_path)
    raw = bytearray(Path(f"{prefix}.idx").read_bytes())
    struct.pack_into("<q", raw, 34 + 4 * 20 + 8 * 5, 7)  # sequence 5 starts at a wrong byte
    Path(f"{prefix}.idx").write_bytes(bytes(raw))
    with pytest.raises(CorruptIndexError, match=r"m\.idx.*sequence 5"):
        open_corpus(str(prefix))


def _wds(tmp_path: Path, docs: list[np.ndarray]) -> tuple[Path, np.ndarray]:
    write_corpus(str(tmp_path / "c"), docs, format="wds")
    return tmp_path / "c" / "shard-00000.tar", np.load(tmp_path / "c" / "shard-00000.members.npy")


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x41
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("where", ["header", "npy"])
def test_corrupt_tar_member(tmp_path: Path, where: str) -> None:
    docs = random_docs(30)
    tar, table = _wds(tmp_path, docs)
    _flip(tar, int(table[7, 0]) + 3 if where == "header" else int(table[7, 1]) + 1)
    corpus = open_corpus(str(tmp_path / "c"))  # with the member table: the read finds it
    assert np.array_equal(corpus.shards[0].read(6), docs[6])
    with pytest.raises(CorruptMemberError, match=r"shard-00000\.tar.*member") as info:
        corpus.shards[0].read(7)
    assert where == "header" or info.value.member == "000000000007.npy"
    (tmp_path / "c" / "index.json").unlink()
    (tmp_path / "c" / "shard-00000.members.npy").unlink()
    with pytest.raises(CorruptMemberError, match=r"shard-00000\.tar"):
        open_corpus(str(tmp_path / "c"))  # the scan for the dtype hits it
    skipping = open_corpus(str(tmp_path / "c"), on_error="skip")
    assert skipping.skipped == 1 and len(skipping.shards[0].lengths) == 29
    assert all(np.array_equal(x, y) for x, y in zip(read_all(skipping), docs[:7] + docs[8:], strict=True))


def test_empty_shards(tmp_path: Path) -> None:
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x.tar").write_bytes(bytes(1024))
    with pytest.raises(EmptyShardError, match=r"x\.tar"):
        open_corpus(str(tmp_path / "e"))
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "y.tar").write_bytes(b"")
    with pytest.raises(EmptyShardError, match=r"y\.tar"):
        open_corpus(str(tmp_path / "z"))
    with pytest.raises(InvalidParameterError, match="documents"):
        write_corpus(str(tmp_path / "none"), [], format="lmdb")
    with pytest.raises(CorpusNotFoundError):
        open_corpus(str(tmp_path / "missing"))
    with pytest.raises(InvalidParameterError, match="on_error"):
        open_corpus(str(tmp_path / "e"), on_error="ignore")


# --- fuzzing ------------------------------------------------------------------------------------------

def _valid_idx() -> bytes:
    buf = io.BytesIO()
    lengths = [3, 1, 5]
    buf.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 3, 4))
    buf.write(struct.pack("<3i", *lengths) + struct.pack("<3q", 0, 6, 8) + struct.pack("<4q", 0, 1, 2, 3))
    return buf.getvalue()


FUZZ = settings(max_examples=300, deadline=timedelta(milliseconds=500),
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_idx_arbitrary_bytes(data: bytes) -> None:
    for buf in (data, b"MMIDIDX\x00\x00" + data):
        try:
            parse_index(buf, "fuzz.idx", bin_size=18)
        except FormatError as exc:
            assert "fuzz.idx" in str(exc) or "bin" in str(exc)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 120), st.integers(0, 255)), max_size=6), st.integers(0, 130))
def test_fuzz_idx_mutated_header(edits: list[tuple[int, int]], cut: int) -> None:
    raw = bytearray(_valid_idx())
    for pos, value in edits:
        if pos < len(raw):
            raw[pos] = value
    try:
        index = parse_index(bytes(raw[: len(raw) - cut % 8 if cut > 100 else len(raw)]), "m.idx", bin_size=18)
    except FormatError:
        return
    assert index.lengths.min() >= 0


@FUZZ
@given(st.binary(max_size=3000))
def test_fuzz_tar_scan(data: bytes) -> None:
    def read(offset: int, length: int) -> bytes:
        return data[offset:offset + length]

    for on_error in ("raise", "skip"):
        try:
            scan_tar(read, len(data), "fuzz.tar", on_error)
        except FormatError as exc:
            assert "fuzz.tar" in str(exc)


def test_index_json_is_checked(tmp_path: Path) -> None:
    write_corpus(str(tmp_path / "c"), random_docs(5), format="megatron")
    path = tmp_path / "c" / "index.json"
    index = json.loads(path.read_text())
    index["shards"][0]["files"]["bin"]["path"] = "../escape.bin"
    path.write_text(json.dumps(index))
    with pytest.raises(CorruptIndexError, match=r"index\.json.*relative"):
        open_corpus(str(tmp_path / "c"))
    path.write_text("{not json")
    with pytest.raises(CorruptIndexError, match=r"index\.json"):
        open_corpus(str(tmp_path / "c"))
    shutil.rmtree(tmp_path / "c")


def _small_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(3):
            payload = io.BytesIO()
            np.save(payload, np.arange(i + 1, dtype=np.uint16))
            info = tarfile.TarInfo(f"{i:03d}.npy")
            info.size = len(payload.getvalue())
            tar.addfile(info, io.BytesIO(payload.getvalue()))
    return buf.getvalue()


SMALL_TAR = _small_tar()


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(SMALL_TAR) - 1), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, len(SMALL_TAR)))
def test_fuzz_tar_scan_mutated(edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(SMALL_TAR)
    for pos, value in edits:
        data[pos] = value
    blob = bytes(data[:cut])
    for on_error in ("raise", "skip"):
        try:
            rows, _, _ = scan_tar(lambda o, n: blob[o:o + n], len(blob), "fuzz.tar", on_error)
        except FormatError as exc:
            assert "fuzz.tar" in str(exc)
        else:
            assert rows.shape[1] == 4 and (rows.size == 0 or int(rows[:, 2].max()) <= len(blob))


def test_foreign_tar_with_pax_and_extra_members(tmp_path: Path) -> None:
    docs = random_docs(5, dtype=np.uint32)
    long_dir = "d" * 120
    with tarfile.open(tmp_path / "f.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for i, doc in enumerate(docs):
            for name, data in ((f"{long_dir}/s{i}.json", b"{}"), (f"{long_dir}/s{i}.tokens.npy", None)):
                if data is None:
                    payload = io.BytesIO()
                    np.save(payload, doc)
                    data = payload.getvalue()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with open_corpus(str(tmp_path / "f.tar")) as corpus:
        assert corpus.dtype == np.uint32
        assert all(np.array_equal(x, y) for x, y in zip(read_all(corpus), docs, strict=True))
