"""Series blobs on local disk: single-flight downloads, crash-safe commits, LRU eviction.

Design note
-----------
* A series blob is one file holding the series' instances back to back, plus a *manifest*
  (instance key -> offset, length) kept in its own small diskcache.
* Several processes may share one cache (a mount and a ``prefetch``). Each has its own folder
  ``work/<pid>-<random>/`` (partial downloads, evicted blobs still open), locked with ``flock``
  for the process's lifetime; folders whose lock is free belong to dead processes and are
  deleted on start. Commits from all processes are serialised by ``commit.lock``: a series that
  another process committed meanwhile is kept and ours discarded, unless ours holds instances it
  lacks (the series grew): then ours replaces it. A manifest never describes a blob other than
  the one in the index. A running download holds ``locks/<hash of its key>``;
  ``fetch_series`` (prefetch) waits for another process's download of the same series instead of
  fetching it a second time, while a reader never waits (it would wait for the whole series).
* A download writes into ``work/<process>/<random>.part`` through a bounded queue drained by a writer
  task (batches written in a worker thread), so the network is read while the disk is written.
  Every member's bytes pass a structural Part 10 check (``p10check``) on the way; a member that
  fails is refused and the next one takes its place. Readers of instance k wait only until k's
  bytes are written (an event per change), then read through their own dup'ed fd.
* A download runs within the transfer limits (``transferlimits.enforce``), asks the archive's
  breaker first (refused at once while the archive is down), and is resumed after a break only
  if the broken attempt brought new instances: the HTTP layer owns the retrying of requests.
* Sources that can fetch one instance cheaply (``InstanceFetcher``, e.g. COD by Range) get the
  first instance opened in an uncached series fetched alone; a second one fetches the series.
* When the download ends cleanly the file is fsync'ed and handed to the blob index (a diskcache
  with ``size_limit`` and least-recently-used eviction). ``BlobDisk.store`` *renames* it into the
  index directory (no copy), in the same call that records it, after the manifest was written.
  A crash at any point leaves at worst a ``.part`` file (deleted on start) or an unindexed file:
  never an index entry for a blob that was not complete and verified. The manifest records each
  member's CRC32C, computed by the writer thread as the bytes are written, so ``verify`` can
  re-check a blob later.
* Single-flight: one ``SeriesDownload`` per series at a time; every reader joins it. Downloads
  belong to the store's own nursery, so a reader that gives up does not cancel them. After a
  complete retrieve, an instance it did not hold is not retrieved for again within
  ``missing_recheck`` (the listing TTL).
* Eviction runs in a background task (``Cache.cull`` in a worker thread), never in a read. A blob
  that is evicted while a reader of this process holds it open is moved to the process's
  ``graveyard/`` and deleted when the last reader lets go (``BlobDisk.remove``); other
  processes keep reading an unlinked file through their open descriptors. A write that fails
  with ENOSPC evicts below the limit once (a ``ballast`` file gives sqlite the room to record
  it) and is tried again; the limit is fitted to the filesystem only at start.
* Sources that have a local file per instance (folders, the demo) are served in place.

Must not know about FUSE, inodes or the tree.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cachetools
import diskcache
import google_crc32c
import trio

from dicomfs import clock
from dicomfs.breaker import Breaker
from dicomfs.cachedir import fit_size_limit
from dicomfs.errors import CacheError, DicomfsError, IntegrityError, ProtocolError, SourceError, TransferBroken
from dicomfs.p10check import Part10Check
from dicomfs.progress import human_bytes
from dicomfs.records import InstanceRecord, SeriesRecord
from dicomfs.sources.base import InstanceFetcher, Source
from dicomfs.tasks import leaves, open_nursery, plain
from dicomfs.transferlimits import TransferLimits, enforce

log = logging.getLogger(__name__)

WRITE_BATCH = 1 << 20  # bytes of one instance gathered before they are queued for writing
WRITE_QUEUE = 32  # queued writes before the download waits for the disk
RESUMES = 2  # a transfer that broke off after bringing new instances is resumed at most this often
RESUME_DELAY = 0.5
JOIN_ATTEMPTS = 4
ROOM_STEP = 16 << 20  # a full disk: evict an eighth of the limit, at least 4 MiB, at most this
BALLAST_NAME = "ballast"
BALLAST_BYTES = 1 << 20
LRU_FLUSH_SECONDS = 5.0
STALE_NEW_FOLDER_SECONDS = 3600.0
LOCK_POLL_SECONDS = 0.1
MAX_WAIT_FOR_OTHER_PROCESS = 3600.0  # a prefetch waits this long for another process's download
FULL_DISK = "the disk holding the cache is full, and evicting what is not in use did not make room"


@dataclass(frozen=True)
class Manifest:
    members: dict[str, tuple[int, int]]  # key -> (offset, length)
    size: int
    crcs: dict[str, int] | None = None  # key -> CRC32C of the member (absent in old caches)


class ProcessFolder:
    """This process's private folder inside a shared cache, locked while the process lives."""

    def __init__(self, cache_dir: Path) -> None:
        root = cache_dir / "work"
        root.mkdir(parents=True, exist_ok=True)
        sweep_dead_folders(root)
        # Lock before the folder gets a name that sweepers look at.
        fresh = root / f".new-{uuid.uuid4().hex}"
        fresh.mkdir()
        self._fd = os.open(fresh / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.path = root / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(fresh, self.path)
        self.graveyard = self.path / "graveyard"
        self.graveyard.mkdir()

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._fd)


def sweep_dead_folders(root: Path) -> int:
    """Delete the work folders of processes that are gone (their lock is free). Blocking."""
    swept = 0
    for folder in root.iterdir():
        if folder.name.startswith(".new-"):
            # a process between mkdir and rename (a moment), or one that died right there
            try:
                if time.time() - folder.stat().st_mtime > STALE_NEW_FOLDER_SECONDS:
                    shutil.rmtree(folder, ignore_errors=True)
            except OSError:
                pass
            continue
        try:
            fd = os.open(folder / ".lock", os.O_RDWR)
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)
            swept += 1
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # alive
        finally:
            os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)
        swept += 1
    return swept


@dataclass
class CompletedBlob:
    """A finished ``.part`` file, handed to ``BlobDisk.store`` to be moved into the index."""

    path: str
    size: int
    stored_at: str | None = None  # where BlobDisk.store moved it


class _Pins:
    """Blob files that readers hold open, and evicted ones waiting for their last reader.

    Used from the event loop (pin, unpin) and from the eviction worker thread (bury): a lock
    keeps the two from crossing."""

    def __init__(self, graveyard: Path) -> None:
        self.graveyard = graveyard
        self._counts: Counter[str] = Counter()
        self._buried: dict[str, str] = {}
        self._lock = threading.Lock()

    def pin(self, path: str) -> None:
        with self._lock:
            self._counts[path] += 1

    def unpin(self, path: str) -> None:
        with self._lock:
            self._counts[path] -= 1
            if self._counts[path] > 0:
                return
            del self._counts[path]
            grave = self._buried.pop(path, None)
        if grave is not None:
            _unlink_quietly(grave)

    def bury(self, path: str) -> bool:
        """Move a pinned blob to the graveyard instead of deleting it; False if not pinned."""
        with self._lock:
            if not self._counts.get(path):
                return False
            grave = str(self.graveyard / uuid.uuid4().hex)
            try:
                os.rename(path, grave)
            except OSError:
                return False
            self._buried[path] = grave
            return True


class _Ballast:
    """A small file of real blocks kept in the cache, deleted when the disk is full so that
    sqlite has room to record the eviction that makes room (it cannot even delete a row on a full
    disk), and made again afterwards. Blocking."""

    def __init__(self, path: Path, size: int = BALLAST_BYTES) -> None:
        self.path = path
        self.size = size

    def keep(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        except OSError:
            return
        try:
            os.posix_fallocate(fd, 0, self.size)
        except OSError:  # no room for it now: next time
            os.close(fd)
            _unlink_quietly(str(self.path))
            return
        os.close(fd)

    def drop(self) -> None:
        _unlink_quietly(str(self.path))


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class BlobDisk(diskcache.Disk):
    """diskcache storage that adopts finished blob files by rename and spares pinned ones."""

    pins: _Pins  # set on the per-store subclass made by ``_disk_class``

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> tuple[Any, ...]:
        if isinstance(value, CompletedBlob):
            filename, full_path = self.filename(key, value)
            folder = os.path.dirname(full_path)
            for attempt in range(10):
                # Another process's eviction may remove the (empty) folder between the two calls.
                os.makedirs(folder, exist_ok=True)
                try:
                    os.rename(value.path, full_path)
                    break
                except FileNotFoundError:
                    if attempt == 9 or not os.path.exists(value.path):
                        raise
            _fsync_directory(folder)  # the rename survives a power cut before the index row does
            value.stored_at = full_path
            return value.size, diskcache.core.MODE_BINARY, filename, None
        return super().store(value, read, key)  # type: ignore[no-any-return]

    def remove(self, file_path: str) -> None:
        if not self.pins.bury(os.path.join(self._directory, file_path)):
            super().remove(file_path)


def _fsync_directory(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_class(pins: _Pins) -> type[BlobDisk]:
    return type("PinnedBlobDisk", (BlobDisk,), {"pins": pins})


class InstanceHandle:
    """An open instance: a private fd on the file that holds it, and where in that file."""

    def __init__(self, fd: int, offset: int, length: int, release: Any = None) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length
        self._release = release
        self._nowait = True

    async def read(self, off: int, size: int) -> bytes | bytearray:
        if off >= self.length or size <= 0:
            return b""
        size = min(size, self.length - off)
        pos = self.offset + off
        if self._nowait:
            # Page-cache hits are answered inline; only a read that would block goes to a thread.
            buf = bytearray(size)
            try:
                if os.preadv(self.fd, [buf], pos, os.RWF_NOWAIT) == size:
                    return buf  # pyfuse3 takes any buffer: no copy
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._nowait = False
        data = await trio.to_thread.run_sync(os.pread, self.fd, size, pos)
        if len(data) != size:
            raise IntegrityError("cached blob is shorter than its manifest")
        return data

    def close(self) -> None:
        os.close(self.fd)
        if self._release is not None:
            self._release()
            self._release = None


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
        self.members: dict[str, _Member] = {}  # written to disk, readable
        self.rejected: dict[str, str] = {}  # instance key -> why its bytes were refused
        self.end = 0  # end of the written members
        self.reserved = 0  # end of the members the source has finished (maybe not yet written)
        self._finished: set[str] = set()
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
        self._send, self._receive = trio.open_memory_channel[_Write](WRITE_QUEUE)

    # --- SeriesSink -------------------------------------------------------------------------
    def arrived(self, size: int) -> None:
        self.wire += size
        if self.on_answer is not None:
            answered, self.on_answer = self.on_answer, None
            answered()

    def wants(self, key: str) -> bool:
        return key not in self._finished

    async def begin(self, key: str, size: int | None) -> _MemberWriter:
        return _MemberWriter(self, key, self.reserved, size)

    def in_thread(self) -> ThreadSink:
        return ThreadSink(self)

    # --- members, from either writer ---------------------------------------------------------
    def reserve(self, key: str, offset: int, length: int) -> _Member:
        """A member the source finished and that passed its checks: the next one goes after it."""
        self.reserved = offset + length
        self._finished.add(key)
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
                await self._write(batch)
                done = [(w.completes, w.crc.value) for w in batch if w.completes is not None]
                for (key, member), crc in done:
                    self.members[key] = member
                    self.crcs[key] = crc
                    self.end = max(self.end, member.offset + member.length)
                if done:
                    self.notify()

    async def _write(self, batch: list[_Write]) -> None:
        try:
            await trio.to_thread.run_sync(_write_batch, self.fd, batch)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or self._make_room is None:
                raise CacheError(f"cannot write to the cache: {exc.strerror}") from None
        if await self._make_room():
            try:
                await trio.to_thread.run_sync(_write_batch, self.fd, batch)
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
        """Wait until ``key`` is complete; None if the download already ended and was committed."""
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
    and no copy but the one the CRC needs; finished members reach readers in batches (``publish``).
    The thread never waits for the event loop to tell it of progress: ``publish`` and the first
    answer are handed to the loop with ``run_sync_soon`` (first in, first run, and before the
    thread's own return reaches its task, which comes the same way). Only a full disk waits for
    the loop, to make room once."""

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
        try:
            _pwrite_all(self._download.fd, data, pos)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or self._download._make_room is None:
                raise CacheError(f"cannot write to the cache: {exc.strerror}") from None
        if trio.from_thread.run(self._download._make_room):
            try:
                _pwrite_all(self._download.fd, data, pos)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise CacheError(f"cannot write to the cache: {exc.strerror}") from None
        raise CacheError(FULL_DISK)


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
        self._crc = google_crc32c.extend(self._crc, data if isinstance(data, bytes) else bytes(data))
        self._sink._download.received += len(data)

    def finish(self) -> None:
        download, key = self._sink._download, self._member.key
        reason = self._member.close()
        if reason is not None:
            self._sink._refused[key] = reason  # (logged and made known by ``publish``)
            return
        member = download.reserve(key, self._offset, self._member.length)
        self._sink._done.append((key, member, self._crc))


def _write_batch(fd: int, batch: list[_Write]) -> None:
    """Write, and advance each member's CRC32C, in order (runs in a worker thread): each piece's
    CRC right after its write, while its bytes are still in the CPU's cache, but into the members'
    ``_Crc`` only once the whole batch is written, so a batch that failed can be written again."""
    running: dict[int, tuple[_Crc, int]] = {}
    for write in batch:
        _pwrite_all(fd, write.data, write.pos)
        data = write.data if isinstance(write.data, bytes) else bytes(write.data)  # the C CRC wants bytes
        crc, value = running.get(id(write.crc), (write.crc, write.crc.value))
        running[id(crc)] = (crc, google_crc32c.extend(value, data))
    for crc, value in running.values():
        crc.value = value


def _as_dicomfs_error(error: BaseException, what: str) -> DicomfsError:
    """A download's error, raised anew to each of its readers: of the same kind (an outage stays
    an outage), with ``what`` before it; anything else (a bug) as a SourceError."""
    if isinstance(error, DicomfsError):
        return type(error)(f"{what}: {error}")
    return SourceError(f"{what}: {error}")


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, pos: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, pos)
        view = view[written:]
        pos += written


class BlobStore:
    """The disk cache of series blobs for one source."""

    def __init__(self, cache_dir: Path, size_limit: int, source: Source, *, breaker: Breaker | None = None,
                 limits: TransferLimits | None = None, missing_recheck: float = 60.0,
                 instances_alone: bool = False) -> None:
        """``missing_recheck``: an instance that a retrieve of its series did not hold is not asked
        for again sooner (the listing TTL: within it, the archive is taken to be as listed).
        ``instances_alone`` (``--readahead off``): a source that can fetch one instance cheaply is
        asked for each instance opened, never for its whole series on a second read."""
        self.source = source
        self.cache_dir = cache_dir
        self.size_limit = size_limit
        self.breaker = breaker or Breaker(source.description)
        self.limits = limits or TransferLimits()
        self.missing_recheck = missing_recheck
        self.instances_alone = instances_alone
        try:
            self._folder = ProcessFolder(cache_dir)
        except OSError as exc:
            raise CacheError(f"cannot use the cache in {cache_dir}: {exc.strerror}") from None
        self.partial_dir = self._folder.path
        self._pins = _Pins(self._folder.graveyard)
        self._commit_lock = cache_dir / "commit.lock"
        self._lock_dir = cache_dir / "locks"  # one lock file per blob being downloaded
        self._lock_dir.mkdir(exist_ok=True)
        try:
            self.index, self.manifests = open_indexes(cache_dir, size_limit, _disk_class(self._pins))
        except CacheError:
            self._folder.close()
            raise
        self._index_lock = threading.Lock()  # cull and the full-disk eviction, one at a time
        self._fit_limit()
        self._ballast = _Ballast(cache_dir / BALLAST_NAME)
        self._ballast.keep()
        self._manifest_memory: cachetools.LRUCache[str, Manifest] = cachetools.LRUCache(4096)
        # blob key -> (file, the manifest read with it): a path is only ever used with its manifest
        self._blob_paths: cachetools.LRUCache[str, tuple[str, Manifest]] = cachetools.LRUCache(4096)
        self._recently_used: set[str] = set()
        self._downloads: dict[str, SeriesDownload] = {}
        self._nursery: trio.Nursery | None = None
        self._cull_wanted = trio.Event()
        self._commits: Counter[str] = Counter()  # completed downloads per blob key
        self._series_touched: set[str] = set()  # series with an instance opened since start
        self._instance_blobs: dict[str, set[str]] = {}  # series -> its single-instance blobs
        # series -> (when, instance keys) of its last complete retrieve here: an instance listed
        # but not in it is not asked for again at once (no retrieve per read of a missing file)
        self._retrieved: cachetools.LRUCache[str, tuple[float, frozenset[str], dict[str, str]]] = \
            cachetools.LRUCache(4096)

    def close(self) -> None:
        self.index.close()
        self.manifests.close()
        self._folder.close()

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Own the downloads and the maintenance task; returns when cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._maintenance_loop()
        finally:
            self._nursery = None

    def stop(self) -> None:
        """Shutting down: cancel every download (their readers get an error at once) and take no
        new ones."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _maintenance_loop(self) -> None:
        while True:
            with trio.move_on_after(LRU_FLUSH_SECONDS):
                await self._cull_wanted.wait()
            cull = self._cull_wanted.is_set()
            self._cull_wanted = trio.Event()
            used, self._recently_used = self._recently_used, set()
            if cull or used:
                await trio.to_thread.run_sync(self._maintain, used, cull)

    def _maintain(self, used: set[str], cull: bool) -> None:
        """Record recent use for the LRU order, then evict down to the size limit. Blocking."""
        try:
            for key in used:
                blob = self.index.get(key, read=True)  # updates the access time
                if blob is not None:
                    blob.close()
            if cull:
                with self._index_lock:
                    removed = self.index.cull()
                if removed:
                    log.info("evicted %d blobs to stay under the cache size limit", removed)
        except Exception as exc:
            log.warning("cache maintenance failed: %s", exc)

    # --- the space the cache may take -------------------------------------------------------
    def _fit_limit(self) -> None:
        """Never start with a limit the filesystem holding the cache cannot honour (what the cache
        holds and what is free). A disk that fills up later is met by ``_make_room``, not by a
        lower limit: a transient shortage must not shrink the cache for good. Blocking."""
        try:
            fitted = fit_size_limit(self.cache_dir, self.size_limit, self.index.volume())
        except Exception as exc:  # only a precaution: the cache works without it
            log.warning("cannot tell how much space the cache's filesystem has: %s", exc)
            return
        if fitted < self.size_limit:
            log.warning("cache size limit %s is more than the filesystem holding %s can hold: using %s",
                        human_bytes(self.size_limit), self.cache_dir, human_bytes(fitted))
            self.index.reset("size_limit", fitted)
            self.size_limit = fitted

    async def _make_room(self) -> bool:
        """The disk is full (ENOSPC): evict the least recently used blobs, below the limit (one in
        use by a reader here only leaves the index, its bytes stay until it is closed), and say
        whether anything was evicted, so the write is tried once more."""
        return await trio.to_thread.run_sync(self._evict_for_space)

    def _evict_for_space(self) -> bool:
        # sqlite needs a little space to record an eviction: the ballast file gives it back
        self._ballast.drop()
        try:
            with self._index_lock:
                volume = self.index.volume()
                target = max(volume - min(ROOM_STEP, max(self.size_limit // 8, 4 * WRITE_BATCH)), 0)
                self.index.reset("size_limit", target, update=False)  # this process, this once
                try:
                    removed = self.index.cull()
                finally:
                    self.index.reset("size_limit", self.size_limit, update=False)
        except Exception as exc:
            log.warning("the disk holding the cache is full, and eviction failed: %s", exc)
            return False
        finally:
            self._ballast.keep()
        log.warning("the disk holding the cache is full: evicted %d blobs to make room", removed)
        return removed > 0

    # --- sizes ------------------------------------------------------------------------------
    async def manifest(self, blob_key: str) -> Manifest | None:
        manifest = self._manifest_memory.get(blob_key)
        if manifest is None:
            manifest = await trio.to_thread.run_sync(self.manifests.get, blob_key)
            if manifest is not None:
                self._manifest_memory[blob_key] = manifest
        return manifest

    async def known_sizes(self, series: SeriesRecord) -> dict[str, int]:
        """Sizes known without downloading: from a stored manifest or a running download."""
        manifest = await self.manifest(series.key)
        sizes = {k: length for k, (_, length) in manifest.members.items()} if manifest else {}
        download = self._downloads.get(series.key)
        if download is not None:
            sizes.update({k: m.length for k, m in download.members.items()})
        return sizes

    async def size_of(self, series: SeriesRecord, instance: InstanceRecord) -> int:
        """The exact size of an instance, downloading its series if nothing else knows it."""
        if instance.size is not None:
            return instance.size
        for _ in range(JOIN_ATTEMPTS):
            commits = self._commits[series.key]
            sizes = await self.known_sizes(series)
            if instance.key in sizes:
                return sizes[instance.key]
            if self._commits[series.key] != commits:
                continue  # a download finished while we looked: look again
            download = self._downloads.get(series.key)
            if download is None:
                self._not_recently_missing(series, instance.key)
                download = self._series_download(series)
            member = await download.wait_member(instance.key)
            if member is not None:
                return member.length
        raise SourceError(f"series {series.uid} keeps changing in the cache; giving up")

    # --- reading ----------------------------------------------------------------------------
    async def open_instance(self, series: SeriesRecord, instance: InstanceRecord) -> InstanceHandle:
        """Open an instance, fetching what is needed: the series blob, or first just the instance.

        Policy for sources that can fetch one instance cheaply (COD: a Range request): the first
        instance opened in a series that is not cached is fetched alone; opening a second one
        means someone is reading through the series, so the whole series is fetched once.
        """
        local = self.source.local_file(instance)
        if local is not None:
            return await trio.to_thread.run_sync(_open_local, local, instance)
        for _ in range(JOIN_ATTEMPTS):
            download = self._downloads.get(series.key)
            if download is None:
                commits = self._commits[series.key]
                handle = await self._open_cached(series.key, instance.key)
                if handle is None and isinstance(self.source, InstanceFetcher):
                    handle = await self._open_instance_alone(series, instance, self.source)
                if handle is not None:
                    return handle
                if self._commits[series.key] != commits:
                    continue  # a download finished while we looked: look again
                self._not_recently_missing(series, instance.key)
                download = self._series_download(series)
            handle = await download.open_member(instance.key)
            if handle is not None:
                return handle
        raise SourceError(f"series {series.uid} keeps changing in the cache; giving up")

    def _not_recently_missing(self, series: SeriesRecord, key: str) -> None:
        """Raise at once if ``key`` was not in (or was refused from) a retrieve of its series that
        ended less than ``missing_recheck`` seconds ago: reading a missing file again and again
        must not retrieve its series every time."""
        seen = self._retrieved.get(series.key)
        if seen is None or key in seen[1]:
            return
        age = clock.now() - seen[0]
        if age >= self.missing_recheck:
            return
        reason = seen[2].get(key, "is listed but was not in the retrieve of its series")
        raise IntegrityError(f"instance {key} {reason} {age:.0f} s ago; asked for again after "
                             f"{self.missing_recheck:.0f} s")

    async def _open_instance_alone(self, series: SeriesRecord, instance: InstanceRecord,
                                   source: InstanceFetcher) -> InstanceHandle | None:
        blob_key = f"{series.key}#{instance.key}"
        for _ in range(JOIN_ATTEMPTS):
            download = self._downloads.get(blob_key)
            if download is None:
                commits = self._commits[blob_key]
                handle = await self._open_cached(blob_key, instance.key)
                if handle is not None:
                    return handle
                if self._commits[blob_key] != commits:
                    continue
                if not self.instances_alone and (series.key in self._series_touched
                                                 or series.key in self._downloads):
                    return None  # reading through the series: fetch all of it
                self._series_touched.add(series.key)
                self._instance_blobs.setdefault(series.key, set()).add(blob_key)

                async def fetch(sink: SeriesDownload) -> None:
                    await source.fetch_instance(instance, sink)

                download = self._start(blob_key, series, fetch)
            handle = await download.open_member(instance.key)
            if handle is not None:
                return handle
        return None

    async def _open_cached(self, blob_key: str, key: str) -> InstanceHandle | None:
        manifest = await self.manifest(blob_key)
        if manifest is None or key not in manifest.members:
            return None
        opened = self._open_known_path(blob_key)
        if opened is None:
            def open_blob() -> tuple[int, str, Manifest | None] | None:
                # The blob and its manifest are read together: another process may have
                # replaced an evicted blob since our copy of the manifest was loaded.
                blob = self.index.get(blob_key, read=True)
                if blob is None:
                    return None
                with blob:
                    return os.dup(blob.fileno()), blob.name, self.manifests.get(blob_key)

            found = await trio.to_thread.run_sync(open_blob)
            if found is None:
                return None
            fd, path, fresh = found
            if fresh is None:
                os.close(fd)
                return None
            self._blob_paths[blob_key] = (path, fresh)
            self._manifest_memory[blob_key] = fresh
            opened = fd, path, fresh
        fd, path, manifest = opened  # offsets always from the manifest that came with this file
        if key not in manifest.members:
            os.close(fd)
            return None
        offset, length = manifest.members[key]
        if offset + length > os.fstat(fd).st_size:
            os.close(fd)
            raise IntegrityError(f"cached blob {blob_key} is shorter than its manifest")
        self._pins.pin(path)
        return InstanceHandle(fd, offset, length, release=lambda: self._pins.unpin(path))

    def _open_known_path(self, blob_key: str) -> tuple[int, str, Manifest] | None:
        """Open a blob whose file we have seen, without asking the index (no thread, no SQL).

        The index's access time is brought up to date later, in the background."""
        known = self._blob_paths.get(blob_key)
        if known is None:
            return None
        path, manifest = known
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # evicted since
            del self._blob_paths[blob_key]
            return None
        self._recently_used.add(blob_key)
        return fd, path, manifest

    def is_cached(self, series: SeriesRecord) -> bool:
        """Whether the series' blob is in the index, its file present and its manifest stored.
        Blocking (sqlite, open): call in a worker thread."""
        return has_valid_entry(self.index, self.manifests, series.key)

    async def fetch_series(self, series: SeriesRecord, expect: set[str] | None = None) -> SeriesDownload | None:
        """Make sure the whole series is cached: None if it already was, else the finished
        download (joined if one was running). Raises the download's error if it failed.
        With ``expect`` (the listed instance keys), a cached copy that lacks some of them is
        fetched again (the series grew), at most once per ``missing_recheck``."""
        for _ in range(JOIN_ATTEMPTS):
            download = self._downloads.get(series.key)
            if download is None:
                if await trio.to_thread.run_sync(self.is_cached, series) and not await self._lacks(series, expect):
                    return None
                if await self._waited_for_another_process(series.key):
                    continue  # it was downloading this series: look at the cache again
                download = self._series_download(series)
            await download.done.wait()
            if download.error is not None:
                raise download.error if isinstance(download.error, DicomfsError) else \
                    SourceError(f"series {series.uid} could not be fetched: {download.error}")
            if not download.committed_elsewhere:
                return download
            if expect is not None:
                return None  # the cache had all this retrieve had: the caller checks what is missing
        raise SourceError(f"series {series.uid} keeps changing in the cache; giving up")

    async def _lacks(self, series: SeriesRecord, expect: set[str] | None) -> bool:
        """Whether the cached copy lacks an expected instance that a recent retrieve did not
        already look for in vain."""
        if not expect:
            return False
        manifest = await self.manifest(series.key)
        missing = expect - set(manifest.members) if manifest is not None else expect
        if not missing:
            return False
        seen = self._retrieved.get(series.key)
        return seen is None or clock.now() - seen[0] >= self.missing_recheck

    async def _waited_for_another_process(self, blob_key: str) -> bool:
        """If another process is downloading ``blob_key`` (it holds the key's lock), wait until it
        is done and return True; False at once if nobody is."""
        try:
            fd = os.open(self._lock_dir / _lock_name(blob_key), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return False  # no usable lock: just download
        waited = False
        try:
            with trio.move_on_after(MAX_WAIT_FOR_OTHER_PROCESS) as patience:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break  # free (and released again below: we only wanted to know)
                    except BlockingIOError:
                        waited = True
                        await trio.sleep(LOCK_POLL_SECONDS)
            return waited and not patience.cancelled_caught  # out of patience: download it ourselves
        finally:
            os.close(fd)

    def downloads(self) -> list[SeriesDownload]:
        """The downloads running now (for progress reports)."""
        return list(self._downloads.values())

    def running(self, series: SeriesRecord) -> SeriesDownload | None:
        """The download of the whole series running in this process, if any."""
        return self._downloads.get(series.key)

    async def read_ahead(self, series: SeriesRecord) -> SeriesDownload | None:
        """Start downloading the whole series for a reader to come (``readahead``): the running
        download if there is one, None if it is cached or another process is fetching it."""
        download = self.running(series)
        if download is not None:
            return download
        if await trio.to_thread.run_sync(self.is_cached, series):
            return None
        if not _lock_free(self._lock_dir / _lock_name(series.key)):
            return None  # another process (a prefetch) is fetching it
        return self._series_download(series)  # (the running one, if one started while we looked)

    # --- downloading ------------------------------------------------------------------------
    def _series_download(self, series: SeriesRecord) -> SeriesDownload:
        """The running download of ``series``, started if there is none."""
        download = self._downloads.get(series.key)
        if download is not None:
            return download

        async def fetch(sink: SeriesDownload) -> None:
            await self.source.fetch_series(series, sink)

        self._series_touched.add(series.key)
        return self._start(series.key, series, fetch)

    def _start(self, blob_key: str, series: SeriesRecord, fetch: Fetch) -> SeriesDownload:
        if self._nursery is None:
            raise CacheError("the blob store is not running")
        probe = self.breaker.admit()  # refused at once while the archive is known to be down
        download = SeriesDownload(blob_key, series, self.partial_dir / f"{uuid.uuid4().hex}.part", fetch,
                                  make_room=self._make_room)
        try:
            self._nursery.start_soon(self._run_download, download, probe)
        except RuntimeError:  # shutting down: the nursery takes no new downloads
            os.close(download.fd)
            _unlink_quietly(str(download.path))
            if probe:
                self.breaker.release()
            raise CacheError("the blob store is shutting down") from None
        self._downloads[blob_key] = download
        return download

    async def _run_download(self, download: SeriesDownload, probe: bool) -> None:
        what = download.blob_key
        # Say that this process is downloading the blob, for a prefetch in another process that
        # would rather wait than fetch it twice. If someone else holds the lock, go on anyway:
        # a reader here should not wait for a whole series that another process streams.
        lock_fd = _try_lock(self._lock_dir / _lock_name(what))
        committed = False
        try:
            async with trio.open_nursery() as writer:
                writer.start_soon(download.write_loop)
                try:
                    async with open_nursery() as watch:
                        watch.start_soon(enforce, self.limits, lambda: download.wire,
                                         f"the retrieve of {what} from {self.source.description}")
                        await self._fetch_resuming(download)
                        watch.cancel_scope.cancel()
                finally:
                    download.fetched.set()
                    download.close_writes()
            await self._commit(download)
            committed = True
        except* DicomfsError as group:
            first = plain(group)
            log.error("%s could not be fetched from %s: %s", what, self.source.description, first)
            download.error = first
        except* Exception as group:  # a bug must not take the daemon down with it
            log.error("%s: unexpected error while fetching", what, exc_info=group)
            download.error = leaves(group)[0]
        finally:
            if isinstance(download.error, SourceError):
                self.breaker.failed(download.error)
            elif committed:
                self.breaker.succeeded()
            elif probe:
                self.breaker.release()  # stopped, or failed here (the disk): nothing learnt of the archive
            if download.error is None and not committed:  # cancelled: dicomfs is shutting down
                download.error = SourceError("the download was stopped: dicomfs is shutting down")
            if committed and download.blob_key == download.series.key:
                self._retrieved[download.blob_key] = (clock.now(), frozenset(download.members),
                                                      dict(download.rejected))
            download.finished = True
            del self._downloads[download.blob_key]
            download.notify()
            download.fetched.set()
            download.done.set()
            if lock_fd is not None:
                os.close(lock_fd)
            os.close(download.fd)
            _unlink_quietly(str(download.path))

    async def _fetch_resuming(self, download: SeriesDownload) -> None:
        """The source's fetch; a transfer that broke off after bringing new instances is resumed
        (instances already in are skipped), at most ``RESUMES`` times. Nothing else is retried
        here: the HTTP layer has its own one retry of failed requests."""
        for resume in range(RESUMES + 1):
            done_before = len(download._finished) + len(download.rejected)
            download.on_answer = self.breaker.succeeded  # the archive answers: tell the breaker
            try:
                await download.fetch(download)
                return
            except TransferBroken as exc:
                progressed = len(download._finished) + len(download.rejected) > done_before
                if not progressed or resume == RESUMES:
                    raise
                log.warning("%s: %s; resuming (%d instances are in)", download.blob_key, exc,
                            len(download._finished))
                await trio.sleep(RESUME_DELAY * 2**resume)

    async def _commit(self, download: SeriesDownload) -> None:
        manifest = download.manifest()

        blob_key = download.blob_key
        # A whole series makes the single instances fetched from it before redundant.
        redundant = self._instance_blobs.pop(blob_key, set()) if blob_key == download.series.key else set()

        blob = CompletedBlob(str(download.path), manifest.size)

        def commit() -> None:
            os.ftruncate(download.fd, manifest.size)
            os.fsync(download.fd)
            with flocked(self._commit_lock):
                cached = self.manifests.get(blob_key) if has_valid_entry(self.index, self.manifests, blob_key) \
                    else None
                if cached is not None:
                    if not set(manifest.members) - set(cached.members):
                        download.committed_elsewhere = True  # nothing new in ours: keep the cached copy
                        return
                    download.replaced = len(cached.members)  # the series grew: ours is the new version
                self.manifests.set(blob_key, manifest)
                # Replacing an entry removes the old file through BlobDisk.remove: a file that
                # readers of this process hold goes to the graveyard until they close it.
                self.index.set(blob_key, blob)
                for key in redundant:
                    self.index.delete(key)
                    self.manifests.delete(key)

        try:
            await trio.to_thread.run_sync(commit)
        except OSError as exc:
            raise CacheError(f"cannot commit {blob_key} to the cache: {exc.strerror or exc}") from None
        except sqlite3.Error as exc:
            raise CacheError(f"cannot commit {blob_key} to the cache: {exc}") from None
        if download.committed_elsewhere:
            self._manifest_memory.pop(blob_key, None)
            self._commits[blob_key] += 1
            log.info("%s: the cache already holds its %d instances; this copy is discarded", blob_key,
                     len(manifest.members))
            return
        self._manifest_memory[blob_key] = manifest
        if blob.stored_at is not None:
            self._blob_paths[blob_key] = (blob.stored_at, manifest)
        for key in redundant:
            self._manifest_memory.pop(key, None)
            self._blob_paths.pop(key, None)
        self._commits[blob_key] += 1
        self._cull_wanted.set()
        if download.replaced is not None:
            log.info("%s cached anew: %d instances (the cached copy had %d), %d bytes", blob_key,
                     len(manifest.members), download.replaced, manifest.size)
        else:
            log.info("%s cached: %d instances, %d bytes", blob_key, len(manifest.members), manifest.size)


def open_indexes(cache_dir: Path, size_limit: int | None,
                 disk: type[diskcache.Disk] = diskcache.Disk) -> tuple[diskcache.Cache, diskcache.Cache]:
    """The blob index (LRU, size-limited) and the manifest store of a cache directory.
    ``size_limit`` None keeps the limit stored in the cache."""
    limit = {} if size_limit is None else {"size_limit": size_limit}
    try:
        index = diskcache.Cache(str(cache_dir / "blobs"), cull_limit=0, eviction_policy="least-recently-used",
                                disk=disk, **limit)
        manifests = diskcache.Cache(str(cache_dir / "manifests"))
    except Exception as exc:
        raise CacheError(f"cannot open the cache in {cache_dir}: {exc}") from None
    return index, manifests


def _lock_name(blob_key: str) -> str:
    return hashlib.sha256(blob_key.encode()).hexdigest()[:32]


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path``, or None if it is taken (or unusable)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _lock_free(path: Path) -> bool:
    """Whether nobody holds the blob lock at ``path`` (False too when it cannot be used)."""
    fd = _try_lock(path)
    if fd is None:
        return False
    os.close(fd)
    return True


def has_valid_entry(index: diskcache.Cache, manifests: diskcache.Cache, blob_key: str) -> bool:
    """An index entry whose file opens and whose manifest exists (an entry can outlive its file,
    e.g. after a power cut; such an entry is replaced by the next commit). Blocking."""
    blob = index.get(blob_key, read=True)
    if blob is None:
        return False
    blob.close()
    return manifests.get(blob_key) is not None


class flocked:
    """An exclusive ``flock`` on a lock file, across processes (blocking: use in a thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)  # releases the lock


def _open_local(path: Path, instance: InstanceRecord) -> InstanceHandle:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise SourceError(f"cannot open {path}: {exc.strerror}") from None
    size = os.fstat(fd).st_size
    if instance.size is not None and size != instance.size:
        os.close(fd)
        raise IntegrityError(f"{path} changed size since it was indexed; remount to re-index")
    return InstanceHandle(fd, 0, size)
