"""How slow a transfer from the archive may be before it is abandoned: a minimum rate over a
window, and an overall deadline.

Owns the measurement (bytes that arrived, sampled as the transfer runs) and the verdict, so that a
trickling answer (10 KB/s) or one that never ends is given up within a bounded time, whatever the
source. The blob store runs ``enforce`` beside each download; the socket-level timeout of the HTTP
client is the same ``window``. Must not know what is transferred or how.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import trio

from dicomfs.errors import SourceUnavailable

DEFAULT_WINDOW = 30.0
DEFAULT_MIN_RATE = 32 * 1024
DEFAULT_DEADLINE = 3600.0


@dataclass(frozen=True)
class TransferLimits:
    window: float = DEFAULT_WINDOW  # ``--timeout``: seconds over which the rate is measured
    min_rate: float = DEFAULT_MIN_RATE  # ``--min-rate``: bytes per second, 0 for none
    deadline: float = DEFAULT_DEADLINE  # ``--retrieve-timeout``: seconds for one whole retrieve


class RateMeter:
    """Samples of (time, bytes so far) of one transfer; ``verdict`` says why it is too slow."""

    def __init__(self, limits: TransferLimits, start: float) -> None:
        self.limits = limits
        self.start = start
        self._samples: deque[tuple[float, int]] = deque([(start, 0)])

    def verdict(self, now: float, total: int) -> str | None:
        limits = self.limits
        if now - self.start > limits.deadline:
            return f"it took longer than {limits.deadline:.0f} s (--retrieve-timeout)"
        self._samples.append((now, total))
        horizon = now - limits.window
        while len(self._samples) > 1 and self._samples[1][0] <= horizon:
            self._samples.popleft()
        then, before = self._samples[0]
        if not limits.min_rate or then > horizon:
            return None  # not a whole window yet
        rate = (total - before) / (now - then)
        if rate < limits.min_rate:
            return (f"it sent {_rate(rate)} over the last {now - then:.0f} s, less than the minimum "
                    f"of {_rate(limits.min_rate)} (--min-rate)")
        return None


async def enforce(limits: TransferLimits, progress: Callable[[], int], what: str) -> NoReturn:
    """Run beside a transfer whose ``progress()`` is the bytes arrived so far; raise
    ``SourceUnavailable`` (an outage: the archive is not delivering) once it is too slow."""
    meter = RateMeter(limits, trio.current_time())
    tick = min(1.0, limits.window / 4)
    while True:
        await trio.sleep(tick)
        reason = meter.verdict(trio.current_time(), progress())
        if reason is not None:
            raise SourceUnavailable(f"{what} was abandoned: {reason}")


def _rate(bytes_per_second: float) -> str:
    if bytes_per_second >= 1 << 20:
        return f"{bytes_per_second / (1 << 20):.1f} MiB/s"
    return f"{bytes_per_second / 1024:.1f} KiB/s"
