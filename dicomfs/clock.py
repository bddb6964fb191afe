"""The clock of freshness: how old a listing, a rendered index file or a retrieve is.

Owns one rule: every in-memory age (the catalog's listing TTL, the static tree's listing files,
the blob store's "missing from the last retrieve" window) is measured on trio's clock, so that a
test runs them with ``trio.testing.MockClock`` (pytest-trio's ``autojump_clock``) instead of
sleeping, and all of them move together. Ages kept on disk across processes (the catalog's store)
are wall-clock time, ``wall``. Must only be called from inside ``trio.run``.
"""

from __future__ import annotations

import time

import trio


def now() -> float:
    """Seconds on trio's clock (monotonic; mockable)."""
    return trio.current_time()


def wall() -> float:
    """Seconds since the epoch, for timestamps other processes read."""
    return time.time()
