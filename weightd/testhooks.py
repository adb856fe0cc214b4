"""Test-only pause points: a daemon started with ``WEIGHTDTEST_PAUSE_AT=<point>[,<point>]``
stops at each named step of a fetch's commit path for :data:`PAUSE_SECONDS`, after a
WARNING line that names it, so that a test can SIGKILL it there (tests/test_durable.py).

The variable is outside the ``WEIGHTD_`` prefix on purpose: the configuration refuses
unknown ``WEIGHTD_*`` variables, and this is not a setting. It is for tests only; a
daemon that sees it says so at start (:func:`announce`). Each point pauses once per
process.

Points, in the order a fetch reaches them:

``downloading``
    the first chunk of a downloaded file was hashed and written to its temporary file;
``ready``
    every file of the model is written and verified and the node may serve it; no shard
    blob has been fsynced;
``fsynced``
    the first shard's temporary file was fsynced, not yet renamed into ``blobs/``;
``renamed``
    every shard was renamed into ``blobs/``; nothing was recorded in the index.
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)

PAUSE_ENV = "WEIGHTDTEST_PAUSE_AT"
POINTS = ("downloading", "ready", "fsynced", "renamed")
#: How long a pause lasts before the work goes on (a test kills the daemon well before).
PAUSE_SECONDS = 120.0

_done: set[str] = set()
_lock = threading.Lock()


def _wanted() -> set[str]:
    return {p.strip() for p in os.environ.get(PAUSE_ENV, "").split(",") if p.strip()}


def announce() -> None:
    """Log loudly, at start, that test-only pauses are armed (or that a point is unknown)."""
    wanted = _wanted()
    if wanted:
        log.warning("%s=%s is set: TEST-ONLY pauses are armed (points: %s); never set it on "
                    "a real node", PAUSE_ENV, ",".join(sorted(wanted)), ", ".join(POINTS))
        for point in sorted(wanted - set(POINTS)):
            log.warning("%s: unknown pause point %r ignored", PAUSE_ENV, point)


def pause_at(point: str) -> None:
    """Pause here when the test asked for ``point`` (once per process); else nothing."""
    if point not in _wanted():
        return
    with _lock:
        if point in _done:
            return
        _done.add(point)
    log.warning("test pause at %r (%s): sleeping %.0f s", point, PAUSE_ENV, PAUSE_SECONDS)
    time.sleep(PAUSE_SECONDS)
