"""Parsing and validation of a COD series index (``metadata.json``) of Cloud Optimized DICOM.

Owns the two instance-entry versions (v1: a DICOM JSON dict; v2: base64 of zstd-compressed JSON),
gzip/plain detection, and the checks that keep a broken or hostile index from naming bytes that
do not belong to an instance (negative sizes, ranges past the tar, overlapping ranges, keys that
are not safe names). Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dicomfs.decoding import inflate_gzip, parse_json
from dicomfs.errors import ProtocolError
from dicomfs.records import DicomJson, dicom_datetime_ns
from dicomfs.uids import is_key

log = logging.getLogger(__name__)

MAX_METADATA_BYTES = 256 * 1024 * 1024  # a series index as stored, and once inflated
MAX_ENTRY_JSON_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class CodInstance:
    key: str
    start: int  # inclusive offset of the P10 file in the series tar
    size: int
    crc32c: int | None
    metadata: DicomJson = field(compare=False)
    mtime_ns: int | None = None
    frame_offsets: tuple[tuple[int, int], ...] = ()  # (offset in the P10 file, length) per frame

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class CodSeries:
    study_uid: str | None
    series_uid: str | None
    instances: dict[str, CodInstance]


def decode_document(raw: bytes) -> Any:
    """gzip'd (inflated within ``MAX_METADATA_BYTES``) or plain JSON."""
    if raw[:2] == b"\x1f\x8b":
        raw = inflate_gzip(raw, MAX_METADATA_BYTES, "metadata.json")
    return parse_json(raw, "metadata.json")


def parse_series_index(raw: bytes, tar_size: int | None) -> CodSeries:
    """Validate a series index; bad entries are skipped with a log line, never trusted."""
    document = decode_document(raw)
    if not isinstance(document, dict):
        raise ProtocolError("metadata.json is not a JSON object")
    cod = document.get("cod")
    entries = cod.get("instances") if isinstance(cod, dict) else None
    if not isinstance(entries, dict):
        raise ProtocolError("metadata.json has no cod.instances object")
    study = document.get("study_uid", document.get("deid_study_uid"))
    series = document.get("series_uid", document.get("deid_series_uid"))
    instances: list[CodInstance] = []
    for key, entry in entries.items():
        try:
            instances.append(_parse_entry(key, entry, tar_size))
        except ProtocolError as exc:
            log.warning("COD entry %r skipped: %s", str(key)[:80], exc)
    return CodSeries(study if isinstance(study, str) else None, series if isinstance(series, str) else None,
                     _without_overlaps(instances))


def _parse_entry(key: object, entry: object, tar_size: int | None) -> CodInstance:
    if not isinstance(key, str) or not is_key(key):
        raise ProtocolError("the instance key is not a safe name")
    if not isinstance(entry, dict):
        raise ProtocolError("the entry is not an object")
    version = entry.get("version", "1.0")
    if version not in ("1.0", "2.0", "1", "2", 1, 2):
        raise ProtocolError(f"unknown entry version {version!r}")
    headers = entry.get("headers")
    if not isinstance(headers, dict):
        raise ProtocolError("no byte range (headers)")
    start, end, size = headers.get("start_byte"), headers.get("end_byte"), entry.get("size")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end, size)):
        raise ProtocolError("byte range or size is not an integer")
    assert isinstance(start, int) and isinstance(end, int) and isinstance(size, int)
    if start < 0 or size <= 0 or end != start + size:
        raise ProtocolError(f"inconsistent byte range {start}-{end} for size {size}")
    if tar_size is not None and end > tar_size:
        raise ProtocolError(f"byte range ends at {end}, past the end of the tar ({tar_size})")
    metadata = _metadata(entry.get("metadata"), str(version).startswith("2"))
    return CodInstance(key, start, size, _crc32c(entry.get("crc32c")), metadata,
                       _mtime(metadata, entry.get("modified_datetime")), _frames(entry.get("offset_tables"), size))


def _metadata(value: object, compressed: bool) -> DicomJson:
    if compressed:
        if not isinstance(value, str):
            raise ProtocolError("v2 metadata is not a string")
        try:
            import zstandard

            packed = base64.b64decode(value, validate=True)
            raw = zstandard.ZstdDecompressor().decompress(packed, max_output_size=MAX_ENTRY_JSON_BYTES)
            value = parse_json(raw, "v2 instance metadata")
        except ProtocolError:
            raise
        except (binascii.Error, ValueError) as exc:
            raise ProtocolError(f"v2 metadata is not base64 zstd JSON: {exc}") from None
        except Exception as exc:  # zstandard.ZstdError and friends
            raise ProtocolError(f"v2 metadata does not decompress: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError("metadata is not a DICOM JSON object")
    return value


def _crc32c(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError("crc32c is not a string")
    try:
        raw = base64.b64decode(value, validate=True)
    except binascii.Error:
        raise ProtocolError("crc32c is not base64") from None
    if len(raw) != 4:
        raise ProtocolError("crc32c is not 4 bytes")
    return int.from_bytes(raw, "big")


def _mtime(metadata: DicomJson, modified: object) -> int | None:
    stamp = dicom_datetime_ns(metadata, "00080020", "00080030")
    if stamp:
        return stamp
    if isinstance(modified, str):
        try:
            parsed = datetime.fromisoformat(modified)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return int(parsed.timestamp()) * 1_000_000_000
    return None


def _frames(tables: object, size: int) -> tuple[tuple[int, int], ...]:
    if not isinstance(tables, dict) or not tables:
        return ()
    offsets, lengths = tables.get("CustomOffsetTable"), tables.get("CustomOffsetTableLengths")
    if not isinstance(offsets, list) or not isinstance(lengths, list) or len(offsets) != len(lengths):
        return ()
    frames = []
    for offset, length in zip(offsets, lengths, strict=False):
        if not (isinstance(offset, int) and isinstance(length, int)) or offset < 0 or length < 0 \
                or offset + length > size:
            return ()  # an offset table that does not fit is ignored, not trusted
        frames.append((offset, length))
    return tuple(frames)


def _without_overlaps(instances: list[CodInstance]) -> dict[str, CodInstance]:
    """Entries whose ranges overlap another's are all dropped: neither can be trusted."""
    ordered = sorted(instances, key=lambda i: i.start)
    bad: set[str] = set()
    reach: CodInstance | None = None  # the entry reaching furthest so far
    for entry in ordered:
        if reach is not None and entry.start < reach.end:
            bad.update((reach.key, entry.key))
        if reach is None or entry.end > reach.end:
            reach = entry
    for key in sorted(bad):
        log.warning("COD entry %r skipped: its byte range overlaps another entry's", key[:80])
    return {i.key: i for i in ordered if i.key not in bad}
