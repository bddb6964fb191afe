"""Unit tests of ``dicomfs.mounttable``: the mount table as the kernel writes it."""

from __future__ import annotations

import os
from pathlib import Path

from dicomfs.mounttable import mount_entries


def test_mount_points_with_escapes_and_names_that_are_not_utf8(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_bytes(b"22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
                      b"61 22 0:52 / /mnt/caf\xe9 rw,nosuid shared:30 - fuse.sshfs host: rw\n"
                      b"62 22 0:53 / /tmp/with\\040space rw,nosuid - fuse.dicomfs dicomfs ro\n")
    entries = mount_entries(str(table))
    assert [(e.point, e.device, e.fstype) for e in entries] == [
        ("/", "0:21", "ext4"), (os.fsdecode(b"/mnt/caf\xe9"), "0:52", "fuse.sshfs"),
        ("/tmp/with space", "0:53", "fuse.dicomfs")]
