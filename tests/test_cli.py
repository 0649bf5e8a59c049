"""The pcache CLI: stat, warm, verify, gc, flush, config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import s3fs

from pcache.diskstore import HEADER

MiB = 1024 * 1024


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pcache.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_help_explains_every_command() -> None:
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in ("stat", "warm", "flush", "verify", "gc"):
        assert cmd in out.stdout
    sub = run_cli("warm", "--help")
    assert "--endpoint-url" in sub.stdout and "PCACHE_" in sub.stdout


def test_invalid_config_exits_2_naming_the_field(tmp_path) -> None:
    out = run_cli("stat", "--cache-dir", str(tmp_path), env={"PCACHE_DISK_BYTES": "plenty"})
    assert out.returncode == 2
    assert "disk_bytes" in out.stderr and "PCACHE_DISK_BYTES" in out.stderr


def test_warm_stat_verify_gc(tmp_path, s3_server, s3_options, bucket) -> None:
    s3 = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options)
    for i in range(3):
        s3.pipe_file(f"{bucket}/ds/shard-{i}.bin", os.urandom(3 * MiB))
    cache = str(tmp_path / "c")
    env = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
           "AWS_ENDPOINT_URL": s3_server.endpoint_url, "PCACHE_BLOCK_SIZE": "1MiB"}
    warm = run_cli("warm", "--cache-dir", cache, "--json", f"s3://{bucket}/ds/", env=env)
    assert warm.returncode == 0, warm.stderr
    assert json.loads(warm.stdout) == {"files": 3, "bytes": 9 * MiB}

    stat = json.loads(run_cli("stat", "--cache-dir", cache, "--json", env=env).stdout)
    assert stat["disk_blocks"] == 9 and stat["misses"] == 9 and stat["pending_uploads"] == 0
    human = run_cli("stat", "--cache-dir", cache, env=env).stdout
    assert "hit ratio" in human and "pending uploads" in human

    assert run_cli("verify", "--cache-dir", cache, env=env).returncode == 0
    block = next(p for p in (tmp_path / "c" / "blocks").rglob("*") if p.is_file())
    raw = bytearray(block.read_bytes())
    raw[HEADER.size + 5] ^= 0x01
    block.write_bytes(bytes(raw))
    bad = run_cli("verify", "--cache-dir", cache, "--json", env=env)
    assert bad.returncode == 1 and json.loads(bad.stdout)["corrupt"] == [str(block)]
    assert not block.exists()

    stale = tmp_path / "c" / "tmp" / "leftover"
    stale.write_bytes(b"x")
    os.utime(stale, (0, 0))
    orphan = tmp_path / "c" / "writeback" / "deadbeef.data"
    orphan.write_bytes(b"y")
    os.utime(orphan, (0, 0))
    # A writer renames its .data file into place just before its journal entry commits: a fresh
    # staged file without an entry may be exactly that, and must survive gc.
    in_flight = tmp_path / "c" / "writeback" / "c0ffee.data"
    in_flight.write_bytes(b"z")
    gc = json.loads(run_cli("gc", "--cache-dir", cache, "--json", env=env).stdout)
    assert gc["removed_tmp"] == 1 and gc["orphan_staged"] == 1
    assert not stale.exists() and not orphan.exists() and in_flight.exists()
    # Warm again: only the dropped block comes from the origin.
    run_cli("warm", "--cache-dir", cache, f"s3://{bucket}/ds/", env=env)
    assert json.loads(run_cli("stat", "--cache-dir", cache, "--json", env=env).stdout)["misses"] == 10


def test_flush_with_nothing_pending(tmp_path) -> None:
    out = run_cli("flush", "--cache-dir", str(tmp_path), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["uploaded"] == 0
