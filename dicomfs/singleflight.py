"""Keyed single-flight: concurrent callers asking for the same key share one execution.

Owns only the coordination; what is computed belongs to the caller. If the running call is
cancelled, a waiting caller takes over instead of failing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class _Flight(Generic[T]):
    def __init__(self) -> None:
        self.done = trio.Event()
        self.outcome: tuple[T] | None = None  # (the result, once the call returned: T may be None)
        self.error: Exception | None = None


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._flights: dict[Hashable, _Flight[T]] = {}

    async def run(self, key: Hashable, call: Callable[[], Awaitable[T]]) -> T:
        while True:
            flight = self._flights.get(key)
            if flight is None:
                flight = _Flight()
                self._flights[key] = flight
                try:
                    flight.outcome = (await call(),)
                    return flight.outcome[0]
                except Exception as exc:
                    flight.error = exc
                    raise
                finally:
                    del self._flights[key]
                    flight.done.set()
                    # an error's traceback holds this frame: without this, frame, flight and error
                    # would make a cycle that only the cyclic collector frees
                    flight = None
            await flight.done.wait()
            if flight.outcome is not None:
                return flight.outcome[0]
            if flight.error is not None:
                raise flight.error
            # the leader was cancelled: try again, possibly as the new leader
