"""``dicomfs ls``: search results as a readable table or as JSON lines for scripts.

Owns the columns shown at each level and their formatting, and handing rows on a batch at a time
as the search finds them (``row_batches``). The search itself is ``search``'s and
derived attributes (counts, modalities) are ``summary``'s; this module must not filter or compute.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator, Iterator
from contextlib import aclosing
from typing import Any

import trio

from dicomfs.catalog import Catalog
from dicomfs.query import Query
from dicomfs.records import DicomJson
from dicomfs.search import BATCH, Search
from dicomfs.tasks import map_bounded

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
PARALLEL = 8


async def rows(catalog: Catalog, query: Query, level: str) -> list[dict[str, Any]]:
    """One dict per match: the level's columns by keyword, plus ``attributes`` (DICOM JSON,
    completed by ``summary`` exactly as the static DICOMweb tree completes it)."""
    async with aclosing(row_batches(catalog, query, level)) as batches:
        return [row async for batch in batches for row in batch]


async def row_batches(catalog: Catalog, query: Query, level: str) -> AsyncGenerator[list[dict[str, Any]], None]:
    """``rows``, in order, a batch (``BATCH`` rows or more: a study's series, a series' instances
    come whole) at a time as the search finds them (``ls --json`` prints each batch at once)."""
    search = Search(catalog)
    summaries = search.summaries
    limit = trio.CapacityLimiter(PARALLEL)
    if level == "study":
        studies = await search.studies(query)  # (compact records: the IDC index's are rows of one table)
        for start in range(0, len(studies), BATCH):
            chunk = studies[start:start + BATCH]
            summaries_of = await map_bounded(chunk, summaries.study_summary, limit)
            yield [_row("study", attrs, StudyInstanceUID=study.uid)
                   for study, attrs in zip(chunk, summaries_of, strict=True)]
    elif level == "series":
        async with aclosing(search.series_batches(query)) as series_batches:
            async for series in series_batches:
                summaries_of = await map_bounded(series, summaries.series_summary, limit)
                yield [_row("series", attrs, StudyInstanceUID=s.study_uid, SeriesInstanceUID=s.uid)
                       for s, attrs in zip(series, summaries_of, strict=True)]
    else:
        async with aclosing(search.instance_batches(query)) as instance_batches:
            async for instances in instance_batches:
                yield [_row("instance", instance.attrs, SeriesInstanceUID=instance.series_uid,
                            SOPInstanceUID=instance.key, Size=instance.size) for instance in instances]


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


_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def table(found: list[dict[str, Any]], level: str) -> Iterator[str]:
    names = [name for name, _ in COLUMNS[level]]
    cells = [[_cell(row.get(name)) for name in names] for row in found]
    widths = [max([len(name)] + [len(c[i]) for c in cells]) for i, name in enumerate(names)]
    widths = [min(WIDEST, w) if name.endswith("Description") else w for name, w in zip(names, widths, strict=False)]
    yield "  ".join(name.ljust(w) for name, w in zip(names, widths, strict=False)).rstrip()
    for line in cells:
        yield "  ".join(_fit(c, w) for c, w in zip(line, widths, strict=False)).rstrip()


def _cell(value: Any) -> str:
    """A value as one line of a table cell: control characters (a newline or tab an archive put
    in a name) become a space, so that a row stays one line."""
    if value is None:
        return ""
    text = "\\".join(str(v) for v in value) if isinstance(value, list) else str(value)
    return _CONTROLS.sub(" ", text)


def _fit(text: str, width: int) -> str:
    return text.ljust(width) if len(text) <= width else text[: width - 1] + "…"
