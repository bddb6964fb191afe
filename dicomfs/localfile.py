"""Opening a local file that must be a regular file (a folder source's instance), for reading.

Owns the one rule for it: the open never waits (``O_NONBLOCK``: a fifo put where a file was would
otherwise block the open until a writer came, and with it the reader of the mount, beyond any
timeout or signal), and anything but a regular file is refused with one line. Must not read or
interpret the file.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from dicomfs.errors import SourceError


def open_regular(path: str | Path) -> int:
    """A read-only descriptor (blocking reads) on ``path``, which must be a regular file;
    SourceError otherwise, or when it cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise SourceError(f"cannot open {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SourceError(f"{path} is no longer a regular file")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd
