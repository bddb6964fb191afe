"""The records a source yields: what exists in an archive, independent of how it was found.

Owns the plain data types shared by sources, catalog, blob store and tree. Must not do I/O.
"""

from __future__ import annotations

import calendar
import datetime
from dataclasses import dataclass, field
from typing import Any

DicomJson = dict[str, Any]


@dataclass(frozen=True, slots=True)  # (slots: the IDC index lists 168,000 of them)
class StudyRecord:
    uid: str  # the folder name: a StudyInstanceUID or the archive's hashed key
    attrs: DicomJson = field(default_factory=dict, compare=False)  # QIDO-style DICOM JSON
    _mtime_ns: int | None = field(default=None, init=False, compare=False, repr=False)

    @classmethod
    def dated(cls, uid: str, attrs: DicomJson, mtime_ns: int) -> StudyRecord:
        """A record whose ``mtime_ns`` its source worked out already (for many at once)."""
        record = cls(uid, attrs)
        object.__setattr__(record, "_mtime_ns", mtime_ns)
        return record

    @property
    def mtime_ns(self) -> int:  # asked for every folder of every listing: worked out once
        if self._mtime_ns is None:
            object.__setattr__(self, "_mtime_ns", dicom_datetime_ns(self.attrs, "00080020", "00080030"))
        assert self._mtime_ns is not None
        return self._mtime_ns


@dataclass(frozen=True)
class SeriesRecord:
    study_uid: str
    uid: str
    attrs: DicomJson = field(default_factory=dict, compare=False)

    @property
    def key(self) -> str:
        """Identifies the series blob in the cache."""
        return f"{self.study_uid}/{self.uid}"


@dataclass(frozen=True)
class InstanceRecord:
    study_uid: str
    series_uid: str
    key: str  # the file name without ".dcm": a SOPInstanceUID or a hashed key
    size: int | None = None  # exact P10 size when the archive says so without a download
    crc32c: int | None = None
    mtime_ns: int | None = None
    attrs: DicomJson = field(default_factory=dict, compare=False)



@dataclass(frozen=True)
class FrameTable:
    """Where an archive says an instance's frames lie, without reading it (COD's
    CustomOffsetTable): each frame's first byte in the Part 10 file (its fragment's value, past
    the item header, for encapsulated data) and its length. A claim, trusted only once
    ``frames.check_frame_table`` has checked it against the instance's own bytes."""

    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    size: int  # of the instance
    # the instance's first bytes, where the archive read them to find the table (IDC: the table
    # is the file's own), so that the check need not read them again; b"" where it did not
    head: bytes = field(default=b"", repr=False, compare=False)

def json_value(attrs: DicomJson, tag: str) -> Any:
    """First value of ``tag`` in a DICOM JSON object, or None."""
    element = attrs.get(tag)
    if not isinstance(element, dict):
        return None
    values = element.get("Value")
    if not isinstance(values, list) or not values:
        return None
    return values[0]


SERIES_INSTANCES = "00201209"  # NumberOfSeriesRelatedInstances: a series search's count of its instances
STUDY_SERIES = "00201206"  # NumberOfStudyRelatedSeries: a study search's count of its series


def json_count(attrs: DicomJson, tag: str) -> int | None:
    """A count attribute's value (IS: a JSON number, or a string from some archives), else None."""
    value = json_value(attrs, tag)
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def dicom_datetime_ns(attrs: DicomJson, date_tag: str, time_tag: str) -> int:
    """A stable timestamp from a DICOM date (and time) element, as UTC; 0 when absent."""
    date = json_value(attrs, date_tag)
    if not isinstance(date, str) or len(date) < 8 or not date[:8].isdigit():
        return 0
    clock = json_value(attrs, time_tag)
    hhmmss = "000000"
    if isinstance(clock, str):
        digits = clock.split(".")[0].replace(":", "")
        if digits.isdigit():
            hhmmss = (digits + "000000")[:6]
    try:  # (datetime checks the fields; time.strptime costs ten times as much)
        moment = datetime.datetime(int(date[:4]), int(date[4:6]), int(date[6:8]), int(hhmmss[:2]),
                                   int(hhmmss[2:4]), min(int(hhmmss[4:6]), 59))  # (a leap second)
    except ValueError:
        return 0
    return calendar.timegm(moment.timetuple()) * 1_000_000_000
