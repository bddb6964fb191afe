"""Unit tests of ``dicomfs.dicomread``: a data set is read no further than it goes."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import pytest

from dicomfs.dicomread import read_dataset
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
