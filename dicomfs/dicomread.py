"""Reading a DICOM data set with pydicom, no further than the data set goes.

Owns ``read_dataset``: pydicom's reader with one more stop. Zero bytes after a data set (a file
padded or preallocated by whatever wrote it) read as elements of group 0000, which no stored data
set holds, one per 8 bytes: 20 MB of them took pydicom 5.7 s, a worker thread that no timeout can
stop, and the last of them ended up in the metadata as an element (0000,0000). The read stops at the
first element of that group, as at the pixel data when asked to, and a data set that begins with
zeros is an empty one. Blocking. Must not open files (callers hand over a file object:
``localfile.open_regular`` for a folder's) or interpret the data set.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, BinaryIO, cast

from dicomfs.errors import ProtocolError
from dicomfs.p10 import parse_file_meta

if TYPE_CHECKING:
    from pydicom.dataset import FileDataset
    from pydicom.tag import BaseTag

PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData: in that order
HEAD_BYTES = 16 * 1024  # where a Part 10 file's meta group ends (at most: one that does not is read as it is)


def read_dataset(source: BinaryIO | io.RawIOBase, *, defer_size: int | None = None, stop_before_pixels: bool = False,
                 specific_tags: Sequence[str] | None = None, force: bool = False) -> FileDataset:
    """What ``pydicom.dcmread`` gives for ``source``, read up to the first element of group
    0000 (and before the pixel data with ``stop_before_pixels``)."""
    from pydicom.filereader import read_partial
    from pydicom.tag import Tag

    def stop(tag: BaseTag, vr: str | None, length: int) -> bool:
        return tag.group == 0 or (stop_before_pixels and tag in PIXEL_TAGS)

    tags: list[BaseTag | int] | None = [Tag(t) for t in specific_tags] if specific_tags else None
    return read_partial(_cut_at_leading_zeros(source), stop, defer_size=defer_size, force=force, specific_tags=tags)


def _cut_at_leading_zeros(source: BinaryIO | io.RawIOBase) -> BinaryIO:
    """``source``, or, when zeros follow its file meta at once (a file its writer preallocated
    and never filled), just its preamble and file meta: pydicom reads a data set's leading group
    0000 elements by a loop of its own, which ``stop`` never sees (4 MiB of zeros: 1 s)."""
    start = source.tell()
    head = source.read(HEAD_BYTES) or b""
    source.seek(start)
    try:
        end = parse_file_meta(head).end
    except ProtocolError:
        return cast(BinaryIO, source)  # (no Part 10 header that ends in these bytes: as pydicom reads it)
    if head[end:end + 8] == bytes(8):
        return io.BytesIO(bytes(head[:end]))
    return cast(BinaryIO, source)
