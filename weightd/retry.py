"""Retries with exponential backoff and full jitter, bounded by attempts and by time.

The one place weightd retries anything. Callers say what is transient. A server that
says how long to wait (HTTP ``Retry-After``, on a 429 or a 503) is obeyed: an error that
carries a ``retry_after`` attribute (seconds) waits that long instead of the backoff,
and when that wait would end past ``max_seconds`` the error is raised at once, since
no try would be allowed after it anyway.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry.

    Attributes:
        attempts: total tries, the first included.
        max_seconds: no new try starts after this many seconds since the first.
        base_delay: the first backoff's upper bound; it doubles each try.
        max_delay: no single backoff is longer than this (a server-given delay may be
            longer, up to ``max_seconds``).
    """

    attempts: int = 6
    max_seconds: float = 60.0
    base_delay: float = 0.05
    max_delay: float = 5.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based): full jitter."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from an HTTP ``Retry-After`` value: delay-seconds or an HTTP-date
    (RFC 9110 10.2.3); None when absent or unreadable.

    Example
    -------
    >>> parse_retry_after("3")
    3.0
    >>> parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0)
    10.0
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    base = datetime.now(UTC).timestamp() if now is None else now
    return max(0.0, when.timestamp() - base)


def _server_delay(e: BaseException) -> float | None:
    value = getattr(e, "retry_after", None)
    return float(value) if isinstance(value, int | float) and value >= 0 else None


def _pause(e: BaseException, attempt: int, start: float, policy: RetryPolicy,
           is_transient: Callable[[BaseException], bool]) -> float | None:
    """Seconds to wait before the next try, or None to raise ``e`` now."""
    elapsed = time.monotonic() - start
    if not is_transient(e) or attempt == policy.attempts or elapsed > policy.max_seconds:
        return None
    asked = _server_delay(e)
    if asked is None:
        return policy.delay(attempt)
    if elapsed + asked > policy.max_seconds:
        log.info("the server asks to wait %.1fs, past retry_max_seconds (%.0fs): giving up",
                 asked, policy.max_seconds)
        return None
    return asked


async def retry_async(
    fn: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    is_transient: Callable[[BaseException], bool],
    what: str,
) -> T:
    """Await ``fn()`` until it succeeds, retrying transient errors under ``policy``.

    The last error is re-raised as is when tries or time run out, or at once when it is
    not transient.
    """
    start = time.monotonic()
    for attempt in range(1, policy.attempts + 1):
        try:
            return await fn()
        except Exception as e:
            pause = _pause(e, attempt, start, policy, is_transient)
            if pause is None:
                raise
            log.info("retrying %s after %s (attempt %d/%d, in %.2fs)",
                     what, type(e).__name__, attempt, policy.attempts, pause)
            await asyncio.sleep(pause)
    raise AssertionError("unreachable")  # pragma: no cover


def retry_call(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    is_transient: Callable[[BaseException], bool],
    what: str,
) -> T:
    """:func:`retry_async` for a blocking call (a listing, an API request)."""
    start = time.monotonic()
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as e:
            pause = _pause(e, attempt, start, policy, is_transient)
            if pause is None:
                raise
            log.info("retrying %s after %s (attempt %d/%d, in %.2fs)",
                     what, type(e).__name__, attempt, policy.attempts, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")  # pragma: no cover
