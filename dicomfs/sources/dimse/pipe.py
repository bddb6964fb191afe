"""What the daemon and a retrieve worker process say to each other through the worker's pipes.

Requests go down the worker's stdin, one JSON line each: the peer (address, AE titles, timeout,
the TLS files, rebuilt there), the series with its listed instances, and how to retrieve it
(``get``, or ``move`` to our Storage SCP on a port). Answers come up its
stdout as frames, each a kind byte and a little-endian header:

* ``R`` u64: bytes received from the PACS so far in this retrieve (the download's progress);
* ``I`` u16 u64, the UID, then that many bytes: one instance, its Part 10 header and data set;
* ``L`` u32, JSON ``{"level", "message"}``: a log record of the worker's;
* ``E`` u32, JSON ``{"kind", "message"}``: the retrieve failed with this error of ours;
* ``D`` u32, JSON ``{}``: the retrieve is over (a failed sub-operation was logged).

Owns the encoding (the worker's ``FrameWriter``, thread-safe, blocking) and a sans-I/O decoder
(the daemon's ``FrameReader``, which hands out an instance's bytes as they come, never copying
them). Must not retrieve or store anything.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dicomfs.errors import AccessRefused, ProtocolError, SourceError, SourceUnavailable, TransferBroken
from dicomfs.sources.dimse.net import Peer, tls_context
from dicomfs.sources.dimse.status import GetRefused

PROGRESS, INSTANCE, LOG, ERROR, DONE = b"R", b"I", b"L", b"E", b"D"
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_INSTANCE = struct.Struct("<HQ")
# The errors a worker may report, by name; anything else becomes a SourceError
ERRORS: dict[str, type[SourceError]] = {cls.__name__: cls for cls in (
    SourceError, SourceUnavailable, AccessRefused, ProtocolError, TransferBroken, GetRefused)}


# --- requests ---------------------------------------------------------------------------------
def request(peer: Peer, study_uid: str, series_uid: str, listed: dict[str, str], log_level: int,
            move_port: int | None = None) -> bytes:
    """A C-GET of the series, or with ``move_port`` a C-MOVE to our Storage SCP on that port."""
    return json.dumps({
        "peer": {"host": peer.host, "port": peer.port, "called_ae": peer.called_ae, "calling_ae": peer.calling_ae,
                 "timeout": peer.timeout, "tls_files": list(peer.tls_files) if peer.tls_files else None},
        "study": study_uid, "series": series_uid, "listed": listed, "log_level": log_level,
        "move_port": move_port}).encode() + b"\n"


def read_request(line: bytes) -> tuple[Peer, dict[str, Any]]:
    """The peer (its TLS context rebuilt from the files) and the rest of a request."""
    fields = json.loads(line)
    spec = fields.pop("peer")
    files = tuple(spec.pop("tls_files") or ()) or None
    tls = tls_context(*files) if files else None
    return Peer(**spec, tls=tls, tls_files=files), fields


# --- the worker's side ------------------------------------------------------------------------
class FrameWriter:
    """Frames to a file descriptor (the worker's stdout), whole, from any thread; blocking, so
    that a daemon that does not keep up holds the worker (and the PACS) back."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()

    def _write(self, *pieces: bytes | memoryview) -> None:
        with self._lock:
            for piece in pieces:
                view = memoryview(piece)
                while view:
                    view = view[os.write(self.fd, view):]

    def progress(self, received: int) -> None:
        self._write(PROGRESS + _U64.pack(received))

    def instance(self, key: str, head: bytes, data: bytes) -> None:
        uid = key.encode()
        self._write(INSTANCE + _INSTANCE.pack(len(uid), len(head) + len(data)) + uid, head, data)

    def message(self, kind: bytes, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self._write(kind + _U32.pack(len(payload)) + payload)


# --- the daemon's side ------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    received: int


@dataclass(frozen=True)
class InstanceStart:
    key: str
    size: int


@dataclass(frozen=True)
class InstanceData:
    data: memoryview  # a view of bytes received: never changes


@dataclass(frozen=True)
class InstanceEnd:
    pass


@dataclass(frozen=True)
class Message:
    kind: bytes  # LOG, ERROR or DONE
    body: dict[str, Any]


Event = Progress | InstanceStart | InstanceData | InstanceEnd | Message


class FrameReader:
    """Feed what the worker's stdout gives (``feed``), get the events it completes."""

    def __init__(self) -> None:
        self._pending = b""  # an incomplete frame header, or message body
        self._left = 0  # bytes of the current instance still to come

    def feed(self, data: bytes | bytearray) -> Iterator[Event]:
        """``data`` must not change afterwards (instance bytes are handed out as views of it)."""
        view = memoryview(data)
        if self._pending:
            joined = self._pending + bytes(data)
            self._pending = b""
            view = memoryview(joined)
        while view:
            if self._left:
                piece = view[:self._left]
                view = view[len(piece):]
                self._left -= len(piece)
                yield InstanceData(piece)
                if not self._left:
                    yield InstanceEnd()
                continue
            event, used = self._frame(view)
            if event is None:
                self._pending = bytes(view)
                return
            view = view[used:]
            yield event
            if isinstance(event, InstanceStart) and not event.size:
                yield InstanceEnd()

    def _frame(self, view: memoryview) -> tuple[Event | None, int]:
        """The frame that starts ``view`` (its header, for an instance) and the bytes it used;
        (None, 0) when more bytes are needed."""
        kind = bytes(view[:1])
        if kind == PROGRESS:
            if len(view) < 1 + _U64.size:
                return None, 0
            return Progress(_U64.unpack_from(view, 1)[0]), 1 + _U64.size
        if kind == INSTANCE:
            if len(view) < 1 + _INSTANCE.size:
                return None, 0
            uid_length, size = _INSTANCE.unpack_from(view, 1)
            end = 1 + _INSTANCE.size + uid_length
            if len(view) < end:
                return None, 0
            self._left = size
            return InstanceStart(bytes(view[1 + _INSTANCE.size:end]).decode(), size), end
        if kind in (LOG, ERROR, DONE):
            if len(view) < 1 + _U32.size:
                return None, 0
            end = 1 + _U32.size + _U32.unpack_from(view, 1)[0]
            if len(view) < end:
                return None, 0
            return Message(kind, json.loads(bytes(view[1 + _U32.size:end]))), end
        raise ProtocolError(f"the DIMSE retrieve worker wrote an unknown frame {kind!r}")

    @property
    def idle(self) -> bool:
        """Between frames: the stream may end here."""
        return not self._pending and not self._left
