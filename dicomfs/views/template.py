"""View templates: ``{Keyword}`` path templates, validated at start, rendered into names.

Owns the keywords a readable view may use (only attributes the archives' listings carry: QIDO,
C-FIND, COD metadata, the folder index, the IDC index's ``collection_id``), how each reads
(``names``), the level of each path component (study, series, instance), which component names a
study, a series, an instance or a patient (the identity a collision suffix is made from), and the
built-in views ``patients``, ``dates`` and (IDC) ``collections``. Pure: no I/O; a bad template is
a ``UsageError`` of one line.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dicomfs.errors import UsageError
from dicomfs.records import DicomJson
from dicomfs.views import names

SUFFIX = ".dcm"


class Level(enum.IntEnum):
    STUDY = 0  # patient attributes count as study attributes (Study Root: a study carries them)
    SERIES = 1
    INSTANCE = 2


class Reads(enum.Enum):
    TEXT = "text"
    PERSON = "person"
    DATE = "date"
    TIME = "time"
    ID = "id"
    NUMBER3 = "series number"
    NUMBER5 = "instance number"
    YEAR = "year"
    MONTH = "month"


@dataclass(frozen=True)
class Field:
    keyword: str
    tag: str
    level: Level
    reads: Reads
    patient: bool = False  # the value belongs to the patient (a folder of it stands for a patient)

    @functools.cached_property
    def reader(self) -> Callable[[Any], str | None]:
        return _READERS[self.reads]

    @functools.cached_property
    def placeholder(self) -> str:
        return _PLACEHOLDER.get(self.reads, names.UNNAMED)


_FIELDS = [
    Field("PatientName", "00100010", Level.STUDY, Reads.PERSON, patient=True),
    Field("PatientID", "00100020", Level.STUDY, Reads.ID, patient=True),
    Field("IssuerOfPatientID", "00100021", Level.STUDY, Reads.TEXT, patient=True),
    Field("PatientBirthDate", "00100030", Level.STUDY, Reads.DATE, patient=True),
    Field("PatientSex", "00100040", Level.STUDY, Reads.TEXT, patient=True),
    Field("StudyDate", "00080020", Level.STUDY, Reads.DATE),
    Field("YYYY", "00080020", Level.STUDY, Reads.YEAR),
    Field("YYYY-MM", "00080020", Level.STUDY, Reads.MONTH),
    Field("YYYY-MM-DD", "00080020", Level.STUDY, Reads.DATE),
    Field("StudyTime", "00080030", Level.STUDY, Reads.TIME),
    Field("StudyDescription", "00081030", Level.STUDY, Reads.TEXT),
    Field("AccessionNumber", "00080050", Level.STUDY, Reads.ID),
    Field("StudyID", "00200010", Level.STUDY, Reads.ID),
    Field("ReferringPhysicianName", "00080090", Level.STUDY, Reads.PERSON),
    Field("StudyInstanceUID", "0020000D", Level.STUDY, Reads.ID),
    Field("Modality", "00080060", Level.SERIES, Reads.TEXT),
    Field("SeriesNumber", "00200011", Level.SERIES, Reads.NUMBER3),
    Field("SeriesDescription", "0008103E", Level.SERIES, Reads.TEXT),
    Field("SeriesDate", "00080021", Level.SERIES, Reads.DATE),
    Field("SeriesTime", "00080031", Level.SERIES, Reads.TIME),
    Field("SeriesInstanceUID", "0020000E", Level.SERIES, Reads.ID),
    Field("InstanceNumber", "00200013", Level.INSTANCE, Reads.NUMBER5),
    Field("SOPInstanceUID", "00080018", Level.INSTANCE, Reads.ID),
    Field("SOPClassUID", "00080016", Level.INSTANCE, Reads.ID),
    # not a DICOM attribute: the IDC index's collection, which IDC records carry under this key
    Field("collection_id", "collection_id", Level.STUDY, Reads.ID),
]
FIELDS: Mapping[str, Field] = {f.keyword: f for f in _FIELDS}
_PLACEHOLDER = {Reads.DATE: names.NO_DATE, Reads.YEAR: names.NO_DATE, Reads.MONTH: names.NO_DATE,
                Reads.TIME: names.NO_TIME, Reads.ID: names.NO_ID, Reads.NUMBER3: names.NO_NUMBER}
_PIECE = re.compile(r"\{([^{}]*)\}|([^{}]+)|([{}])")

BUILT_IN = {
    "patients": "{PatientName} ({PatientID})/{StudyDate} {StudyDescription}/"
                "{SeriesNumber} {Modality} {SeriesDescription}/{InstanceNumber}.dcm",
    "dates": "{YYYY}/{YYYY-MM-DD}/{PatientName} ({PatientID}) {StudyDescription}/"
             "{SeriesNumber} {Modality} {SeriesDescription}/{InstanceNumber}.dcm",
    "collections": "{collection_id}/{PatientID}/{StudyDate} {StudyDescription}/"
                   "{SeriesNumber} {Modality} {SeriesDescription}/{InstanceNumber}.dcm",
}


class Names(enum.Enum):
    """What the entries of one path component stand for, so which of them collide."""

    GROUP = "group"  # folders that gather what shares the name (a year): never a collision
    PATIENT = "patient"  # one folder per patient (PatientID)
    ENTITY = "entity"  # one entry per study, series or instance of the component's level


@dataclass(frozen=True)
class Component:
    pieces: tuple[str | Field, ...]
    level: Level
    names: Names

    def render(self, attrs: Sequence[DicomJson], *, key: str = "", ascii_only: bool = False,
               extension: str = "") -> str:
        """The component's safe name for one entity; ``attrs[level]`` are the attributes of that
        level, ``key`` the instance's key (a missing InstanceNumber falls back to it)."""
        parts = []
        for literal, field, level in self._steps:  # (this runs for every entry of a listing)
            if field is None:
                parts.append(literal)
                continue
            element = attrs[level].get(field.tag)
            values = element.get("Value") if isinstance(element, dict) else None
            text = field.reader(values[0]) if values and isinstance(values, list) and values[0] is not None else None
            if not text:
                text = key if key and field.keyword == "InstanceNumber" else field.placeholder
            parts.append(text)
        text = "".join(parts)
        if extension and text.endswith(extension):
            text = text[: -len(extension)]
        return names.safe(text, ascii_only=ascii_only, keep=extension)


    @functools.cached_property
    def _steps(self) -> list[tuple[str, Field | None, int]]:
        return [(piece, None, 0) if isinstance(piece, str) else ("", piece, int(piece.level)) for piece in self.pieces]


@dataclass(frozen=True)
class Template:
    text: str
    components: tuple[Component, ...]

    @property
    def depth(self) -> int:
        return len(self.components)


def _text(value: Any) -> str | None:
    return str(value).strip() or None


def _year(value: Any) -> str | None:
    text = names.date(value)
    return text[:4] if text is not None and len(text) == 10 and text[4] == "-" else text


def _month(value: Any) -> str | None:
    text = names.date(value)
    return text[:7] if text is not None and len(text) == 10 and text[4] == "-" else text


def _time(value: Any) -> str | None:
    return str(value).split(".")[0].replace(":", "").strip() or None


_READERS: dict[Reads, Callable[[Any], str | None]] = {
    Reads.TEXT: _text, Reads.ID: _text, Reads.PERSON: names.person_name, Reads.DATE: names.date,
    Reads.YEAR: _year, Reads.MONTH: _month, Reads.TIME: _time,
    Reads.NUMBER3: lambda value: names.number(value, 3), Reads.NUMBER5: lambda value: names.number(value, 5),
}


def parse(text: str) -> Template:
    """A template, checked: known keywords, one path level per ``/``, levels that only go down,
    study or patient attributes in the first level and an instance attribute in the last (the
    file name, ending in ``.dcm``)."""
    if not text.strip():
        raise UsageError("a view template is empty")
    if text.startswith("/") or text.endswith("/") or "//" in text:
        raise UsageError(f"view template {text!r}: a path level is empty")
    if not text.endswith(SUFFIX):
        raise UsageError(f"view template {text!r}: the file name (last level) must end in {SUFFIX}")
    parts = text.split("/")
    components: list[Component] = []
    level = Level.STUDY
    for index, part in enumerate(parts):
        pieces: list[str | Field] = []
        for match in _PIECE.finditer(part):
            keyword, literal, brace = match.groups()
            if brace is not None:
                raise UsageError(f"view template {text!r}: unmatched {brace!r} in {part!r}")
            if literal is not None:
                if literal.strip() in (".", ".."):
                    raise UsageError(f"view template {text!r}: {literal!r} is not a folder name")
                pieces.append(literal)
                continue
            found = FIELDS.get(keyword.strip())
            if found is None:
                raise UsageError(f"view template {text!r}: unknown keyword {{{keyword}}} "
                                 f"(known: {', '.join(sorted(FIELDS))})")
            pieces.append(found)
        fields = [p for p in pieces if isinstance(p, Field)]
        if not fields:
            raise UsageError(f"view template {text!r}: level {part!r} uses no {{Keyword}}")
        last = index == len(parts) - 1
        own = max(f.level for f in fields)
        if index == 0 and own is not Level.STUDY:
            raise UsageError(f"view template {text!r}: the first level must use study or patient attributes "
                             f"({part!r} does not), or listing the view would list every series")
        if own is Level.INSTANCE and not last:
            raise UsageError(f"view template {text!r}: only the file name may use instance attributes ({part!r})")
        if last and own is not Level.INSTANCE:
            raise UsageError(f"view template {text!r}: the file name must use an instance attribute "
                             "such as {InstanceNumber} or {SOPInstanceUID}")
        level = max(level, own)
        components.append(Component(tuple(pieces), level, Names.GROUP))
    return Template(text, tuple(_with_identities(components)))


def _with_identities(components: list[Component]) -> list[Component]:
    """The last component of each level names its entities; a folder level above them that uses
    patient attributes names patients; the others group."""
    out = []
    for index, component in enumerate(components):
        below = components[index + 1:]
        if not below or below[0].level != component.level:
            kind = Names.ENTITY
        elif any(isinstance(p, Field) and p.patient for p in component.pieces):
            kind = Names.PATIENT
        else:
            kind = Names.GROUP
        out.append(Component(component.pieces, component.level, kind))
    return out


def parse_view(spec: str) -> tuple[str, Template]:
    """``NAME=TEMPLATE`` (``--view``) as a name and a checked template."""
    name, sep, text = spec.partition("=")
    name = name.strip()
    if not sep or not name:
        raise UsageError(f"--view {spec!r}: expected NAME=TEMPLATE")
    if names.safe(name) != name or name in (".", ".."):
        raise UsageError(f"--view {spec!r}: {name!r} cannot be a folder name")
    return name, parse(text)
