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
from contextlib import AbstractContextManager
from pathlib import Path

import trio

from dicomfs.errors import DicomfsError, Interrupted, WaitTimeout

log = logging.getLogger(__name__)

DEFAULT_READ_TIMEOUT = 300.0
CHECK_INTERVAL = 0.5
_SIGKILL_BIT = 1 << (signal.SIGKILL - 1)  # the kernel adds SIGKILL to every thread of a dying process


class _Wait:
    """One waiting request: a context manager (a class, not a generator: it is around every
    lookup, getattr, opendir and open that may wait, and the generator's own cost showed)."""

    __slots__ = ("waits", "scope", "pid", "since", "what", "reason")

    def __init__(self, waits: Waits, pid: int, what: str) -> None:
        now = trio.current_time()
        self.waits = waits
        self.scope = trio.CancelScope(deadline=now + waits.timeout)
        self.pid = pid
        self.since = now
        self.what = what
        self.reason = ""

    def __enter__(self) -> None:
        waits = self.waits
        if waits._closing:
            self.reason = "shutdown"
            self.scope.cancel()
        self.scope.__enter__()
        waits._waiting.add(self)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        try:
            self.scope.__exit__(kind, exc, tb)  # type: ignore[arg-type]  # (trio's stub wants a traceback)
        finally:
            self.waits._waiting.discard(self)
        if not self.scope.cancelled_caught:
            return
        if self.reason == "killed":
            raise Interrupted(f"{self.what}: stopped waiting, the process that asked is being killed")
        if self.reason == "shutdown":
            raise DicomfsError(f"{self.what}: dicomfs is shutting down")
        raise WaitTimeout(f"{self.what}: gave up after {self.waits.timeout:.0f} s (--read-timeout); "
                          "the download goes on")


class Waits:
    """The requests waiting now; ``run`` is the watcher task."""

    def __init__(self, timeout: float = DEFAULT_READ_TIMEOUT, *, proc: Path = Path("/proc")) -> None:
        self.timeout = timeout
        self._proc = proc
        self._waiting: set[_Wait] = set()
        self._closing = False

    def bounded(self, pid: int | None, what: str) -> AbstractContextManager[None]:
        """Around the work of one request from process (thread) ``pid``: raises ``WaitTimeout``
        after the deadline, ``Interrupted`` when the process is being killed, ``DicomfsError``
        when dicomfs is shutting down."""
        return _Wait(self, pid or 0, what)

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
