"""``dicomfs umount``: unmount, and wait for the daemon to exit.

Owns unmounting through ``fusermount3 -u`` (or ``umount``), of dicomfs mounts only, and stopping
a daemon that does not see its mount go (SIGTERM, then SIGKILL; its pid from the pid file). Must
not touch the cache or the mount's state otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from dicomfs.errors import DicomfsError, UsageError

UMOUNT_TIMEOUT = 60.0
UMOUNT_GRACE = 5.0  # after unmounting, the daemon gets this long to see it before it is told to stop
UMOUNT_STOP_TIMEOUT = 15.0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    umount = subparsers.add_parser("umount", help="unmount and wait for the daemon to exit")
    umount.add_argument("mountpoint")


def run(args: argparse.Namespace) -> int:
    """Unmount, and wait for the daemon to exit. A daemon that does not see its end (the mount is
    also held in another mount namespace, as containers do) is told to stop: its pid is known."""
    from dicomfs.mount import pidfile_for

    mountpoint = Path(os.path.realpath(Path(args.mountpoint).expanduser()))
    _check_dicomfs_mount(mountpoint)
    pidfile = pidfile_for(mountpoint)
    try:
        pid: int | None = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        pid = None
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    command = [tool, "-u", str(mountpoint)] if tool else ["umount", str(mountpoint)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=UMOUNT_TIMEOUT)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["unmount failed"])[-1]
        raise DicomfsError(f"cannot unmount {mountpoint}: {reason}")
    if pid is None or _gone_within(pid, UMOUNT_GRACE):
        return 0
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return 0
        if _gone_within(pid, UMOUNT_STOP_TIMEOUT):
            if signum == signal.SIGKILL:
                raise DicomfsError(f"unmounted; the daemon (pid {pid}) did not stop on SIGTERM and was killed")
            return 0
    raise DicomfsError(f"unmounted, but the daemon (pid {pid}) did not exit")


def _check_dicomfs_mount(mountpoint: Path) -> None:
    """UsageError unless the topmost mount at ``mountpoint`` is a dicomfs mount (a stale one
    included): run as root, ``fusermount3 -u`` unmounts any file system."""
    from dicomfs.mounttable import DICOMFS_TYPE, mount_entries

    try:
        found = [entry for entry in mount_entries() if entry.point == str(mountpoint)]
    except OSError:
        return  # cannot tell: fusermount3 says what it finds
    if not found:
        raise UsageError(f"{mountpoint} is not mounted")
    if found[-1].fstype != DICOMFS_TYPE:
        raise UsageError(f"{mountpoint} is not a dicomfs mount (it is {found[-1].fstype}): not unmounted")


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            return stat_file.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
