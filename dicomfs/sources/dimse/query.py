"""C-FIND identifiers and answers: what dicomfs asks a DIMSE archive, and what it takes back.

Owns the Study Root identifiers at STUDY, SERIES and IMAGE level (the return keys the catalog,
``ls``, ``--query`` and the static DICOMweb tree need), writing query terms into them the way
C-FIND matches natively (wildcards, date ranges, UID lists; SpecificCharacterSet ISO_IR 192 for
non-ASCII values), and turning the answers into records: UIDs validated, duplicates and answers
without their key dropped with a log line. Sans-I/O. Must not talk to the network.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from dicomfs.query import Term
from dicomfs.records import DicomJson, InstanceRecord, SeriesRecord, StudyRecord
from dicomfs.sources.dimse.imports import import_pynetdicom
from dicomfs.uids import is_uid

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
UTF8 = "ISO_IR 192"

# Return keys by level: what the catalog, ``ls``, queries and the QIDO files of dicomweb/ read.
RETURN_KEYS = {
    "STUDY": ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
              "ReferringPhysicianName", "StudyDescription", "PatientName", "PatientID", "PatientBirthDate",
              "PatientSex", "StudyInstanceUID", "StudyID", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances"),
    "SERIES": ("SeriesDate", "SeriesTime", "Modality", "SeriesDescription",
               "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "NumberOfSeriesRelatedInstances"),
    "IMAGE": ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
              "InstanceNumber", "NumberOfFrames", "Rows", "Columns"),
}
KEY_OF = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
# Counts the archive computes: asked for as return keys, never matched on (checked by the caller)
_COMPUTED = frozenset({"NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
                       "NumberOfSeriesRelatedInstances"})
_DATE_TIME_VRS = frozenset({"DA", "TM", "DT"})


def identifier(level: str, matching: dict[str, str] | None = None) -> Dataset:
    """A C-FIND identifier at ``level`` asking for its return keys, with ``matching`` values (by
    keyword). SpecificCharacterSet is ISO_IR 192 when a value is not ASCII."""
    import_pynetdicom()  # (on the event loop, while a worker thread may be importing pydicom)
    from pydicom.dataset import Dataset

    ds = Dataset()
    matching = matching or {}
    if any(not value.isascii() for value in matching.values()):
        ds.SpecificCharacterSet = UTF8
    ds.QueryRetrieveLevel = level
    for keyword in RETURN_KEYS[level]:
        setattr(ds, keyword, None)  # a return key: universal matching
    for keyword, value in matching.items():
        setattr(ds, keyword, value)
    return ds


def study_matching(terms: Sequence[Term]) -> dict[str, str]:
    """Matching keys for a STUDY level C-FIND from ``--query`` terms, as C-FIND matches natively:
    ``*`` and ``?`` wildcards, ``low-high`` ranges, lists (backslash-separated). Terms C-FIND
    cannot take (computed counts, wildcards on dates) are left out; the caller checks every term
    again on the answers anyway (an archive may match loosely, or not support a key)."""
    matching: dict[str, str] = {}
    for term in terms:
        value = term.value
        if value.strip("*") == "" or term.keyword in _COMPUTED:
            continue
        if term.vr in _DATE_TIME_VRS and ("*" in value or "?" in value):
            continue
        keyword = "ModalitiesInStudy" if term.keyword == "Modality" else term.keyword
        matching[keyword] = "\\".join(term.values)  # a list (UIDs, modalities) as C-FIND writes it
    return matching


def attributes(ds: Dataset) -> DicomJson:
    """An answer's attributes as DICOM JSON (its own character set decoded)."""
    from dicomfs.dicomjson import dataset_json

    json = dataset_json(ds)
    json.pop("00080052", None)  # QueryRetrieveLevel: part of the question, not of the answer
    return json


def _keys(level: str, answers: Iterable[Dataset], what: str) -> list[tuple[str, DicomJson]]:
    """(key UID, attributes) of each answer; bad or repeated keys dropped with a log line."""
    keyword = KEY_OF[level]
    seen: set[str] = set()
    out: list[tuple[str, DicomJson]] = []
    for ds in answers:
        raw: Any = ds.get(keyword, None)
        uid = str(raw).rstrip("\0 ") if raw is not None else ""
        if not is_uid(uid):
            log.warning("the archive answered a %s without a valid %s (%r): skipped", what, keyword, uid[:80])
            continue
        if uid in seen:
            continue
        seen.add(uid)
        out.append((uid, attributes(ds)))
    return out


def studies(answers: Iterable[Dataset]) -> list[StudyRecord]:
    return [StudyRecord(uid, attrs) for uid, attrs in _keys("STUDY", answers, "study")]


def series(study_uid: str, answers: Iterable[Dataset]) -> list[SeriesRecord]:
    return [SeriesRecord(study_uid, uid, attrs) for uid, attrs in _keys("SERIES", answers, "series")
            if _belongs(attrs, "0020000D", study_uid, uid)]


def instances(series: SeriesRecord, answers: Iterable[Dataset]) -> list[InstanceRecord]:
    return [InstanceRecord(series.study_uid, series.uid, uid, attrs=attrs)
            for uid, attrs in _keys("IMAGE", answers, "instance")
            if _belongs(attrs, "0020000D", series.study_uid, uid) and _belongs(attrs, "0020000E", series.uid, uid)]


def _belongs(attrs: DicomJson, tag: str, parent: str, uid: str) -> bool:
    """An answer that names another parent than was asked for is the archive's mistake: drop it."""
    element = attrs.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    if values and values[0] != parent:
        log.warning("the archive answered %s under %s when asked for %s: skipped", uid, values[0], parent)
        return False
    return True
