"""Where everything in a cache directory lives, and what its two indexes hold.

Owns every name and path rule of a cache directory (the table in docs/cache.md, "The
directory"): the blob index and the manifest store (opened here, with the ``Manifest`` record
they hold), the work folders, the download locks, the commit lock, the cache-wide lock, the
ballast, the source label, the catalog folder, the log file, the key of a single-instance blob.
Must not act on them (lock, sweep, write, delete): that is ``disk``'s, ``store``'s and
``admin``'s. Why the layout is what it is: docs/cache.md.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diskcache

from dicomfs.errors import CacheError

LOCK_NAME = "lock"  # the cache-wide lock: shared while in use, exclusive to clear
SOURCE_LABEL = "source.json"
BLOB_FILES = "*.val"  # diskcache's names for the files it holds (<2 hex>/<2 hex>/<32 hex>.val)
# inside a process's work folder
FOLDER_LOCK = ".lock"
NEW_FOLDER_PREFIX = ".new-"
GRAVEYARD = "graveyard"


@dataclass(frozen=True)
class CachePaths:
    """Every path at the top of one cache directory."""

    lock: Path
    source_label: Path
    blobs: Path  # the blob index: diskcache's database and the blob files it names
    index_db: Path
    manifests: Path  # blob key -> Manifest
    work: Path  # one folder per process using the cache
    locks: Path  # one lock file per blob key ever downloaded (``download_lock``)
    commit_lock: Path
    ballast: Path
    catalog: Path  # the catalog's store (catalog.py)
    log: Path  # a detached mount's log, unless --log-file says otherwise


def paths(cache_dir: Path) -> CachePaths:
    blobs = cache_dir / "blobs"
    return CachePaths(
        lock=cache_dir / LOCK_NAME,
        source_label=cache_dir / SOURCE_LABEL,
        blobs=blobs,
        index_db=blobs / "cache.db",  # (diskcache's name)
        manifests=cache_dir / "manifests",
        work=cache_dir / "work",
        locks=cache_dir / "locks",
        commit_lock=cache_dir / "commit.lock",
        ballast=cache_dir / "ballast",
        catalog=cache_dir / "catalog",
        log=cache_dir / "dicomfs.log",
    )


def download_lock(cache_dir: Path, blob_key: str) -> Path:
    """The lock a running download of ``blob_key`` holds (a hash: keys may be long)."""
    return paths(cache_dir).locks / hashlib.sha256(blob_key.encode()).hexdigest()[:32]


def has_index(cache_dir: Path) -> bool:
    """Whether a blob index was ever made here."""
    return paths(cache_dir).blobs.is_dir()


def is_cache_dir(path: Path) -> bool:
    """What marks a folder as a dicomfs cache: a blob index, or a source label."""
    return has_index(path) or paths(path).source_label.exists()


def blob_files(cache_dir: Path) -> Iterator[Path]:
    """Every blob file in the index's folder, whether an entry names it or not."""
    return paths(cache_dir).blobs.rglob(BLOB_FILES)


def process_folder_name() -> str:
    """``<pid>-<random>``: a process's work folder."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def new_folder_name() -> str:
    """A process's folder before it is named for the process (locked first)."""
    return NEW_FOLDER_PREFIX + uuid.uuid4().hex


def part_name() -> str:
    return uuid.uuid4().hex + ".part"  # a download's file in its process's work folder


def instance_blob_key(series_key: str, instance_key: str) -> str:
    """The blob key of one instance fetched alone (``InstanceFetcher``)."""
    return f"{series_key}#{instance_key}"


def is_instance_blob_key(blob_key: str) -> bool:
    return "#" in str(blob_key)


@dataclass(frozen=True)
class Manifest:
    members: dict[str, tuple[int, int]]  # key -> (offset, length)
    size: int
    crcs: dict[str, int] | None = None  # key -> CRC32C of the member (absent in old caches)


def open_indexes(cache_dir: Path, size_limit: int | None,
                 disk: type[diskcache.Disk] = diskcache.Disk) -> tuple[diskcache.Cache, diskcache.Cache]:
    """The blob index (LRU, size-limited) and the manifest store of a cache directory.
    ``size_limit`` None keeps the limit stored in the cache."""
    limit = {} if size_limit is None else {"size_limit": size_limit}
    try:
        where = paths(cache_dir)
        index = diskcache.Cache(str(where.blobs), cull_limit=0, eviction_policy="least-recently-used",
                                disk=disk, **limit)
        manifests = diskcache.Cache(str(where.manifests), disk=_ManifestDisk)
    except Exception as exc:
        raise CacheError(f"cannot open the cache in {cache_dir}: {exc}") from None
    return index, manifests


def has_valid_entry(index: diskcache.Cache, manifests: diskcache.Cache, blob_key: str) -> bool:
    """An index entry whose file opens and whose manifest exists and has the file's size (an entry
    can outlive its file, e.g. after a power cut, and a commit that replaced a cached copy can be
    cut off between writing the manifest and the index row; such an entry is replaced by the next
    commit). Blocking."""
    blob = index.get(blob_key, read=True)
    if blob is None:
        return False
    with blob:
        size = os.fstat(blob.fileno()).st_size
    manifest = manifests.get(blob_key)
    return manifest is not None and manifest.size == size


class _ManifestDisk(diskcache.Disk):  # type: ignore[misc]  # diskcache has no types: Disk is Any
    """The manifest store's values are pickled ``Manifest``s; those written before this package
    existed name ``dicomfs.blobstore.Manifest``, and are read as what they are."""

    def fetch(self, mode: int, filename: str, value: Any, read: bool) -> Any:
        if mode != diskcache.core.MODE_PICKLE:
            return super().fetch(mode, filename, value, read)
        if value is None:
            with open(os.path.join(self._directory, filename), "rb") as reader:
                return _ManifestUnpickler(reader).load()
        return _ManifestUnpickler(io.BytesIO(value)).load()


class _ManifestUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("dicomfs.blobstore", "Manifest"):
            return Manifest
        return super().find_class(module, name)
