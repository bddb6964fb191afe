"""Incremental (sans-I/O) parser for ``multipart/related`` bodies such as WADO-RS responses.

Owns the framing of a multipart body: boundaries, part headers, per-part ``Content-Length``.
Feed it bytes as they arrive; it returns events. It runs in linear time: with a per-part
``Content-Length`` the body bytes are passed through without scanning or copying, and without one
each byte is scanned for the delimiter once (a tail shorter than the delimiter is kept between
feeds).
It must not do I/O or interpret part contents.
"""

from __future__ import annotations

from dataclasses import dataclass

from dicomfs.errors import ProtocolError

MAX_HEADER_BYTES = 16 * 1024
BOUNDARY_WINDOW = 64 * 1024  # bytes buffered at a time between two parts


@dataclass(frozen=True)
class PartStart:
    """A new part begins; ``content_length`` is the announced body size, if any."""

    headers: dict[str, str]
    content_length: int | None


@dataclass(frozen=True)
class PartData:
    data: bytes | memoryview


@dataclass(frozen=True)
class PartEnd:
    """The current part's body is complete."""


Event = PartStart | PartData | PartEnd

_PREAMBLE, _AFTER_BOUNDARY, _HEADERS, _BODY_SIZED, _BODY_CHECK, _BODY_SCAN, _DONE = range(7)


def boundary_from_content_type(content_type: str) -> bytes:
    """Extract the ``boundary`` parameter of a multipart Content-Type header."""
    media, _, params = content_type.partition(";")
    if not media.strip().lower().startswith("multipart/"):
        raise ProtocolError(f"expected a multipart response, got {media.strip()[:60]!r}")
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary":
            value = value.strip().strip('"')
            if 0 < len(value) <= 200:
                return value.encode("latin-1")
    raise ProtocolError("multipart response without a usable boundary")


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.split(b"\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise ProtocolError("malformed multipart part header")
        headers[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
    return headers


class MultipartParser:
    """Turns a multipart body, fed in arbitrary pieces, into PartStart/PartData/PartEnd events."""

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"\r\n--" + boundary
        self._state = _PREAMBLE
        # The body may start directly with "--boundary": pretend a CRLF came before it.
        self._buf = bytearray(b"\r\n")
        self._remaining = 0

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> list[Event]:
        """Events for ``data``. Body bytes of a part with a Content-Length are handed out as
        zero-copy ``memoryview`` slices of ``data``; only the few bytes around a boundary (and,
        without a Content-Length, the body being scanned) go through the internal buffer."""
        events: list[Event] = []
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end and self._state != _DONE:
            if self._state == _BODY_SIZED and not self._buf:
                take = min(self._remaining, end - pos)
                events.append(PartData(view[pos:pos + take]))
                self._remaining -= take
                pos += take
                if self._remaining == 0:
                    self._state = _BODY_CHECK
                continue
            # Boundaries and headers need little: buffer a window, not the rest of the chunk.
            window = end - pos if self._state == _BODY_SCAN else BOUNDARY_WINDOW
            self._buf += view[pos:pos + window]
            pos += min(window, end - pos)
            self._advance(events)
        return events

    def close(self) -> None:
        """Declare the end of input; raises ProtocolError if the body was cut short."""
        if self._state != _DONE:
            raise ProtocolError("multipart body ended before its closing boundary (truncated)")

    def _advance(self, events: list[Event]) -> None:
        buf = self._buf
        delim = self._delimiter
        while True:
            state = self._state
            if state == _PREAMBLE:
                idx = buf.find(delim)
                if idx < 0:
                    # keep only a tail that could still start the delimiter
                    if len(buf) > len(delim):
                        del buf[: len(buf) - len(delim)]
                    return
                del buf[: idx + len(delim)]
                self._state = _AFTER_BOUNDARY
            elif state == _AFTER_BOUNDARY:
                # transport padding (spaces/tabs) may follow the boundary
                stripped = 0
                while stripped < len(buf) and buf[stripped] in b" \t":
                    stripped += 1
                if stripped:
                    del buf[:stripped]
                if len(buf) < 2:
                    return
                if buf[:2] == b"--":
                    self._state = _DONE
                    buf.clear()
                    return
                if buf[:2] != b"\r\n":
                    raise ProtocolError("malformed multipart boundary line")
                del buf[:2]
                self._state = _HEADERS
            elif state == _HEADERS:
                if buf[:2] == b"\r\n":
                    headers: dict[str, str] = {}
                    del buf[:2]
                else:
                    idx = buf.find(b"\r\n\r\n")
                    if idx < 0:
                        if len(buf) > MAX_HEADER_BYTES:
                            raise ProtocolError("multipart part headers too long")
                        return
                    if idx > MAX_HEADER_BYTES:
                        raise ProtocolError("multipart part headers too long")
                    headers = _parse_headers(bytes(buf[:idx]))
                    del buf[: idx + 4]
                length = _content_length(headers)
                events.append(PartStart(headers, length))
                if length is None:
                    self._state = _BODY_SCAN
                else:
                    self._remaining = length
                    self._state = _BODY_SIZED
            elif state == _BODY_SIZED:
                take = min(self._remaining, len(buf))
                if take:
                    events.append(PartData(bytes(buf[:take])))
                    del buf[:take]
                    self._remaining -= take
                if self._remaining:
                    return
                self._state = _BODY_CHECK
            elif state == _BODY_CHECK:
                if len(buf) < len(delim):
                    if not delim.startswith(bytes(buf)):
                        raise ProtocolError("multipart part is longer than its Content-Length")
                    return
                if buf[: len(delim)] != delim:
                    raise ProtocolError("multipart part is longer than its Content-Length")
                del buf[: len(delim)]
                events.append(PartEnd())
                self._state = _AFTER_BOUNDARY
            elif state == _BODY_SCAN:
                idx = buf.find(delim)
                if idx < 0:
                    keep = len(delim) - 1
                    if len(buf) > keep:
                        cut = len(buf) - keep
                        events.append(PartData(bytes(buf[:cut])))
                        del buf[:cut]
                    return
                if idx:
                    events.append(PartData(bytes(buf[:idx])))
                del buf[: idx + len(delim)]
                events.append(PartEnd())
                self._state = _AFTER_BOUNDARY
            else:  # _DONE
                buf.clear()
                return


def _content_length(headers: dict[str, str]) -> int | None:
    raw = headers.get("content-length")
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 15:
        raise ProtocolError("invalid Content-Length in multipart part")
    return int(raw)
