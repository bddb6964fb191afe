"""The daemon's side of the retrieve workers (``worker``): child processes that run one C-GET or
C-MOVE at a time, and the retrieve that streams a worker's instances into a series sink as they
come.

Owns starting workers (``warm`` starts them ahead of need, up to the association limit: a worker
takes a third of a second to start), handing an idle one out, and ending them: a worker whose
retrieve finished, with success or with an error it reported, goes back to the idle list; one
whose retrieve was given up, or that broke, is sent SIGTERM (it cancels its retrieve) and killed
if it has not ended after a grace. Idle workers end by themselves after ``worker.IDLE_EXIT``
seconds and are replaced when needed. Workers run the ``dicomfs`` package this one was imported
from. Must not know DIMSE: what a request holds is ``pipe``'s, what a worker does is
``worker``'s.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

import dicomfs
from dicomfs.errors import SourceError, TransferBroken
from dicomfs.sources.base import MemberWriter, SeriesSink
from dicomfs.sources.dimse import pipe

log = logging.getLogger(__name__)

RECEIVE = 1 << 20  # bytes read from a worker's stdout at once
END_GRACE = 5.0  # after SIGTERM (the worker's C-CANCEL, then A-ABORT), seconds before SIGKILL


class WorkerPool:
    """Retrieve workers for one source: as many run at once as retrieves do (the association
    pool bounds those, to ``limit``); ``warm`` never starts one beyond ``limit`` in all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._idle: list[trio.Process] = []
        self._busy = 0  # workers running a retrieve
        self._ending: set[trio.Process] = set()

    async def _start(self) -> trio.Process:
        package_root = str(Path(dicomfs.__file__).resolve().parents[1])
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": package_root + (os.pathsep + path if path else "")}
        return await trio.lowlevel.open_process([sys.executable, "-m", "dicomfs.sources.dimse.worker"],
                                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def _take_idle(self) -> trio.Process | None:
        while self._idle:
            process = self._idle.pop()
            if process.poll() is None:
                return process
        return None

    async def warm(self, count: int = 1) -> None:
        """Have ``count`` idle workers ready, as far as ``limit`` allows with the busy ones (those
        missing are started now, not waited for)."""
        self._idle = [process for process in self._idle if process.poll() is None]
        for _ in range(min(count, self.limit - self._busy) - len(self._idle)):
            self._idle.append(await self._start())

    async def retrieve(self, request: bytes, sink: SeriesSink, what: str) -> None:
        """Have a worker run ``request`` (``pipe.request``); its instances go to ``sink`` as they
        arrive. Raises the error the worker reports, or ``TransferBroken`` if the worker dies (the
        blob store then resumes the series with another)."""
        process = self._take_idle() or await self._start()
        reusable = False
        self._busy += 1
        try:
            assert process.stdin is not None and process.stdout is not None
            await process.stdin.send_all(request)
            reader = pipe.FrameReader()
            writer: MemberWriter | None = None
            reported = 0
            while True:
                data = await process.stdout.receive_some(RECEIVE)
                if not data:
                    with trio.move_on_after(1):
                        await process.wait()
                    raise TransferBroken(f"the retrieve of {what} broke off: its worker process ended "
                                         f"({_ended(process)})")
                for event in reader.feed(data):
                    if isinstance(event, pipe.InstanceData):
                        if writer is not None:
                            await writer.write(event.data)
                    elif isinstance(event, pipe.InstanceStart):
                        writer = await sink.begin(event.key, event.size) if sink.wants(event.key) else None
                    elif isinstance(event, pipe.InstanceEnd):
                        if writer is not None:
                            await writer.finish()
                            writer = None
                    elif isinstance(event, pipe.Progress):
                        if event.received > reported:
                            sink.arrived(event.received - reported)
                            reported = event.received
                    elif event.kind == pipe.LOG:
                        log.log(int(event.body.get("level", logging.WARNING)), "%s", event.body.get("message"))
                    elif event.kind == pipe.ERROR:
                        reusable = True
                        raise pipe.ERRORS.get(str(event.body.get("kind")), SourceError)(str(event.body.get("message")))
                    else:  # DONE
                        reusable = reader.idle
                        return
        finally:
            self._busy -= 1
            if reusable:
                self._idle.append(process)
            else:
                self._end(process)

    def _end(self, process: trio.Process) -> None:
        """SIGTERM now (the worker gives its C-GET up), SIGKILL after ``END_GRACE``; reaped in the
        background, so that a cancelled caller does not wait."""
        if process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        self._ending.add(process)
        trio.lowlevel.spawn_system_task(self._reap, process, name="dicomfs: ending a retrieve worker")

    async def _reap(self, process: trio.Process) -> None:
        try:
            with trio.move_on_after(END_GRACE):
                await process.wait()
            if process.poll() is None:
                log.warning("a retrieve worker (pid %d) did not end on SIGTERM: killed", process.pid)
                process.kill()
                await process.wait()
        except Exception:  # a system task must not raise
            log.exception("ending retrieve worker %d failed", process.pid)
        finally:
            self._ending.discard(process)

    async def aclose(self) -> None:
        """End every worker: idle ones at once (SIGTERM: they hold no association), the others as
        ``_end`` does."""
        idle, self._idle = self._idle, []
        for process in idle:
            if process.poll() is None:
                process.terminate()
        with trio.CancelScope(shield=True), trio.move_on_after(END_GRACE):
            for process in idle:
                await process.wait()
            while self._ending:
                await trio.sleep(0.05)
        for process in [*idle, *self._ending]:
            if process.poll() is None:
                process.kill()


def _ended(process: trio.Process) -> str:
    code = process.poll()
    if code is None:
        return "it is still running"
    if code < 0:
        return f"killed by signal {-code}"
    return f"exit status {code}"
