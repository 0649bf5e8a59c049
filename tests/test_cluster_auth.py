"""A real ``pcache serve`` process: malformed auth headers get 401 (never 500), and /metrics is scrapable
unsigned on its own port while every route of the main port stays signed."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from pcache.cluster.auth import (
    DATE_HEADER,
    SIGNATURE_HEADER,
    AuthError,
    load_token,
    sign_request,
    verify_request,
)
from pcache.cluster.protocol import block_query
from pcache.testing import NodeProcess, write_token

PY = sys.executable
BLOCK = block_query("bucket/key", "v1", 10, 0)
PATHS = [BLOCK, "/metrics", "/v1/replica?source_id=x", "/no/such/route", "/"]
METHODS = ["GET", "HEAD", "PUT", "DELETE", "POST"]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node over the local file system (no S3 needed: these requests never reach the origin)."""
    tmp = tmp_path_factory.mktemp("auth")
    proc = NodeProcess(tmp / "cache", write_token(tmp / "token"), "http://127.0.0.1:1", dict(os.environ),
                       ("--origin-protocol", "file"))
    proc.start()
    yield proc
    assert proc.stop() == 0


def request(url: str, method: str, path: str, headers: list[tuple[str, bytes]]) -> int:
    """Send one request with exactly these header lines (repeats and raw bytes kept); return the status."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def signed(node: NodeProcess, method: str, path: str) -> list[tuple[str, bytes]]:
    return [(k, v.encode()) for k, v in sign_request(load_token(node.token_file), method, path).items()]


# Characters an HTTP field value may carry (no control characters); non-ASCII travels as UTF-8 bytes.
FIELD_TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=80)
DATES = st.one_of(
    FIELD_TEXT,
    st.integers(-10**400, 10**400).map(str),  # huge numbers: int() works, the skew arithmetic overflows
    st.text("0123456789", min_size=17, max_size=400),
    st.text("٠١٢٣٤٥٦٧٨٩", min_size=1, max_size=12),  # Arabic-Indic digits: int() accepts them
    st.just(""), st.just(str(int(time.time()))), st.just(f" {int(time.time())} "), st.just("1_700_000_000"),
)
SIGNATURES = st.one_of(
    FIELD_TEXT,
    st.text("0123456789abcdef", max_size=80),
    st.text("0123456789abcdefé", min_size=64, max_size=64),
    st.just(""), st.just("0" * 64), st.just("é" * 64),
)


def header_lines(name: str, values: st.SearchStrategy[str]) -> st.SearchStrategy[list[tuple[str, bytes]]]:
    """The header absent, once, or repeated."""
    return st.lists(values.map(lambda v: (name, v.encode())), max_size=3)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(METHODS), path=st.sampled_from(PATHS), dates=header_lines(DATE_HEADER, DATES),
       signatures=header_lines(SIGNATURE_HEADER, SIGNATURES))
def test_any_malformed_or_missing_auth_header_gets_401(node, method, path, dates, signatures) -> None:
    assert request(node.url, method, path, dates + signatures) == 401


@settings(max_examples=500, deadline=None)
@given(dates=header_lines(DATE_HEADER, DATES | st.text(max_size=40)),
       signatures=header_lines(SIGNATURE_HEADER, SIGNATURES | st.text(max_size=80)),
       path=st.text(st.characters(blacklist_categories=()), max_size=40))
def test_verify_request_raises_only_auth_error(dates, signatures, path) -> None:
    """The check itself, without the server's safety net: any header shape is an AuthError, nothing else
    (paths with lone surrogates included, as a server may decode undecodable bytes to them)."""
    headers = CIMultiDict((name, value.decode()) for name, value in dates + signatures)
    with pytest.raises(AuthError):
        verify_request(b"s" * 32, "GET", "/" + path, headers)
    well_formed = sign_request(b"t" * 32, "GET", "/" + path)  # fresh and well formed, wrong secret
    with pytest.raises(AuthError, match="invalid signature"):
        verify_request(b"s" * 32, "GET", "/" + path, well_formed)


@pytest.mark.parametrize("case", ["huge_date", "non_ascii_signature", "non_ascii_date", "empty_date",
                                  "empty_signature", "duplicated_date", "duplicated_signature", "short_signature",
                                  "non_hex_signature", "unicode_digits_date", "negative_date", "spaced_date"])
def test_explicit_malformed_headers_get_401(node, case: str) -> None:
    good = dict(signed(node, "GET", BLOCK))
    date, sig = good[DATE_HEADER], good[SIGNATURE_HEADER]
    lines = {
        "huge_date": [(DATE_HEADER, b"9" * 400), (SIGNATURE_HEADER, sig)],
        "non_ascii_signature": [(DATE_HEADER, date), (SIGNATURE_HEADER, "é".encode() * 32)],
        "non_ascii_date": [(DATE_HEADER, "١٧".encode()), (SIGNATURE_HEADER, sig)],
        "empty_date": [(DATE_HEADER, b""), (SIGNATURE_HEADER, sig)],
        "empty_signature": [(DATE_HEADER, date), (SIGNATURE_HEADER, b"")],
        "duplicated_date": [(DATE_HEADER, date), (DATE_HEADER, date), (SIGNATURE_HEADER, sig)],
        "duplicated_signature": [(DATE_HEADER, date), (SIGNATURE_HEADER, sig), (SIGNATURE_HEADER, sig)],
        "short_signature": [(DATE_HEADER, date), (SIGNATURE_HEADER, sig[:10])],
        "non_hex_signature": [(DATE_HEADER, date), (SIGNATURE_HEADER, b"z" * 64)],
        "unicode_digits_date": [(DATE_HEADER, "١٧٠٠٠٠٠٠٠٠".encode()), (SIGNATURE_HEADER, sig)],
        "negative_date": [(DATE_HEADER, b"-" + date), (SIGNATURE_HEADER, sig)],
        "spaced_date": [(DATE_HEADER, b"1_" + date), (SIGNATURE_HEADER, sig)],
    }[case]
    assert request(node.url, "GET", BLOCK, lines) == 401
    assert node.proc is not None and node.proc.poll() is None


def test_a_correct_signature_still_passes(node) -> None:
    """The shape checks refuse nothing the client sends: a signed block request reaches the handler."""
    status = request(node.url, "GET", BLOCK, signed(node, "GET", BLOCK))
    assert status not in (401, 500), status
    assert request(node.url, "GET", "/metrics", signed(node, "GET", "/metrics")) == 200


def test_metrics_port_serves_prometheus_unsigned_and_the_main_port_stays_signed(node) -> None:
    assert node.metrics_url, "the node opened no metrics port"
    metrics = urlsplit(node.metrics_url)
    assert metrics.hostname == "127.0.0.1" and metrics.port != urlsplit(node.url).port
    conn = http.client.HTTPConnection(metrics.hostname, metrics.port, timeout=10)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    body = resp.read().decode()
    assert resp.status == 200 and resp.getheader("Content-Type", "").startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(body)}
    assert {"pcache_hits", "pcache_misses", "pcache_upload_queue_depth"} <= names
    assert request(node.metrics_url, "GET", BLOCK, []) == 404  # nothing but /metrics on that port
    assert request(node.url, "GET", "/metrics", []) == 401
    assert request(node.url, "GET", BLOCK, []) == 401


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_metrics_listen_from_env_and_off(tmp_path) -> None:
    token = write_token(tmp_path / "token")
    port = free_port()
    env = dict(os.environ, PCACHE_METRICS_LISTEN=f"127.0.0.1:{port}")
    # No --metrics-listen flag: the port comes from PCACHE_METRICS_LISTEN.
    cmd = [PY, "-m", "pcache.cli", "serve", "--listen", "127.0.0.1:0", "--cache-dir", str(tmp_path / "a"),
           "--token-file", token, "--origin-protocol", "file"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"metrics=http://127.0.0.1:{port}/metrics" in line, line
        assert request(f"http://127.0.0.1:{port}", "GET", "/metrics", []) == 200
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
    off = NodeProcess(tmp_path / "b", token, "http://127.0.0.1:1", dict(os.environ),
                      ("--origin-protocol", "file", "--metrics-listen", "off"))
    off.start()
    try:
        assert off.metrics_url == ""
    finally:
        assert off.stop() == 0
    bad = subprocess.run([*cmd, "--metrics-listen", "nowhere"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "metrics_listen" in bad.stderr
