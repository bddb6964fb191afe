"""The archive's breaker and the transfer limits, on a clock of their own."""

from __future__ import annotations

import pytest

from dicomfs.breaker import Breaker
from dicomfs.errors import AccessRefused, NotFound, SourceError, SourceUnavailable
from dicomfs.transferlimits import RateMeter, TransferLimits


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_outage_refuses_at_once_until_a_probe_succeeds() -> None:
    clock = Clock()
    breaker = Breaker("the archive", first_cooldown=2, max_cooldown=8, clock=clock)
    assert breaker.admit() is False
    breaker.failed(SourceUnavailable("cannot reach it: ConnectError"))
    assert breaker.open and breaker.refusing
    with pytest.raises(SourceUnavailable, match="the archive is unavailable .cannot reach it.*trying again in 2 s"):
        breaker.admit()
    clock.now += 2
    assert breaker.admit() is True  # the probe
    with pytest.raises(SourceUnavailable, match="testing whether it is back"):
        breaker.admit()  # one probe at a time
    breaker.failed(SourceUnavailable("still down"))
    clock.now += 3.9
    with pytest.raises(SourceUnavailable):
        breaker.admit()  # the cool-down doubled
    clock.now += 0.1
    assert breaker.admit() is True
    breaker.succeeded()
    assert not breaker.open and breaker.admit() is False


def test_the_cooldown_is_bounded_and_a_cancelled_probe_is_released() -> None:
    clock = Clock()
    breaker = Breaker("a", first_cooldown=1, max_cooldown=4, clock=clock)
    for _ in range(10):
        breaker.failed(SourceUnavailable("down"))
    clock.now += 4
    assert breaker.admit() is True
    breaker.release()
    assert breaker.admit() is True  # someone else may probe


@pytest.mark.parametrize("answer", [NotFound("404"), SourceError("HTTP 500"), AccessRefused("HTTP 401"),
                                    ValueError("a bug")])
def test_anything_but_an_outage_is_an_answer(answer: Exception) -> None:
    clock = Clock()
    breaker = Breaker("a", clock=clock)
    breaker.failed(SourceUnavailable("down"))
    clock.now += 10
    with pytest.raises(type(answer)):
        with breaker.guard():
            raise answer
    assert not breaker.open


def test_guard_records_outages() -> None:
    breaker = Breaker("a", clock=Clock())
    with pytest.raises(SourceUnavailable):
        with breaker.guard():
            raise SourceUnavailable("timed out")
    assert breaker.refusing


def test_a_trickle_is_too_slow_once_a_whole_window_has_passed() -> None:
    meter = RateMeter(TransferLimits(window=10, min_rate=1000, deadline=3600), start=0.0)
    assert meter.verdict(5, 100) is None  # not a whole window yet
    assert meter.verdict(9.9, 200) is None
    verdict = meter.verdict(10.5, 300)  # 300 bytes in 10.5 s
    assert verdict is not None and "less than the minimum of 1.0 KiB/s (--min-rate)" in verdict


def test_a_steady_transfer_with_a_pause_passes() -> None:
    meter = RateMeter(TransferLimits(window=10, min_rate=1000, deadline=3600), start=0.0)
    total = 0
    for second in range(1, 60):
        total += 5000 if second % 7 else 0  # a second of silence now and then
        assert meter.verdict(float(second), total) is None


def test_the_deadline_ends_even_a_fast_transfer() -> None:
    meter = RateMeter(TransferLimits(window=10, min_rate=0, deadline=30), start=0.0)
    assert meter.verdict(29, 10**9) is None
    assert "longer than 30 s (--retrieve-timeout)" in (meter.verdict(31, 2 * 10**9) or "")


def test_no_minimum_rate() -> None:
    meter = RateMeter(TransferLimits(window=1, min_rate=0, deadline=3600), start=0.0)
    assert all(meter.verdict(float(t), 0) is None for t in range(1, 100))
