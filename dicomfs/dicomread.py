"""Reading a DICOM data set with pydicom, no further than the data set goes.

Owns ``read_dataset``: pydicom's reader with one more stop. Zero bytes after a data set (a file
padded or preallocated by whatever wrote it) read as elements of group 0000, which no stored data
set holds, one per 8 bytes: 20 MB of them took pydicom 5.7 s, a worker thread that no timeout can
stop, and the last of them ended up in the metadata as an element (0000,0000). The read stops at the
first element of that group, as at the pixel data when asked to, and a data set that begins with
zeros is an empty one. Also what every such reader shares: ``stored_transfer_syntax`` (the
syntax a file's meta group names, for readers that must know it before pydicom reads the data
set), ``value_left_in_file`` (a value pydicom deferred, read back), ``RangeFile`` (a range of an
open descriptor as the file object pydicom reads, on ``PositionedReader``, the position rules it
shares with ``bucket.ObjectFile``) and ``quiet_pydicom`` (what pydicom logs and
warns, kept for debugging). Blocking. Must not open files (callers hand over a file object:
``localfile.open_regular`` for a folder's) or interpret the data set.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, TypeGuard, cast

from dicomfs.errors import ProtocolError
from dicomfs.p10 import NeedMoreData, parse_file_meta

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import FileDataset
    from pydicom.tag import BaseTag

Readable = BinaryIO | io.RawIOBase  # a seekable file object pydicom reads
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData: in that order
_PIXEL_TAG_SET = frozenset(PIXEL_TAGS)
HEAD_BYTES = 16 * 1024  # where a Part 10 file's meta group ends (at most: one that does not is read as it is)


_PYDICOM_IMPORT = threading.Lock()
_PYDICOM_IMPORTED = threading.Event()  # set once pydicom is whole: later calls take no lock


def import_pydicom() -> None:
    """pydicom imported whole, once, under a lock. Its modules import each other in a cycle, and
    two threads importing parts of it for the first time at once can each get the other's
    half-made module ("cannot import name 'dcmread' from partially initialized module
    'pydicom.filereader'": a ``dicomfs export`` whose bulk data renders started together). Every
    function that may be the first to use pydicom in a worker thread calls this before its own
    imports of pydicom; once it is imported, a call takes no lock (it is made for every element
    of a header: 16 threads reading headers contended for the lock)."""
    if _PYDICOM_IMPORTED.is_set():
        return
    with _PYDICOM_IMPORT:
        import pydicom  # noqa: F401
        import pydicom.encaps  # noqa: F401
        import pydicom.filewriter  # noqa: F401
        _PYDICOM_IMPORTED.set()


def read_dataset(source: Readable, *, defer_size: int | None = None, stop_before_pixels: bool = False,
                 specific_tags: Sequence[str] | None = None, force: bool = False) -> FileDataset:
    """What ``pydicom.dcmread`` gives for ``source``, read up to the first element of group
    0000 (and before the pixel data with ``stop_before_pixels``)."""
    import_pydicom()
    from pydicom.filereader import read_partial
    from pydicom.tag import Tag

    def stop(tag: BaseTag, vr: str | None, length: int) -> bool:
        number = int(tag)  # (pydicom's tags compare through Tag(): 1.1 million calls for 1,000 headers)
        return number < 0x10000 or (stop_before_pixels and number in _PIXEL_TAG_SET)

    tags: list[BaseTag | int] | None = [Tag(t) for t in specific_tags] if specific_tags else None
    return read_partial(_cut_at_leading_zeros(source), stop, defer_size=defer_size, force=force, specific_tags=tags)


DEFLATED = "1.2.840.10008.1.2.1.99"  # the data set deflated (pydicom inflates it whole); .2.8.1 deflates frames only


def quiet_pydicom(debug: bool) -> None:
    """pydicom says what it finds odd in a file (a value longer than its VR allows, an unknown
    character set) twice, as a log line and as a Python warning with its own source line, for
    every file and every read of it: nothing dicomfs serves changes (the bytes are served as
    stored). Only when debugging. (A filter, not a level: pydicom sets its logger's level when it
    is imported, later.) For the process that calls it: the CLI's, and each worker process."""
    if not debug:
        logging.getLogger("pydicom").addFilter(lambda record: record.levelno >= logging.ERROR)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


def left_in_file(element: Any) -> TypeGuard[RawDataElement]:
    """Whether pydicom left the element's value in the file (a data set read with ``defer_size``)."""
    import_pydicom()
    from pydicom.dataelem import RawDataElement

    return (isinstance(element, RawDataElement) and element.value is None and bool(element.length)
            and element.value_tell is not None)


def value_left_in_file(element: Any, read_at: Callable[[int, int], bytes]) -> bytes | None:
    """The value of an element pydicom left in the file (read with ``defer_size``), read with
    ``read_at`` (offset, length); None for an element whose value pydicom read. ProtocolError for
    one of undefined length or that runs past the end of the file."""
    if not left_in_file(element):
        return None
    if element.length == 0xFFFFFFFF:
        raise ProtocolError(f"element {int(element.tag):08X} has no stored length")
    value = read_at(element.value_tell, element.length)
    if len(value) != element.length:
        raise ProtocolError(f"element {int(element.tag):08X} runs past the end of the file")
    return value


def stored_transfer_syntax(source: Readable) -> str | None:
    """The transfer syntax in the file meta of the Part 10 file ``source`` (left where it was), or
    None when its meta group does not end in its first ``HEAD_BYTES``. Raises ProtocolError for
    what is not a Part 10 file. For readers that leave large values in the file, which they
    cannot do in a deflated data set (its offsets are those of the inflated bytes)."""
    start = source.tell()
    head = source.read(HEAD_BYTES) or b""
    source.seek(start)
    try:
        return parse_file_meta(head).transfer_syntax_uid
    except NeedMoreData:
        if len(head) < HEAD_BYTES:
            raise ProtocolError("not a DICOM Part 10 file (it ends in its file meta group)") from None
        return None


class PositionedReader(io.RawIOBase):
    """A read-only, seekable file object of ``length`` bytes, as pydicom reads one: where it is
    and how it seeks; a subclass reads (``readinto``). Unbuffered on purpose: pydicom takes a
    ``BufferedReader`` for a named file and opens it again by name for a value it left in the
    file."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self._length, self._pos = length, 0

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


class RangeFile(PositionedReader):
    """``length`` bytes of an open descriptor from ``offset``, as the file object pydicom reads:
    ``pread``, so the descriptor's own position is left alone. ``shorter`` makes the error for a
    descriptor that ends before ``length`` (by default the range just ends there); ``check`` is
    called before every read (a job's stop: it raises to end a parse of 2 GB that nobody waits
    for any more)."""

    def __init__(self, fd: int, offset: int, length: int, shorter: Callable[[], Exception] | None = None,
                 check: Callable[[], None] | None = None) -> None:
        super().__init__(length)
        self._fd, self._offset = fd, offset
        self._shorter = shorter
        self._check = check

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        size = max(0, min(len(view), self._length - self._pos))
        if not size:
            return 0
        if self._check is not None:
            self._check()
        got = os.preadv(self._fd, [view[:size]], self._offset + self._pos)
        if not got and self._shorter is not None:
            raise self._shorter()
        self._pos += got
        return got

    def read_at(self, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset`` (fewer at the end), the position left alone."""
        size = max(0, min(size, self._length - offset))
        if offset < 0 or not size:
            return b""
        if self._check is not None:
            self._check()
        data = os.pread(self._fd, size, self._offset + offset)
        if len(data) != size and self._shorter is not None:
            raise self._shorter()
        return data


def _cut_at_leading_zeros(source: Readable) -> BinaryIO:
    """``source``, or, when zeros follow its file meta at once (a file its writer preallocated
    and never filled), just its preamble and file meta: pydicom reads a data set's leading group
    0000 elements by a loop of its own, which ``stop`` never sees (4 MiB of zeros: 1 s)."""
    start = source.tell()
    head = source.read(HEAD_BYTES) or b""
    source.seek(start)
    try:
        end = parse_file_meta(head).end
    except (ProtocolError, NeedMoreData):
        return cast(BinaryIO, source)  # (no Part 10 header that ends in these bytes: as pydicom reads it)
    if head[end:end + 8] == bytes(8):
        return io.BytesIO(bytes(head[:end]))
    return cast(BinaryIO, source)
