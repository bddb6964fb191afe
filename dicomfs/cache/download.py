"""A running download of one blob: the sink a source writes into, and the writes to its file.

Owns ``SeriesDownload`` (a series' or one instance's ``.part`` file, its members as they
become readable, waking their readers), the checks every member's bytes pass however they
arrive (announced length, the Part 10 walk: ``_MemberCheck``), the two ways bytes reach the
file: a bounded queue drained by a writer task for sources on the event loop (``_MemberWriter``,
``write_loop``), and ``pwrite`` in the retrieve's own thread (``ThreadSink``), and the member
CRC32Cs the manifest records. Must not decide when to start, resume, commit or evict a
download (``store``); which attributes each thread may touch: docs/cache.md, "Threads and the
event loop".
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import trio

from dicomfs.cache.handles import InstanceHandle
from dicomfs.cache.layout import Manifest
from dicomfs.errors import CacheError, DicomfsError, IntegrityError, ProtocolError, SourceError
from dicomfs.p10check import Part10Check
from dicomfs.records import SeriesRecord

log = logging.getLogger(__name__)

WRITE_BATCH = 1 << 20  # bytes of one instance gathered before they are queued for writing
WRITE_QUEUE = 32  # queued writes before the download waits for the disk
WRITEBACK_STEP = 16 << 20  # written bytes handed to the kernel's writeback at a time
FULL_DISK = "the disk holding the cache is full, and evicting what is not in use did not make room"


@dataclass
class _Member:
    offset: int
    length: int


Fetch = Callable[["SeriesDownload"], Awaitable[None]]


@dataclass
class _Crc:
    """A member's running CRC32C, advanced by the writer thread as its bytes are written."""

    value: int = 0


@dataclass
class _Write:
    """Bytes for the blob file; ``completes`` names the member these bytes finish."""

    pos: int
    data: bytes | bytearray | memoryview
    crc: _Crc
    completes: tuple[str, _Member] | None = None


class SeriesDownload:
    """One running download of a blob (a whole series, or one instance of it); also the sink the
    source writes into.

    The source's bytes go through a bounded queue to ``write_loop``, which writes them in a worker
    thread, batch by batch, while the network keeps streaming. A member becomes visible to readers
    only once its last byte is written and it passed its Part 10 check.
    """

    def __init__(self, blob_key: str, series: SeriesRecord, path: Path, fetch: Fetch,
                 make_room: Callable[[], Awaitable[bool]] | None = None) -> None:
        self.blob_key = blob_key
        self.series = series
        self.fetch = fetch
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self.writeback = _Writeback(self.fd)
        self.members: dict[str, _Member] = {}  # written to disk, readable
        self.rejected: dict[str, str] = {}  # instance key -> why its bytes were refused
        self.end = 0  # end of the written members
        self.reserved = 0  # end of the members the source has finished (maybe not yet written)
        self.delivered: set[str] = set()  # members the source finished (maybe not yet written)
        self.finished = False
        self.error: BaseException | None = None
        self.done = trio.Event()  # set when the download ended, committed or not
        self.fetched = trio.Event()  # set when the source has delivered its bytes (or failed): the wire is free
        self.received = 0  # instance bytes delivered by the source so far
        self.wire = 0  # bytes that came from the archive, kept or skipped (the rate is measured on these)
        self.on_answer: Callable[[], None] | None = None  # called at the first byte of an attempt
        self.crcs: dict[str, int] = {}
        self.committed_elsewhere = False
        self.replaced: int | None = None  # instances in the cached copy this one replaced
        self._make_room = make_room
        self._changed = trio.Event()
        self._awaited: Counter[str] = Counter()  # instance key -> readers waiting for it
        self._send, self._receive = trio.open_memory_channel[_Write](WRITE_QUEUE)

    # --- SeriesSink -------------------------------------------------------------------------
    def arrived(self, size: int) -> None:
        self.wire += size
        if self.on_answer is not None:
            answered, self.on_answer = self.on_answer, None
            answered()

    def wants(self, key: str) -> bool:
        return key not in self.delivered

    def awaited(self) -> Collection[str]:
        return self._awaited.keys()

    async def begin(self, key: str, size: int | None) -> _MemberWriter:
        return _MemberWriter(self, key, self.reserved, size)

    def in_thread(self) -> ThreadSink:
        return ThreadSink(self)

    # --- members, from either writer ---------------------------------------------------------
    def reserve(self, key: str, offset: int, length: int) -> _Member:
        """A member the source finished and that passed its checks: the next one goes after it."""
        self.reserved = offset + length
        self.delivered.add(key)
        return _Member(offset, length)

    def refuse(self, key: str, reason: str) -> None:
        log.error("%s: instance %s refused: %s", self.blob_key, key, reason)
        self.rejected[key] = reason

    def publish(self, done: list[tuple[str, _Member, int]], refused: dict[str, str]) -> None:
        """Members written by a thread (with their CRC32C), and members it refused: readable now."""
        for key, member, crc in done:
            self.members[key] = member
            self.crcs[key] = crc
            self.end = max(self.end, member.offset + member.length)
        for key, reason in refused.items():
            self.refuse(key, reason)
        self.notify()

    # --- writing ----------------------------------------------------------------------------
    async def enqueue(self, write: _Write) -> None:
        try:
            await self._send.send(write)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The writer failed (its error, e.g. a full disk, is the download's): wait to be
            # cancelled with it rather than add an error of our own.
            await trio.sleep_forever()

    def close_writes(self) -> None:
        self._send.close()

    async def write_loop(self) -> None:
        """Write queued bytes in batches until the queue is closed; then every byte is on disk.
        A full disk makes room once (``make_room``: eviction) and tries the batch again."""
        async with self._receive:
            async for first in self._receive:
                batch = [first]
                while len(batch) < WRITE_QUEUE:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await trio.to_thread.run_sync(self.write_making_room,
                                              functools.partial(_write_batch, self.fd, batch, self.writeback))
                done = []
                for write in batch:
                    if write.completes is not None:
                        key, member = write.completes
                        done.append((key, member, write.crc.value))
                if done:
                    self.publish(done, {})

    def write_making_room(self, write: Callable[[], None]) -> None:
        """``write()``, in a worker thread (the writer task's or a retrieve's own). A full disk
        makes room once (``make_room``, on the event loop: eviction) and the write is tried again
        (a batch's CRC32Cs move only once it is all written, so writing it twice is harmless)."""
        try:
            write()
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or self._make_room is None:
                raise CacheError(f"cannot write to the cache: {exc.strerror}") from None
        if trio.from_thread.run(self._make_room):
            try:
                write()
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise CacheError(f"cannot write to the cache: {exc.strerror}") from None
        raise CacheError(FULL_DISK)

    # --- readers ----------------------------------------------------------------------------
    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_member(self, key: str) -> _Member | None:
        """Wait until ``key`` is complete; None if the download already ended and was committed.
        While it waits, ``key`` is among the ``awaited`` instances."""
        self._awaited[key] += 1
        try:
            while True:
                member = self.members.get(key)
                if member is not None:
                    return None if self.finished else member
                if key in self.rejected:
                    raise IntegrityError(f"instance {key}: {self.rejected[key]}")
                if self.finished:
                    if self.error is not None:
                        raise _as_dicomfs_error(self.error, f"{self.blob_key} could not be fetched")
                    raise IntegrityError(f"instance {key} is listed but missing from its series retrieve")
                await self._changed.wait()
        finally:
            self._awaited[key] -= 1
            if not self._awaited[key]:
                del self._awaited[key]

    async def open_member(self, key: str) -> InstanceHandle | None:
        member = await self.wait_member(key)
        if member is None:
            return None
        # No await between the check above and the dup: the fd is still open here.
        return InstanceHandle(os.dup(self.fd), member.offset, member.length)

    def manifest(self) -> Manifest:
        return Manifest({k: (m.offset, m.length) for k, m in self.members.items()}, self.end,
                        {k: self.crcs[k] for k in self.members})


class _MemberCheck:
    """What every member's bytes must pass, however they are written: the announced size and the
    structural Part 10 check. ``take`` raises on a member longer than announced; ``close`` says
    why the member is refused (None: accepted)."""

    def __init__(self, key: str, announced: int | None) -> None:
        self.key = key
        self.length = 0
        self._announced = announced
        self._check = Part10Check()
        self._malformed: str | None = None

    def take(self, data: bytes | bytearray | memoryview) -> None:
        if self._announced is not None and self.length + len(data) > self._announced:
            raise IntegrityError(f"instance {self.key} is longer than announced")
        if self._malformed is None:
            try:
                self._check.feed(data)
            except ProtocolError as exc:
                self._malformed = str(exc)
        self.length += len(data)

    def close(self) -> str | None:
        if self._announced is not None and self.length != self._announced:
            raise IntegrityError(f"instance {self.key} is shorter than announced")
        if self._malformed is None:
            try:
                self._check.finish()
            except ProtocolError as exc:
                self._malformed = str(exc)
        if self._malformed is None:
            return None
        # Never part of a blob; the next instance takes its place in the file.
        return f"not a well-formed DICOM Part 10 file: {self._malformed}"


class _MemberWriter:
    """A member from a source on the event loop: its bytes go to the download's write queue."""

    def __init__(self, download: SeriesDownload, key: str, offset: int, announced: int | None) -> None:
        self._download = download
        self._offset = offset
        self._queued = 0
        self._pending: list[bytes | bytearray | memoryview] = []
        self._pending_bytes = 0
        self._crc = _Crc()
        self._member = _MemberCheck(key, announced)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self._member.take(data)
        self._download.received += len(data)
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= WRITE_BATCH:
            await self._queue()

    async def _queue(self, completes: tuple[str, _Member] | None = None) -> None:
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        await self._download.enqueue(_Write(self._offset + self._queued, data, self._crc, completes))
        self._queued += len(data)

    async def finish(self) -> None:
        download, key = self._download, self._member.key
        reason = self._member.close()
        if reason is not None:
            download.refuse(key, reason)
            self._pending.clear()
            self._pending_bytes = 0
            download.notify()
            return
        member = download.reserve(key, self._offset, self._member.length)
        await self._queue(completes=(key, member))


class ThreadSink:
    """The download as a retrieve running in one worker thread sees it (``SeriesSink.in_thread``).

    Bytes are checked, written (``pwrite``) and CRC'd in that thread as they come, with no queue
    and no copy but the one the CRC needs of a piece that is part of a read (``_crc_input``);
    finished members reach readers in batches (``publish``). The thread never waits for the event
    loop to tell it of progress: ``publish`` and the first answer are handed to the loop with
    ``run_sync_soon`` (first in, first run, and before the thread's own return reaches its task,
    which comes the same way). Only a full disk waits for the loop, to make room once."""

    def __init__(self, download: SeriesDownload) -> None:
        self._download = download
        self._loop = trio.lowlevel.current_trio_token()  # (made on the event loop)
        self._done: list[tuple[str, _Member, int]] = []
        self._refused: dict[str, str] = {}

    def arrived(self, size: int) -> None:
        download = self._download
        download.wire += size
        if download.on_answer is not None:
            answered, download.on_answer = download.on_answer, None
            self._loop.run_sync_soon(answered)

    def wants(self, key: str) -> bool:
        return self._download.wants(key)

    def begin(self, key: str, size: int | None) -> _ThreadMemberWriter:
        return _ThreadMemberWriter(self, key, self._download.reserved, size)

    def publish(self) -> None:
        if self._done or self._refused:
            done, self._done = self._done, []
            refused, self._refused = self._refused, {}
            self._loop.run_sync_soon(self._download.publish, done, refused)

    def write(self, data: bytes | memoryview, pos: int) -> None:
        download = self._download

        def write() -> None:
            _pwrite_all(download.fd, data, pos)
            download.writeback.advance(pos + len(data))

        download.write_making_room(write)


class _ThreadMemberWriter:
    def __init__(self, sink: ThreadSink, key: str, offset: int, announced: int | None) -> None:
        self._sink = sink
        self._offset = offset
        self._crc = 0
        self._member = _MemberCheck(key, announced)

    def write(self, data: bytes | memoryview) -> None:
        pos = self._offset + self._member.length
        self._member.take(data)
        self._sink.write(data, pos)
        self._crc = google_crc32c.extend(self._crc, _crc_input(data))
        self._sink._download.received += len(data)

    def finish(self) -> None:
        download, key = self._sink._download, self._member.key
        reason = self._member.close()
        if reason is not None:
            self._sink._refused[key] = reason  # (logged and made known by ``publish``)
            return
        member = download.reserve(key, self._offset, self._member.length)
        self._sink._done.append((key, member, self._crc))


def _write_batch(fd: int, batch: list[_Write], writeback: _Writeback | None = None) -> None:
    """Write, and advance each member's CRC32C, in order (runs in a worker thread): each piece's
    CRC right after its write, while its bytes are still in the CPU's cache, but into the members'
    ``_Crc`` only once the whole batch is written, so a batch that failed can be written again."""
    running: dict[int, tuple[_Crc, int]] = {}
    for write in batch:
        _pwrite_all(fd, write.data, write.pos)
        crc, value = running.get(id(write.crc), (write.crc, write.crc.value))
        running[id(crc)] = (crc, google_crc32c.extend(value, _crc_input(write.data)))
    for crc, value in running.values():
        crc.value = value
    if writeback is not None:
        writeback.advance(max(write.pos + len(write.data) for write in batch))


def _crc_input(data: bytes | bytearray | memoryview) -> bytes:
    """``data`` as the C CRC32C takes it (bytes only, not a view): the bytes a view shows all of
    as they are, else a copy. (On a 1 Gbit/s link four fifths of a series' bytes come as pieces
    that are all one read brought, so no copy: about 0.03 s per GB, measured.)"""
    if isinstance(data, bytes):
        return data
    if isinstance(data, memoryview) and isinstance(data.obj, bytes) and data.nbytes == len(data.obj) \
            and data.contiguous and data.itemsize == 1:
        return data.obj
    return bytes(data)


def _as_dicomfs_error(error: BaseException, what: str) -> DicomfsError:
    """A download's error, raised anew to each of its readers: of the same kind (an outage stays
    an outage), with ``what`` before it; anything else (a bug) as a SourceError."""
    if isinstance(error, DicomfsError):
        return type(error)(f"{what}: {error}")
    return SourceError(f"{what}: {error}")


class _Writeback:
    """Starts the kernel writing a download's bytes to disk as they come (``sync_file_range``,
    which does not wait), a step at a time, so that the fsync of the commit finds little left to
    write: without it a whole series waits in the page cache and the fsync writes it all, while the
    commit (and a prefetch's end) waits. Used by the one thread writing at a time."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._started = 0  # bytes before this offset were handed to writeback

    def advance(self, end: int) -> None:
        if end - self._started < WRITEBACK_STEP:
            return
        _sync_file_range(self._fd, self._started, end - self._started)  # (a head start only: no error)
        self._started = end


SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, do not wait


@functools.cache
def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Python's ``os`` has no binding), None where there is none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _sync_file_range(fd: int, offset: int, length: int) -> None:
    function = _libc_sync_file_range()
    if function is not None:
        function(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, pos: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, pos)
        view = view[written:]
        pos += written

