"""How long a file system request may wait, and when to stop waiting for a process being killed.

Owns three ways a kernel request that waits for the archive (a lookup that needs a size, an open
that needs its instance, a folder listing that queries) comes to an end before its answer is
ready: its deadline (``--read-timeout``: EIO, the download goes on for whoever asks next); its
process being killed (EINTR: a process waiting on a FUSE request sits in uninterruptible sleep,
and not even SIGKILL ends it until the request is answered, and pyfuse3 does not pass on the
kernel's interrupt, so the pending signals of waiting processes are looked at in ``/proc`` twice a
second); and the daemon shutting down (EIO at once). Only fatal signals count: a process that
handles a signal (and may be restarted by it) keeps waiting, as with a hard NFS mount.
Must not know what the requests wait for.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

from dicomfs.errors import DicomfsError, Interrupted, WaitTimeout

log = logging.getLogger(__name__)

DEFAULT_READ_TIMEOUT = 300.0
CHECK_INTERVAL = 0.5
_SIGKILL_BIT = 1 << (signal.SIGKILL - 1)  # the kernel adds SIGKILL to every thread of a dying process


class _Wait:
    __slots__ = ("scope", "pid", "since", "reason")

    def __init__(self, scope: trio.CancelScope, pid: int, since: float) -> None:
        self.scope = scope
        self.pid = pid
        self.since = since
        self.reason = ""


class Waits:
    """The requests waiting now; ``run`` is the watcher task."""

    def __init__(self, timeout: float = DEFAULT_READ_TIMEOUT, *, proc: Path = Path("/proc")) -> None:
        self.timeout = timeout
        self._proc = proc
        self._waiting: set[_Wait] = set()
        self._closing = False

    @contextmanager
    def bounded(self, pid: int | None, what: str) -> Iterator[None]:
        """Around the work of one request from process (thread) ``pid``: raises ``WaitTimeout``
        after the deadline, ``Interrupted`` when the process is being killed, ``DicomfsError``
        when dicomfs is shutting down."""
        now = trio.current_time()
        wait = _Wait(trio.CancelScope(deadline=now + self.timeout), pid or 0, now)
        if self._closing:
            wait.reason = "shutdown"
            wait.scope.cancel()
        self._waiting.add(wait)
        try:
            with wait.scope:
                yield
        finally:
            self._waiting.discard(wait)
        if not wait.scope.cancelled_caught:
            return
        if wait.reason == "killed":
            raise Interrupted(f"{what}: stopped waiting, the process that asked is being killed")
        if wait.reason == "shutdown":
            raise DicomfsError(f"{what}: dicomfs is shutting down")
        raise WaitTimeout(f"{what}: gave up after {self.timeout:.0f} s (--read-timeout); the download goes on")

    async def run(self) -> None:
        """Every ``CHECK_INTERVAL``, end the waits of processes that are being killed."""
        while True:
            await trio.sleep(CHECK_INTERVAL)
            now = trio.current_time()
            for wait in list(self._waiting):
                if wait.pid and now - wait.since >= CHECK_INTERVAL and self._being_killed(wait.pid):
                    wait.reason = "killed"
                    wait.scope.cancel()

    def cancel_all(self) -> None:
        """Shutting down: every waiting request fails now, and so does any that comes later."""
        self._closing = True
        for wait in list(self._waiting):
            wait.reason = "shutdown"
            wait.scope.cancel()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _being_killed(self, pid: int) -> bool:
        """Whether SIGKILL is pending for thread ``pid`` (or its process)."""
        try:
            status = (self._proc / str(pid) / "status").read_text()
        except OSError:
            return False  # not ours to see (another pid namespace), or already gone
        for line in status.splitlines():
            name, _, value = line.partition(":")
            if name in ("SigPnd", "ShdPnd"):
                try:
                    if int(value.strip(), 16) & _SIGKILL_BIT:
                        return True
                except ValueError:
                    continue
        return False
