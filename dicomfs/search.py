"""Searching an archive with a ``Query``: which studies, series and instances match.

Owns the walk a query needs. Study-level terms go to the archive when it can search
(``StudySearcher``, QIDO-RS) and are checked here otherwise, on the study's attributes or, for
archives that list studies without attributes (COD), on the attributes of its first instance;
attributes derived from the listings below (ModalitiesInStudy, the counts) are matched on
``summary``'s values, the ones the QIDO objects show. Series- and instance-level terms keep a
study when any of its series or instances match.
``Shown`` is the one answer to "which studies does this mount show" (all, or a query's), kept
like a listing. Must not fetch instance data, only listings and metadata through the catalog.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, TypeVar

import trio

from dicomfs.query import Query, Term
from dicomfs.records import DicomJson, InstanceRecord, SeriesRecord, StudyRecord
from dicomfs.sources.base import StudySearcher
from dicomfs.summary import SERIES_DERIVED, Summaries
from dicomfs.tasks import map_bounded

if TYPE_CHECKING:
    from dicomfs.catalog import Catalog

PARALLEL_LISTINGS = 8
BATCH = 1000  # matches handed on at a time by the ``*_batches`` walks
T = TypeVar("T")


class Search:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.summaries = Summaries(catalog)
        self._limit = trio.CapacityLimiter(PARALLEL_LISTINGS)

    async def studies(self, query: Query) -> list[StudyRecord]:
        study_terms = list(query.at("study"))
        narrowing = [*query.at("series"), *query.at("instance")]
        source = self.catalog.source
        if isinstance(source, StudySearcher) and (
                study_terms or (narrowing and getattr(source, "narrows_by_series", False))):
            candidates, unchecked = await source.search_studies(study_terms, narrowing=narrowing)
            study_terms = unchecked  # the archive matched the rest
        else:
            candidates = list((await self.catalog.studies()).values())
        tags = {t.tag for t in study_terms}

        async def keep(study: StudyRecord) -> bool:
            if study_terms and not await self._terms_hold(
                    study_terms, study.attrs, lambda: self.summaries.study_attrs_for(study, tags)):
                return False
            if query.at("series") or query.at("instance"):
                return bool(await self.series_in(study, query, first_only=True))
            return True

        return await self._filter(candidates, keep)

    async def series(self, query: Query) -> list[SeriesRecord]:
        async with aclosing(self.series_batches(query)) as batches:
            return [series async for batch in batches for series in batch]

    async def series_batches(self, query: Query, size: int = BATCH) -> AsyncGenerator[list[SeriesRecord], None]:
        """``series``, a study's series at a time gathered into batches of about ``size``, as they
        are found: a caller that hands each on holds one batch, not the whole result (592,600
        series of one IDC collection took 2.2 GB as one list)."""
        batch: list[SeriesRecord] = []
        for study in await self.studies(query):
            batch.extend(await self.series_in(study, query))
            if len(batch) >= size:
                yield batch
                batch = []
        if batch:
            yield batch

    async def instance_batches(self, query: Query, size: int = BATCH) -> AsyncGenerator[list[InstanceRecord], None]:
        """The instances matching ``query``, in batches of about ``size``, as ``series_batches``."""
        batch: list[InstanceRecord] = []
        async with aclosing(self.series_batches(query, size)) as series_batches:
            async for series_batch in series_batches:
                for series in series_batch:
                    batch.extend(await self.instances_in(series, query))
                    if len(batch) >= size:
                        yield batch
                        batch = []
        if batch:
            yield batch

    async def series_in(self, study: StudyRecord, query: Query, first_only: bool = False) -> list[SeriesRecord]:
        series_terms = query.at("series")

        async def keep(series: SeriesRecord) -> bool:
            if series_terms and not await self._terms_hold(
                    series_terms, series.attrs, lambda: self._series_attrs_for(series, series_terms)):
                return False
            if query.at("instance"):
                return bool(await self.instances_in(series, query))
            return True

        candidates = list((await self.catalog.series_of(study)).values())
        if first_only:
            for series in candidates:
                if await keep(series):
                    return [series]
            return []
        return await self._filter(candidates, keep)

    async def instances_in(self, series: SeriesRecord, query: Query) -> list[InstanceRecord]:
        terms = query.at("instance")
        instances = (await self.catalog.instances_of(series)).values()
        return [i for i in instances if all(t.matches(i.attrs) for t in terms)]

    async def _series_attrs_for(self, series: SeriesRecord, terms: Sequence[Term]) -> DicomJson:
        """The attributes of the series' first instance (or, where the archive lists series from
        local data, which is all it can tell of them, the series' own: the IDC index, whose
        instances would be read from the bucket to name themselves only), with ``summary``'s
        derived ones (its instance count) when a term asks for one."""
        if getattr(self.catalog.source, "local_listings", False):
            attrs = series.attrs
        else:
            instances = await self.catalog.instances_of(series)
            attrs = next(iter(instances.values())).attrs if instances else {}
        if SERIES_DERIVED.intersection(t.tag for t in terms):
            attrs = {**attrs, **await self.summaries.series_summary(series)}
        return attrs

    async def _terms_hold(self, terms: Sequence[Term], attrs: DicomJson,
                          fallback: Callable[[], Awaitable[DicomJson]]) -> bool:
        results = [t.matches(attrs) for t in terms]
        if None in results:
            richer = await fallback()
            results = [r if r is not None else t.matches(richer) for t, r in zip(terms, results, strict=False)]
        return all(bool(r) for r in results)

    async def _filter(self, items: list[T], keep: Callable[[T], Awaitable[bool]]) -> list[T]:
        """``items`` for which ``keep`` holds, in order, checked concurrently (bounded)."""
        verdicts = await map_bounded(items, keep, self._limit)
        return [item for item, verdict in zip(items, verdicts, strict=False) if verdict]


class Shown:
    """The studies a mount shows: all the catalog's, or those matching the mount's ``--query``,
    searched once per listing TTL and kept like the archive's own listings (so an offline mount
    still shows the same studies). Every view asks this, not the catalog."""

    def __init__(self, catalog: Catalog, query: Query | None = None) -> None:
        self.catalog = catalog
        self.query = query or Query()

    async def studies(self) -> dict[str, StudyRecord]:
        if not self.query:
            return await self.catalog.studies()

        async def search() -> dict[str, StudyRecord]:
            return {s.uid: s for s in await Search(self.catalog).studies(self.query)}

        return await self.catalog.remembered(("studies", self.query.text), search)

    async def study(self, study_uid: str) -> StudyRecord | None:
        return (await self.studies()).get(study_uid)
