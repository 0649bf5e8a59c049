"""Typed errors raised by babel_sync.

Each names the config field, site or URL involved and subclasses the built-in exception a caller would
already catch (``ValueError`` for bad config, ``OSError`` for storage problems).
"""

from __future__ import annotations

import errno

from lingcore.errors import ConfigError, OriginUnavailableError, StaleObjectError

__all__ = [
    "ConfigError",
    "DeleteError",
    "IntegrityError",
    "ListingError",
    "LockedError",
    "OriginUnavailableError",
    "SiteAuthError",
    "SiteUnreachableError",
    "SourceChangedError",
    "UnknownSiteError",
]


class UnknownSiteError(ConfigError):
    """A rule names a site that has no ``[sites.NAME]`` table."""

    def __init__(self, field: str, site: str, known: list[str], source: str = "") -> None:
        self.site = site
        super().__init__(field, f"unknown site {site!r}; defined sites: {', '.join(sorted(known)) or 'none'}",
                         source)


class SiteUnreachableError(OSError):
    """A site's endpoint did not answer (connection refused, DNS, timeouts) after all retries."""

    def __init__(self, site: str, url: str, endpoint: str | None, cause: BaseException | None) -> None:
        self.site = site
        self.url = url
        self.endpoint = endpoint
        where = f" at endpoint {endpoint}" if endpoint else ""
        super().__init__(errno.EHOSTUNREACH, f"site {site!r} ({url}{where}) is unreachable: {cause}")


class SiteAuthError(PermissionError):
    """A site refused our credentials or denied access (HTTP 401/403)."""

    def __init__(self, site: str, url: str, endpoint: str | None, detail: str) -> None:
        self.site = site
        self.url = url
        where = f" at endpoint {endpoint}" if endpoint else ""
        super().__init__(errno.EACCES, f"site {site!r} ({url}{where}) denied access: {detail}")


class SourceChangedError(StaleObjectError):
    """A source object changed (its ETag moved) while it was being copied; the unit is not published.

    Subclasses pcache's :class:`~pcache.errors.StaleObjectError`, which the shared retry loop treats as
    permanent: retrying the same version cannot succeed, the next pass copies the new version.
    """


class IntegrityError(OSError):
    """Destination content does not match the source hash, even after a re-transfer."""

    def __init__(self, url: str, detail: str) -> None:
        self.url = url
        super().__init__(errno.EIO, f"integrity check failed for {url}: {detail}")


class LockedError(OSError):
    """Another babel-sync process holds the state directory."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(errno.EBUSY, f"another babel-sync process is using the state directory {path}")


class DeleteError(OSError):
    """A DeleteObjects call answered 200 but listed per-key errors: the named objects are still there.

    Raised after the shared retry loop gave up on transient codes (``InternalError``, ``SlowDown``, ...),
    at once for the others (``AccessDenied``): a marker that could not be deleted must stop the caller
    before it touches the files below it.
    """

    def __init__(self, url: str, code: str, detail: str, transient: bool = False) -> None:
        self.url = url
        self.code = code
        # EINVAL makes the shared retry helper treat it as permanent; EAGAIN is retried.
        super().__init__(errno.EAGAIN if transient else errno.EINVAL,
                         f"could not delete {url}: {code} {detail}".rstrip())


class ListingError(OSError):
    """A listing lacks what a pass needs to trust it (e.g. ``LastModified`` on a unit marker)."""

    def __init__(self, url: str, detail: str) -> None:
        self.url = url
        super().__init__(errno.EINVAL, f"{url}: {detail}")
