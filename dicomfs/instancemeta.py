"""An instance's metadata (DICOM JSON) read from its Part 10 bytes: a file, or a range of a blob.

Owns reading the header with pydicom, large values left unread (deferred), for the archives that
have no metadata service of their own: folders (their files) and DIMSE PACS (the instances a
retrieve brought into the cache). Blocking: callers run it in a worker thread. Must not decide
where the bytes come from.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from dicomfs.dicomread import read_dataset
from dicomfs.errors import SourceError
from dicomfs.localfile import open_regular
from dicomfs.records import DicomJson

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer


class _Range(io.RawIOBase):
    """``length`` bytes of an open file from ``offset``, read with ``pread`` (the descriptor's
    own position is left alone)."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self._fd, self._offset, self._length, self._pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        size = max(0, min(len(view), self._length - self._pos))
        if not size:
            return 0
        data = os.pread(self._fd, size, self._offset + self._pos)
        view[:len(data)] = data
        self._pos += len(data)
        return len(data)


def metadata(path: Path | None = None, *, fd: int | None = None, offset: int = 0, length: int = 0) -> DicomJson:
    """The DICOM JSON of the instance in file ``path``, or in ``length`` bytes of ``fd`` from
    ``offset``. Blocking."""
    from dicomfs.dicomjson import BULK_THRESHOLD, dataset_json

    own = None
    source: BinaryIO | _Range
    if path is not None:
        own = open_regular(path)
        # A named file (buffered reads, 10-15 % faster than pread of each piece): by the name of
        # the descriptor, which pydicom opens again for a deferred value, as long as it is open
        # (the same file whatever is put in its place since).
        source, what = open(f"/proc/self/fd/{own}", "rb"), str(path)  # noqa: SIM115 (closed below)
    else:  # (not in a BufferedReader: pydicom would take it for a named file and reopen it by name)
        assert fd is not None
        source, what = _Range(fd, offset, length), "a cached instance"
    try:
        ds = read_dataset(source, defer_size=BULK_THRESHOLD)
        return dataset_json(ds)
    except Exception as exc:  # pydicom raises many kinds of errors for broken files
        raise SourceError(f"{what} is not readable as DICOM: {exc}") from None
    finally:
        if own is not None:
            source.close()
            os.close(own)
