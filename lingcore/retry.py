"""The one retry loop: exponential backoff with full jitter.

Every origin call in the project goes through :func:`retry_call`, so the policy (and its tests) live
in one place.
"""

from __future__ import annotations

import errno
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from lingcore.errors import OriginUnavailableError, StaleObjectError

T = TypeVar("T")

# Errors that mean "the object is not there / you may not have it": retrying cannot help.
_PERMANENT: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,
    TypeError,
    StaleObjectError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try before declaring the origin unavailable.

    Attributes:
        attempts: Total tries, including the first.
        base_delay: Delay before the first retry, in seconds; doubles each retry.
        max_delay: Cap on a single delay, in seconds.
    """

    attempts: int = 6
    base_delay: float = 0.1
    max_delay: float = 5.0

    def delay(self, retry_index: int, rng: random.Random | None = None) -> float:
        """Return the sleep before retry ``retry_index`` (0-based), with full jitter."""
        cap = min(self.max_delay, self.base_delay * (2**retry_index))
        return (rng or random).uniform(0, cap)


def is_permanent(exc: BaseException) -> bool:
    """Return True for errors that retrying cannot fix (missing object, bad request, no access).

    s3fs reports S3's InvalidArgument, InvalidRange, MalformedXML and EntityTooSmall as
    ``OSError(EINVAL)``: a bad request, not an outage.
    """
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return False
    return isinstance(exc, _PERMANENT) or (isinstance(exc, OSError) and exc.errno == errno.EINVAL)


def retry_call(
    fn: Callable[[], T],
    *,
    url: str,
    policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[int, BaseException], None] | None = None,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call ``fn`` until it succeeds, retrying transient errors with backoff and jitter.

    Args:
        fn: The operation; it is called with no arguments.
        url: The URL the operation is about, named in the final error.
        policy: Attempts and delays; defaults to :class:`RetryPolicy()`.
        sleep: Injected for tests.
        on_retry: Called with (attempt number, error) before each retry, e.g. to count or log.
        deadline: ``clock()`` time by which the whole call, retries included, must end. No retry starts
            (and no backoff sleeps) past it; ``fn`` itself must bound each attempt (socket timeouts
            clipped to the time left), since a blocked call cannot be interrupted from here. The
            first attempt always runs.
        clock: Injected for tests.

    Returns:
        Whatever ``fn`` returns.

    Raises:
        FileNotFoundError, PermissionError, ValueError: immediately, since retrying cannot help.
        OriginUnavailableError: after the last attempt failed with a transient error, or when the
            deadline leaves no time for another attempt.
    """
    policy = policy or RetryPolicy()
    last: BaseException | None = None
    for attempt in range(policy.attempts):
        try:
            return fn()
        except BaseException as exc:  # noqa: BLE001 - classified below
            if isinstance(exc, (KeyboardInterrupt, SystemExit)) or is_permanent(exc):
                raise
            last = exc
            if attempt + 1 == policy.attempts:
                break
            delay = policy.delay(attempt)
            if deadline is not None and clock() + delay >= deadline:
                # Retrying past the deadline would only turn a bounded failure into an unbounded one.
                cause = TimeoutError(f"total deadline passed after {attempt + 1} attempt(s); last error: {exc!r}")
                raise OriginUnavailableError(url, attempt + 1, cause) from exc
            if on_retry is not None:
                on_retry(attempt + 1, exc)
            sleep(delay)
    raise OriginUnavailableError(url, policy.attempts, last) from last
