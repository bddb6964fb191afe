"""A small writer of Cloud Optimized DICOM datastores for tests (see specs/cod-format.md).

Real PAX tars (offsets from ``TarInfo.offset_data``), real CRC32C, metadata.json v1 or v2,
hashed (de-identified) keys, multi-frame offset tables. The output is a dict of object name ->
bytes, ready to upload to a bucket.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import struct
import tarfile
from dataclasses import dataclass, field
from typing import Any

import google_crc32c
import pydicom
import zstandard


def crc32c_b64(data: bytes) -> str:
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


def hashed(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:40]


def frame_table(data: bytes) -> dict[str, list[int]]:
    """CustomOffsetTable(+Lengths) of a multi-frame file, relative to the file's first byte."""
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames <= 1:
        return {}
    tag = b"\xe0\x7f\x10\x00"
    at = data.rfind(tag)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        pos = at + 12  # tag, "OB", reserved, undefined length
        _, bot_length = struct.unpack_from("<4sI", data, pos)
        pos += 8 + bot_length
        offsets: list[int] = []
        lengths: list[int] = []
        while len(offsets) < frames:
            item, length = struct.unpack_from("<4sI", data, pos)
            assert item == b"\xfe\xff\x00\xe0", "one fragment per frame expected"
            offsets.append(pos + 8)
            lengths.append(length)
            pos += 8 + length
    else:
        value_start = at + (12 if data[at + 4:at + 6] in (b"OB", b"OW") else 8)
        frame_size = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * int(ds.BitsAllocated) // 8
        offsets = [value_start + n * frame_size for n in range(frames)]
        lengths = [frame_size] * frames
    return {"CustomOffsetTable": offsets, "CustomOffsetTableLengths": lengths}


@dataclass
class CodSeriesFiles:
    study_uid: str
    series_uid: str
    files: dict[str, bytes]  # SOPInstanceUID -> P10 bytes
    version: int = 1
    hashed_keys: bool = False
    gzip_metadata: bool = True
    damaged: bool = False
    extra_top_level: dict[str, Any] = field(default_factory=lambda: {"thumbnail": {"uri": "x"}, "custom": 1})
    offset_tables: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # SOPInstanceUID -> a table to write

    @property
    def study_key(self) -> str:
        return hashed(self.study_uid) if self.hashed_keys else self.study_uid

    @property
    def series_key(self) -> str:
        return hashed(self.series_uid) if self.hashed_keys else self.series_uid

    def key(self, sop: str) -> str:
        return hashed(sop) if self.hashed_keys else sop


def write_series(prefix: str, series: CodSeriesFiles) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Objects of one series, and {mount-relative path: bytes} of what the mount must show."""
    tar_buffer = io.BytesIO()
    with tarfile.open(fileobj=tar_buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for sop, data in series.files.items():
            info = tarfile.TarInfo(f"instances/{series.key(sop)}.dcm")
            info.size = len(data)
            info.mtime = 1_700_000_000
            info.pax_headers = {"comment": "dicomfs test fixture"}  # an extended header, as real writers emit
            tar.addfile(info, io.BytesIO(data))
    tar_bytes = tar_buffer.getvalue()
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r") as written:  # offsets as tar reads them
        data_offsets = {member.name: member.offset_data for member in written.getmembers()}
    entries: dict[str, dict[str, Any]] = {}
    expected: dict[str, bytes] = {}
    for sop, data in series.files.items():
        key = series.key(sop)
        start = data_offsets[f"instances/{key}.dcm"]
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        dicom_json = ds.file_meta.to_json_dict()
        dicom_json.update(ds.to_json_dict(bulk_data_threshold=4096,
                                          bulk_data_element_handler=lambda el: f"bulk/{el.tag:08X}"))
        entry: dict[str, Any] = {
            "headers": {"start_byte": start, "end_byte": start + len(data)},
            "offset_tables": series.offset_tables.get(sop) or frame_table(data),
            "crc32c": crc32c_b64(data),
            "size": len(data),
            "uri": f"gs://bucket/{prefix}/studies/{series.study_key}/series/{series.series_key}.tar"
                   f"://instances/{key}.dcm",
            "original_path": f"/data/{key}.dcm",
            "modified_datetime": "2024-01-02T03:04:05.123456",
        }
        if series.version == 2:
            raw = json.dumps(dicom_json).encode()
            entry.update(version="2.0", metadata=base64.b64encode(zstandard.ZstdCompressor().compress(raw)).decode(),
                         instance_uid=sop, series_uid=series.series_uid, study_uid=series.study_uid,
                         has_pixeldata=True)
        else:
            entry.update(version="1.0", metadata=dicom_json)
        entries[key] = entry
        expected[f"studies/{series.study_key}/{series.series_key}/{key}.dcm"] = data
    document = {"cod": {"instances": entries}, **series.extra_top_level}
    if series.hashed_keys:
        document.update(deid_study_uid=series.study_key, deid_series_uid=series.series_key)
    else:
        document.update(study_uid=series.study_uid, series_uid=series.series_uid)
    metadata = json.dumps(document).encode()
    if series.gzip_metadata:
        metadata = gzip.compress(metadata, mtime=0)
    folder = f"{prefix}/studies/{series.study_key}/series/{series.series_key}"
    objects = {f"{folder}.tar": tar_bytes, f"{folder}/metadata.json": metadata}
    if series.damaged:
        objects[f"{folder}/error.log"] = b"writer crashed\n"
    return objects, expected


def series_from_files(files: list[bytes], **options: object) -> list[CodSeriesFiles]:
    """Group Part 10 files into COD series by their UIDs."""
    grouped: dict[tuple[str, str], dict[str, bytes]] = {}
    for data in files:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        grouped.setdefault((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)), {})[str(ds.SOPInstanceUID)] = data
    return [CodSeriesFiles(study, series, members, **options)  # type: ignore[arg-type]
            for (study, series), members in grouped.items()]
