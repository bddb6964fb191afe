"""Synthetic DICOM instances for tests and benchmarks (pydicom, no network), and mock answers."""

from __future__ import annotations

import io
import os
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def make_instance(study: str, series: str, sop: str | None = None, *, pixel_bytes: int = 64,
                  number: int = 1, patient: str = "TEST^PATIENT", study_date: str = "20240102",
                  modality: str = "OT", series_number: int = 1) -> bytes:
    """A valid Part 10 file: a secondary capture with ``pixel_bytes`` of 8-bit pixels."""
    sop = sop or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(SECONDARY_CAPTURE)
    meta.MediaStorageSOPInstanceUID = UID(sop)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = sop
    if not patient.isascii():
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientName = patient
    ds.PatientID = "TEST-1"
    ds.StudyDate = study_date
    ds.StudyTime = "120000"
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.InstanceNumber = number
    side = 1
    while side * side < pixel_bytes:
        side += 1
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    period = bytes((i * 7 + number) % 256 for i in range(256))  # the pattern repeats every 256 bytes
    ds.PixelData = (period * (side * side // 256 + 1))[:side * side]
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def slide(study: str, series: str, *, encapsulated: bool, frames: int, frame_bytes: int, number: int,
          has_bot: bool = True, split: tuple[int, ...] = ()) -> bytes:
    """A large multi-frame instance (as a slide's level is), with an ICC profile as bulk data.
    Encapsulated: JPEG baseline, frames of different sizes, one fragment each (with a basic
    offset table unless ``has_bot`` is false), except the frames (1-based) in ``split``, stored as
    two fragments."""
    from pydicom.dataset import Dataset
    from pydicom.encaps import encapsulate, itemize_frame
    from pydicom.uid import JPEGBaseline8Bit

    sop = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.77.1.6")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit if encapsulated else ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.Modality, ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "SLIDE", "SM", "20240101", 1, number
    side = int(frame_bytes ** 0.5)
    ds.Rows = ds.Columns = side
    ds.NumberOfFrames, ds.SamplesPerPixel, ds.PhotometricInterpretation = frames, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    optical = Dataset()
    optical.OpticalPathIdentifier = "1"
    optical.ICCProfile = os.urandom(4000)
    ds.OpticalPathSequence = [optical]
    noise = os.urandom(side * side + frames)
    if encapsulated:  # (each frame ends in a JPEG end-of-image marker, as pydicom looks for one)
        pieces = [noise[i:i + side * side - i % 7] + b"\xff\xd9" for i in range(frames)]
        if split:
            framed = [b"".join(itemize_frame(piece, 2 if position in split else 1))
                      for position, piece in enumerate(pieces, 1)]
            starts = [sum(map(len, framed[:index])) for index in range(frames)] if has_bot else []
            table = struct.pack(f"<{len(starts)}I", *starts)
            ds.PixelData = b"\xfe\xff\x00\xe0" + struct.pack("<I", len(table)) + table + b"".join(framed)
            ds["PixelData"].is_undefined_length = True
        else:
            ds.PixelData = encapsulate(pieces, has_bot=has_bot)
    else:
        ds.PixelData = b"".join(noise[i:i + side * side] for i in range(frames))
    ds["PixelData"].VR = "OB"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def write_slide(path: Path, study: str, series: str, *, encapsulated: bool, frames: int, frame_bytes: int,
                number: int) -> str:
    """``slide`` written to ``path``; its SOP Instance UID."""
    data = slide(study, series, encapsulated=encapsulated, frames=frames, frame_bytes=frame_bytes, number=number)
    path.write_bytes(data)
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def multipart(parts: list[bytes], boundary: str = "dicomfs-test-boundary", *, lengths: bool = True) -> bytes:
    out = bytearray()
    for body in parts:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n".encode()
        if lengths:
            out += f"Content-Length: {len(body)}\r\n".encode()
        out += b"\r\n" + body + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


def streamed(handler: Callable[[httpx.Request], httpx.Response]) -> Callable[[httpx.Request], httpx.Response]:
    """The handler's answers as a network transport gives them: bodies still to be streamed (a
    mock ``httpx.Response(json=...)`` arrives already read)."""
    def handle(request: httpx.Request) -> httpx.Response:
        response = handler(request)
        if not response.is_stream_consumed:
            return response
        return httpx.Response(response.status_code, headers=response.headers,
                              stream=httpx.ByteStream(response.content))

    return handle


class MemorySink:
    """A SeriesSink keeping every instance in memory, for a source on the event loop (``begin``
    is async) or in a worker thread (``in_thread``: the same sink, written to synchronously)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.sizes: dict[str, int | None] = {}
        self.arrivals = 0
        self.published = 0
        self.waiting: list[str] = []  # what ``awaited`` says readers wait for
        self.pieces: Counter[str] = Counter()  # how many writes each instance came in

    def awaited(self) -> list[str]:
        return self.waiting

    def arrived(self, size: int) -> None:
        self.arrivals += size

    def wants(self, key: str) -> bool:
        return key not in self.files

    async def begin(self, key: str, size: int | None) -> _MemoryWriter:
        return self._writer(key, size)

    def _writer(self, key: str, size: int | None) -> _MemoryWriter:
        self.sizes[key] = size
        return _MemoryWriter(self, key)

    def in_thread(self) -> _BlockingFace:
        return _BlockingFace(self)


class _MemoryWriter:
    def __init__(self, sink: MemorySink, key: str) -> None:
        self._sink, self._key, self._buffer = sink, key, bytearray()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self.write_now(data)

    async def finish(self) -> None:
        self.finish_now()

    def write_now(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer.extend(data)
        self._sink.pieces[self._key] += 1

    def finish_now(self) -> None:
        self._sink.files[self._key] = bytes(self._buffer)


class _BlockingFace:
    def __init__(self, sink: MemorySink) -> None:
        self._sink = sink

    def arrived(self, size: int) -> None:
        self._sink.arrived(size)

    def wants(self, key: str) -> bool:
        return self._sink.wants(key)

    def publish(self) -> None:
        self._sink.published += 1

    def begin(self, key: str, size: int | None) -> _BlockingWriter:
        return _BlockingWriter(self._sink._writer(key, size))


class _BlockingWriter:
    def __init__(self, writer: _MemoryWriter) -> None:
        self.write = writer.write_now
        self.finish = writer.finish_now
