"""What pydicom says about the source files, the reference DICOMweb answers are checked against,
and a plain split of the multipart answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
from pydicom.encaps import generate_frames

KEY_TAGS = ("00080016", "00080018", "00080060", "0020000D", "0020000E", "00200013", "00100010",
            "00100020", "00280002", "00280004", "00280008", "00280010", "00280011", "00280100",
            "00280101", "00280103", "00200032", "00200037", "00280030", "00281050", "00281051")
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def source_files(demo_dir: Path) -> dict[str, Path]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in demo_dir.rglob("*.dcm")}


def reference_frames(path: Path) -> tuple[str, list[bytes]]:
    """The transfer syntax a frame should announce and the frames, as pydicom extracts them."""
    ds = pydicom.dcmread(path)
    count = int(ds.get("NumberOfFrames") or 1)
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_encapsulated:
        return str(syntax), list(generate_frames(ds.PixelData, number_of_frames=count))
    data = ds.PixelData
    if not syntax.is_little_endian and ds.BitsAllocated > 8:
        data = np.frombuffer(data, dtype=f">u{ds.BitsAllocated // 8}").byteswap().tobytes()
    length = ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8
    return EXPLICIT_LE, [data[i * length:(i + 1) * length] for i in range(count)]


def value(element: dict[str, Any] | None) -> Any:
    return None if element is None else element.get("Value")


def parts(response: httpx.Response) -> list[tuple[str, bytes]]:
    """A multipart/related body -> (Content-Type, body) of each part, split on the announced boundary."""
    content_type = response.headers["content-type"]
    assert content_type.startswith("multipart/related"), content_type
    boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip('"').encode()
    body = response.content
    assert body.endswith(b"--" + boundary + b"--\r\n")
    out = []
    for chunk in body.split(b"--" + boundary)[1:-1]:
        assert chunk.startswith(b"\r\n") and chunk.endswith(b"\r\n")
        head, _, data = chunk[2:-2].partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        out.append((headers["Content-Type"], data))
    return out
