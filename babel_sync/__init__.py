"""babel_sync: cross-cluster dataset and checkpoint synchronizer.

Public API:

- :func:`load_config` / :class:`SyncConfig`, :class:`Site`, :class:`Rule`, :class:`SyncOptions`: the
  TOML configuration (see ``docs/babel_sync.md``).
- :class:`Syncer`: plans and executes passes; :func:`sync_once` runs one pass and returns the JSON
  summary that ``babel-sync once`` prints; :func:`verify` re-hashes destination content; :func:`daemon`
  is the loop behind ``babel-sync run``.
- Errors: :class:`ConfigError`, :class:`UnknownSiteError`, :class:`SiteUnreachableError`,
  :class:`SiteAuthError`, :class:`SourceChangedError`, :class:`IntegrityError`, :class:`LockedError`,
  :class:`DeleteError`, :class:`ListingError`.
"""

from babel_sync.config import Rule, Site, SyncConfig, SyncOptions
from babel_sync.config import load as load_config
from babel_sync.engine import Syncer
from babel_sync.errors import (
    ConfigError,
    DeleteError,
    IntegrityError,
    ListingError,
    LockedError,
    SiteAuthError,
    SiteUnreachableError,
    SourceChangedError,
    UnknownSiteError,
)
from babel_sync.runner import daemon, sync_once
from babel_sync.verify import verify

__all__ = [
    "ConfigError",
    "DeleteError",
    "IntegrityError",
    "ListingError",
    "LockedError",
    "Rule",
    "Site",
    "SiteAuthError",
    "SiteUnreachableError",
    "SourceChangedError",
    "SyncConfig",
    "SyncOptions",
    "Syncer",
    "UnknownSiteError",
    "daemon",
    "load_config",
    "sync_once",
    "verify",
]
