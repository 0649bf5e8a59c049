"""The one config loader: defaults < TOML file < environment < explicit options (flags, kwargs).

Every CLI and library entry point builds its frozen dataclass config through :func:`load_config`, so
precedence, type coercion and error messages (naming the field and its source) are the same
everywhere.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

from lingcore.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

C = TypeVar("C")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(value: str | int, field: str = "size", source: str = "") -> int:
    """Parse ``"4MiB"``, ``"512k"``, ``"1G"`` or ``4194304`` into bytes (binary units).

    Raises:
        ConfigError: naming ``field`` when the value is not a non-negative size.
    """
    if isinstance(value, bool):
        raise ConfigError(field, f"expected a size, got {value!r}", source)
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(field, f"size must be >= 0, got {value}", source)
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ConfigError(field, f"expected a size such as 4MiB or 1073741824, got {value!r}", source)
    number, unit, _ = match.groups()
    return int(float(number) * (1024 ** _UNITS[unit.lower()]))


def _coerce(field: str, typ: Any, value: Any, source: str) -> Any:
    """Convert a raw TOML/env/flag value to the dataclass field's type."""
    type_name = getattr(typ, "__name__", str(typ))
    if value is None:
        return None
    if field.endswith(("_bytes", "_size")) and "int" in str(typ):
        return parse_size(value, field, source)
    try:
        if typ is bool or type_name == "bool":
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
            raise ValueError(value)
        if typ is int or type_name == "int":
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if typ is float or type_name == "float":
            return float(value)
        if "tuple" in str(typ):
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(value)
        if "str" in str(typ):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(field, f"expected {type_name}, got {value!r}", source) from None
    return value


def read_toml_section(path: str | os.PathLike[str], section: str) -> dict[str, Any]:
    """Return the ``[section]`` table of a TOML file (the whole file if it has no such table).

    Raises:
        ConfigError: when the file is missing or is not valid TOML, naming the file.
    """
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("config", f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path}: {exc}") from None
    table = data.get(section, data)
    if not isinstance(table, dict):
        raise ConfigError(section, f"{path}: [{section}] must be a table")
    return table


def load_config(
    cls: type[C],
    *,
    toml_path: str | os.PathLike[str] | None = None,
    section: str = "pcache",
    env_prefix: str = "PCACHE_",
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> C:
    """Build a frozen dataclass config from defaults, a TOML file, env vars and explicit overrides.

    Args:
        cls: The dataclass type.
        toml_path: Optional TOML file; its ``[section]`` table (or top level) is read.
        section: TOML table name.
        env_prefix: Environment variables ``{env_prefix}{FIELD}`` (upper case) override the file.
        env: Environment mapping (defaults to ``os.environ``).
        overrides: Explicit values (CLI flags, keyword arguments); ``None`` values are ignored.

    Raises:
        ConfigError: for unknown fields or values of the wrong type, naming the field and source.
    """
    env = os.environ if env is None else env
    hints = get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if toml_path is None and env.get(f"{env_prefix}CONFIG"):
        toml_path = env[f"{env_prefix}CONFIG"]
    if toml_path is not None:
        source = str(Path(toml_path))
        for key, raw in read_toml_section(toml_path, section).items():
            name = key.replace("-", "_")
            if name not in fields:
                raise ConfigError(key, f"unknown option; valid options: {', '.join(sorted(fields))}", source)
            values[name] = _coerce(name, hints[name], raw, source)
    for name in fields:
        var = f"{env_prefix}{name.upper()}"
        if var in env:
            values[name] = _coerce(name, hints[name], env[var], f"env {var}")
    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        name = key.replace("-", "_")
        if name not in fields:
            raise ConfigError(key, f"unknown option; valid options: {', '.join(sorted(fields))}", "arguments")
        values[name] = _coerce(name, hints[name], raw, "arguments")
    return cls(**values)
