"""Retries with exponential backoff and full jitter, bounded by attempts and by time.

The one place weightd retries anything. Callers say what is transient.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
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
        max_delay: no single backoff is longer than this.
    """

    attempts: int = 6
    max_seconds: float = 60.0
    base_delay: float = 0.05
    max_delay: float = 5.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based): full jitter."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))


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
            elapsed = time.monotonic() - start
            if not is_transient(e) or attempt == policy.attempts or elapsed > policy.max_seconds:
                raise
            pause = policy.delay(attempt)
            log.info("retrying %s after %s (attempt %d/%d, in %.2fs)",
                     what, type(e).__name__, attempt, policy.attempts, pause)
            await asyncio.sleep(pause)
    raise AssertionError("unreachable")  # pragma: no cover
