"""lingcore: the shared kernel of the project. It imports no other package of the project.

One implementation of each helper every package needs; packages import them from here instead of
writing their own:

- :mod:`lingcore.retry`: :func:`retry_call` and :class:`RetryPolicy` (backoff with full jitter)
- :mod:`lingcore.checksum`: xxh3 block checksums and whole-content hashes
- :mod:`lingcore.config`: defaults < TOML < env < flags, typed errors naming the field
- :mod:`lingcore.log`: text or JSON log lines
- :mod:`lingcore.files`: full writes, directory fsync, owner-only secrets, whole-or-nothing puts
- :mod:`lingcore.lmdb_env`: one LMDB environment per path per process
- :mod:`lingcore.storage`: S3 options from flags and the ``AWS_*`` environment
- :mod:`lingcore.errors`: :class:`ConfigError`, :class:`OriginUnavailableError`, :class:`StaleObjectError`,
  the store-access errors (:class:`StoreUnreachableError`, :class:`StoreForbiddenError`, ...)
- :mod:`lingcore.probe`: bounded reachability probes and the classifier of store-access failures
- :mod:`lingcore.versions`: :func:`object_version`
- :mod:`lingcore.marker`: the ``pcache-commit/1`` commit-marker format
- :mod:`lingcore.cli`: :func:`run_command`, the exit-code mapping of every CLI

Import the submodule you need (``from lingcore.retry import retry_call``): this ``__init__`` imports
nothing, so a tool that needs one helper does not pay for the others.
"""
