"""Pausing Python's cyclic garbage collector while a large JSON document or listing is built or
rewritten, and handing the memory such a document took back to the system afterwards.

Parsing a whole series' metadata creates about a million small objects, and each batch of them
sets off a collection that walks every object alive: with the collector paused the same parse
takes a third of the time (measured: 1.0 s -> 0.32 s for 29 MB from Orthanc). The IDC index's
168,000 studies, and their folders, are made the same way. The collector is
one per process, so the pause is too: a counter (under a lock) lets pauses in several worker
threads overlap, and the collector runs again when the last one ends. Nothing here is cyclic, so
nothing is lost by waiting. Must not be used around anything that may block for long.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import threading
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_lock = threading.Lock()
_pauses = 0
_was_enabled = True


def paused(call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``call(*args, **kwargs)`` with the cyclic garbage collector paused."""
    global _pauses, _was_enabled
    with _lock:
        if _pauses == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        return call(*args, **kwargs)
    finally:
        with _lock:
            _pauses -= 1
            if _pauses == 0 and _was_enabled:
                gc.enable()


def release_free_memory() -> None:
    """Return freed heap memory to the system (glibc ``malloc_trim``): after a large document is
    dropped, much of its memory would otherwise stay in the process. Blocking; a no-op elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    # glibc's soname first: ctypes.util.find_library would run ldconfig in a subprocess
    for name in _libc_names():
        try:
            trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
            return trim
        except (OSError, AttributeError):
            continue
    return None


def _libc_names() -> Iterator[str]:
    yield "libc.so.6"
    found = ctypes.util.find_library("c")
    if found:
        yield found
