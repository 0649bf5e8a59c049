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


class StoreAccessError(OSError):
    """A store could not be used at all: the base of the four cases :mod:`lingcore.probe` tells apart.

    The message is one line, ``"<url>: <case>: <detail>"``, naming the URL as the user gave it.

    Attributes:
        url: The URL involved (as given by the user).
        detail: What was wrong, in words (never credentials).
        endpoint: The S3 endpoint used, when there is one.
    """

    case = "inaccessible"
    code = errno.EIO

    def __init__(self, url: str, detail: str, endpoint: str | None = None) -> None:
        self.url, self.detail, self.endpoint = url, detail, endpoint
        super().__init__(self.code, f"{url}: {self.case}: {detail}")

    def __str__(self) -> str:  # without OSError's "[Errno N]" prefix: the message is for people
        return str(self.args[1])

    def __reduce__(self) -> tuple[type, tuple[str, str, str | None]]:  # picklable across processes
        return type(self), (self.url, self.detail, self.endpoint)


class StoreUnreachableError(StoreAccessError, ConnectionError):
    """Nothing answered: connection refused, unknown host, timeouts (a stopped or mistyped endpoint)."""

    case = "unreachable"
    code = errno.EHOSTUNREACH


class StoreForbiddenError(StoreAccessError, PermissionError):
    """The store answered and refused: wrong secret or key, no credentials, or no permission."""

    case = "forbidden"
    code = errno.EACCES


class StoreNotFoundError(StoreAccessError, FileNotFoundError):
    """The store answered, but the bucket, prefix or object does not exist."""

    case = "not found"
    code = errno.ENOENT


class BadEndpointError(StoreAccessError):
    """The endpoint is malformed, or what answers there is not an S3 service."""

    case = "bad endpoint"
    code = errno.EINVAL
