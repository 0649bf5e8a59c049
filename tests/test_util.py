"""Shared helpers: retry with backoff, config precedence and typed errors, secret scrubbing."""

from __future__ import annotations

import random

import pytest

from lingcore.config import load_config, parse_size
from lingcore.retry import RetryPolicy, retry_call
from pcache import CacheConfig, ConfigError, OriginUnavailableError
from pcache.journal import merge_options, split_secrets


def test_retry_recovers_from_transient_errors() -> None:
    calls, sleeps = [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    assert retry_call(flaky, url="s3://b/k", sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2


def test_retry_gives_up_with_error_naming_url() -> None:
    def down() -> None:
        raise TimeoutError("timed out")

    with pytest.raises(OriginUnavailableError, match="s3://bucket/key after 4 attempts") as info:
        retry_call(down, url="s3://bucket/key", policy=RetryPolicy(attempts=4), sleep=lambda s: None)
    assert isinstance(info.value, OSError)


def test_retry_does_not_retry_missing_objects() -> None:
    calls = []

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("s3://b/missing")

    with pytest.raises(FileNotFoundError):
        retry_call(missing, url="s3://b/missing", sleep=lambda s: None)
    assert len(calls) == 1


def test_backoff_is_exponential_with_full_jitter() -> None:
    policy = RetryPolicy(base_delay=0.1, max_delay=1.0)
    rng = random.Random(0)
    for i in range(8):
        cap = min(1.0, 0.1 * 2**i)
        assert all(0 <= policy.delay(i, rng) <= cap for _ in range(50))


def test_parse_size() -> None:
    assert parse_size("4MiB") == 4 << 20
    assert parse_size("1g") == 1 << 30
    assert parse_size("512k") == 512 << 10
    assert parse_size(123) == 123
    with pytest.raises(ConfigError, match="disk_bytes"):
        parse_size("lots", "disk_bytes")


def test_config_precedence_file_env_flags(tmp_path) -> None:
    toml = tmp_path / "pcache.toml"
    toml.write_text('[pcache]\nblock_size = "1MiB"\nmemory_bytes = "64MiB"\ncompression = "zstd"\n')
    env = {"PCACHE_MEMORY_BYTES": "32MiB"}
    cfg = load_config(CacheConfig, toml_path=toml, env=env, overrides={"compression": "none",
                                                                      "cache_dir": str(tmp_path)})
    assert cfg.block_size == 1 << 20  # file
    assert cfg.memory_bytes == 32 << 20  # env beats file
    assert cfg.compression == "none"  # flag beats env and file


@pytest.mark.parametrize(
    ("text", "field"),
    [('block_size = "huge"', "block_size"), ('compression = "lz4"', "compression"),
     ("nonsense = 1", "nonsense"), ("fetch_workers = 0", "fetch_workers")],
)
def test_invalid_config_names_the_field(tmp_path, text: str, field: str) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text(f"[pcache]\n{text}\n")
    with pytest.raises(ConfigError, match=field):
        CacheConfig.load(str(toml), cache_dir=str(tmp_path))


def test_invalid_env_names_the_variable(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PCACHE_READAHEAD_BLOCKS", "many")
    with pytest.raises(ConfigError, match="PCACHE_READAHEAD_BLOCKS"):
        CacheConfig.load(cache_dir=str(tmp_path))


def test_secrets_are_split_out_of_storage_options() -> None:
    options = {"key": "AKIA", "secret": "s3cr3t", "token": "t",
               "client_kwargs": {"endpoint_url": "http://127.0.0.1:1", "aws_secret_access_key": "x"}}
    public, secret = split_secrets(options)
    assert "s3cr3t" not in repr(public) and "AKIA" not in repr(public) and "x" not in repr(public.values())
    assert public == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}}
    assert merge_options(public, secret) == options


def test_debug_logging_never_lets_credential_bearing_libraries_through(capsys) -> None:
    import logging

    from lingcore.log import SECRET_BEARING_LOGGERS, setup_logging

    setup_logging("DEBUG")
    try:
        for name in SECRET_BEARING_LOGGERS:
            logging.getLogger(name).debug("Authorization: AWS4-HMAC-SHA256 Credential=AKIA/secret")
        logging.getLogger("pcache.test").debug("our own debug line")
        err = capsys.readouterr().err
        assert "our own debug line" in err and "AKIA" not in err
    finally:
        setup_logging("INFO")


def test_write_private_is_owner_only_even_when_replacing_a_readable_file(tmp_path) -> None:
    import stat

    from lingcore.files import write_private

    path = tmp_path / "creds"
    path.write_text("old")
    path.chmod(0o644)
    write_private(path, b"secret")
    assert path.read_bytes() == b"secret" and stat.S_IMODE(path.stat().st_mode) == 0o600
    write_private(tmp_path / "new", b"x")
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o600
