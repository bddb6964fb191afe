"""Decoding untrusted bytes from an archive: content codings undone within a hard limit, and JSON
parsed so that whatever is wrong with it is one ``ProtocolError``.

Owns the rule that compressed bytes are inflated in bounded steps and counted as they come out
(a 1 MB gzip bomb must never become a gigabyte in memory or on disk), which codings are accepted
(identity, gzip, deflate: what dicomfs advertises), and that malformed or absurdly nested JSON
(``RecursionError``) is reported like any other malformed answer. Must not do I/O.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import orjson

from dicomfs.errors import ProtocolError

ACCEPTED_CODINGS = "gzip, deflate"  # the Accept-Encoding dicomfs sends where it takes compression
_STEP = 1 << 20  # bytes inflated at a time


class BoundedDecoder:
    """Undoes one HTTP ``Content-Encoding`` chunk by chunk, never giving out more than ``limit``
    bytes in all (``ProtocolError`` once it would)."""

    def __init__(self, encoding: str | None, limit: int, what: str) -> None:
        coding = (encoding or "identity").strip().lower()
        self.limit = limit
        self.what = what
        self.produced = 0
        self._inflater: zlib._Decompress | None = None
        self._deflate_format_pending = False
        if coding == "gzip" or coding == "x-gzip":
            self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self._deflate_format_pending = True  # zlib-wrapped per the RFC, raw from some servers
        elif coding != "identity":
            raise ProtocolError(f"{what} came with Content-Encoding {coding[:40]!r}, which dicomfs did not ask for")

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[bytes | bytearray | memoryview]:
        if self._deflate_format_pending and chunk:
            head = bytes(chunk[:2])
            zlib_wrapped = len(head) == 2 and head[0] & 0x0F == 8 and int.from_bytes(head, "big") % 31 == 0
            self._inflater = zlib.decompressobj(zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS)
            self._deflate_format_pending = False
        if self._inflater is None:
            self._count(len(chunk))
            return [chunk]
        out: list[bytes | bytearray | memoryview] = []
        pending = bytes(chunk)
        try:
            while pending and not self._inflater.eof:
                piece = self._inflater.decompress(pending, _STEP)
                self._count(len(piece))
                if piece:
                    out.append(piece)
                pending = self._inflater.unconsumed_tail
        except zlib.error as exc:
            raise ProtocolError(f"{self.what} is not validly compressed: {exc}") from None
        return out

    def finish(self) -> None:
        if self._inflater is not None and not self._inflater.eof:
            raise ProtocolError(f"{self.what} ends inside its compressed stream")

    def _count(self, size: int) -> None:
        self.produced += size
        if self.produced > self.limit:
            raise ProtocolError(f"{self.what} is larger than {self.limit} bytes{self._inflated}: refused")

    @property
    def _inflated(self) -> str:
        return " once inflated" if self._inflater is not None else ""


def inflate_gzip(raw: bytes, limit: int, what: str) -> bytes:
    """A gzip'd document inflated, at most ``limit`` bytes of it (``ProtocolError`` beyond)."""
    decoder = BoundedDecoder("gzip", limit, what)
    pieces = decoder.feed(raw)
    decoder.finish()
    return b"".join(pieces)


def parse_json(body: bytes | bytearray | memoryview | str, what: str) -> Any:
    """Parse JSON from an archive; anything malformed, including nesting too deep for the parser,
    is a one-line ``ProtocolError``.

    orjson first (a 1,500-instance series' metadata: 4 ms instead of 17); what it refuses and the
    standard library reads (NaN and Infinity as archives send them, lone surrogate escapes,
    nesting beyond 1,024 levels) is read by the standard library, or refused by it."""
    data = body if isinstance(body, (bytes, str)) else bytes(body)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(data)
    except RecursionError:
        raise ProtocolError(f"malformed JSON from {what}: nested too deeply") from None
    except ValueError:
        raise ProtocolError(f"malformed JSON from {what}") from None
