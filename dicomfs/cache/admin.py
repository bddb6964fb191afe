"""A cache directory as a whole: who is using it, what it holds, checking and clearing it.

Owns the directory-level lock (shared by mounts, prefetches and ``verify``; exclusive for
``clear``), keeping the cache private to its user (folders 0700, files 0600: the catalog holds
patient names), the ``source.json`` label that says which archive a cache belongs to, how large
a limit the filesystem holding it can honour, and the ``dicomfs cache stats|verify|clear`` work.
Must not change the layout (``layout`` names it, ``store`` and ``catalog`` fill it): this module
only reads it, or deletes blobs that fail verification. Blocking: callers run it in a thread or
from the CLI. The lock order ``verify`` keeps: docs/cache.md.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import diskcache
import google_crc32c

from dicomfs.cache import layout
from dicomfs.cache.disk import flocked
from dicomfs.cache.layout import LOCK_NAME, SOURCE_LABEL, Manifest, open_indexes
from dicomfs.errors import CacheError
from dicomfs.sources.base import SourceSpec

VERIFY_CHUNK = 1 << 20
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600
FILL_FRACTION = 0.9  # of the space the cache could have, the most its limit may take (room for the rest)


class CacheUse:
    """A flock on ``<cache>/lock``: shared while a process uses the cache, exclusive to clear it."""

    def __init__(self, cache_dir: Path, *, exclusive: bool = False) -> None:
        try:
            make_private(cache_dir)
            self._fd = os.open(layout.paths(cache_dir).lock, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
        except OSError as exc:
            raise CacheError(f"cannot use the cache directory {cache_dir}: {exc.strerror}") from None
        try:
            fcntl.flock(self._fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            if exclusive:
                raise CacheError(f"cache {cache_dir} is in use by a running dicomfs mount or prefetch") from None
            raise CacheError(f"cache {cache_dir} is being cleared; try again") from None

    def release(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> CacheUse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def make_private(cache_dir: Path) -> None:
    """Create ``cache_dir`` readable by its owner only; tighten a cache made before (folders
    0700, files 0600), once: a private top folder means it was done. Blocking."""
    cache_dir.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    if os.stat(cache_dir).st_mode & 0o077 == 0:
        return
    for folder, dirs, files in os.walk(cache_dir):
        for name in files:
            _tighten(os.path.join(folder, name), PRIVATE_FILE)
        for name in dirs:
            _tighten(os.path.join(folder, name), PRIVATE_DIR)
    _tighten(str(cache_dir), PRIVATE_DIR)  # last: it marks the work as done


def _tighten(path: str, mode: int) -> None:
    try:
        st = os.lstat(path)
        if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) & ~mode:
            os.chmod(path, stat.S_IMODE(st.st_mode) & mode)
    except OSError:
        pass  # vanished meanwhile (another process's work file)


def fit_size_limit(cache_dir: Path, wanted: int, held: int) -> int:
    """``wanted``, or less if the filesystem holding the cache cannot give it that much: at most
    ``FILL_FRACTION`` of what the cache holds now (``held`` bytes) plus the free space. Blocking."""
    room = int((shutil.disk_usage(cache_dir).free + held) * FILL_FRACTION)
    return max(min(wanted, room), 1)


def label(cache_dir: Path, spec: SourceSpec) -> None:
    """Record which archive this cache holds (for ``cache stats``)."""
    path = layout.paths(cache_dir).source_label
    text = json.dumps({"kind": spec.kind, "location": spec.location})
    try:
        if path.exists() and path.read_text() == text:
            return
        tmp = path.with_name(f".{SOURCE_LABEL}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    except OSError:
        pass  # only a label


def stored_size_limit(cache_dir: Path) -> int | None:
    """The size limit recorded in an existing cache (diskcache keeps its settings), or None."""
    try:
        if not layout.paths(cache_dir).index_db.exists():
            return None
        with diskcache.Cache(str(layout.paths(cache_dir).blobs)) as index:
            return int(index.size_limit)
    except Exception:  # an unreadable cache gets the default; opening it will say what is wrong
        return None


def caches_under(root: Path) -> list[Path]:
    """The cache directories in a cache root (one per source), with any folder in it that cannot
    be looked into (another user's: whoever acts on it says why, and goes on with the rest)."""
    if layout.is_cache_dir(root):
        return [root]
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _may_be_cache(p))


def _may_be_cache(path: Path) -> bool:
    try:
        return layout.is_cache_dir(path)
    except PermissionError:
        return True


@dataclass
class CacheStats:
    path: Path
    source: str
    series: int = 0
    single_instances: int = 0
    instances: int = 0
    blob_bytes: int = 0
    disk_bytes: int = 0
    size_limit: int | None = None
    in_use: bool = False


def stats(cache_dir: Path) -> CacheStats:
    result = CacheStats(cache_dir, _source_of(cache_dir), disk_bytes=_disk_usage(cache_dir))
    result.in_use = _in_use(cache_dir)
    if not layout.has_index(cache_dir):
        return result
    index, manifests = open_indexes(cache_dir, None)  # keep the stored size limit
    try:
        result.size_limit = int(index.size_limit)
        for key in index.iterkeys():
            manifest = manifests.get(key)
            if layout.is_instance_blob_key(key):
                result.single_instances += 1
            else:
                result.series += 1
            if manifest is not None:
                result.instances += len(manifest.members)
                result.blob_bytes += manifest.size
    finally:
        index.close()
        manifests.close()
    return result


@dataclass
class VerifyReport:
    path: Path
    checked: int = 0
    bytes_checked: int = 0
    dropped: list[str] = field(default_factory=list)  # "key: reason"
    crc_checked: int = 0
    orphans: int = 0  # blob files without an entry, deleted


def verify(cache_dir: Path) -> VerifyReport:
    """Re-check every blob against its manifest (file present, size, CRC32C of each member) and
    drop bad ones; delete blob files no entry refers to. A blob is read without the commit lock
    (through its own descriptor: a blob replaced or evicted meanwhile stays readable), which a
    mount's or a prefetch's commit would otherwise wait for while gigabytes are checked; a bad one
    is dropped under the lock, and only if its entry still names the file and the manifest that
    were checked (a series committed anew meanwhile is the next run's)."""
    report = VerifyReport(cache_dir)
    if not layout.has_index(cache_dir):
        return report
    index, manifests = open_indexes(cache_dir, None)  # keep the stored size limit
    lock = layout.paths(cache_dir).commit_lock
    try:
        for key in list(index.iterkeys()):
            checked = _check_blob(index, manifests, key, report)
            if checked is None:
                continue
            reason, entry = checked
            with flocked(lock):
                if key in index and _entry(index, manifests, key) == entry:
                    index.delete(key)
                    manifests.delete(key)
                    report.dropped.append(f"{key}: {reason}")
        with flocked(lock):
            report.orphans = _delete_orphans(index, cache_dir)
    finally:
        index.close()
        manifests.close()
    return report


# What an entry is, for telling whether it changed: its blob file's identity (device, inode) or
# None, and its manifest or None.
_Entry = tuple[tuple[int, int] | None, Manifest | None]


def _entry(index: diskcache.Cache, manifests: diskcache.Cache, key: str) -> _Entry:
    blob = index.get(key, read=True)
    if blob is None:
        return None, manifests.get(key)
    with blob:
        st = os.fstat(blob.fileno())
    return (st.st_dev, st.st_ino), manifests.get(key)


def _delete_orphans(index: diskcache.Cache, cache_dir: Path) -> int:
    """Blob files without an index entry (a crash between the rename and the index row)."""
    known: set[str] = set()
    for key in index.iterkeys():
        blob = index.get(key, read=True)
        if blob is not None:
            known.add(os.path.realpath(blob.name))
            blob.close()
    deleted = 0
    for path in layout.blob_files(cache_dir):
        if os.path.realpath(path) not in known:
            path.unlink(missing_ok=True)
            deleted += 1
    return deleted


def _check_blob(index: diskcache.Cache, manifests: diskcache.Cache, key: str,
                report: VerifyReport) -> tuple[str, _Entry] | None:
    """Why the entry ``key`` is bad, and the entry as it was checked; None if it is good (or gone)."""
    blob = index.get(key, read=True)
    manifest = manifests.get(key)
    if blob is None:
        return ("its file is missing", (None, manifest)) if key in index else None
    with blob:
        st = os.fstat(blob.fileno())
        entry: _Entry = ((st.st_dev, st.st_ino), manifest)
        reason = _check_file(blob, st.st_size, manifest, report)
    return (reason, entry) if reason is not None else None


def _check_file(blob: BinaryIO, size: int, manifest: Manifest | None, report: VerifyReport) -> str | None:
    if manifest is None:
        return "no manifest"
    if size != manifest.size:
        return f"{size} bytes on disk, {manifest.size} recorded"
    report.checked += 1
    report.bytes_checked += size
    for member, (offset, length) in manifest.members.items():
        if offset < 0 or offset + length > size:
            return f"instance {member} lies outside the blob"
        expected = (manifest.crcs or {}).get(member)
        if expected is None:
            continue
        blob.seek(offset)
        crc, left = 0, length
        while left:
            chunk = blob.read(min(VERIFY_CHUNK, left))
            if not chunk:
                return f"instance {member} is truncated"
            crc = google_crc32c.extend(crc, chunk)
            left -= len(chunk)
        report.crc_checked += 1
        if crc != expected:
            return f"instance {member} fails its CRC32C check"
    return None


def clear(cache_dir: Path) -> int:
    """Delete everything cached; the bytes freed. Refuses while a mount or prefetch uses it."""
    freed = _disk_usage(cache_dir)
    with CacheUse(cache_dir, exclusive=True):
        for entry in cache_dir.iterdir():
            if entry.name in (LOCK_NAME, SOURCE_LABEL):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    return freed - _disk_usage(cache_dir)


def _source_of(cache_dir: Path) -> str:
    try:
        data = json.loads(layout.paths(cache_dir).source_label.read_text())
        return str(data["location"])
    except (OSError, ValueError, KeyError, TypeError):
        return "(unknown source)"


def _in_use(cache_dir: Path) -> bool:
    try:
        fd = os.open(layout.paths(cache_dir).lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _disk_usage(folder: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total
