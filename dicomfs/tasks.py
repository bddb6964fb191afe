"""Structured-concurrency helpers shared by the modules that fan work out to several tasks.

Owns one thing: a trio nursery whose failure comes out as a plain exception (the first
``DicomfsError`` of its tasks, or a ``KeyboardInterrupt``) rather than an ``ExceptionGroup``, so
that the CLI can print one line and the FUSE layer can map it to an errno. A group holding
anything else (a bug) is re-raised unchanged. Must not know what the tasks do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from dicomfs.errors import DicomfsError


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
