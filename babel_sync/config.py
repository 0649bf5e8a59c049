"""Configuration: sites, rules and sync options from one TOML file (plus env and flags for options).

Layout::

    [sync]                 # optional; every key also as env BABEL_<KEY> and as a CLI flag
    state_dir = "/var/lib/babel-sync"
    [sites.a]
    url = "s3://data"
    endpoint_url = "http://127.0.0.1:8333"
    [[rules]]
    name = "datasets"
    source = "a"
    destinations = ["b"]
    include = ["datasets/**"]

``[sync]`` goes through the project's one loader (:func:`lingcore.config.load_config`), so
precedence (defaults < TOML < env < flags) and error messages match every other CLI. Sites and rules
are validated here; every error names the field (``sites.a.url``, ``rules[0].source``) and the file.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from babel_sync.errors import ConfigError, UnknownSiteError
from lingcore.config import load_config, read_toml_section
from lingcore.marker import MARKER_NAME
from lingcore.storage import split_url

PRIORITIES = {"high": 10, "normal": 0, "low": -10}
_SITE_KEYS = {"url", "endpoint_url", "region", "credentials_file", "credentials_profile", "addressing_style"}
_RULE_KEYS = {"name", "source", "destinations", "include", "exclude", "unit_marker", "priority", "keep_last",
              "delete"}


@dataclass(frozen=True)
class Site:
    """A named storage root.

    Attributes:
        name: The ``[sites.NAME]`` key.
        url: fsspec root, e.g. ``s3://data`` or ``s3://data/cluster-a`` or ``/mnt/data``.
        endpoint_url: S3 endpoint; ``AWS_ENDPOINT_URL`` is used when unset.
        region: S3 region (``AWS_REGION``/``us-east-1`` when unset).
        addressing_style: ``path`` (default, works with any S3 server) or ``virtual``.
        key, secret, token: Credentials from ``credentials_file`` or the environment; never printed.
        options: Extra fsspec storage options for non-S3 sites.
    """

    name: str
    url: str
    endpoint_url: str | None = None
    region: str = "us-east-1"
    addressing_style: str = "path"
    key: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    options: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def protocol(self) -> str:
        """``s3`` or another fsspec protocol (``file`` for bare paths)."""
        return split_url(self.url)[0]

    @property
    def root(self) -> str:
        """The path part of :attr:`url` without trailing slash (``bucket/prefix`` for S3)."""
        return split_url(self.url)[1].rstrip("/")

    def same_store(self, other: Site) -> bool:
        """True when both sites are one S3 endpoint with one identity, so server-side copy works."""
        return (self.protocol == other.protocol == "s3" and self.endpoint_url == other.endpoint_url
                and self.key == other.key)


@dataclass(frozen=True)
class Rule:
    """What flows where.

    Attributes:
        name: Unique rule name (used by ``verify``, ``status`` and metrics).
        source: Source site name.
        destinations: Destination site names.
        include: Glob patterns relative to the site root (``**`` crosses ``/``).
        exclude: Glob patterns that are never copied.
        unit_marker: File name that marks a directory as a complete unit.
        priority: Higher goes first (``high`` = 10, ``normal`` = 0, ``low`` = -10).
        keep_last: Keep only the newest N units at the destination (0 = all).
        delete: Propagate deletions of files and units.
    """

    name: str
    source: str
    destinations: tuple[str, ...]
    include: tuple[str, ...] = ("**",)
    exclude: tuple[str, ...] = ()
    unit_marker: str = MARKER_NAME
    priority: int = 0
    keep_last: int = 0
    delete: bool = False


@dataclass(frozen=True)
class SyncOptions:
    """Engine options (``[sync]`` table, env ``BABEL_<NAME>``, CLI flags). See docs/babel_sync.md."""

    state_dir: str = os.path.join(os.path.expanduser("~"), ".cache", "babel-sync")
    site: str = ""
    transfers: int = 8
    part_concurrency: int = 8
    multipart_threshold_size: int = 64 * 1024 * 1024
    min_part_size: int = 8 * 1024 * 1024
    max_part_size: int = 256 * 1024 * 1024
    bandwidth_limit_bytes: int = 0
    #: Part bytes held in memory by all files together (adaptive sharding never exceeds it).
    max_inflight_bytes: int = 1024 * 1024 * 1024
    listing_workers: int = 32
    #: Ignored since the listing splits adaptively; kept so that older configs still load.
    listing_depth: int = 2
    #: A unit whose marker is newer than (listing start - this) waits a pass: listings are no snapshot.
    listing_settle_seconds: float = 2.0
    retry_attempts: int = 6
    retry_base_delay: float = 0.2
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    manifest_name: str = "_BABEL_MANIFEST.json"
    interval: float = 30.0
    verify_sample: float = 0.01
    #: Bytes per checksummed chunk in manifests (``verify --sample`` reads whole chunks).
    verify_chunk_size: int = 1024 * 1024
    metrics_port: int = 9464
    metrics_addr: str = "127.0.0.1"
    progress: bool = True


@dataclass(frozen=True)
class SyncConfig:
    """A whole validated config: options, sites by name, rules in file order."""

    options: SyncOptions
    sites: Mapping[str, Site]
    rules: tuple[Rule, ...]
    path: str = ""

    def rule(self, name: str) -> Rule:
        """Return the rule called ``name``.

        Raises:
            ConfigError: naming ``rules`` when there is no such rule.
        """
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise ConfigError("rules", f"no rule named {name!r}; rules: {', '.join(r.name for r in self.rules)}",
                          self.path)


def _credentials(name: str, table: Mapping[str, Any], env: Mapping[str, str], source: str) -> dict[str, str]:
    path = table.get("credentials_file")
    if path is None:
        out = {"key": env.get("AWS_ACCESS_KEY_ID", ""), "secret": env.get("AWS_SECRET_ACCESS_KEY", ""),
               "token": env.get("AWS_SESSION_TOKEN", "")}
        return {k: v for k, v in out.items() if v}
    fld = f"sites.{name}.credentials_file"
    if not isinstance(path, str):
        raise ConfigError(fld, f"expected a path, got {path!r}", source)
    full = Path(os.path.expanduser(path))
    if not full.is_absolute() and source:
        full = Path(source).parent / full
    try:
        text = full.read_text()
    except OSError as exc:
        raise ConfigError(fld, f"cannot read {str(full)!r}: {exc.strerror or exc}", source) from None
    parser = configparser.ConfigParser()
    try:  # AWS shared-credentials INI; a file without a section header is read as [default]
        parser.read_string(text if text.lstrip().startswith("[") else "[default]\n" + text)
    except configparser.Error as exc:
        raise ConfigError(fld, f"{full} is not an AWS credentials file: {type(exc).__name__}", source) from None
    profile = str(table.get("credentials_profile", "default"))
    if not parser.has_section(profile):
        raise ConfigError(f"sites.{name}.credentials_profile", f"no [{profile}] section in {full}", source)
    sec = parser[profile]
    key, secret = sec.get("aws_access_key_id"), sec.get("aws_secret_access_key")
    if not key or not secret:
        raise ConfigError(fld, f"[{profile}] in {full} needs aws_access_key_id and aws_secret_access_key", source)
    out = {"key": key, "secret": secret}
    if sec.get("aws_session_token"):
        out["token"] = sec["aws_session_token"]
    return out


def _site(name: str, table: Any, env: Mapping[str, str], source: str) -> Site:
    if not isinstance(table, dict):
        raise ConfigError(f"sites.{name}", "must be a table", source)
    url = table.get("url")
    if not isinstance(url, str) or not url:
        raise ConfigError(f"sites.{name}.url", "required: an fsspec root such as s3://bucket/prefix", source)
    protocol, root = split_url(url)
    if protocol != "s3":
        raise ConfigError(f"sites.{name}.url", f"{url!r}: only s3:// sites are supported in this version", source)
    if protocol == "s3":
        unknown = set(table) - _SITE_KEYS
        if unknown:
            raise ConfigError(f"sites.{name}.{sorted(unknown)[0]}",
                              f"unknown option for an s3 site; valid: {', '.join(sorted(_SITE_KEYS))}", source)
        if not root.strip("/"):
            raise ConfigError(f"sites.{name}.url", f"{url!r} names no bucket", source)
    endpoint = table.get("endpoint_url") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint is not None and (not isinstance(endpoint, str) or "://" not in endpoint):
        raise ConfigError(f"sites.{name}.endpoint_url", f"expected http(s)://host:port, got {endpoint!r}", source)
    style = table.get("addressing_style", "path")
    if style not in ("path", "virtual", "auto"):
        raise ConfigError(f"sites.{name}.addressing_style", f"expected path, virtual or auto, got {style!r}",
                          source)
    creds = _credentials(name, table, env, source) if protocol == "s3" else {}
    extra = {k: v for k, v in table.items() if k not in _SITE_KEYS}
    region = table.get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    return Site(name=name, url=url, endpoint_url=endpoint, region=str(region), addressing_style=style,
                options=extra, **creds)


def _str_list(value: Any, fld: str, source: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(fld, f"expected a list of non-empty strings, got {value!r}", source)
    return tuple(value)


def _rule(i: int, table: Any, sites: Mapping[str, Site], source: str) -> Rule:
    where = f"rules[{i}]"
    if not isinstance(table, dict):
        raise ConfigError(where, "must be a table ([[rules]])", source)
    unknown = set(table) - _RULE_KEYS
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}", f"unknown option; valid: {', '.join(sorted(_RULE_KEYS))}",
                          source)
    for req in ("name", "source", "destinations"):
        if req not in table:
            raise ConfigError(f"{where}.{req}", "required", source)
    name = table["name"]
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name", f"expected a non-empty string, got {name!r}", source)
    src = table["source"]
    if src not in sites:
        raise UnknownSiteError(f"{where}.source", str(src), list(sites), source)
    dests = _str_list(table["destinations"], f"{where}.destinations", source)
    for j, dest in enumerate(dests):
        if dest not in sites:
            raise UnknownSiteError(f"{where}.destinations[{j}]", dest, list(sites), source)
        if dest == src:
            raise ConfigError(f"{where}.destinations[{j}]", f"site {dest!r} is also the source", source)
    marker = table.get("unit_marker", MARKER_NAME)
    if not isinstance(marker, str) or not marker or "/" in marker:
        raise ConfigError(f"{where}.unit_marker", f"expected a file name such as _COMMITTED, got {marker!r}", source)
    prio = table.get("priority", "normal")
    if isinstance(prio, str) and prio.lower() in PRIORITIES:
        prio = PRIORITIES[prio.lower()]
    if isinstance(prio, bool) or not isinstance(prio, int):
        raise ConfigError(f"{where}.priority", f"expected high, normal, low or an integer, got {prio!r}", source)
    keep = table.get("keep_last", 0)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ConfigError(f"{where}.keep_last", f"expected an integer >= 0, got {keep!r}", source)
    delete = table.get("delete", False)
    if not isinstance(delete, bool):
        raise ConfigError(f"{where}.delete", f"expected true or false, got {delete!r}", source)
    return Rule(name=name, source=src, destinations=dests,
                include=_str_list(table.get("include", ["**"]), f"{where}.include", source),
                exclude=_str_list(table.get("exclude", []), f"{where}.exclude", source) if "exclude" in table
                else (), unit_marker=marker, priority=prio, keep_last=keep, delete=delete)


def load(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> SyncConfig:
    """Load and validate a babel-sync TOML file.

    Args:
        path: The TOML file.
        env: Environment (defaults to ``os.environ``): ``BABEL_*`` options, ``AWS_*`` credentials/endpoint.
        overrides: CLI flag values for ``[sync]`` options (``None`` values are ignored).

    Raises:
        ConfigError: naming the field and the file for any malformed or inconsistent value.
        UnknownSiteError: when a rule names a site that is not defined.
    """
    env = os.environ if env is None else env
    source = str(path)
    data = read_toml_section(path, "\0whole-file")  # a missing table name returns the whole document
    unknown = set(data) - {"sync", "sites", "rules"}
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown top-level key; expected [sync], [sites.*], [[rules]]", source)
    opt_env = {k: v for k, v in env.items() if k != "BABEL_CONFIG"}
    options = load_config(SyncOptions, toml_path=path if "sync" in data else None, section="sync",
                          env_prefix="BABEL_", env=opt_env, overrides=overrides)
    for fld in ("transfers", "part_concurrency", "listing_workers", "retry_attempts"):
        if getattr(options, fld) < 1:
            raise ConfigError(fld, f"must be >= 1, got {getattr(options, fld)}", source)
    if options.min_part_size < 5 * 1024 * 1024 or options.max_part_size < options.min_part_size:
        raise ConfigError("min_part_size", "S3 needs parts of at least 5MiB and max_part_size >= min_part_size",
                          source)
    if options.listing_settle_seconds < 0:
        raise ConfigError("listing_settle_seconds", f"must be >= 0, got {options.listing_settle_seconds}", source)
    if options.verify_chunk_size < 4096:
        raise ConfigError("verify_chunk_size", f"must be at least 4KiB, got {options.verify_chunk_size}", source)
    if options.max_inflight_bytes < options.min_part_size:
        raise ConfigError("max_inflight_bytes", "must hold at least one part (>= min_part_size)", source)
    if not 0.0 <= options.verify_sample <= 1.0:
        raise ConfigError("verify_sample", f"must be within 0..1, got {options.verify_sample}", source)
    raw_sites = data.get("sites", {})
    if not isinstance(raw_sites, dict) or not raw_sites:
        raise ConfigError("sites", "at least one [sites.NAME] table is required", source)
    sites = {name: _site(name, table, env, source) for name, table in raw_sites.items()}
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list) or not raw_rules:
        raise ConfigError("rules", "at least one [[rules]] table is required", source)
    rules = tuple(_rule(i, t, sites, source) for i, t in enumerate(raw_rules))
    names = [r.name for r in rules]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ConfigError("rules", f"rule name {dup!r} is used twice", source)
    if options.site and options.site not in sites:
        raise UnknownSiteError("site", options.site, list(sites), source)
    return SyncConfig(options=options, sites=sites, rules=rules, path=source)
