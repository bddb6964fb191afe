"""What every object store a bucket source reads looks like: listings and ranged object reads.

Owns the object store protocol (``Bucket``: ``list`` and ``read`` on the event loop, ranged object
reads in worker threads with ``stream_in_thread``, ``aclose``), the ``ObjectInfo`` a listing
yields, the ``Chunks`` a read in a worker thread yields (with the answer's headers), exactly one
range of an object (``read_range``), an object as a file object read by ranges (``ObjectFile``, for
a parser in a worker thread), and what every
store shares: following a listing's pages, a bounded whole-object read and a ranged stream that
checks the range it got (or skips to it when a server ignores Range). The stores (``gcs``, ``s3``)
own their URLs, one listing page and authentication. Must not know what the objects contain.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from dicomfs.dicomread import PositionedReader
from dicomfs.errors import ProtocolError, TransferBroken
from dicomfs.sources.asynchttp import HttpClient
from dicomfs.sources.threadhttp import BlockingHttp
from dicomfs.tasks import StopSignal

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

MAX_LIST_PAGES = 100_000


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int
    crc32c: str | None = None  # base64 of the big-endian CRC32C (GCS)
    updated: str | None = None
    # without quotes (S3; an MD5 for objects uploaded in one part, unless encrypted with a KMS or
    # customer key)
    etag: str | None = None


class Chunks:
    """An object's bytes as a worker thread reads them (iterate), with its answer's headers."""

    def __init__(self, pieces: Iterator[bytes], headers: Mapping[str, str]) -> None:
        self._pieces = pieces
        self.headers = headers  # (case-insensitive where the HTTP library's are)

    def __iter__(self) -> Iterator[bytes]:
        return self._pieces


class Bucket(Protocol):
    description: str  # ``gs://bucket`` or ``s3://bucket``: safe to log

    async def list(self, prefix: str, *, delimiter: str | None = "/",
                   max_pages: int = MAX_LIST_PAGES) -> tuple[list[str], list[ObjectInfo]]:
        """All sub-prefixes and objects under ``prefix``, following every page (up to ``max_pages``)."""
        ...

    async def read(self, name: str, limit: int) -> bytes: ...

    def stream_in_thread(self, name: str, start: int, end: int | None,
                         stop: StopSignal) -> AbstractContextManager[Chunks]: ...

    async def aclose(self) -> None: ...


class ObjectReader:
    """Listing and reading objects over HTTP, given one listing page (``list_page``) and where an
    object is (``object_url``); the stores inherit it."""

    http: HttpClient
    blocking: BlockingHttp  # object reads from worker threads

    def object_url(self, name: str) -> str:
        raise NotImplementedError

    async def list_page(self, prefix: str, delimiter: str | None,
                        token: str | None) -> tuple[list[str], list[ObjectInfo], str | None]:
        """One page of a listing: its sub-prefixes, its objects and the next page's token (None
        on the last)."""
        raise NotImplementedError

    async def list(self, prefix: str, *, delimiter: str | None = "/",
                   max_pages: int = MAX_LIST_PAGES) -> tuple[list[str], list[ObjectInfo]]:
        """All sub-prefixes and objects under ``prefix``, following every page (up to ``max_pages``)."""
        prefixes: list[str] = []
        objects: list[ObjectInfo] = []
        token: str | None = None
        for _ in range(max_pages):
            found, items, token = await self.list_page(prefix, delimiter, token)
            prefixes.extend(found)
            objects.extend(items)
            if not token:
                break
        return prefixes, objects

    async def aclose(self) -> None:
        await self.http.aclose()
        self.blocking.close()

    async def read(self, name: str, limit: int) -> bytes:
        """A whole (small) object, as stored: no transparent decompression."""
        return await self.read_url(self.object_url(name), limit, f"object {name}")

    async def read_url(self, url: str, limit: int, what: str) -> bytes:
        """The whole body of a GET of ``url`` (``what`` it is, for the error), at most ``limit``
        bytes, as sent: no transparent decompression."""
        async with self.http.stream(url, {"Accept-Encoding": "identity"}) as response:
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > limit:
                    raise ProtocolError(f"{what} is larger than {limit} bytes")
            return bytes(body)

    @contextmanager
    def stream_in_thread(self, name: str, start: int, end: int | None, stop: StopSignal) -> Iterator[Chunks]:
        """The bytes ``[start, end)`` of an object (a Range request unless it is the whole object),
        read in a worker thread (``tasks.run_stoppable``: ``stop`` breaks off the request)."""
        with self.blocking.stream(self.object_url(name), _range(start, end), stop) as body:
            skip = _skip(name, start, body.status, body.headers.get("content-range", ""))
            yield Chunks(_skipping_now(body.chunks(), skip), body.headers)



class ObjectFile(PositionedReader):
    """An object of ``size`` bytes as a read-only file object for one worker thread, read by Range
    requests of ``first_block`` bytes, each next one twice as large up to ``MAX_BLOCK`` (a
    header of a few KB costs one request, one with a large value in the middle a few), holding
    only the last block: pydicom parses a header from it, seeking past the values it leaves in
    the file (a request each when they are read back later, and a block from there). Reads never
    go past ``size``, nor past ``limit`` (a ``ProtocolError``: a header that large is no header);
    a body shorter than asked is a ``TransferBroken``. ``first``: the object's first bytes, read
    before (then the first request is for what follows them). With ``keep_head``, the blocks read
    one after another from the start are also kept, as ``head``, up to that many bytes."""

    MAX_BLOCK = 4 << 20

    def __init__(self, bucket: Bucket, name: str, size: int, stop: StopSignal, first_block: int = 64 << 10,
                 limit: int | None = None, keep_head: int = 0, first: bytes = b"") -> None:
        super().__init__(size)
        self._bucket, self._name, self._stop = bucket, name, stop
        self._block, self._start, self._data = first_block, 0, first[:size]
        self._limit = size if limit is None else limit
        self._keep = keep_head
        self._head = bytearray(self._data[:keep_head])

    @property
    def head(self) -> bytes:
        """The object's first bytes as read so far without a gap (up to ``keep_head`` of them)."""
        return bytes(self._head)

    def readinto(self, buffer: WriteableBuffer) -> int:
        """As much as ``buffer`` holds, up to the object's end (never less: pydicom reads a value
        with one ``read``, and a short one would be a malformed file to it)."""
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._pos < self._length:
            if not self._start <= self._pos < self._start + len(self._data):
                self._fetch(self._pos)
            at = self._pos - self._start
            got = min(len(view) - done, len(self._data) - at)
            view[done:done + got] = self._data[at:at + got]
            self._pos += got
            done += got
        return done

    def _fetch(self, start: int) -> None:
        self._stop.check()
        if start >= self._limit:
            raise ProtocolError(f"object {self._name}: more than its first {self._limit:,} bytes would be read")
        end = min(self._length, self._limit, start + self._block)
        self._block = min(self._block * 2, self.MAX_BLOCK)
        self._start, self._data = start, read_range(self._bucket, self._name, start, end, self._stop)
        if start == len(self._head) and start + len(self._data) <= self._keep:
            self._head += self._data


def read_range(bucket: Bucket, name: str, start: int, end: int, stop: StopSignal) -> bytes:
    """Exactly the bytes ``[start, end)`` of an object, in a worker thread (``stream_in_thread``);
    a body that ends sooner is a ``TransferBroken``."""
    data = bytearray()
    with bucket.stream_in_thread(name, start, end, stop) as chunks:
        for chunk in chunks:
            data += chunk
            if len(data) >= end - start:
                break  # (a server that ignored the Range sends the rest of the object)
    if len(data) < end - start:
        raise TransferBroken(f"object {name}: {len(data)} of the {end - start} bytes asked for from {start} came")
    return bytes(data[:end - start])

def _range(start: int, end: int | None) -> dict[str, str]:
    headers = {"Accept-Encoding": "identity"}
    if start or end is not None:
        headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
    return headers


def _skip(name: str, start: int, status: int, content_range: str) -> int:
    """How many bytes of the answer come before ``start``: all of them when the server ignored the
    Range (200); a 206 for another range is refused."""
    if status == 206 and not content_range.startswith(f"bytes {start}-"):
        raise ProtocolError(f"object {name}: the server answered a different range")
    return start if (start and status == 200) else 0


def _cut(chunk: bytes, skip: int) -> tuple[bytes, int]:
    """What is left of ``chunk`` after skipping ``skip`` more bytes, and what remains to skip."""
    if skip >= len(chunk):
        return b"", skip - len(chunk)
    return (chunk[skip:] if skip else chunk), 0


def _skipping_now(chunks: Iterator[bytes], skip: int) -> Iterator[bytes]:
    for chunk in chunks:
        piece, skip = _cut(chunk, skip)
        if piece:
            yield piece
