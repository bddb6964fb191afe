"""A retrieve worker: a child process of the daemon that runs C-GETs and C-MOVEs, one at a time,
with pynetdicom (``python -m dicomfs.sources.dimse.worker``).

Why a process: pynetdicom receives in Python threads that poll, and in the daemon they contend for
one interpreter lock with the event loop that serves FUSE and writes the cache; the PACS then
waits on us (measured: 84 MB over C-GET took 1.5-1.8 s in the daemon against 0.7 s for pynetdicom
alone; a C-MOVE received by a Storage SCP in the daemon cost it 13-17 s of CPU per GB). In a
process of its own, a retrieve runs on another core; and a worker that hangs in the library is
killed without the daemon noticing more than a failed retrieve.

Owns the loop of one worker: a request (``pipe.read_request``) from stdin, the C-GET
(``retrieve.get``) or C-MOVE (``retrieve.move``, which listens on the move port while it runs), its
instances, progress, log records and outcome as frames on stdout
(``pipe.FrameWriter``). Ends when stdin closes, after ``IDLE_EXIT`` seconds without a request, or
on SIGTERM, which gives the running retrieve up (C-CANCEL, then A-ABORT) before exiting. Must not
write anywhere but its stdout and stderr.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import signal
import sys
import threading
from typing import Any

from dicomfs.errors import SourceError
from dicomfs.sources.dimse import pipe, query, retrieve
from dicomfs.sources.dimse.imports import import_pynetdicom
from dicomfs.sources.dimse.net import CANCEL_GRACE

IDLE_EXIT = 120.0  # seconds without a request before the worker ends (the daemon starts another)
PROGRESS_TICK = 0.25
PIPE_SIZE = 1 << 20  # F_SETPIPE_SZ: fewer, larger reads for the daemon
AHEAD_BYTES = 32 << 20  # instances received but not yet written to the daemon (see _Forwarder)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class _Frames(logging.Handler):
    """Log records as ``L`` frames: they end up in the daemon's log."""

    def __init__(self, out: pipe.FrameWriter) -> None:
        super().__init__()
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.out.message(pipe.LOG, {"level": record.levelno, "message": record.getMessage()})
        except OSError:
            pass  # the daemon is gone: nobody to tell


def _next_request(fd: int, buffer: bytearray) -> bytes | None:
    """The next request line from stdin; None when stdin closes or stays silent too long."""
    while b"\n" not in buffer:
        ready, _, _ = select.select([fd], [], [], IDLE_EXIT)
        if not ready:
            return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return None
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


class _Forwarder:
    """Writes instances to the daemon from a thread of its own, so that the C-STORE response
    leaves (and the PACS sends the next instance) while the last one still goes down the pipe.
    At most ``AHEAD_BYTES`` wait (or one instance, whatever its size); ``put`` blocks beyond
    that, which holds the PACS when the daemon does not keep up."""

    def __init__(self, out: pipe.FrameWriter) -> None:
        self.out = out
        self.broken = False  # the daemon stopped reading
        self._waiting: list[tuple[str, bytes, bytes]] = []
        self._bytes = 0
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="dicomfs-forward", daemon=True)
        self._thread.start()

    def put(self, key: str, head: bytes, data: bytes) -> bool:
        size = len(head) + len(data)
        with self._changed:
            while self._waiting and self._bytes + size > AHEAD_BYTES and not self.broken:
                self._changed.wait()
            if self.broken:
                return False
            self._waiting.append((key, head, data))
            self._bytes += size
            self._changed.notify_all()
        return True

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._waiting and not self._closed:
                    self._changed.wait()
                if not self._waiting:
                    return
                key, head, data = self._waiting[0]
            try:
                if not self.broken:
                    self.out.instance(key, head, data)
            except OSError:
                self.broken = True
            with self._changed:
                self._waiting.pop(0)
                self._bytes -= len(head) + len(data)
                self._changed.notify_all()

    def close(self) -> None:
        """Wait until every instance put has been written (or the pipe broke)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join()


def _run(out: pipe.FrameWriter, line: bytes, current: dict[str, retrieve.Job]) -> None:
    peer, fields = pipe.read_request(line)
    logging.getLogger("dicomfs").setLevel(fields["log_level"])
    forwarder = _Forwarder(out)
    port = fields.get("move_port")
    what = "C-MOVE" if port else "C-GET"
    job = retrieve.Job(peer.description, peer.called_ae, fields["study"], fields["series"], fields["listed"],
                       forwarder.put, model=query.STUDY_ROOT_MOVE if port else query.STUDY_ROOT_GET)
    current["job"] = job
    finished = threading.Event()

    def report_progress() -> None:
        sent = -1
        try:
            while not finished.wait(PROGRESS_TICK):
                if job.received != sent:
                    sent = job.received
                    out.progress(sent)
        except OSError:
            pass  # the daemon is gone; the retrieve notices it too

    ticker = threading.Thread(target=report_progress, name="dicomfs-progress", daemon=True)
    ticker.start()
    try:
        if port:
            retrieve.move(peer, job, int(port))
        else:
            retrieve.get(peer, job)
        outcome: tuple[bytes, dict[str, Any]] = (pipe.DONE, {})
    except SourceError as exc:
        outcome = (pipe.ERROR, {"kind": type(exc).__name__, "message": str(exc)})
    except Exception as exc:  # a bug here, or in the library: this retrieve fails, the worker goes on
        logging.getLogger(__name__).exception("the %s of series %s failed", what, job.series_uid)
        outcome = (pipe.ERROR, {"kind": "SourceError", "message": f"the {what} of series {job.series_uid} failed: "
                                f"{type(exc).__name__}: {exc}"})
    finally:
        forwarder.close()
        finished.set()
        ticker.join()
        current.pop("job", None)
    if forwarder.broken:
        raise BrokenPipeError("the daemon stopped reading")
    out.progress(job.received)
    out.message(*outcome)


def main() -> int:
    # imported now, while the daemon has nothing for us yet, rather than with the first request
    import_pynetdicom()

    out = pipe.FrameWriter(sys.stdout.fileno())
    try:
        fcntl.fcntl(out.fd, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # not a pipe, or over the system's limit: the default size works too
    root = logging.getLogger("dicomfs")
    root.addHandler(_Frames(out))
    root.propagate = False
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    current: dict[str, retrieve.Job] = {}

    def on_term(signum: int, frame: Any) -> None:
        job = current.get("job")
        if job is not None:
            retrieve.stop(job, job.model)
            if job.assoc is not None:
                job.assoc.join(timeout=CANCEL_GRACE + 1.0)  # the cancel, then the abort, run their course
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the daemon's terminal is the daemon's to handle
    buffer = bytearray()
    while (line := _next_request(sys.stdin.fileno(), buffer)) is not None:
        try:
            _run(out, line, current)
        except OSError:  # our stdout is gone: so is the daemon
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
