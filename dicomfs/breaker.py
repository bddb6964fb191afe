"""A short memory of an archive's recent failures (a circuit breaker), one per opened archive.

Owns the rule that once the archive has failed as a whole — unreachable, timed out, too slow,
overloaded (``SourceUnavailable``, but not refused credentials) — the next requests fail at once
instead of each waiting out its own timeouts, and that after a cool-down one request (the probe)
is let through to test recovery: its success closes the breaker, its failure opens it again for
twice as long (up to a limit). Anything the archive answers, even an error about one resource,
counts as a success. The catalog and the blob store ask it before every request to the archive;
cached data never goes through it. Must not know what is being requested.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from dicomfs.errors import AccessRefused, SourceUnavailable

log = logging.getLogger(__name__)

FIRST_COOLDOWN = 1.0
MAX_COOLDOWN = 10.0  # a probe every 10 s at most: an archive that is back is found back soon


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the archive as a whole is not working (not one bad answer)."""
    return isinstance(exc, SourceUnavailable) and not isinstance(exc, AccessRefused)


class Breaker:
    def __init__(self, description: str, *, first_cooldown: float = FIRST_COOLDOWN,
                 max_cooldown: float = MAX_COOLDOWN, clock: Callable[[], float] = time.monotonic) -> None:
        self.description = description
        self.first_cooldown = first_cooldown
        self.max_cooldown = max_cooldown
        self._clock = clock
        self._cooldown = 0.0  # 0: closed
        self._retry_at = 0.0
        self._probing = False
        self._last_error = ""

    @property
    def open(self) -> bool:
        """Whether the archive failed last time (requests refused, or only a probe let through)."""
        return self._cooldown > 0

    @property
    def refusing(self) -> bool:
        """Whether ``admit`` would refuse a request right now."""
        return bool(self._cooldown) and (self._probing or self._clock() < self._retry_at)

    def admit(self) -> bool:
        """Raise ``SourceUnavailable`` at once while the breaker is open; True if this request is
        the probe that tests recovery (its outcome must be reported, or ``release``d)."""
        if not self._cooldown:
            return False
        now = self._clock()
        if self._probing or now < self._retry_at:
            wait = max(self._retry_at - now, 0.0)
            raise SourceUnavailable(f"{self.description} is unavailable ({self._last_error}); "
                                    + (f"trying again in {wait:.0f} s" if not self._probing
                                       else "testing whether it is back"))
        self._probing = True
        return True

    def succeeded(self) -> None:
        """The archive answered."""
        if self._cooldown:
            log.info("%s answers again", self.description)
        self._cooldown = 0.0
        self._probing = False

    def failed(self, exc: BaseException) -> None:
        """A request ended with ``exc``: an outage opens (or keeps open) the breaker, anything
        else is an answer."""
        if not is_outage(exc):
            self.succeeded()
            return
        was_open = bool(self._cooldown)
        self._cooldown = min(self._cooldown * 2, self.max_cooldown) if was_open else self.first_cooldown
        self._retry_at = self._clock() + self._cooldown
        self._probing = False
        self._last_error = str(exc)[:300]
        if not was_open:
            log.info("%s failed (%s): uncached reads fail at once until it answers again",
                        self.description, self._last_error)

    def release(self) -> None:
        """The probe ended without telling anything (cancelled): let another request probe."""
        self._probing = False

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Around one request to the archive: refused at once while open, outcome recorded."""
        probe = self.admit()
        try:
            yield
        except Exception as exc:
            self.failed(exc)
            raise
        except BaseException:
            if probe:
                self.release()
            raise
        else:
            self.succeeded()
