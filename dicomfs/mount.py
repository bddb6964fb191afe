"""Daemon lifecycle: the trio nursery, the FUSE session, signals, systemd notify, clean unmount.

Owns the order of start-up (take a shared hold on the cache, open and check the source, or go
offline on the stored catalog if the archive cannot be reached, start the blob store, mount) and of shut-down (unmount, cancel downloads, close stores), the pid file that
``dicomfs umount`` waits on, and ``READY=1``. Must not implement any filesystem behaviour.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import signal
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from dicomfs.archive import ArchiveOptions, open_archive
from dicomfs.errors import UsageError
from dicomfs.fs import DicomOperations
from dicomfs.query import Query
from dicomfs.sources import Credentials, SourceOptions, SourceSpec
from dicomfs.tasks import open_nursery
from dicomfs.tree import Tree

log = logging.getLogger(__name__)


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


def check_mountpoint(path: Path) -> Path:
    """An absolute, existing, empty-of-mounts directory; a one-line UsageError otherwise."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise UsageError(f"{path} is a stale dicomfs mount: run 'dicomfs umount {path}' first") from None
        raise UsageError(f"mount point {path} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        raise UsageError(f"{path} is already a mount point")
    return path.resolve()


def runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/dicomfs-{os.getuid()}"
    folder = Path(base) / "dicomfs"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


def pidfile_for(mountpoint: Path) -> Path:
    digest = hashlib.sha256(str(mountpoint.resolve()).encode()).hexdigest()[:16]
    return runtime_dir() / f"{digest}.pid"


def sd_notify(message: str) -> None:
    """Send ``message`` to systemd's notification socket, if there is one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())


def fuse_options(allow_other: bool) -> set[str]:
    options = set(pyfuse3.default_options)
    options |= {"fsname=dicomfs", "subtype=dicomfs", "ro", "noatime"}
    if allow_other:
        options.add("allow_other")
    return options


async def serve(options: MountOptions, on_ready: Callable[[], None]) -> None:
    """Mount, serve until unmounted or signalled, and unmount. Raises DicomfsError on failure."""
    archive_options = ArchiveOptions(options.spec, options.cache_dir, options.credentials, options.source_options,
                                     options.cache_size, options.listing_ttl, options.query)
    async with open_archive(archive_options) as archive:
        assert archive.blobs is not None
        tree = Tree(archive.catalog, archive.blobs, listing_ttl=options.listing_ttl)
        pidfile = pidfile_for(options.mountpoint)
        async with open_nursery() as nursery:
            pyfuse3.init(DicomOperations(tree, archive.blobs), str(options.mountpoint),
                         fuse_options(options.allow_other))
            try:
                pidfile.write_text(f"{os.getpid()}\n")
                nursery.start_soon(_terminate_on_signal)
                log.info("mounted %s on %s", archive.source.description, options.mountpoint)
                on_ready()
                await pyfuse3.main(min_tasks=4, max_tasks=256)
            finally:
                sd_notify("STOPPING=1")
                pyfuse3.close(unmount=True)
                pidfile.unlink(missing_ok=True)
                log.info("unmounted %s", options.mountpoint)
            nursery.cancel_scope.cancel()


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return
