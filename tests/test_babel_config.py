"""babel_sync configuration: the issue's TOML, and a typed error naming the field for each bad input."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from babel_sync import ConfigError, UnknownSiteError, load_config
from babel_sync.cli import build_parser, main
from babel_sync.config import Rule
from babel_sync.listdb import ListingStore
from babel_sync.listing import Entry
from babel_sync.shard import part_size
from babel_sync.units import (
    complete_units,
    glob_regex,
    list_prefix,
    matcher,
    natural_key,
    owned_files,
    watch_names,
)

ISSUE_TOML = """
[sites.a]
url = "s3://data"                        # any fsspec root
endpoint_url = "http://127.0.0.1:8333"   # storage options go beside url
[sites.b]
url = "s3://data"
endpoint_url = "http://127.0.0.1:8334"
[[rules]]
name = "datasets"
source = "a"
destinations = ["b"]
include = ["datasets/**"]
unit_marker = "_COMMITTED"   # optional: what makes a directory a complete unit
"""
ENV = {"AWS_ACCESS_KEY_ID": "AKIDTEST", "AWS_SECRET_ACCESS_KEY": "very-secret-value"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "babel.toml"
    path.write_text(text)
    return path


def test_issue_toml_loads_with_env_credentials(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ISSUE_TOML), env=ENV)
    a = cfg.sites["a"]
    assert (a.url, a.endpoint_url, a.key, a.secret) == ("s3://data", "http://127.0.0.1:8333", "AKIDTEST",
                                                         "very-secret-value")
    rule = cfg.rule("datasets")
    assert rule.destinations == ("b",) and rule.include == ("datasets/**",) and rule.unit_marker == "_COMMITTED"
    assert "very-secret-value" not in repr(cfg)  # secrets never reach reprs or logs


def test_endpoint_from_env_and_sync_options_precedence(tmp_path: Path) -> None:
    text = ISSUE_TOML.replace('endpoint_url = "http://127.0.0.1:8334"', "") + '[sync]\ntransfers = 3\n'
    env = {**ENV, "AWS_ENDPOINT_URL": "http://127.0.0.1:9999", "BABEL_PART_CONCURRENCY": "5"}
    cfg = load_config(write(tmp_path, text), env=env, overrides={"bandwidth_limit_bytes": "10MiB"})
    assert cfg.sites["b"].endpoint_url == "http://127.0.0.1:9999"
    assert (cfg.options.transfers, cfg.options.part_concurrency) == (3, 5)
    assert cfg.options.bandwidth_limit_bytes == 10 * 1024 * 1024


@pytest.mark.parametrize("mutate, field", [
    (lambda t: t.replace('destinations = ["b"]', 'destinations = ["c"]'), "rules[0].destinations[0]"),
    (lambda t: t.replace('source = "a"', 'source = "nowhere"'), "rules[0].source"),
    (lambda t: t.replace('url = "s3://data"                        # any fsspec root', ""), "sites.a.url"),
    (lambda t: t.replace('name = "datasets"', ""), "rules[0].name"),
    (lambda t: t + 'priority = "urgent"\n', "rules[0].priority"),
    (lambda t: t + "keep_last = -1\n", "rules[0].keep_last"),
    (lambda t: t + "delete = \"yes\"\n", "rules[0].delete"),
    (lambda t: t + "colour = 1\n", "rules[0].colour"),
    (lambda t: t.replace('endpoint_url = "http://127.0.0.1:8333"', 'endpoint_url = "localhost"'),
     "sites.a.endpoint_url"),
    (lambda t: t.replace('endpoint_url = "http://127.0.0.1:8333"', 'credentials_file = "missing.ini"'),
     "sites.a.credentials_file"),
    (lambda t: t.replace('url = "s3://data"\nendpoint', 'url = "s3://data"\nbogus = 1\nendpoint'), "sites.b.bogus"),
    (lambda t: "[sync]\ntransfers = \"many\"\n" + t, "transfers"),
    (lambda t: "[sync]\nwhatever = 1\n" + t, "whatever"),
    (lambda t: t + "[[rules]]\nname = \"datasets\"\nsource = \"a\"\ndestinations = [\"b\"]\n", "rules"),
])
def test_bad_config_names_the_field(tmp_path: Path, mutate, field: str) -> None:
    path = write(tmp_path, mutate(ISSUE_TOML))
    with pytest.raises(ConfigError) as info:
        load_config(path, env=ENV)
    assert info.value.field == field
    assert str(path) in str(info.value)


def test_unknown_site_is_its_own_type(tmp_path: Path) -> None:
    with pytest.raises(UnknownSiteError, match="unknown site 'c'.*defined sites: a, b"):
        load_config(write(tmp_path, ISSUE_TOML.replace('["b"]', '["c"]')), env=ENV)


def test_malformed_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[sites.a\nurl = 1")
    with pytest.raises(ConfigError, match="babel.toml"):
        load_config(path, env=ENV)


def test_credentials_file_profiles(tmp_path: Path) -> None:
    (tmp_path / "creds").write_text("[prod]\naws_access_key_id = AKPROD\naws_secret_access_key = s3cr3t\n")
    text = ISSUE_TOML.replace('endpoint_url = "http://127.0.0.1:8333"',
                              'credentials_file = "creds"\ncredentials_profile = "prod"')
    cfg = load_config(write(tmp_path, text), env={})
    assert (cfg.sites["a"].key, cfg.sites["a"].secret) == ("AKPROD", "s3cr3t")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text.replace('"prod"', '"dev"')), env={})
    assert info.value.field == "sites.a.credentials_profile"


def test_cli_bad_config_exits_2_with_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, ISSUE_TOML.replace('["b"]', '["c"]'))
    assert main(["once", "--config", str(path)]) == 2
    assert "rules[0].destinations[0]" in capsys.readouterr().err
    monkeypatch.delenv("BABEL_CONFIG", raising=False)
    assert main(["once"]) == 2
    assert "--config" in capsys.readouterr().err
    logging.getLogger().handlers.clear()


def test_help_explains_every_command() -> None:
    out = subprocess.run([sys.executable, "-m", "babel_sync.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for word in ("once", "run", "status", "verify", "AWS_ACCESS_KEY_ID", "docs/babel_sync.md"):
        assert word in out
    args = build_parser().parse_args(["verify", "datasets", "--sample", "0.1"])
    assert (args.rule, args.sample, args.full) == ("datasets", 0.1, False)


def test_globs_units_and_part_sizes(tmp_path: Path) -> None:
    assert glob_regex("datasets/**").match("datasets/v1/a/b")
    assert not glob_regex("datasets/*").match("datasets/v1/a")
    assert list_prefix("checkpoints/run1/**") == "checkpoints/run1/" and list_prefix("d*/x") == ""
    assert sorted(["step_10", "step_9"], key=natural_key) == ["step_9", "step_10"]
    rule = Rule("r", "a", ("b",), include=("d/**",))
    listing = ListingStore(str(tmp_path / "state")).new(watch_names(rule), matcher(rule, "_M"))
    keys = ["d/v1/_COMMITTED", "d/v1/a", "d/v1/sub/b", "d/v1/_M", "d/v2/a", "x/_COMMITTED",
            "d/v3/_COMMITTED", "d/v3/_PACKING", "d/v3/a"]  # v3: a pack was re-run over it, not complete
    listing.add([Entry(k, 1, "e", 0.0) for k in keys])
    units = complete_units(listing, rule, "_M")
    assert list(units) == ["d/v1"]
    files = owned_files(listing, "d/v1", "d/v1/_COMMITTED", units, sorted(units), rule, "_M", matcher(rule, "_M"))
    assert [k for k, _ in files] == ["d/v1/a", "d/v1/sub/b"]
    assert (listing.objects, listing.bytes) == (7, 7)  # what the rule matches (not x/, not the manifest)
    cfg = load_config(write(tmp_path, ISSUE_TOML), env=ENV).options
    assert part_size(256 << 20, cfg) == 8 << 20  # four parts per slot: 256 MiB / 32, at least min_part_size
    assert part_size(1 << 30, cfg) == 32 << 20
    assert part_size(100 << 30, cfg) == 256 << 20
    assert part_size(1 << 20, cfg) == cfg.min_part_size


def test_connection_errors_never_carry_presigned_query_strings() -> None:
    import urllib3

    from babel_sync.s3http import _scrub

    url = "/b?list-type=2&X-Amz-Credential=AKIAX%2F&X-Amz-Security-Token=SESSION&X-Amz-Signature=abc"
    text = _scrub(urllib3.exceptions.MaxRetryError(None, url, "refused"))  # type: ignore[arg-type]
    assert "SESSION" not in text and "Signature" not in text and "/b?" in text
