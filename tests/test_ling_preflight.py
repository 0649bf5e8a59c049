"""Preflight and one-line store errors: a stopped endpoint, a wrong secret and a missing bucket are each
refused within 30 s with exit 2 and one line naming the URL and the case, by ling-train (data and
checkpoint side), loaders inspect, pcache warm and babel-sync, against the real SeaweedFS."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from babel_sync.cli import main as babel_main
from ling_train.corpus import sample_texts, write_text_corpus
from lingcore.errors import StoreForbiddenError, StoreNotFoundError, StoreUnreachableError
from lingcore.probe import classify
from loaders.cli import main as loaders_main
from pcache.cli import main as pcache_main
from pcache.s3server import REGION
from pcache.testing import SeaweedServer

CASES = ("stopped endpoint", "wrong secret", "missing bucket")
WORDS = {"stopped endpoint": "unreachable", "wrong secret": "forbidden", "missing bucket": "not found"}


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: nothing listens, connections are refused


def _aws_env(server: SeaweedServer, case: str) -> dict[str, str]:
    """The AWS variables a user would set, broken the way ``case`` says."""
    return {"AWS_ACCESS_KEY_ID": server.access_key,
            "AWS_SECRET_ACCESS_KEY": "not-the-secret" if case == "wrong secret" else server.secret_key,
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_dead_port()}" if case == "stopped endpoint"
            else server.endpoint_url,
            "AWS_REGION": REGION}


@pytest.fixture
def s3_corpus(s3_server: SeaweedServer, bucket: str) -> str:
    url = f"s3://{bucket}/corpus"
    write_text_corpus(url, sample_texts(40, seed=3), storage_options=s3_server.storage_options())
    return url


def _url_for(case: str, url: str) -> str:
    return url.replace("test-bucket-", "no-such-bucket-") if case == "missing bucket" else url


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _ling_train(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ling_train.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})
    return proc, time.monotonic() - t0


@pytest.mark.parametrize("case", CASES)
def test_ling_train_refuses_unusable_data_before_step_1(case: str, s3_server: SeaweedServer, s3_corpus: str,
                                                        tmp_path: Path) -> None:
    url = "pcache::" + _url_for(case, s3_corpus)
    proc, seconds = _ling_train(["--data", url, "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                                 "--cache-dir", str(tmp_path / "cache")], _aws_env(s3_server, case))
    line = _one_line(proc.stderr)
    assert proc.returncode == 2 and seconds < 30, (proc.returncode, seconds, proc.stderr)
    assert url in line and f": {WORDS[case]}: " in line, line
    if case == "missing bucket":
        assert "bucket 'no-such-bucket-" in line and "does not exist" in line
    assert s3_server.secret_key not in proc.stderr


@pytest.mark.parametrize("case", ["stopped endpoint"])  # the data-side test covers the other cases' wording
def test_ling_train_refuses_an_unusable_checkpoint_root_before_training(case: str, s3_server: SeaweedServer,
                                                                       bucket: str, tmp_path: Path) -> None:
    corpus = str(tmp_path / "corpus")
    write_text_corpus(corpus, sample_texts(40, seed=4))
    ckpt = f"pcache::s3://{'no-such-bucket-x' if case == 'missing bucket' else bucket}/run"
    cache = tmp_path / "cache"
    proc, seconds = _ling_train(["--data", corpus, "--ckpt", ckpt, "--steps", "2", "--batch-size", "2",
                                 "--seq-len", "32", "--cache-dir", str(cache)], _aws_env(s3_server, case))
    line = _one_line(proc.stderr)
    assert proc.returncode == 2 and seconds < 30, (proc.returncode, seconds, proc.stderr)
    assert line.startswith(f"ling-train: {ckpt}: {WORDS[case]}: "), line
    from pcache import CacheConfig
    from pcache.admin import pending_uploads

    assert not cache.exists() or pending_uploads(CacheConfig.load(cache_dir=str(cache))) == []  # nothing staged


@pytest.mark.parametrize("case", CASES)
def test_loaders_inspect_gives_one_line_per_case(case: str, s3_server: SeaweedServer, s3_corpus: str,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    for key, value in _aws_env(s3_server, case).items():
        monkeypatch.setenv(key, value)
    url = _url_for(case, s3_corpus)
    t0 = time.monotonic()
    code = loaders_main(["inspect", url])
    seconds = time.monotonic() - t0
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and seconds < 30, (code, seconds)
    assert line.startswith(f"loaders inspect: error: {url}: {WORDS[case]}: "), line


def test_loaders_inspect_traceback_only_at_debug(s3_server: SeaweedServer, s3_corpus: str, tmp_path: Path) -> None:
    env = {**os.environ, **_aws_env(s3_server, "wrong secret")}
    proc = subprocess.run([sys.executable, "-m", "loaders.cli", "inspect", s3_corpus, "--log-level", "DEBUG"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert f"{s3_corpus}: forbidden: " in proc.stderr and s3_server.secret_key not in proc.stderr


def test_pcache_warm_forbidden_names_the_url(s3_server: SeaweedServer, s3_corpus: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    for key, value in _aws_env(s3_server, "wrong secret").items():
        monkeypatch.setenv(key, value)
    code = pcache_main(["warm", "--cache-dir", str(tmp_path / "cache"), s3_corpus])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and line.startswith(f"pcache warm: error: {s3_corpus}: forbidden: "), line


def test_babel_sync_missing_source_bucket_is_one_line_naming_it(s3_server: SeaweedServer, bucket: str,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    for key, value in _aws_env(s3_server, "missing bucket").items():
        monkeypatch.setenv(key, value)
    config = tmp_path / "babel.toml"
    config.write_text(f"""
[sites.a]
url = "s3://no-such-bucket-babel"
[sites.b]
url = "s3://{bucket}"
[[rules]]
name = "r"
source = "a"
destinations = ["b"]
include = ["data/**"]
""")
    code = babel_main(["once", "--config", str(config), "--state-dir", str(tmp_path / "state")])
    out, err = capsys.readouterr()
    line = _one_line(err)
    assert code == 1 and line.startswith("babel-sync once: error: rule 'r' -> b: s3://no-such-bucket-babel"), line
    assert "not found: bucket 'no-such-bucket-babel' does not exist" in line
    [record] = json.loads(out)["errors"]
    assert record["url"] == "s3://no-such-bucket-babel"  # the site that failed, not the destination


def _client_error(code: str, status: int) -> Any:
    return botocore.exceptions.ClientError({"Error": {"Code": code, "Message": "m"},
                                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def test_classify_names_each_case() -> None:
    url = "s3://b/k"
    refused = botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b/k")
    assert isinstance(classify(refused, url, "http://127.0.0.1:9"), StoreUnreachableError)
    wrapped = PermissionError("Forbidden")
    wrapped.__cause__ = _client_error("SignatureDoesNotMatch", 403)
    forbidden = classify(wrapped, url, "http://e")
    assert isinstance(forbidden, StoreForbiddenError) and "SignatureDoesNotMatch" in str(forbidden)
    missing = classify(_client_error("NoSuchBucket", 404), url, "http://e")
    assert isinstance(missing, StoreNotFoundError) and "bucket 'b' does not exist" in str(missing)
    assert classify(ValueError("a bug, not a store"), url) is None
    assert str(forbidden).startswith(f"{url}: forbidden: ") and "\n" not in str(forbidden)
