"""Unit tests of ``dicomfs.dicomread``: a data set is read no further than it goes."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from dicomfs.dicomread import RangeFile, read_dataset
from dicomfs.errors import IntegrityError
from dicomfs.p10 import parse_file_meta
from dicomfs.tasks import Stopped, StopSignal
from tests.factory import make_instance
from tests.importrace import assert_imports_whole

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


def test_a_range_file_reads_its_range_and_checks_before_every_read(tmp_path: Path) -> None:
    """``RangeFile``: the bytes of one range of a descriptor (as pydicom reads them), the end of
    the range as its end, a descriptor that ends early as the error asked for, and the check run
    before every read: a stopped job's parse ends at its next read."""
    data = make_instance(STUDY, SERIES, pixel_bytes=5000)
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 100 + data + b"y" * 50)
    fd = os.open(path, os.O_RDONLY)
    try:
        checks: list[int] = []
        file = RangeFile(fd, 100, len(data), check=lambda: checks.append(1))
        assert str(read_dataset(file).SOPInstanceUID) == str(read_dataset(io.BytesIO(data)).SOPInstanceUID)
        assert file.read_at(0, 1 << 20) == data and file.read_at(len(data) - 4, 100) == data[-4:]
        assert file.seek(0, io.SEEK_END) == len(data) and file.read(10) == b""
        assert len(checks) >= 3

        stop = StopSignal()
        stopped = RangeFile(fd, 100, len(data), check=stop.check)
        assert stopped.read(132)[128:] == b"DICM"
        stop.set()
        with pytest.raises(Stopped):
            stopped.read(10)
        with pytest.raises(Stopped):
            stopped.read_at(0, 10)

        short = RangeFile(fd, 100, len(data) + 1000, shorter=lambda: IntegrityError("shorter"))
        short.seek(len(data) + 50)
        with pytest.raises(IntegrityError, match="shorter"):
            short.read(100)
    finally:
        os.close(fd)




@pytest.mark.mount  # (processes of its own: a first import of pydicom in each)
def test_worker_threads_that_first_use_pydicom_at_once_get_it_whole() -> None:
    """pydicom's modules import each other in a cycle: threads importing parts of it for the first
    time at once each got the other's half-made module now and then (1 run in 20, an ImportError
    that failed a ``dicomfs export`` in CI). Each run here is a fresh process whose six threads
    start their first pydicom work together; none may see an ImportError."""
    assert_imports_whole("import io\nfrom dicomfs import dicomjson, dicomread, frames", [
        "dicomread.read_dataset(io.BytesIO(data))",
        "dicomjson.bulk_value(io.BytesIO(data), '00100010', lambda o, n: data[o:o + n])",
        "frames.locate_in_bytes(data)", "frames.cut_frames(data)", "dicomread.left_in_file(None)",
        "dicomjson.dataset_json(dicomread.read_dataset(io.BytesIO(data)))"], runs=30)


def test_pydicom_once_imported_takes_no_lock() -> None:
    """``import_pydicom`` is called for every element of a header read (``left_in_file``): once
    pydicom is whole, it returns without the import lock, which 16 threads reading headers at once
    contended for. Here it returns while another thread holds that lock."""
    import threading

    from dicomfs import dicomread

    dicomread.import_pydicom()
    returned = threading.Event()

    def call() -> None:
        dicomread.import_pydicom()
        returned.set()

    with dicomread._PYDICOM_IMPORT:
        threading.Thread(target=call, daemon=True).start()
        assert returned.wait(10)
