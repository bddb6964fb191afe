"""Structured-concurrency helpers shared by the modules that fan work out to several tasks.

Owns a trio nursery whose failure comes out as a plain exception (the first ``DicomfsError`` of
its tasks, or a ``KeyboardInterrupt``) rather than an ``ExceptionGroup``, so that the CLI can
print one line and the FUSE layer can map it to an errno (a group holding anything else, a bug,
is re-raised unchanged); and the bounded concurrent map built on it. Must not know what the
tasks do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio

from dicomfs.errors import DicomfsError

T = TypeVar("T")
R = TypeVar("R")


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def plain(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception to raise instead of ``group``: see the module docstring."""
    found = leaves(group)
    for kind in (KeyboardInterrupt, trio.Cancelled):
        if any(isinstance(exc, kind) for exc in found):
            return next(exc for exc in found if isinstance(exc, kind))
    if found and all(isinstance(exc, DicomfsError) for exc in found):
        return found[0]
    return group


@asynccontextmanager
async def open_nursery() -> AsyncIterator[trio.Nursery]:
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        raise plain(group) from None


async def map_bounded(items: list[T], call: Callable[[T], Awaitable[R]], limit: trio.CapacityLimiter) -> list[R]:
    """``call`` of every item, concurrently but at most ``limit`` at a time; results in order."""
    results: list[Any] = [None] * len(items)

    async def one(index: int, item: T) -> None:
        async with limit:
            results[index] = await call(item)

    async with open_nursery() as nursery:
        for index, item in enumerate(items):
            nursery.start_soon(one, index, item)
    return results
