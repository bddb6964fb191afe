"""Open instances: where an instance's bytes lie in a file, read without blocking the event loop.

Owns ``InstanceHandle`` (a private fd, an offset and a length; reads answered inline from the
page cache, in a worker thread only when they would block; a file object for a worker thread
that parses the instance; a release called once on close) and opening a source's
local file in place (``open_local``). Must not find, fetch or pin anything:
``store`` hands handles out, with offsets from the manifest that came with the file (docs/cache.md,
invariant 4).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from dicomfs.dicomread import RangeFile
from dicomfs.errors import IntegrityError
from dicomfs.localfile import open_regular
from dicomfs.records import InstanceRecord


class InstanceHandle:
    """An open instance: a private fd on the file that holds it, and where in that file."""

    def __init__(self, fd: int, offset: int, length: int, release: Any = None, *,
                 local: Path | None = None) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length
        self._release = release
        self._nowait = True
        self._local = local  # a source's own file, served in place (for errors: not a cached blob)

    async def read(self, off: int, size: int, reply: bytearray | None = None) -> bytes | bytearray | memoryview:
        """``size`` bytes from ``off`` (fewer at the end). With ``reply`` (a buffer the caller has
        sent on before it next awaits: ``views.base.Handle``), a page-cache hit is read into it,
        not into new memory that would be zeroed first (a tenth of a warm 1 MiB FUSE read)."""
        if off >= self.length or size <= 0:
            return b""
        size = min(size, self.length - off)
        pos = self.offset + off
        if self._nowait:
            # Page-cache hits are answered inline; only a read that would block goes to a thread.
            buf = memoryview(reply)[:size] if reply is not None and len(reply) >= size else bytearray(size)
            try:
                if os.preadv(self.fd, [buf], pos, os.RWF_NOWAIT) == size:
                    return buf  # pyfuse3 takes any buffer: no copy
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._nowait = False
        data = await trio.to_thread.run_sync(os.pread, self.fd, size, pos)
        if len(data) != size:
            raise self._shorter()
        return data

    def blocking_file(self, check: Callable[[], None] | None = None) -> RangeFile:
        """The instance as a file object (its first byte at position 0) for one worker thread,
        valid while the handle is open: pydicom parses an instance from it without the whole
        instance in memory, and its ``read_at`` reads a range. ``check``: called before each
        read (``StopSignal.check``: the job ends at its next read once trio has stopped it)."""
        return RangeFile(self.fd, self.offset, self.length, self._shorter, check)

    def _shorter(self) -> IntegrityError:
        if self._local is not None:
            return IntegrityError(f"{self._local} is shorter than when it was indexed (it is indexed again at the "
                                  "next start)")
        return IntegrityError("cached blob is shorter than its manifest")

    def close(self) -> None:
        os.close(self.fd)
        if self._release is not None:
            self._release()
            self._release = None


def open_local(path: Path, instance: InstanceRecord) -> InstanceHandle:
    fd = open_regular(path)  # (never waits: a fifo left in the file's place is refused)
    size = os.fstat(fd).st_size
    if instance.size is not None and size != instance.size:
        os.close(fd)
        raise IntegrityError(f"{path} changed size since it was indexed (it is indexed again at the next start)")
    return InstanceHandle(fd, 0, size, local=path)
