"""QIDO-RS for the DICOMweb server: a request's query parameters, the search, the result page.

Owns what the parameters mean (attribute keys by keyword or tag, ``limit``, ``offset``,
``includefield``, ``fuzzymatching``; a browser's cache buster ``_`` is ignored; anything else is a
``BadRequest`` with a one-line reason),
that a search only ever finds studies the server shows (``serve --query``), the order of results
(by UID, so pages are stable) and paging before rendering (a page of 25 renders 25 objects).
Matching itself is ``query`` and ``search``'s, the result objects ``webfiles``' (the same as in
the static tree and ``ls``). Must not know HTTP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypeVar

import trio

from dicomfs.catalog import Catalog
from dicomfs.dicomread import import_pydicom
from dicomfs.errors import UsageError
from dicomfs.query import COMMON_KEYS, Query, dictionary_entry, parse_query
from dicomfs.records import DicomJson, SeriesRecord, StudyRecord
from dicomfs.search import Search, Shown
from dicomfs.tasks import map_bounded
from dicomfs.webfiles import ALL, Include, WebFiles, instance_object

MAX_LIMIT = 1_000_000
MAX_OFFSET = 1_000_000_000
MAX_TERMS = 64
RENDERED_AT_ONCE = 8
_TAG = re.compile(r"[0-9A-Fa-f]{8}")
_KEYWORD = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")
T = TypeVar("T")


class BadRequest(UsageError):
    """A request the server cannot make sense of (HTTP 400); the message says why."""


@dataclass(frozen=True)
class QidoRequest:
    query: Query
    limit: int | None = None
    offset: int = 0
    include: Include = ()


# ``_=<time>``: what a browser client (jQuery's ``cache: false``, some viewers) adds to make each
# request's URL new; not a query term, and refusing it would refuse those clients.
CACHE_BUSTER = "_"


def parse_request(params: list[tuple[str, str]]) -> QidoRequest:
    """The query string's ``(key, value)`` pairs -> a QidoRequest. Raises BadRequest."""
    terms: list[str] = []
    include: list[str] = []
    include_all = fuzzy = False
    limit: int | None = None
    offset = 0
    seen: set[str] = set()
    for key, value in params:
        if len(terms) >= MAX_TERMS:
            raise BadRequest(f"more than {MAX_TERMS} query parameters")
        if key == "limit":
            limit = _number(key, value, 1, MAX_LIMIT)
        elif key == "offset":
            offset = _number(key, value, 0, MAX_OFFSET)
        elif key == "fuzzymatching":
            if value not in ("true", "false"):
                raise BadRequest(f"fuzzymatching must be true or false, not {value[:40]!r}")
            fuzzy = value == "true"
        elif key == CACHE_BUSTER:
            continue
        elif key == "includefield":
            for field in value.split(","):
                if field == "all":
                    include_all = True
                elif field:
                    include.append(_tag_of(field))
        else:
            keyword = _keyword_of(key)
            if keyword in seen:
                raise BadRequest(f"{key} given twice (a list of UIDs is one comma-separated value)")
            seen.add(keyword)
            terms.append(f"{keyword}={value}")
    try:
        query = parse_query(terms, fuzzy=fuzzy, reversed_ranges=True)
    except UsageError as exc:
        raise BadRequest(str(exc)) from None
    return QidoRequest(query, limit, offset, ALL if include_all else tuple(dict.fromkeys(include)))


class Qido:
    """Searches at the three levels, within the studies the server shows."""

    def __init__(self, catalog: Catalog, shown: Shown, files: WebFiles) -> None:
        self.catalog = catalog
        self.shown = shown
        self.files = files
        self.search = Search(catalog)

    async def studies(self, request: QidoRequest) -> list[DicomJson]:
        if request.query:
            found = await self.search.studies(self._within_shown(request.query))
        else:
            found = list((await self.shown.studies()).values())
        page = _page(sorted(found, key=lambda s: s.uid), request)
        include = self._include(request)
        return await map_bounded(page, lambda s: self.files.study_object(s, include), _limiter())

    async def series(self, request: QidoRequest, study: StudyRecord | None = None) -> list[DicomJson]:
        """Series matching the request: of ``study``, or of every study shown."""
        if study is not None and not request.query.at("study"):
            found = await self.search.series_in(study, request.query)
        else:
            query = request.query if study is None else _with_study(request.query, study.uid)
            found = await self.search.series(self._within_shown(query))
        page = _page(sorted(found, key=lambda s: (s.study_uid, s.uid)), request)
        studies = {s.uid: s for s in await self._studies_of(page, study)}
        include = self._include(request)
        return await map_bounded(page, lambda s: self.files.series_object(studies[s.study_uid], s, include),
                                 _limiter())

    async def instances(self, request: QidoRequest, study: StudyRecord | None = None,
                        series: SeriesRecord | None = None) -> list[DicomJson]:
        """Instances matching the request: of ``series``, of ``study``, or of everything shown."""
        if series is not None and not request.query.at("study") and not request.query.at("series"):
            pairs = [(series, i) for i in await self.search.instances_in(series, request.query)]
        else:
            query = request.query
            if study is not None:
                query = _with_study(query, study.uid)
            if series is not None:
                query = Query((*query.terms, *parse_query([f"SeriesInstanceUID={series.uid}"]).terms))
            pairs = []
            for found in await self.search.series(self._within_shown(query)):
                pairs.extend((found, i) for i in await self.search.instances_in(found, query))
        pairs.sort(key=lambda pair: (pair[0].study_uid, pair[0].uid, pair[1].key))
        include = self._include(request)
        return [instance_object(s, i, include) for s, i in _page(pairs, request)]

    def _within_shown(self, query: Query) -> Query:
        return Query((*self.shown.query.terms, *query.terms))

    async def _studies_of(self, series: list[SeriesRecord], study: StudyRecord | None) -> list[StudyRecord]:
        if study is not None:
            return [study]
        shown = await self.shown.studies()
        return [shown[uid] for uid in {s.study_uid for s in series} if uid in shown]

    @staticmethod
    def _include(request: QidoRequest) -> Include:
        """The requested tags, and those of the attributes it matched on (PS3.18 returns them)."""
        if request.include == ALL:
            return ALL
        return tuple(dict.fromkeys((*request.include, *(t.tag for t in request.query.terms))))


def _page(items: list[T], request: QidoRequest) -> list[T]:
    end = None if request.limit is None else request.offset + request.limit
    return items[request.offset:end]


def _with_study(query: Query, study_uid: str) -> Query:
    return Query((*query.terms, *parse_query([f"StudyInstanceUID={study_uid}"]).terms))


def _limiter() -> trio.CapacityLimiter:
    return trio.CapacityLimiter(RENDERED_AT_ONCE)


def _number(key: str, value: str, low: int, high: int) -> int:
    if not value.isascii() or not value.isdigit() or len(value) > 12:
        raise BadRequest(f"{key} must be a whole number, not {value[:40]!r}")
    number = int(value)
    if not low <= number <= high:
        raise BadRequest(f"{key} must be between {low} and {high}, not {number}")
    return number


def _keyword_of(key: str) -> str:
    """An attribute key of a query string (keyword or tag) -> its keyword. Raises BadRequest."""
    if _TAG.fullmatch(key):
        tag = key.upper()
        known = next((k for k, (t, _) in COMMON_KEYS.items() if t == tag), None)
        if known is not None:
            return known
        import_pydicom()  # (on the event loop, while worker threads may be importing it too)
        from pydicom.datadict import keyword_for_tag

        keyword = keyword_for_tag(int(tag, 16))
        if not keyword:
            raise BadRequest(f"unknown attribute tag {key}")
        return str(keyword)
    if not _KEYWORD.fullmatch(key):
        raise BadRequest(f"unknown query parameter {key[:64]!r}")
    return key


def _tag_of(field: str) -> str:
    """An ``includefield`` value (keyword or tag) -> its tag. Raises BadRequest."""
    if _TAG.fullmatch(field):
        return field.upper()
    entry = dictionary_entry(field) if _KEYWORD.fullmatch(field) else None
    if entry is None:
        raise BadRequest(f"unknown includefield {field[:64]!r}")
    return entry[0]
