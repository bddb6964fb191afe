"""Unit tests of the keyed single flight: one execution for concurrent callers, its error shared."""

from __future__ import annotations

import gc
import weakref

import trio

from dicomfs.singleflight import SingleFlight


class Boom(Exception):
    pass


async def test_callers_at_the_same_time_share_one_call_and_its_error() -> None:
    flights: SingleFlight[int] = SingleFlight()
    calls: list[int] = []
    outcomes: list[object] = []

    async def failing() -> int:
        calls.append(1)
        await trio.sleep(0.01)
        raise Boom("once")

    async def caller() -> None:
        try:
            outcomes.append(await flights.run("k", failing))
        except Boom as exc:
            outcomes.append(str(exc))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(caller)
    assert calls == [1] and outcomes == ["once"] * 3


async def test_a_failed_call_leaves_no_reference_cycle() -> None:
    """The error's traceback holds the leader's frame: that frame must not hold the flight that
    holds the error, or every failed listing stays in memory until the cyclic collector runs
    (``dicomfs ls`` runs without it)."""
    flights: SingleFlight[int] = SingleFlight()

    async def failing() -> int:
        raise Boom("no")

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        ref = None
        try:
            await flights.run("k", failing)
        except Boom as exc:
            ref = weakref.ref(exc)
        assert ref is not None and ref() is None  # freed by its reference count alone
    finally:
        if was_enabled:
            gc.enable()
