"""fusefs pieces without a mount: the inode table, the parallel paginated listing, config loading."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import s3fs

from fusefs.cli import build_parser, load_configs
from fusefs.namespace import ROOT_INODE, FileEntry, Namespace, list_origin
from lingcore.retry import RetryPolicy
from pcache.errors import ConfigError, OriginUnavailableError
from pcache.fs import build_target_fs
from pcache.testing import ChaosProxy, SeaweedServer


def _entry(version: str, size: int = 1) -> FileEntry:
    return FileEntry(size=size, mtime_ns=0, version=version)


def test_namespace_keeps_inodes_and_reports_changes() -> None:
    ns = Namespace()
    ns.apply({"a/b/x": _entry("1"), "a/y": _entry("1"), "z": _entry("1")})
    a = ns.child(ROOT_INODE, "a")
    assert a is not None and a.is_dir
    b = ns.child(a.ino, "b")
    assert b is not None
    x = ns.child(b.ino, "x")
    assert x is not None and x.entry == _entry("1")
    y = ns.child(a.ino, "y")
    assert y is not None
    changes = ns.apply({"a/b/x": _entry("2", 5), "z": _entry("1"), "new": _entry("1")})
    assert changes.changed == (x.ino,)
    assert (a.ino, "y") in changes.removed
    assert changes.added == 1
    x2 = ns.child(b.ino, "x")
    # a new version is a new inode (the kernel's page cache is per inode); its old name is dropped
    assert x2 is not None and x2.ino != x.ino and x2.entry == _entry("2", 5)
    assert (b.ino, "x") in changes.removed
    z = ns.child(ROOT_INODE, "z")
    assert z is not None and ns.apply({"a/b/x": _entry("2", 5), "z": _entry("1"), "new": _entry("1")}).changed == ()
    assert ns.child(ROOT_INODE, "z").ino == z.ino  # type: ignore[union-attr]  # unchanged: same inode
    assert ns.child(a.ino, "y") is None
    assert ns.total_bytes == 7


def test_object_that_is_also_a_prefix_shows_the_prefix() -> None:
    ns = Namespace()
    ns.apply({"d": _entry("1"), "d/f": _entry("1")})
    node = ns.child(ROOT_INODE, "d")
    assert node is not None and node.is_dir and "f" in node.children


def test_listing_is_paginated_and_parallel_by_prefix(s3_server: SeaweedServer, bucket: str,
                                                     chaos_proxy: Callable[..., ChaosProxy],
                                                     proxy_options: Callable[[ChaosProxy], dict[str, Any]]) -> None:
    direct = s3fs.S3FileSystem(**s3_server.storage_options(), skip_instance_cache=True)
    direct.pipe({f"{bucket}/p/d{i}/f{j:04d}": b"x" for i in range(4) for j in range(20)} |
                {f"{bucket}/p/d0/deep/many{j:04d}": b"y" for j in range(1001)} | {f"{bucket}/p/top": b"t"})
    proxy = chaos_proxy()
    fs = build_target_fs("s3", proxy_options(proxy), skip_instance_cache=True)
    listing = list_origin(fs, f"{bucket}/p", 8, RetryPolicy(attempts=2, base_delay=0.01), lambda p: f"s3://{p}")
    assert len(listing) == 4 * 20 + 1001 + 1
    assert listing["d0/deep/many1000"].size == 1 and listing["top"].version
    lists = [r for r in proxy.records() if r.method == "GET" and "list-type=2" in r.query]
    prefixes = {q.split("prefix=")[1].split("&")[0] for q in (r.query for r in lists) if "prefix=" in q}
    assert len(prefixes) >= 5  # the root, then each top-level prefix on its own
    assert sum("continuation-token" in r.query for r in lists) >= 1  # d0 has 1,021 keys: two pages


def test_listing_a_dead_origin_raises_origin_unavailable(chaos_proxy: Callable[..., ChaosProxy],
                                                         proxy_options: Callable[[ChaosProxy], dict[str, Any]],
                                                         bucket: str) -> None:
    proxy = chaos_proxy(fail_ratio=1.0)
    fs = build_target_fs("s3", proxy_options(proxy), skip_instance_cache=True)  # pcache's one retry layer
    with pytest.raises(OriginUnavailableError) as info:
        list_origin(fs, f"{bucket}/p", 4, RetryPolicy(attempts=2, base_delay=0.01), lambda p: f"s3://{p}")
    assert f"s3://{bucket}/p" in str(info.value)


def test_config_from_toml_env_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('[pcache]\nblock_size = "2MiB"\ncache_dir = "/tmp/x"\n[fusefs]\nrefresh = 30\nattr_timeout = 5\n')
    monkeypatch.setenv("FUSEFS_ENTRY_TIMEOUT", "7")
    args = build_parser().parse_args(["mount", "s3://b/p", "/mnt", "--config", str(toml), "--attr-timeout", "9"])
    mount, cache = load_configs(args)
    assert (mount.refresh, mount.entry_timeout, mount.attr_timeout) == (30, 7, 9)
    assert cache.block_size == 2 * 1024 * 1024 and cache.cache_dir == "/tmp/x"
    assert not mount.allow_other and not mount.foreground  # safe defaults


def test_bad_config_values_name_the_field(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('[fusefs]\nrefresh = "soon"\n')
    args = build_parser().parse_args(["mount", "s3://b/p", "/mnt", "--config", str(toml)])
    with pytest.raises(ConfigError, match="'refresh'.*c.toml"):
        load_configs(args)
    args = build_parser().parse_args(["mount", "s3://b/p", "/mnt", "--read-ahead", "lots"])
    with pytest.raises(ConfigError, match="read_ahead_bytes"):
        load_configs(args)
