"""Daemon lifecycle: the trio nursery, the FUSE session, signals, systemd notify, clean unmount.

Owns the order of start-up (take a shared hold on the cache, open and check the source, or go
offline on the stored catalog if the archive cannot be reached, start the blob store, mount) and
of shut-down (on SIGTERM/SIGINT or an unmount: waiting requests answered at once, downloads
cancelled, the FUSE loop stopped, requests still running after a grace period abandoned, unmount,
stores closed: seconds, never minutes), the log file and its reopening on SIGHUP (logrotate), the
pid file that ``dicomfs umount`` waits on, the record of what is mounted where (for ``dicomfs ls
PATH`` inside a mount), and ``READY=1``. Must not implement any filesystem behaviour.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import signal
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from dicomfs.archive import ArchiveOptions, open_archive
from dicomfs.errors import UsageError
from dicomfs.fs import MAX_READ, DicomOperations
from dicomfs.mounttable import DICOMFS_TYPE, mount_entries
from dicomfs.query import Query
from dicomfs.readahead import Mode, Readahead
from dicomfs.sdnotify import sd_notify
from dicomfs.sources import Credentials, SourceOptions, SourceSpec
from dicomfs.sources.base import NotesSource
from dicomfs.tasks import open_nursery
from dicomfs.transferlimits import TransferLimits
from dicomfs.tree import Tree
from dicomfs.views import ViewOptions, make_views
from dicomfs.waiting import DEFAULT_READ_TIMEOUT, Waits

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 3.0  # seconds requests in flight get to finish once a stop was asked for
UNMOUNT_POLL = 1.0
READ_WINDOW_KB = MAX_READ // 1024  # the largest FUSE read: 256 pages (FUSE_MAX_MAX_PAGES)


@dataclass(frozen=True)
class MountOptions:
    spec: SourceSpec
    mountpoint: Path
    cache_dir: Path
    cache_size: int
    credentials: Credentials
    allow_other: bool = False
    listing_ttl: float = 60.0
    source_options: SourceOptions = field(default_factory=SourceOptions)
    query: Query | None = None  # show only the studies that match
    limits: TransferLimits = field(default_factory=TransferLimits)
    read_timeout: float = DEFAULT_READ_TIMEOUT
    log_file: Path | None = None  # where the daemon logs (reopened on SIGHUP); None: stderr
    views: ViewOptions = field(default_factory=ViewOptions)
    readahead: Mode = Mode.STUDY  # what is fetched before it is read (``--readahead``)


def check_mountpoint(path: Path) -> Path:
    """An absolute, existing, empty-of-mounts directory; a one-line UsageError otherwise."""
    stale = UsageError(f"{path} is a stale mount (its daemon is gone): run 'dicomfs umount {path}' first")
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise stale from None
        raise UsageError(f"mount point {path} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        try:  # the kernel may answer stat from its cache for a dead mount; statfs always asks
            os.statvfs(path)
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                raise stale from None
        raise UsageError(f"{path} is already a mount point")
    return path.resolve()


def check_apart(mountpoint: Path, cache_dir: Path, log_file: Path | None, folder: Path | None) -> None:
    """A one-line UsageError if the cache, the log file or a folder source would be read or
    written through the mount itself: the daemon would wait for its own answer, a hang no signal
    ends. (A mount point inside the folder it shows is fine: the folder is scanned before the
    mount is made.)"""
    def inside(path: Path, folder: Path) -> bool:
        return path.resolve().is_relative_to(folder)

    if inside(cache_dir, mountpoint):
        raise UsageError(f"the cache folder {cache_dir} is inside the mount point {mountpoint}: "
                         "choose one outside it (--cache-dir)")
    if log_file is not None and inside(log_file, mountpoint):
        raise UsageError(f"the log file {log_file} is inside the mount point {mountpoint}: choose one outside it")
    if folder is not None and inside(folder, mountpoint):
        raise UsageError(f"the source folder {folder} is inside the mount point {mountpoint}: "
                         "mount it somewhere else")


def runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/dicomfs-{os.getuid()}"
    folder = Path(base) / "dicomfs"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


def pidfile_for(mountpoint: Path) -> Path:
    digest = hashlib.sha256(str(mountpoint.resolve()).encode()).hexdigest()[:16]
    return runtime_dir() / f"{digest}.pid"


def record_for(mountpoint: Path) -> Path:
    """Where a running mount says what it mounts (``dicomfs ls PATH`` inside a mount reads it)."""
    return pidfile_for(mountpoint).with_suffix(".json")


def write_record(path: Path, spec: SourceSpec, cache_dir: Path) -> None:
    """The mount's source (never its credentials) and cache, in a private file at ``path``
    (``record_for``: found before mounting, as resolving the mount point after would ask the
    mount itself)."""
    text = json.dumps({"kind": spec.kind, "location": spec.location, "endpoint": spec.endpoint,
                       "cache_dir": str(cache_dir)})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def mount_containing(path: Path) -> tuple[Path, SourceSpec, Path] | None:
    """If ``path`` lies in a dicomfs mount of this namespace: its mount point, source and cache
    directory; None otherwise. A dicomfs mount that left no record is a one-line UsageError."""
    wanted = os.path.abspath(path)
    try:
        entries = mount_entries()
    except OSError:
        return None
    for entry in entries:
        if entry.fstype != DICOMFS_TYPE:
            continue
        point = entry.point
        if wanted == point or wanted.startswith(point.rstrip("/") + "/"):
            try:
                record = json.loads(record_for(Path(point)).read_text())
            except (OSError, ValueError):
                raise UsageError(f"{path} is in the dicomfs mount {point}, which does not say what it mounts "
                                 "(mounted by another user, or by an older dicomfs)") from None
            spec = SourceSpec(record["kind"], record["location"], record.get("endpoint"))
            return Path(point), spec, Path(record["cache_dir"])
    return None


def fuse_options(allow_other: bool) -> set[str]:
    options = set(pyfuse3.default_options)
    options |= {"fsname=dicomfs", "subtype=dicomfs", "ro", "noatime"}
    if allow_other:
        options.add("allow_other")
    return options


async def serve(options: MountOptions, on_ready: Callable[[], None]) -> None:
    """Mount, serve until unmounted or signalled, and unmount. Raises DicomfsError on failure."""
    archive_options = ArchiveOptions(options.spec, options.cache_dir, options.credentials, options.source_options,
                                     options.cache_size, options.listing_ttl, options.query, options.limits)
    async with open_archive(archive_options) as archive:
        assert archive.blobs is not None
        blobs = archive.blobs
        source = archive.source
        notes = await source.root_notes() if isinstance(source, NotesSource) else {}
        blobs.instances_alone = options.readahead is Mode.OFF
        readahead = Readahead(blobs, archive.catalog, mode=options.readahead)
        tree = Tree(make_views(archive.catalog, blobs, archive.shown, options.views, readahead),
                    listing_ttl=options.listing_ttl, notes={k: v.encode() for k, v in notes.items()})
        waits = Waits(options.read_timeout)
        pidfile = pidfile_for(options.mountpoint)
        record = record_for(options.mountpoint)
        async with open_nursery() as nursery:
            await nursery.start(readahead.run)
            pyfuse3.init(DicomOperations(tree, lambda: blobs.size_limit, waits), str(options.mountpoint),
                         fuse_options(options.allow_other))
            try:
                pidfile.write_text(f"{os.getpid()}\n")
                write_record(record, options.spec, options.cache_dir)
                with trio.CancelScope() as serving:
                    stopping = trio.Event()

                    async def stop() -> None:
                        """Answer what waits, stop downloads and the FUSE loop; abandon the rest."""
                        if stopping.is_set():
                            return
                        stopping.set()
                        waits.cancel_all()
                        blobs.stop()
                        pyfuse3.terminate()
                        await trio.sleep(SHUTDOWN_GRACE)
                        if waits.waiting:
                            log.warning("abandoning %d requests still running", waits.waiting)
                        serving.cancel()

                    nursery.start_soon(waits.run)
                    nursery.start_soon(_on_signals, nursery, stop, options.log_file)
                    nursery.start_soon(_stop_when_unmounted, options.mountpoint, stop)
                    nursery.start_soon(widen_read_window, options.mountpoint)
                    log.info("mounted %s on %s", archive.source.description, options.mountpoint)
                    on_ready()
                    await pyfuse3.main(min_tasks=4, max_tasks=256)
            finally:
                sd_notify("STOPPING=1")
                pyfuse3.close(unmount=True)
                pidfile.unlink(missing_ok=True)
                record.unlink(missing_ok=True)
                log.info("unmounted %s", options.mountpoint)
            nursery.cancel_scope.cancel()


async def _on_signals(nursery: trio.Nursery, stop: Callable[[], Awaitable[None]], log_file: Path | None) -> None:
    """SIGTERM and SIGINT unmount (``stop``); SIGHUP reopens the log file (logrotate)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                if log_file is None:
                    log.info("received SIGHUP: no log file to reopen (logging to stderr)")
                else:
                    try:
                        open_log(log_file)
                        log.info("received SIGHUP: log file reopened")
                    except OSError as exc:
                        log.error("received SIGHUP: cannot reopen %s: %s", log_file, exc.strerror)
            else:
                log.info("received %s: unmounting", signal.Signals(signum).name)
                nursery.start_soon(stop)  # (a second signal finds it stopping already)


async def _stop_when_unmounted(mountpoint: Path, stop: Callable[[], Awaitable[None]]) -> None:
    """Once the mount is gone from this mount namespace (``fusermount3 -u``, also while another
    namespace still holds it, or while requests wait), stop: nothing would be asked any more."""
    while is_mounted(mountpoint):
        await trio.sleep(UNMOUNT_POLL)
    log.info("%s is no longer mounted here: stopping", mountpoint)
    await stop()


def is_mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point in this process's mount namespace (/proc/self/mountinfo)."""
    try:
        return any(entry.point == str(path) for entry in mount_entries())
    except OSError:
        return True  # cannot tell: assume it is


async def widen_read_window(mountpoint: Path) -> None:
    """Let the kernel ask for up to 1 MiB per FUSE read instead of 128-256 KiB.

    A FUSE mount's backing device starts with the kernel's default read-ahead window (128 KiB;
    sequential reads get 256 KiB requests), below what one FUSE request may carry (256 pages,
    1 MiB). Every request costs a round through the kernel, libfuse and Python, so a reader of a
    large file costs 4x fewer of them with the window at 1 MiB (docs/benchmarks.md). The window
    can only be widened through sysfs, by root, and only after the kernel has had our answer to
    FUSE_INIT (which sets it to at most its default): so this waits for a stat of the mount
    point, which the kernel answers only after that. Anything in the way is a debug line.
    """
    try:
        await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
        device = next(entry.device for entry in mount_entries() if entry.point == str(mountpoint))
        window = Path("/sys/class/bdi") / device / "read_ahead_kb"
        if int(window.read_text()) < READ_WINDOW_KB:
            window.write_text(f"{READ_WINDOW_KB}\n")
    except (OSError, ValueError, StopIteration) as exc:
        log.debug("read-ahead window of %s left as the kernel set it: %s", mountpoint, exc)


def open_log(path: Path) -> None:
    """Make ``path`` (private, appended to) the process's stdout and stderr, where logging goes."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)
