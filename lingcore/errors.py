"""Base errors shared by every package of the project.

Each subclasses the built-in exception a caller would already catch (``OSError``, ``ValueError``), in
the fsspec tradition, and its message names the URL, path or config field involved.
"""

from __future__ import annotations

import errno


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field and where it came from."""

    def __init__(self, field: str, message: str, source: str = "") -> None:
        self.field = field
        self.source = source
        where = f" (from {source})" if source else ""
        super().__init__(f"invalid config field {field!r}{where}: {message}")


class OriginUnavailableError(OSError):
    """The origin store could not be reached after all retries (or within the deadline)."""

    def __init__(self, url: str, attempts: int, cause: BaseException | None) -> None:
        self.url = url
        self.attempts = attempts
        super().__init__(
            errno.EIO, f"origin unavailable for {url} after {attempts} attempts: {cause!r}"
        )


class StaleObjectError(OSError):
    """The object changed at the origin while a reader held an older version open."""

    def __init__(self, url: str, version: str) -> None:
        self.url = url
        super().__init__(errno.ESTALE, f"{url} changed at the origin (was version {version}); reopen it")
