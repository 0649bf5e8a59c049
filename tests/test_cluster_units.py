"""Cluster building blocks: rendezvous placement and HMAC request signing."""

from __future__ import annotations

import os

import pytest

from pcache.cluster import AuthError, Placement, load_token, owners, sign_request, verify_request

KEYS = [os.urandom(16) for _ in range(20000)]


def nodes(n: int) -> list[str]:
    return [f"http://127.0.0.1:{9000 + i}" for i in range(n)]


def test_a_joining_node_moves_at_most_1_25_over_n_of_the_keys() -> None:
    before, after = Placement(nodes(3)), Placement(nodes(4))
    moved = sum(before.owner(k) != after.owner(k) for k in KEYS)
    assert moved / len(KEYS) <= 1.25 / 4, moved / len(KEYS)
    # Every moved key moved to the new node: nothing shuffles between nodes that stayed.
    assert all(after.owner(k) == nodes(4)[3] for k in KEYS if before.owner(k) != after.owner(k))


def test_load_is_balanced_and_order_independent() -> None:
    placement = Placement(nodes(4))
    counts = {n: 0 for n in nodes(4)}
    for k in KEYS:
        counts[placement.owner(k)] += 1
    assert max(counts.values()) / min(counts.values()) < 1.15
    assert all(owners(k, reversed(nodes(4))) == owners(k, nodes(4)) for k in KEYS[:500])


def test_dead_owner_falls_back_to_the_next_ranked_node() -> None:
    placement = Placement(nodes(3))
    for k in KEYS[:500]:
        ranked = placement.ranked(k)
        assert placement.without([ranked[0]]).owner(k) == ranked[1]


def test_signed_request_verifies() -> None:
    secret = b"s" * 32
    headers = sign_request(secret, "GET", "/blocks/abc?r=1")
    verify_request(secret, "GET", "/blocks/abc?r=1", headers)


@pytest.mark.parametrize("tamper", ["wrong_secret", "other_path", "other_method", "stale", "missing", "bad_date"])
def test_bad_signatures_are_refused(tamper: str) -> None:
    secret = b"s" * 32
    headers = sign_request(secret, "GET", "/blocks/abc", now=1_000_000)
    method, path, now = "GET", "/blocks/abc", 1_000_000.0
    if tamper == "wrong_secret":
        headers = sign_request(b"t" * 32, "GET", "/blocks/abc", now=1_000_000)
    elif tamper == "other_path":
        path = "/blocks/abd"
    elif tamper == "other_method":
        method = "DELETE"
    elif tamper == "stale":
        now += 3600
    elif tamper == "missing":
        headers = {}
    elif tamper == "bad_date":
        headers = {**headers, "X-Pcache-Date": "yesterday"}
    with pytest.raises(AuthError) as info:
        verify_request(secret, method, path, headers, now=now)
    assert "s" * 32 not in str(info.value)


def test_token_file_errors_name_the_file(tmp_path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="nope"):
        load_token(str(missing))
    short = tmp_path / "short"
    short.write_text("abc")
    short.chmod(0o600)
    with pytest.raises(ValueError, match="short.*at least 16"):
        load_token(str(short))
    loose = tmp_path / "loose"
    loose.write_text("x" * 32)
    loose.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_token(str(loose))
    good = tmp_path / "good"
    good.write_text("y" * 32 + "\n")
    good.chmod(0o600)
    assert load_token(str(good)) == b"y" * 32
