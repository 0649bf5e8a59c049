"""Bounded store probes and the one classifier of store-access failures, for every CLI.

A failed fsspec/S3 call surfaces as a botocore ``EndpointConnectionError`` (after ~12 s of botocore's
own retries), a bare ``PermissionError("Forbidden")`` or a ``FileNotFoundError`` that does not say
whether the bucket or the object is missing. :func:`classify` and :func:`explain` turn any of them into
one of four :class:`~lingcore.errors.StoreAccessError` cases, each a one-line message naming the URL:
*unreachable*, *forbidden*, *not found* and *bad endpoint*.

The probes (:func:`diagnose`, :func:`check_readable`, :func:`check_writable`) talk to the origin
directly (never through a cache layer), with short botocore timeouts, at most two attempts, and a hard
deadline on top, so a stopped or black-holed endpoint is reported within ``timeout`` seconds.
"""

from __future__ import annotations

import copy
import errno
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from lingcore.errors import (
    BadEndpointError,
    StoreAccessError,
    StoreForbiddenError,
    StoreNotFoundError,
    StoreUnreachableError,
)
from lingcore.storage import split_url, storage_options

T = TypeVar("T")

#: Default deadline of one probe, in seconds: well inside the 30 s a CLI may take to refuse.
PROBE_TIMEOUT = 20.0
CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 8.0

_FORBIDDEN_CODES = {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken",
                    "TokenRefreshRequired", "Forbidden", "AllAccessDisabled", "InvalidSecurity", "401", "403"}
_NOT_FOUND_CODES = {"NoSuchBucket", "NoSuchKey", "NotFound", "404"}
_UNREACHABLE_TYPES = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                      "ProxyConnectionError", "ClientConnectorError", "ServerDisconnectedError", "ClientOSError",
                      "FSTimeoutError", "NewConnectionError", "MaxRetryError", "OriginUnavailableError",
                      "SiteUnreachableError", "gaierror"}
_UNREACHABLE_ERRNOS = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT,
                       errno.ENOTCONN, errno.ECONNRESET, errno.EHOSTDOWN}
_BAD_ENDPOINT_TYPES = {"ResponseParserError", "InvalidEndpointConfigurationError", "UnknownEndpointError"}


def endpoint_of(url: str, options: Mapping[str, Any] | None = None, endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint a call on ``url`` goes to (None for non-S3 URLs); AWS's own when none is set."""
    protocol = split_url(url)[0]
    if protocol != "s3":
        return None
    opts = _target_options(url, options, endpoint_url)
    return (opts.get("client_kwargs") or {}).get("endpoint_url") or opts.get("endpoint_url") or "AWS S3"


def _target_options(url: str, options: Mapping[str, Any] | None, endpoint_url: str | None) -> dict[str, Any]:
    """The origin layer's fsspec options: chained ones (``{"s3": {...}}``) or flat ones, over the env's."""
    protocol = split_url(url)[0]
    given = dict(options or {})
    if isinstance(given.get(protocol), Mapping):
        given = dict(given[protocol])
    given.pop("pcache", None)
    return {**storage_options(protocol, endpoint_url), **given}


def open_origin(url: str, options: Mapping[str, Any] | None = None,
                endpoint_url: str | None = None) -> tuple[Any, str]:
    """A fresh origin filesystem for ``url`` (any ``pcache::`` layer stripped) with bounded S3 calls.

    Returns:
        (fsspec filesystem, path of ``url`` in it).
    """
    import fsspec

    protocol, path = split_url(url)
    opts = copy.deepcopy(_target_options(url, options, endpoint_url))
    if protocol == "s3":
        # Short timeouts and two attempts in botocore, one in s3fs: stacked retry layers multiply, and
        # a probe must answer within seconds, not after botocore's ~12 s of backoff.
        config = dict(opts.get("config_kwargs") or {})
        config.update(connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT,
                      retries={"total_max_attempts": 2, "mode": "standard"})
        opts["config_kwargs"] = config
    fs = fsspec.filesystem(protocol, skip_instance_cache=True, **opts)
    if protocol == "s3":
        fs.retries = 1
    return fs, path.rstrip("/") or path


#: Where store failures come from. Their causes are looked through (s3fs raises ``PermissionError`` from
#: botocore's ``ClientError``); an exception of any other module (the project's own, typed errors) is
#: taken as it is, so a mountpoint error whose context was a ``FileNotFoundError`` stays what it is.
_STORE_MODULES = {"builtins", "botocore", "aiobotocore", "s3fs", "aiohttp", "fsspec", "urllib3", "socket",
                  "asyncio", "concurrent", "ssl", "http"}


def _chain(exc: BaseException, everything: bool = False) -> Iterator[BaseException]:
    """``exc`` and, for store libraries' exceptions (or with ``everything``), its causes and context."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        if not everything and type(current).__module__.split(".")[0] not in _STORE_MODULES:
            return
        context = None if current.__suppress_context__ else current.__context__
        current = current.__cause__ or context


def _client_error(exc: BaseException) -> tuple[str, int]:
    """(error code, HTTP status) of a botocore ``ClientError``; ("", 0) for anything else."""
    response = getattr(exc, "response", None)
    if not isinstance(response, Mapping):
        return "", 0
    code = str((response.get("Error") or {}).get("Code") or "")
    status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    return code, status


def _reason(exc: BaseException) -> str:
    """A short cause: "connection refused", "timed out", or the first line of the message."""
    for e in _chain(exc, everything=True):
        if isinstance(e, ConnectionRefusedError) or getattr(e, "errno", None) == errno.ECONNREFUSED:
            return "connection refused"
        if "gaierror" in {c.__name__ for c in type(e).__mro__}:
            return "unknown host"
        if isinstance(e, TimeoutError) or "Timeout" in type(e).__name__:
            return "timed out"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _bucket(url: str) -> str:
    return split_url(url)[1].split("/", 1)[0]


def classify(exc: BaseException, url: str, endpoint: str | None = None) -> StoreAccessError | None:
    """The store-access case of ``exc``, raised by a call on ``url``; None when it is none of them.

    A bare ``FileNotFoundError`` counts as *not found* (of the object); :func:`explain` looks closer.
    """
    if isinstance(exc, StoreAccessError):
        return exc
    at = f" at endpoint {endpoint}" if endpoint else ""
    chain = list(_chain(exc))
    names = {c.__name__ for e in chain for c in type(e).__mro__}
    code, status = next((_client_error(e) for e in chain if _client_error(e) != ("", 0)), ("", 0))

    def any_of(*types: type[BaseException]) -> bool:
        return any(isinstance(e, types) for e in chain)

    if names & {"NoCredentialsError", "PartialCredentialsError"}:
        return StoreForbiddenError(url, "no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                                   endpoint)
    if code in _FORBIDDEN_CODES or status in (401, 403) or any_of(PermissionError):
        what = code if code and not code.isdigit() else _reason(exc)
        if split_url(url)[0] != "s3":
            return StoreForbiddenError(url, f"permission denied ({what})", endpoint)
        return StoreForbiddenError(url, f"the store{at} refused the request ({what}): wrong secret or access key, "
                                        "or no permission; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY", endpoint)
    if code == "NoSuchBucket" or any("specified bucket does not exist" in str(e) for e in chain):
        return StoreNotFoundError(url, f"bucket {_bucket(url)!r} does not exist{at}", endpoint)
    if code in _NOT_FOUND_CODES or status == 404 or any_of(FileNotFoundError):
        return StoreNotFoundError(url, f"no such object or prefix{at}", endpoint)
    if names & _BAD_ENDPOINT_TYPES or any(isinstance(e, ValueError) and str(e).startswith("Invalid endpoint")
                                          for e in chain):
        return BadEndpointError(url, f"{endpoint or 'the endpoint'} is not a usable S3 endpoint: {_reason(exc)}",
                                endpoint)
    if names & _UNREACHABLE_TYPES or any_of(ConnectionError, TimeoutError) \
            or any(isinstance(e, OSError) and e.errno in _UNREACHABLE_ERRNOS for e in chain):
        if split_url(url)[0] != "s3":
            return StoreUnreachableError(url, f"cannot reach it ({_reason(exc)})", endpoint)
        return StoreUnreachableError(url, f"cannot reach endpoint {endpoint or 'AWS S3'} ({_reason(exc)}); is it "
                                          "running, and is --endpoint-url / AWS_ENDPOINT_URL right?", endpoint)
    return None


def _bounded(call: Callable[[], T], url: str, endpoint: str | None, timeout: float) -> T:
    """Run ``call`` with a hard deadline; its failure comes back classified when it is a store case."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            box["error"] = exc

    worker = threading.Thread(target=run, name="lingcore-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():  # a black-holed endpoint: nothing will answer, and the daemon thread is left behind
        where = f"endpoint {endpoint}" if endpoint else "the store"
        raise StoreUnreachableError(url, f"no answer from {where} within {timeout:.0f} s", endpoint)
    if "error" in box:
        error = box["error"]
        raise classify(error, url, endpoint) or error
    return box["value"]


def diagnose(url: str, options: Mapping[str, Any] | None = None, endpoint_url: str | None = None,
             timeout: float = PROBE_TIMEOUT) -> StoreAccessError | None:
    """Look at the store under ``url``: unreachable, forbidden, or a missing bucket; None when it is fine.

    For S3 this is one HEAD of the bucket; for local paths, whether the nearest existing parent is there.
    """
    protocol, path = split_url(url)
    endpoint = endpoint_of(url, options, endpoint_url)
    if protocol == "file":
        return None  # a local path's "not found" is already exact
    try:
        fs, _ = open_origin(url, options, endpoint_url)
        target = _bucket(url) if protocol == "s3" else path
        _bounded(lambda: fs.info(target), url, endpoint, timeout)
    except StoreNotFoundError:
        if protocol == "s3":
            return StoreNotFoundError(url, f"bucket {_bucket(url)!r} does not exist"
                                           + (f" at endpoint {endpoint}" if endpoint else ""), endpoint)
        return None
    except StoreAccessError as exc:
        return exc
    except Exception:  # noqa: BLE001 - an unclassified failure tells nothing more than the caller knows
        return None
    return None


def explain(exc: BaseException, url: str, options: Mapping[str, Any] | None = None,
            endpoint_url: str | None = None, timeout: float = PROBE_TIMEOUT) -> BaseException:
    """The error to show for ``exc`` raised by a call on ``url``: a store case when it is one, else ``exc``.

    A ``FileNotFoundError`` on an object store could mean a missing bucket, an unreachable store or a
    refused secret behind an ``exists()`` that swallowed it, so the store is probed (:func:`diagnose`)
    before the original message is kept.
    """
    endpoint = endpoint_of(url, options, endpoint_url)
    if isinstance(exc, StoreAccessError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return diagnose(url, options, endpoint_url, timeout) or exc
    return classify(exc, url, endpoint) or exc


def check_readable(url: str, name: str = "", options: Mapping[str, Any] | None = None,
                   endpoint_url: str | None = None, timeout: float = PROBE_TIMEOUT,
                   siblings: tuple[str, ...] = (), missing: str = "") -> bool:
    """Check that ``url`` (and ``url/name`` when given) can be read; return whether ``name`` exists.

    Returns False when ``url`` exists but holds no ``name`` (foreign data, say), or when ``url`` itself is
    missing but ``url + suffix`` exists for a suffix in ``siblings`` (a Megatron prefix's ``.idx``): the
    caller decides what to make of it. A missing ``url`` is ``missing`` (default "nothing at <url>"); a
    missing bucket says so.

    Raises:
        StoreAccessError: unreachable, forbidden, or nothing at ``url`` (naming a missing bucket).
    """
    fs, path = open_origin(url, options, endpoint_url)
    endpoint = endpoint_of(url, options, endpoint_url)
    if name:
        try:
            # A one-byte GET rather than a HEAD: a refusal then carries its code (SignatureDoesNotMatch
            # says "wrong secret"; a HEAD's 403 has no body).
            _bounded(lambda: fs.cat_file(f"{path}/{name}", start=0, end=1), url, endpoint, timeout)
            return True
        except StoreNotFoundError:
            pass
    try:
        _bounded(lambda: fs.info(path), url, endpoint, timeout)
    except StoreNotFoundError:
        for suffix in siblings:
            try:
                _bounded(lambda s=suffix: fs.info(path + s), url, endpoint, timeout)  # type: ignore[misc]
                return False
            except StoreNotFoundError:
                continue
        at = f" (endpoint {endpoint})" if endpoint else ""
        raise diagnose(url, options, endpoint_url, timeout) or StoreNotFoundError(
            url, (missing or f"nothing at {_plain(url)}") + at, endpoint) from None
    return False


def check_writable(url: str, options: Mapping[str, Any] | None = None, endpoint_url: str | None = None,
                   timeout: float = PROBE_TIMEOUT) -> None:
    """Write and delete a small probe object under ``url`` (a local directory is created if missing).

    A missing bucket fails only where the store refuses the write (AWS does; SeaweedFS creates the
    bucket on the first PUT, so there the destination *is* writable).

    Raises:
        StoreAccessError: unreachable, forbidden (no write permission), or a missing bucket.
    """
    protocol = split_url(url)[0]
    fs, path = open_origin(url, options, endpoint_url)
    endpoint = endpoint_of(url, options, endpoint_url)
    probe = f"{path}/.preflight-{uuid.uuid4().hex[:12]}"

    def write_and_delete() -> None:
        if protocol == "file":
            os.makedirs(path, exist_ok=True)
        fs.pipe_file(probe, b"preflight probe: deleted right away\n")
        fs.rm_file(probe)

    try:
        _bounded(write_and_delete, url, endpoint, timeout)
    except StoreNotFoundError:
        raise diagnose(url, options, endpoint_url, timeout) or StoreNotFoundError(
            url, f"cannot create {_plain(url)}", endpoint) from None


def _plain(url: str) -> str:
    """``url`` without cache layers, as the origin sees it."""
    protocol, path = split_url(url)
    return path if protocol == "file" else f"{protocol}://{path}"
