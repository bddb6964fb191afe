"""Attribute queries from the command line: parse ``KEY=VALUE`` terms and match DICOM JSON.

Owns what a query means: which level (study, series, instance) a key belongs to, wildcard
(``*``, ``?``), date range (``YYYYMMDD-YYYYMMDD``, open ends allowed), person-name and list
matching (``CT\\MR``: any of the values; ``CT,MR`` too where a value cannot hold a comma),
and how a term is written into a QIDO-RS query string for servers that do not percent-decode
(characters a URL cannot carry literally are sent as ``*`` and the term is re-checked here).
Must not do I/O.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dicomfs.dicomread import import_pydicom
from dicomfs.errors import UsageError
from dicomfs.records import DicomJson

STUDY_KEYWORDS = frozenset({
    "StudyInstanceUID", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName",
    "ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
})
SERIES_KEYWORDS = frozenset({
    "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime",
    "BodyPartExamined", "Laterality", "ProtocolName", "PerformedProcedureStepStartDate", "Manufacturer",
    "InstitutionName", "NumberOfSeriesRelatedInstances",
})
# Tags and VRs of common keys, so that a query on them needs no pydicom (slow to import).
COMMON_KEYS = {
    "StudyInstanceUID": ("0020000D", "UI"), "SeriesInstanceUID": ("0020000E", "UI"),
    "SOPInstanceUID": ("00080018", "UI"), "PatientName": ("00100010", "PN"), "PatientID": ("00100020", "LO"),
    "StudyDate": ("00080020", "DA"), "StudyTime": ("00080030", "TM"), "AccessionNumber": ("00080050", "SH"),
    "StudyDescription": ("00081030", "LO"), "ModalitiesInStudy": ("00080061", "CS"),
    "Modality": ("00080060", "CS"), "SeriesNumber": ("00200011", "IS"), "SeriesDescription": ("0008103E", "LO"),
    "InstanceNumber": ("00200013", "IS"), "PatientBirthDate": ("00100030", "DA"), "PatientSex": ("00100040", "CS"),
    "StudyID": ("00200010", "SH"), "ReferringPhysicianName": ("00080090", "PN"),
}
# Characters Orthanc and other servers read literally in a query string (Orthanc's query parser),
# which the HTTP client (urllib3) also sends as they are: not ``^``, which it percent-encodes and
# Orthanc then does not match (a PN's ``^`` goes as ``*``, and the term is checked again here).
_URL_SAFE = re.compile(r"[A-Za-z0-9*?.,\-/_:]")
# Attributes servers compute rather than match (Orthanc answers nothing for them): checked here.
_NOT_SENT = frozenset({"NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
                       "NumberOfSeriesRelatedInstances"})
_NUMERIC_VRS = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"})
# A value with several values (PS3.4 C.2.2.2: the key matches when any of them does) separates
# them by a backslash, DICOM's value delimiter, except in VRs whose one value may hold one; and
# by a comma, QIDO-RS's list separator (PS3.18 8.3.4.1; OHIF's modality filter), in VRs whose
# values cannot hold a comma.
_ONE_VALUE_VRS = frozenset({"LT", "ST", "UT", "UR", "UN"})
_COMMA_LIST_VRS = frozenset({"UI", "CS"})
_RANGE_VRS = frozenset({"DA", "DT", "TM"})


@dataclass(frozen=True)
class Term:
    keyword: str
    tag: str  # 8 upper-case hex digits, as in DICOM JSON (or a source's own key: ``parse_query``'s extra)
    vr: str
    value: str
    level: str
    fuzzy: bool = False  # person names: any name component starting with the value matches

    @property
    def is_range(self) -> bool:
        return _is_range(self.value, self.vr)

    @property
    def values(self) -> tuple[str, ...]:
        """The values the term lists: one, or several when it is a list (``CT\\MR``; ``CT,MR``
        where a value cannot hold a comma), any of which matching is a match."""
        if self.vr in _ONE_VALUE_VRS:
            return (self.value,)
        items = re.split(r"[\\,]" if self.vr in _COMMA_LIST_VRS else r"\\", self.value)
        return tuple(v for v in items if v) or (self.value,)

    def matches(self, attrs: DicomJson) -> bool | None:
        """True or False; None when ``attrs`` does not carry the attribute at all."""
        element = attrs.get(self.tag)
        if not isinstance(element, dict):
            return True if self.value.strip("*") == "" else None
        values = [_text(v) for v in element.get("Value") or []]
        if self.value.strip("*") == "":
            return True  # universal match: present, even empty
        return any(self._matches_one(wanted, values) for wanted in self.values)

    def _matches_one(self, wanted: str, values: list[str]) -> bool:
        """Whether one of the attribute's ``values`` matches the one value ``wanted``."""
        if self.fuzzy and self.vr == "PN" and "*" not in wanted and "?" not in wanted:
            start = wanted.casefold()
            return any(part.startswith(start) for v in values for part in re.split(r"[\^= ]+", v.casefold()))
        if _is_range(wanted, self.vr):
            low, high = wanted.split("-", 1)
            return any(_in_range(v, low, high) for v in values)
        if "*" in wanted or "?" in wanted:
            pattern = _wildcard_regex(wanted, ignore_case=self.vr == "PN")
            return any(pattern.fullmatch(v) for v in values)
        return any(_equal(v, wanted, self.vr) for v in values)

    def qido(self, level: str) -> tuple[str, str, bool] | None:
        """``(key, value, exact)`` to put into a QIDO query at ``level``, or None when the term
        is not sent (the caller checks it itself unless it matches anything). ``exact`` is False
        when the sent value is looser than the term (it must be checked again on the answers)."""
        if self.value.strip("*") == "" or self.keyword in _NOT_SENT or self.fuzzy and self.vr == "PN":
            return None  # (fuzzy matching is ours: archives each do their own)
        if self.vr in _RANGE_VRS and ("*" in self.value or "?" in self.value):
            return None  # DICOM allows no wildcards on dates and times; servers answer 400
        if self.vr != "UI" and len(self.values) > 1:
            return None  # a list: Orthanc reads a comma literally, a backslash cannot go unencoded
        keyword = self.keyword
        if level == "study" and keyword == "Modality":
            keyword = "ModalitiesInStudy"
        value = self.value.replace("\\", ",") if self.vr == "UI" else self.value  # a UID list
        sent = "".join(c if _URL_SAFE.fullmatch(c) else "*" for c in value)
        sent = re.sub(r"\*+", "*", sent)
        if sent.strip("*") == "":
            return None
        return keyword, sent, sent == value


@dataclass(frozen=True)
class Query:
    terms: tuple[Term, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.terms)

    def at(self, level: str) -> tuple[Term, ...]:
        return tuple(t for t in self.terms if t.level == level)

    @property
    def text(self) -> str:
        """A canonical spelling (for cache keys and messages)."""
        return "&".join(sorted(f"{t.keyword}={t.value}" for t in self.terms))


def parse_query(items: list[str] | None, extra: Mapping[str, tuple[str, str, str]] | None = None,
                *, fuzzy: bool = False, reversed_ranges: bool = False) -> Query:
    """``["PatientName=Doe^J*", "StudyDate=20200101-20201231"]`` -> Query; UsageError if bad.
    ``extra``: keys a source knows besides DICOM keywords (keyword -> (attribute key, VR, level);
    the IDC index's ``collection_id``), matched on the records' attributes under that key.
    ``fuzzy``: person names match where any of their components starts with the value, in any
    case (QIDO-RS ``fuzzymatching=true``; checked here, never sent to the archive).
    ``reversed_ranges``: a date range that ends before it starts matches nothing instead of being
    refused (a QIDO client's own arithmetic: OHIF's study list sends ``<start>-<today>`` for a
    start date in the future)."""
    terms: list[Term] = []
    for item in items or []:
        keyword, sep, value = item.partition("=")
        keyword = keyword.strip()
        if not sep or not keyword:
            raise UsageError(f"query term {item!r} is not KEY=VALUE (e.g. PatientName=Doe*)")
        if extra and keyword in extra:
            key, vr, level = extra[keyword]
            terms.append(Term(keyword, key, vr, value, level))
            continue
        tag, vr = _look_up(keyword, item)
        term = Term(keyword, tag, vr, value, level_of(keyword), fuzzy=fuzzy and vr == "PN")
        if vr == "DT" and any(_is_range(v, vr) and not re.fullmatch(r"[0-9.:]*-[0-9.:]*", v) for v in term.values):
            raise UsageError(f"invalid range {value!r} for {keyword} (use YYYYMMDD-YYYYMMDD)")
        if vr in ("DA", "TM"):
            for one in term.values:
                _check_range_ends(keyword, one, vr, reversed_ranges)
        terms.append(term)
    return Query(tuple(terms))


_FORMATS = {"DA": ("date", "YYYYMMDD"), "TM": ("time", "HHMMSS")}  # (a time's HH and HHMM are read too)


def _check_range_ends(keyword: str, value: str, vr: str, reversed_ok: bool) -> None:
    """A date term is ``YYYYMMDD`` (a day of the calendar), a time term ``HH``, ``HHMM``,
    ``HHMMSS`` or ``HHMMSS.FFFFFF`` (colons allowed, as older archives write them), or a range of
    them with either end left out (or a wildcard, matched here): anything else (``2024-01``,
    ``2024``, ``20241399``, ``25``, ``1261``) would match nothing, silently."""
    if not value or "*" in value or "?" in value:
        return
    low, dash, high = value.partition("-")
    ends = [end for end in (low, high) if end]
    valid = _is_calendar_date if vr == "DA" else _is_time
    if not ends or not all(valid(end) for end in ends):
        what, form = _FORMATS[vr]
        raise UsageError(f"invalid {what} {value!r} for {keyword} (use {form}, or {form}-{form} for a range, "
                         "either end left out for an open one)")
    if dash and low and high and _ends_before_it_starts(low, high) and not reversed_ok:
        raise UsageError(f"the range {value!r} for {keyword} ends before it starts")


def _ends_before_it_starts(low: str, high: str) -> bool:
    """Whether no value can be in the range: its ends compared as ``_in_range`` compares a value
    with them, by their common leading digits (``1030-10`` is 10:30 to 10:59), colons dropped."""
    low, high = low.replace(":", ""), high.replace(":", "")
    common = min(len(low), len(high))
    return low[:common] > high[:common]


def dictionary_entry(keyword: str) -> tuple[str, str] | None:
    """A DICOM keyword's tag (8 hex digits) and VR; None if it is not a keyword."""
    common = COMMON_KEYS.get(keyword)
    if common is not None:
        return common
    import_pydicom()  # (on the event loop, while worker threads may be importing it too)
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(keyword)
    return None if tag is None else (f"{tag:08X}", dictionary_VR(tag))


def _look_up(keyword: str, item: str) -> tuple[str, str]:
    entry = dictionary_entry(keyword)
    if entry is None:
        raise UsageError(f"unknown DICOM keyword {keyword!r} in query term {item!r}")
    if entry[1] == "SQ":
        raise UsageError(f"cannot query on the sequence {keyword}")
    return entry


def level_of(keyword: str) -> str:
    """The query model's level of a DICOM keyword: study, series, or else instance."""
    if keyword in STUDY_KEYWORDS:
        return "study"
    if keyword in SERIES_KEYWORDS:
        return "series"
    return "instance"


def _is_range(value: str, vr: str) -> bool:
    if vr not in _RANGE_VRS or "-" not in value:
        return False
    # A date-time may end in a UTC offset ("...120000-0500"): that is not a range.
    return not (vr == "DT" and re.fullmatch(r"\d{8,}(\.\d+)?-\d{4}", value))


def _is_calendar_date(text: str) -> bool:
    """Whether ``text`` is eight digits naming a day of the calendar (20241399 is not)."""
    if not re.fullmatch(r"[0-9]{8}", text):
        return False
    try:
        datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return False
    return True


def _is_time(text: str) -> bool:
    """Whether ``text`` is a DICOM time (PS3.5 TM: ``HH``, ``HHMM``, ``HHMMSS``, ``HHMMSS.F`` to
    six fraction digits; ``HH:MM:SS`` as ACR-NEMA wrote it) of a real hour, minute and second (60:
    a leap second)."""
    found = re.fullmatch(r"([0-9]{2})(?::?([0-9]{2})(?::?([0-9]{2})(\.[0-9]{1,6})?)?)?", text)
    if found is None:
        return False
    hour, minute, second = (int(part) if part else 0 for part in found.groups()[:3])
    return hour < 24 and minute < 60 and second <= 60


def _text(value: Any) -> str:
    if isinstance(value, dict):  # a person name: match its alphabetic form
        return str(value.get("Alphabetic", ""))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _wildcard_regex(value: str, ignore_case: bool) -> re.Pattern[str]:
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value)
    return re.compile(body, re.IGNORECASE | re.DOTALL if ignore_case else re.DOTALL)


def _in_range(value: str, low: str, high: str) -> bool:
    digits = value.replace(":", "")
    low, high = low.replace(":", ""), high.replace(":", "")
    if low and digits[: len(low)] < low:
        return False
    return not (high and digits[: len(high)] > high)


def _equal(value: str, wanted: str, vr: str) -> bool:
    if vr == "PN":
        return value.casefold() == wanted.casefold()
    if vr in _NUMERIC_VRS:
        try:
            return float(value) == float(wanted)
        except ValueError:
            return False
    return value.strip() == wanted.strip()
