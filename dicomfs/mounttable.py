"""The mount table of this process's mount namespace (``/proc/self/mountinfo``), read.

Owns parsing it (``mount_entries``: where, which device, which file system type; octal escapes in
paths undone) and which of its mounts are dicomfs's (``dicomfs_mount_points``). Must not mount,
unmount or look inside a mount.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DICOMFS_TYPE = "fuse.dicomfs"


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo: where, which device, which file system type."""
    point: str
    device: str  # "major:minor", as /sys/class/bdi names the mount's backing device
    fstype: str


def mount_entries(table: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """The mounts of this process's mount namespace. Raises OSError when it cannot be read."""
    entries = []
    # (the kernel writes a path's bytes as they are, not always UTF-8: as os.walk names them)
    with open(table, encoding="utf-8", errors="surrogateescape") as mounts:
        for line in mounts.read().splitlines():
            fields, _, rest = line.partition(" - ")
            parts = fields.split(" ")
            entries.append(MountEntry(_unescape(parts[4]), parts[2], rest.split(" ", 1)[0]))
    return entries


def dicomfs_mount_points() -> set[str]:
    """The mount points of every dicomfs mount here (none when the table cannot be read)."""
    try:
        return {entry.point for entry in mount_entries() if entry.fstype == DICOMFS_TYPE}
    except OSError:
        return set()


def _unescape(field: str) -> str:
    """A mountinfo path field: octal escapes for space, tab, newline and backslash."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
