"""Unit tests of ``dicomfs.dicomread``: a data set is read no further than it goes."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import pytest

from dicomfs.dicomread import read_dataset
from dicomfs.p10 import parse_file_meta
from tests.factory import make_instance

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.7", "1.2.826.0.1.3680043.8.498.7.1"


class Counting(io.RawIOBase):
    """A file of ``data`` that counts the bytes read from it."""

    def __init__(self, data: bytes) -> None:
        self._file = io.BytesIO(data)
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(pos, whence)

    def tell(self) -> int:
        return self._file.tell()

    def readinto(self, buffer: WriteableBuffer) -> int:
        count = self._file.readinto(buffer)
        self.read_bytes += count
        return count


@pytest.mark.parametrize("defer_size", [None, 1024])
def test_zeros_after_the_data_set_are_not_read_as_elements(defer_size: int | None) -> None:
    blob = make_instance(STUDY, SERIES, f"{SERIES}.1", pixel_bytes=4096, number=1)
    padded = Counting(blob + bytes(8 << 20))  # 8 MiB of zeros, as a writer that preallocates leaves them
    ds = read_dataset(padded, defer_size=defer_size)
    assert padded.read_bytes < len(blob) + (64 << 10)  # (pydicom alone reads all 8 MiB, 8 bytes at a time)
    assert all(tag.group != 0 for tag in ds.keys())  # no element (0000,0000) from the zeros
    assert "PixelData" in ds and ds.SOPInstanceUID == f"{SERIES}.1"


def test_before_the_pixels_and_only_the_tags_asked_for() -> None:
    blob = make_instance(STUDY, SERIES, f"{SERIES}.2", pixel_bytes=1 << 20, number=2)
    counted = Counting(blob)
    ds = read_dataset(counted, stop_before_pixels=True, specific_tags=("SOPInstanceUID", "InstanceNumber"))
    assert "PixelData" not in ds and ds.SOPInstanceUID == f"{SERIES}.2" and ds.InstanceNumber == 2
    assert "Rows" not in ds
    assert counted.read_bytes < 64 << 10


def test_a_file_of_zeros_after_its_file_meta_is_an_empty_data_set() -> None:
    """Preallocated and never filled: pydicom reads leading group 0000 elements by a loop of its
    own, before any stop is asked."""
    blob = make_instance(STUDY, SERIES, f"{SERIES}.3", pixel_bytes=64, number=3)
    meta_end = parse_file_meta(blob).end
    counted = Counting(blob[:meta_end] + bytes(4 << 20))
    ds = read_dataset(counted)
    assert len(ds) == 0 and ds.file_meta.MediaStorageSOPInstanceUID == f"{SERIES}.3"
    assert counted.read_bytes < 128 << 10  # (pydicom alone: all 4 MiB, 8 bytes at a time)
