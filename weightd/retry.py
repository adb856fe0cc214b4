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


class _Tries:
    """The bookkeeping of one retried call: :meth:`failed` says how long to wait before
    the next try, or raises the error when there is to be none."""

    def __init__(self, policy: RetryPolicy, is_transient: Callable[[BaseException], bool],
                 what: str) -> None:
        self.policy = policy
        self.is_transient = is_transient
        self.what = what
        self.start = time.monotonic()
        self.attempt = 0

    def failed(self, e: Exception) -> float:
        self.attempt += 1
        policy = self.policy
        elapsed = time.monotonic() - self.start
        if (not self.is_transient(e) or self.attempt >= policy.attempts
                or elapsed > policy.max_seconds):
            raise e
        pause = _server_delay(e)
        if pause is None:
            pause = policy.delay(self.attempt)
        elif elapsed + pause > policy.max_seconds:
            log.info("%s: the server asks to wait %.1fs, past retry_max_seconds (%.0fs): "
                     "giving up", self.what, pause, policy.max_seconds)
            raise e
        log.info("retrying %s after %s (attempt %d/%d, in %.2fs)",
                 self.what, type(e).__name__, self.attempt, policy.attempts, pause)
        return pause


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
    tries = _Tries(policy, is_transient, what)
    while True:
        try:
            return await fn()
        except Exception as e:
            await asyncio.sleep(tries.failed(e))


def retry_call(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    is_transient: Callable[[BaseException], bool],
    what: str,
) -> T:
    """:func:`retry_async` for a blocking call (a listing, an API request)."""
    tries = _Tries(policy, is_transient, what)
    while True:
        try:
            return fn()
        except Exception as e:
            time.sleep(tries.failed(e))
