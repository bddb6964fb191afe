"""Derived attributes: what the archive's listings imply without always saying it.

Owns, in one place for ``ls``, the readable views and the static DICOMweb tree: a study's
attributes completed from its first instance (archives that list studies bare, COD), a series'
attributes completed from its instances, instance counts, and the study summary (ModalitiesInStudy,
NumberOfStudyRelatedSeries/Instances). A value the archive gives is kept; only what it leaves out
is computed. The same summary is what searches match derived attributes on (``search``), so a
study is found by exactly the values its QIDO object shows. Must not fetch instance data:
everything comes from the catalog's listings.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import trio

from dicomfs import dicomjson
from dicomfs.query import COMMON_KEYS, STUDY_KEYWORDS
from dicomfs.records import SERIES_INSTANCES, STUDY_SERIES, DicomJson, SeriesRecord, StudyRecord, json_count, json_value
from dicomfs.tasks import map_bounded

if TYPE_CHECKING:
    from dicomfs.catalog import Catalog

PARALLEL = 8
MODALITIES, STUDY_INSTANCES = "00080061", "00201208"
MODALITY = "00080060"
# What the summaries add: attributes of a study or series that only its listings below imply.
STUDY_DERIVED = frozenset({MODALITIES, STUDY_SERIES, STUDY_INSTANCES})
SERIES_DERIVED = frozenset({SERIES_INSTANCES})
# Study-level attributes an instance also carries (a bare study listing is completed from them).
_STUDY_TAGS_OF_INSTANCES = frozenset(COMMON_KEYS[k][0] for k in STUDY_KEYWORDS if k in COMMON_KEYS)


class Summaries:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._limit = trio.CapacityLimiter(PARALLEL)

    @staticmethod
    def listed_study_attrs(study: StudyRecord) -> DicomJson | None:
        """The study's attributes when its listing carries them (no I/O), else None."""
        attrs = study.attrs
        return attrs if "00100010" in attrs or "00100020" in attrs or "00080020" in attrs else None

    @staticmethod
    def listed_series_attrs(series: SeriesRecord) -> DicomJson | None:
        """The series' attributes when its listing carries them (no I/O), else None."""
        return series.attrs if MODALITY in series.attrs else None

    async def study_attrs(self, study: StudyRecord) -> DicomJson:
        """The study's attributes, completed from its first instance when the archive's study
        listing carries none (study-level attributes only)."""
        listed = self.listed_study_attrs(study)
        if listed is not None:
            return listed
        merged = dict(study.attrs)
        for series in (await self.catalog.series_of(study)).values():
            instances = await self.catalog.instances_of(series)
            if instances:
                first = next(iter(instances.values()))
                merged.update({t: v for t, v in first.attrs.items()
                               if t in _STUDY_TAGS_OF_INSTANCES and t not in merged})
                break
        return merged

    async def study_attrs_for(self, study: StudyRecord, tags: Iterable[str]) -> DicomJson:
        """The study's attributes as far as matching ``tags`` needs them: ``study_summary`` when
        one is derived (it costs the study's series listings), else ``study_attrs``."""
        if STUDY_DERIVED.intersection(tags):
            return await self.study_summary(study)
        return await self.study_attrs(study)

    async def series_attrs(self, series: SeriesRecord) -> DicomJson:
        """The series' attributes; when the archive lists series without them (no Modality: COD),
        completed from the instances, each attribute from the first instance (by key) that has it:
        an instance may lack an attribute its neighbours carry."""
        listed = self.listed_series_attrs(series)
        if listed is not None:
            return listed
        instances = await self.catalog.instances_of(series)
        merged: DicomJson = dict(series.attrs)
        for key in sorted(instances):
            attrs = instances[key].attrs
            merged.update({t: attrs[t] for t in dicomjson.SERIES_TAGS if t in attrs and t not in merged})
        return merged

    async def instance_count(self, series: SeriesRecord) -> int:
        value = json_count(series.attrs, SERIES_INSTANCES)
        if value is not None:
            return value
        return len(await self.catalog.instances_of(series))

    async def modality(self, series: SeriesRecord) -> str | None:
        value = json_value(await self.series_attrs(series), MODALITY)
        return value if isinstance(value, str) else None

    async def study_summary(self, study: StudyRecord) -> DicomJson:
        """``study_attrs`` with ModalitiesInStudy and the series and instance counts added where
        the archive does not give them."""
        attrs = dict(await self.study_attrs(study))
        if STUDY_DERIVED.issubset(attrs):
            return attrs
        series = list((await self.catalog.series_of(study)).values())
        if MODALITIES not in attrs:
            modalities = await map_bounded(series, self.modality, self._limit)
            attrs[MODALITIES] = dicomjson.strings("CS", sorted({m for m in modalities if m}))
        attrs.setdefault(STUDY_SERIES, dicomjson.count(len(series)))
        if STUDY_INSTANCES not in attrs:
            attrs[STUDY_INSTANCES] = dicomjson.count(sum(await map_bounded(series, self.instance_count,
                                                                           self._limit)))
        return attrs

    async def series_summary(self, series: SeriesRecord) -> DicomJson:
        """``series_attrs`` with NumberOfSeriesRelatedInstances added where the archive does not
        give it."""
        attrs = dict(await self.series_attrs(series))
        if SERIES_INSTANCES not in attrs:
            attrs[SERIES_INSTANCES] = dicomjson.count(await self.instance_count(series))
        return attrs
