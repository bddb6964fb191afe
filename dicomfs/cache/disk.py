"""The cache's files on disk: work folders, locks, pins, the ballast, adopting finished blobs.

Owns this process's work folder (made and locked for the process's lifetime; dead processes'
folders swept at start), the file locks (``flocked``, ``try_lock``, ``lock_free``), the blob
files readers hold (``Pins``: an evicted one waits in the graveyard for its last reader), the
ballast, and ``BlobDisk``, diskcache's storage that renames a finished blob into the index and
spares pinned ones. Blocking, but for the pins and the ``LOCK_NB`` probes, which the event loop
uses: callers run the rest in a worker thread, or at start. Must not decide what to download,
commit or evict (``store``), nor name a path (``layout``); the locks, their order and every
crash point: docs/cache.md.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diskcache

from dicomfs.cache import layout

BALLAST_BYTES = 1 << 20
STALE_NEW_FOLDER_SECONDS = 3600.0


class ProcessFolder:
    """This process's private folder inside a shared cache, locked while the process lives."""

    def __init__(self, cache_dir: Path) -> None:
        root = layout.paths(cache_dir).work
        root.mkdir(parents=True, exist_ok=True)
        sweep_dead_folders(root)
        # Lock before the folder gets a name that sweepers look at.
        fresh = root / layout.new_folder_name()
        fresh.mkdir()
        self._fd = os.open(fresh / layout.FOLDER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.path = root / layout.process_folder_name()
        os.rename(fresh, self.path)
        self.graveyard = self.path / layout.GRAVEYARD
        self.graveyard.mkdir()

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._fd)


def sweep_dead_folders(root: Path) -> int:
    """Delete the work folders of processes that are gone (their lock is free). Blocking."""
    swept = 0
    for folder in root.iterdir():
        if folder.name.startswith(layout.NEW_FOLDER_PREFIX):
            # a process between mkdir and rename (a moment), or one that died right there
            try:
                if time.time() - folder.stat().st_mtime > STALE_NEW_FOLDER_SECONDS:
                    shutil.rmtree(folder, ignore_errors=True)
            except OSError:
                pass
            continue
        try:
            fd = os.open(folder / layout.FOLDER_LOCK, os.O_RDWR)
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


class Pins:
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
            unlink_quietly(grave)

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


class Ballast:
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
            unlink_quietly(str(self.path))
            return
        os.close(fd)

    def drop(self) -> None:
        unlink_quietly(str(self.path))


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class BlobDisk(diskcache.Disk):  # type: ignore[misc]  # diskcache has no types: Disk is Any
    """diskcache storage that adopts finished blob files by rename and spares pinned ones."""

    pins: Pins  # set on the per-store subclass made by ``disk_class``

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
        stored: tuple[int, int, str | None, bytes | None] = super().store(value, read, key)
        return stored

    def remove(self, file_path: str) -> None:
        if not self.pins.bury(os.path.join(self._directory, file_path)):
            super().remove(file_path)


def _fsync_directory(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_class(pins: Pins) -> type[BlobDisk]:
    return type("PinnedBlobDisk", (BlobDisk,), {"pins": pins})


def try_lock(path: Path) -> int | None:
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


def lock_free(path: Path) -> bool:
    """Whether nobody holds the blob lock at ``path`` (False too when it cannot be used)."""
    fd = try_lock(path)
    if fd is None:
        return False
    os.close(fd)
    return True


class flocked:
    """An exclusive ``flock`` on a lock file, across processes (blocking: use in a thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)  # releases the lock
