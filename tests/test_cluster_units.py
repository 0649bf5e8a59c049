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


def _replica(journal, data: bytes, url: str, path: str, created: float) -> str:
    import uuid

    from lingcore.checksum import content_hash

    rid = uuid.uuid4().hex
    with open(journal.data_path(rid), "wb") as fh:
        fh.write(data)
    journal.add_replica({"id": rid, "source_id": uuid.uuid4().hex, "source_node": "w", "url": url,
                         "protocol": "file", "path": path, "options": {}, "size": len(data),
                         "xxh3_128": content_hash(data), "created": created})
    return rid


def test_a_stale_replica_never_overwrites_a_newer_origin_write(tmp_path) -> None:
    """Adoption (``pcache flush`` on the peer) drops replicas the origin already has or has superseded."""
    import time

    from pcache.config import CacheConfig
    from pcache.uploader import Uploader

    origin = tmp_path / "origin"
    origin.mkdir()
    uploader = Uploader(CacheConfig(cache_dir=str(tmp_path / "peer")))
    journal = uploader.journal
    newer, same, missing = origin / "newer.bin", origin / "same.bin", origin / "missing.bin"
    newer.write_bytes(b"version 2")  # written after the replica of version 1 was created
    _replica(journal, b"version 1", f"file://{newer}", str(newer), created=time.time() - 60)
    same.write_bytes(b"identical")  # the writer's own upload landed (the DELETE was lost)
    _replica(journal, b"identical", f"file://{same}", str(same), created=time.time() + 60)
    _replica(journal, b"lost write", f"file://{missing}", str(missing), created=time.time())
    assert journal.pending_bytes() == len(b"version 1identicallost write")
    assert uploader.adopt_replicas() == {"adopted": 1, "dropped": 2, "failed": 0}
    assert uploader.drain() == []
    assert newer.read_bytes() == b"version 2" and missing.read_bytes() == b"lost write"
    assert journal.replicas() == [] and journal.pending() == [] and journal.pending_bytes() == 0
    assert [n for n in os.listdir(journal.dir) if n.endswith(".data")] == [], "dropped replicas left files"


def test_an_older_replica_of_a_url_is_superseded_on_arrival(tmp_path) -> None:
    from pcache.journal import Journal

    journal = Journal(str(tmp_path / "peer"))
    _replica(journal, b"v1", "file:///x", "/x", created=100.0)
    _replica(journal, b"v2", "file:///x", "/x", created=200.0)
    _replica(journal, b"v0", "file:///x", "/x", created=50.0)  # late arrival of an even older write
    (kept,) = journal.replicas()
    assert kept["created"] == 200.0 and journal.pending_bytes() == 2


def test_a_journal_without_the_byte_counter_is_counted_once_and_deletes_stay_exact(tmp_path) -> None:
    from pcache.journal import Journal

    journal = Journal(str(tmp_path / "c"))
    for i, size in enumerate((7, 11)):
        journal.add_replica({"id": f"r{i}", "source_id": f"s{i}", "source_node": "n", "url": f"s3://b/{i}",
                             "protocol": "s3", "path": f"b/{i}", "options": {}, "size": size, "xxh3_128": "x",
                             "created": 1.0})
    with journal.env.begin(write=True) as txn:  # as a journal written before the counter existed
        txn.delete(b"pending_bytes", db=journal.meta_db)
    reopened = Journal(str(tmp_path / "c"))
    assert reopened.pending_bytes() == 18
    assert reopened.drop_replica("s0") == "r0"
    assert reopened.pending_bytes() == 11  # not 18 - 11 - 7: the delete did not recount first
