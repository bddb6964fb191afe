"""Progress of a long transfer: a bar on a terminal, periodic log lines elsewhere.

Owns the arithmetic (rate, ETA, percentage by bytes when the total is known, by series when it
is not) and the rendering. Must not know what is being transferred or how.
"""

from __future__ import annotations

import shutil
import time
from typing import TextIO

BAR_INTERVAL = 0.2
LOG_INTERVAL = 10.0


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Call ``update`` as often as you like; it draws at most every ``BAR_INTERVAL`` seconds on a
    terminal, or logs every ``log_interval`` seconds otherwise. ``close`` draws the final state."""

    def __init__(self, stream: TextIO, total_series: int, total_bytes: int | None, *,
                 log_interval: float = LOG_INTERVAL) -> None:
        self.stream = stream
        self.total_series = total_series
        self.total_bytes = total_bytes
        self.terminal = stream.isatty()
        self.log_interval = log_interval
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._bytes = 0
        self._series = 0
        self._drawn = False
        self._logged: tuple[int, int] | None = None

    def update(self, done_bytes: int, done_series: int, *, force: bool = False) -> None:
        self._bytes, self._series = done_bytes, done_series
        now = time.monotonic()
        interval = BAR_INTERVAL if self.terminal else self.log_interval
        if not force and now - self._last_draw < interval:
            return
        self._last_draw = now
        if self.terminal:
            width = shutil.get_terminal_size((100, 20)).columns
            line = self.line(now, bar_width=max(10, min(30, width - 70)))
            self.stream.write("\r" + line.ljust(width - 1)[: width - 1])
            self.stream.flush()
            self._drawn = True
        else:
            state = (self._bytes, self._series)
            if state != self._logged:
                self._logged = state
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                self.stream.write(f"{stamp} progress: {self.line(now, bar_width=0)}\n")
                self.stream.flush()

    def close(self) -> None:
        self.update(self._bytes, self._series, force=True)
        if self.terminal and self._drawn:
            self.stream.write("\n")
            self.stream.flush()

    def fraction(self) -> float:
        if self.total_bytes:
            return min(1.0, self._bytes / self.total_bytes)
        if self.total_series:
            return min(1.0, self._series / self.total_series)
        return 1.0

    def line(self, now: float, bar_width: int) -> str:
        elapsed = max(now - self.started, 1e-6)
        rate = self._bytes / elapsed
        fraction = self.fraction()
        eta = "--:--"
        if 0 < fraction < 1:
            eta = human_duration(elapsed * (1 - fraction) / fraction)
        elif fraction >= 1:
            eta = human_duration(0)
        total = f" / {human_bytes(self.total_bytes)}" if self.total_bytes else ""
        bar = ""
        if bar_width:
            filled = round(fraction * bar_width)
            bar = "[" + "#" * filled + "-" * (bar_width - filled) + "] "
        return (f"{bar}{fraction * 100:3.0f}%  {human_bytes(self._bytes)}{total}  {human_bytes(rate)}/s  "
                f"ETA {eta}  series {self._series}/{self.total_series}")
