"""``dicomfs ls``: search results as a readable table or as JSON lines for scripts.

Owns the columns shown at each level and their formatting. The search itself is ``search``'s;
this module must not filter anything.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from dicomfs.catalog import Catalog
from dicomfs.query import Query
from dicomfs.records import DicomJson, json_value
from dicomfs.search import Search
from dicomfs.tasks import open_nursery

COLUMNS = {
    "study": [("StudyInstanceUID", None), ("PatientName", "00100010"), ("PatientID", "00100020"),
              ("StudyDate", "00080020"), ("ModalitiesInStudy", "00080061"), ("StudyDescription", "00081030"),
              ("Series", "00201206"), ("Instances", "00201208")],
    "series": [("StudyInstanceUID", None), ("SeriesInstanceUID", None), ("Modality", "00080060"),
               ("SeriesNumber", "00200011"), ("SeriesDescription", "0008103E"), ("Instances", "00201209")],
    "instance": [("SeriesInstanceUID", None), ("SOPInstanceUID", None), ("InstanceNumber", "00200013"),
                 ("SOPClassUID", "00080016"), ("Size", None)],
}
WIDEST = 44


async def rows(catalog: Catalog, query: Query, level: str) -> list[dict[str, Any]]:
    """One dict per match: the level's columns by keyword, plus ``attributes`` (DICOM JSON)."""
    search = Search(catalog)
    out: list[dict[str, Any]] = []
    if level == "study":
        studies = await search.studies(query)
        attrs_of: list[DicomJson] = [{}] * len(studies)

        async def complete(n: int) -> None:
            attrs_of[n] = await _with_counts(catalog, search, studies[n].uid, await search.study_attrs(studies[n]))

        async with open_nursery() as nursery:
            for n in range(len(studies)):
                nursery.start_soon(complete, n)
        for study, attrs in zip(studies, attrs_of):
            out.append(_row("study", attrs, StudyInstanceUID=study.uid))
    elif level == "series":
        for series in await search.series(query):
            attrs = series.attrs
            if "00201209" not in attrs:
                attrs = {**attrs, "00201209": {"vr": "IS", "Value": [len(await catalog.instances_of(series))]}}
            out.append(_row("series", attrs, StudyInstanceUID=series.study_uid, SeriesInstanceUID=series.uid))
    else:
        for instance in await search.instances(query):
            out.append(_row("instance", instance.attrs, SeriesInstanceUID=instance.series_uid,
                            SOPInstanceUID=instance.key, Size=instance.size))
    return out


async def _with_counts(catalog: Catalog, search: Search, study_uid: str, attrs: DicomJson) -> DicomJson:
    """Add series/instance counts and modalities when the archive's listing lacks them."""
    attrs = dict(attrs)
    if "00201206" in attrs and "00201208" in attrs and "00080061" in attrs:
        return attrs
    series = list((await catalog.series_of(study_uid)).values())
    attrs.setdefault("00201206", {"vr": "IS", "Value": [len(series)]})
    if "00201208" not in attrs:
        total = 0
        for record in series:
            total += len(await catalog.instances_of(record))
        attrs["00201208"] = {"vr": "IS", "Value": [total]}
    if "00080061" not in attrs:
        modalities = sorted({m for m in (json_value(s.attrs, "00080060") for s in series) if isinstance(m, str)})
        if modalities:
            attrs["00080061"] = {"vr": "CS", "Value": modalities}
    return attrs


def _row(level: str, attrs: DicomJson, **given: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"level": level}
    for name, tag in COLUMNS[level]:
        if tag is None:
            row[name] = given.get(name)
            continue
        element = attrs.get(tag)
        values = element.get("Value") if isinstance(element, dict) else None
        if not values:
            row[name] = None
        else:
            texts = [v.get("Alphabetic", "") if isinstance(v, dict) else v for v in values]
            row[name] = texts[0] if len(texts) == 1 and name != "ModalitiesInStudy" else texts
    row["attributes"] = attrs
    return row


def json_lines(found: list[dict[str, Any]]) -> Iterator[str]:
    for row in found:
        yield json.dumps(row, ensure_ascii=False, sort_keys=False)


def table(found: list[dict[str, Any]], level: str) -> Iterator[str]:
    names = [name for name, _ in COLUMNS[level]]
    cells = [[_cell(row.get(name)) for name in names] for row in found]
    widths = [max([len(name)] + [len(c[i]) for c in cells]) for i, name in enumerate(names)]
    widths = [min(WIDEST, w) if name.endswith("Description") else w for name, w in zip(names, widths)]
    yield "  ".join(name.ljust(w) for name, w in zip(names, widths)).rstrip()
    for line in cells:
        yield "  ".join(_fit(c, w) for c, w in zip(line, widths)).rstrip()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "\\".join(str(v) for v in value)
    return str(value)


def _fit(text: str, width: int) -> str:
    return text.ljust(width) if len(text) <= width else text[: width - 1] + "…"
