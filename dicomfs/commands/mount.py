"""``dicomfs mount``: its arguments, the mount's options, and starting the daemon.

Owns detaching (the daemon is this command run again in the foreground as a child, logging to the
log file and reporting readiness, or why not, through a pipe), the foreground run (log file,
``--systemd``'s ``READY=1``), and the ``--allow-other`` warning. Must not implement the daemon
itself (``dicomfs.mount``) nor filesystem behaviour.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dicomfs.commands.options import (
    add_archive_options,
    add_cache_size_option,
    add_listing_ttl_option,
    add_log_level_option,
    add_transfer_options,
    archive_options,
    configure_logging,
    seconds,
)
from dicomfs.errors import DicomfsError, UsageError
from dicomfs.sources import parse_source
from dicomfs.waiting import DEFAULT_READ_TIMEOUT

if TYPE_CHECKING:
    from dicomfs.mount import MountOptions

log = logging.getLogger("dicomfs")

READY_TIMEOUT = 600.0
_ALLOW_OTHER_WARNING = ("--allow-other: every user of this machine can read {mountpoint} (patient data), "
                        "whatever the cache's own permissions")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mount = subparsers.add_parser("mount", help="mount SOURCE (DICOMweb URL, gs:// or s3:// COD bucket, dimse:// "
                                  "PACS, 'idc', folder, or 'demo') on MOUNTPOINT")
    mount.add_argument("source")
    mount.add_argument("mountpoint")
    add_archive_options(mount)
    mount.add_argument("--query", action="append", metavar="KEY=VALUE",
                       help="show only matching studies (DICOM keyword, * ? wildcards, date ranges)")
    mount.add_argument("--foreground", action="store_true", help="do not detach")
    add_cache_size_option(mount)
    add_log_level_option(mount, "INFO")
    mount.add_argument("--log-file", help="where the daemon logs, reopened on SIGHUP (default: <cache-dir>/dicomfs.log "
                       "when detached, stderr in the foreground)")
    mount.add_argument("--allow-other", action="store_true", help="let other users see the mount")
    mount.add_argument("--systemd", action="store_true",
                       help="stay in the foreground and send READY=1 to $NOTIFY_SOCKET when mounted")
    add_listing_ttl_option(mount)
    add_transfer_options(mount)
    mount.add_argument("--read-timeout", type=seconds, default=DEFAULT_READ_TIMEOUT, metavar="SECONDS",
                       help="longest a file system request waits for the archive before it fails with EIO; "
                       f"the download goes on (default {DEFAULT_READ_TIMEOUT:.0f})")
    mount.add_argument("--readahead", choices=["off", "series", "study"], default="study",
                       help="what is fetched before it is read: 'study' (default) the whole series of what is read "
                       "and then the study's next series, one after another; 'series' the whole series of what is "
                       "read; 'off' only what is read (one instance alone where the archive allows it)")
    mount.add_argument("--views", metavar="LIST", help="which views the mount's root shows, comma-separated "
                       "(default: studies,patients,dates,dicomweb)")
    mount.add_argument("--view", action="append", default=[], metavar="NAME=TEMPLATE",
                       help="add a view laid out by a template of DICOM keywords, e.g. "
                       "'by-accession={AccessionNumber}/{SeriesNumber} {SeriesDescription}/{InstanceNumber}.dcm'")
    mount.add_argument("--ascii-names", action="store_true",
                       help="fold the readable views' names to ASCII (e.g. for Samba shares)")
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Mount, in the foreground or detached (``argv``: this command's arguments, for the daemon)."""
    from dicomfs.cache import layout
    from dicomfs.mount import MountOptions, check_apart, check_mountpoint
    from dicomfs.readahead import Mode
    from dicomfs.views import COLLECTIONS, DEFAULT_VIEWS, ViewOptions

    spec = parse_source(args.source)
    defaults = (*DEFAULT_VIEWS, COLLECTIONS) if spec.kind == "idc" else DEFAULT_VIEWS
    views = ViewOptions.parse(args.views, args.view, args.ascii_names, defaults)
    archive = archive_options(args, with_blobs=True, spec=spec)
    mountpoint = check_mountpoint(Path(args.mountpoint).expanduser())
    assert archive.cache_size is not None
    detach = not (args.foreground or args.systemd)
    log_file = Path(args.log_file).expanduser().absolute() if args.log_file else None
    if detach and log_file is None:
        log_file = layout.paths(archive.cache_dir).log
    check_apart(mountpoint, archive.cache_dir, log_file, Path(spec.location) if spec.kind == "folder" else None)
    options = MountOptions(archive.spec, mountpoint, archive.cache_dir, archive.cache_size, archive.credentials,
                           allow_other=args.allow_other, listing_ttl=args.listing_ttl,
                           source_options=archive.source_options, query=archive.query, limits=archive.limits,
                           read_timeout=args.read_timeout, log_file=log_file, views=views,
                           readahead=Mode(args.readahead))
    if args.allow_other and detach:
        print(f"dicomfs: warning: {_ALLOW_OTHER_WARNING.format(mountpoint=mountpoint)}", file=sys.stderr)
    if not detach:
        return _run_foreground(options, args)
    return _detach(options, argv)
def _run_foreground(options: MountOptions, args: argparse.Namespace) -> int:
    import trio

    from dicomfs.mount import open_log, serve
    from dicomfs.sdnotify import sd_notify

    if options.log_file is not None:
        try:
            open_log(options.log_file)
        except OSError as exc:
            raise UsageError(f"cannot write the log file {options.log_file}: {exc.strerror}") from None
    configure_logging(args.log_level)
    if options.allow_other:
        log.warning(_ALLOW_OTHER_WARNING.format(mountpoint=options.mountpoint))
    ready_fd: int | None = args.ready_fd

    def on_ready() -> None:
        nonlocal ready_fd
        if args.systemd:
            sd_notify("READY=1")
        if ready_fd is not None:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)
            ready_fd = None

    try:
        trio.run(serve, options, on_ready)
    except DicomfsError as exc:
        log.error("%s", exc)
        if ready_fd is not None:
            os.write(ready_fd, f"error: {exc}\n".encode())
        raise
    except Exception as exc:
        log.exception("the daemon failed")
        if ready_fd is not None:
            os.write(ready_fd, f"error: {type(exc).__name__}: {exc}\n".encode())
        return 1
    return 0


def _detach(options: MountOptions, argv: list[str]) -> int:
    """Start the daemon (this command in the foreground, logging to the log file, which it
    reopens on SIGHUP) and wait until it says it is mounted, or why not."""
    from dicomfs.cache import make_private

    assert options.log_file is not None
    log_path = options.log_file
    try:
        make_private(options.cache_dir)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as exc:
        raise UsageError(f"cannot write the log file {log_path}: {exc.strerror}") from None
    read_fd, write_fd = os.pipe()
    child_argv = [sys.executable, "-m", "dicomfs", *argv, "--foreground", "--log-file", str(log_path),
                  "--ready-fd", str(write_fd)]
    try:
        child = subprocess.Popen(child_argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                                 pass_fds=(write_fd,), start_new_session=True)
    finally:
        os.close(log_fd)
    os.close(write_fd)
    message = b""
    deadline = time.monotonic() + READY_TIMEOUT
    while not message.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([read_fd], [], [], remaining)[0]:
            child.kill()
            raise DicomfsError(f"the daemon did not become ready in {READY_TIMEOUT:.0f}s (see {log_path})")
        chunk = os.read(read_fd, 4096)
        if not chunk:
            break
        message += chunk
    os.close(read_fd)
    text = message.decode(errors="replace").strip()
    if text == "ready":
        return 0
    if text.startswith("error: "):
        raise DicomfsError(text[len("error: "):])
    raise DicomfsError(f"the daemon exited with status {child.wait()} before mounting (see {log_path})")
