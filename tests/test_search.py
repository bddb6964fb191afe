"""Unit tests of searching (``search``): terms at each level, archives that list studies bare
(checked on their first instance), archives that search themselves (only what they could not
match exactly is checked again), and the derived attributes ``summary`` completes."""

from __future__ import annotations

from collections.abc import Sequence

from dicomfs.catalog import Catalog
from dicomfs.listing import table
from dicomfs.query import Term, parse_query
from dicomfs.records import DicomJson, InstanceRecord, SeriesRecord, StudyRecord
from dicomfs.search import Search
from dicomfs.summary import Summaries


def _v(vr: str, value: object) -> DicomJson:
    return {"vr": vr, "Value": [value]}


class Archive:
    """Two studies; the listings of studies carry attributes unless ``bare`` (as COD's don't)."""

    description = "scripted archive"

    def __init__(self, bare: bool = False) -> None:
        self.bare = bare
        self.study_attrs = {"1.1": {"00100010": _v("PN", {"Alphabetic": "DOE^JOHN"}), "00080020": _v("DA", "20240105")},
                            "1.2": {"00100010": _v("PN", {"Alphabetic": "ROE^JANE"}), "00080020": _v("DA", "20230101")}}
        self.series = {"1.1": [("1.1.1", "CT"), ("1.1.2", "SR")], "1.2": [("1.2.1", "MR")]}

    async def list_studies(self) -> list[StudyRecord]:
        return [StudyRecord(uid, {} if self.bare else attrs) for uid, attrs in self.study_attrs.items()]

    async def list_series(self, study_uid: str) -> list[SeriesRecord]:
        return [SeriesRecord(study_uid, uid, {} if self.bare else {"00080060": _v("CS", modality)})
                for uid, modality in self.series[study_uid]]

    async def list_instances(self, series: SeriesRecord) -> list[InstanceRecord]:
        modality = dict(self.series[series.study_uid])[series.uid]
        attrs = {**self.study_attrs[series.study_uid], "00080060": _v("CS", modality),
                 "00200013": _v("IS", 1)}
        return [InstanceRecord(series.study_uid, series.uid, f"{series.uid}.{n}", attrs=attrs) for n in (1, 2)]


class SearchingArchive(Archive):
    """Matches study-level terms itself, loosely for PatientName (which it hands back)."""

    def __init__(self) -> None:
        super().__init__()
        self.searched: list[list[str]] = []
        self.narrowed: list[list[str]] = []

    async def search_studies(self, terms: Sequence[Term], narrowing: Sequence[Term] = ()
                             ) -> tuple[list[StudyRecord], list[Term]]:
        self.searched.append([t.keyword for t in terms])
        self.narrowed.append([t.keyword for t in narrowing])
        studies = [s for s in await self.list_studies() if all(t.matches(s.attrs) for t in terms
                                                               if t.keyword != "PatientName")]
        return studies, [t for t in terms if t.keyword == "PatientName"]


async def _uids(archive: Archive, *query: str, level: str = "study") -> list[str]:
    search = Search(Catalog(archive, None))  # type: ignore[arg-type]
    terms = parse_query(list(query))
    if level == "instance":
        return sorted([i.key async for batch in search.instance_batches(terms) for i in batch])
    found = await (search.studies(terms) if level == "study" else search.series(terms))
    return sorted(r.uid for r in found)


async def test_study_terms_with_wildcards_and_ranges() -> None:
    for bare in (False, True):  # a bare listing is checked on each study's first instance
        archive = Archive(bare)
        assert await _uids(archive, "PatientName=DOE*") == ["1.1"]
        assert await _uids(archive, "StudyDate=20240101-20241231") == ["1.1"]
        assert await _uids(archive, "StudyDate=-20231231") == ["1.2"]
        assert await _uids(archive, "PatientName=*") == ["1.1", "1.2"]


async def test_series_and_instance_terms_keep_the_studies_they_match_in() -> None:
    for bare in (False, True):
        archive = Archive(bare)
        assert await _uids(archive, "Modality=SR") == ["1.1"]
        assert await _uids(archive, "Modality=MR", level="series") == ["1.2.1"]
        assert await _uids(archive, "Modality=C*", level="series") == ["1.1.1"]
        assert await _uids(archive, "PatientName=ROE*", level="instance") == ["1.2.1.1", "1.2.1.2"]


async def test_derived_attributes_match_the_values_the_summaries_give() -> None:
    for bare in (False, True):  # (neither listing carries them)
        archive = Archive(bare)
        assert await _uids(archive, "ModalitiesInStudy=CT") == ["1.1"]
        assert await _uids(archive, "ModalitiesInStudy=SR\\MR") == ["1.1", "1.2"]  # any of a list
        assert await _uids(archive, "ModalitiesInStudy=PT,MR") == ["1.2"]
        assert await _uids(archive, "ModalitiesInStudy=PT") == []
        assert await _uids(archive, "NumberOfStudyRelatedSeries=2") == ["1.1"]
        assert await _uids(archive, "NumberOfStudyRelatedInstances=2", "PatientName=ROE*") == ["1.2"]
        assert await _uids(archive, "NumberOfSeriesRelatedInstances=2", level="series") == ["1.1.1", "1.1.2", "1.2.1"]
        assert await _uids(archive, "NumberOfSeriesRelatedInstances=3", level="series") == []


async def test_an_archive_that_searches_is_asked_and_only_loose_terms_are_checked_again() -> None:
    archive = SearchingArchive()
    assert await _uids(archive, "PatientName=ROE*", "StudyDate=20230101") == ["1.2"]
    assert archive.searched == [["PatientName", "StudyDate"]]


async def test_series_and_instance_terms_are_offered_to_an_archive_that_can_narrow_the_studies() -> None:
    """(The IDC index can: one row per series.) They are still checked on the series here."""
    archive = SearchingArchive()
    assert await _uids(archive, "PatientName=DOE*", "Modality=C*", level="series") == ["1.1.1"]
    assert archive.searched == [["PatientName"]] and archive.narrowed == [["Modality"]]
    assert await _uids(archive, "Modality=MR") == ["1.2"]  # series terms alone: listed, not searched
    assert len(archive.searched) == 1
    archive.narrows_by_series = True  # type: ignore[attr-defined]  # (the IDC index)
    assert await _uids(archive, "Modality=MR") == ["1.2"]
    assert archive.searched[1:] == [[]] and archive.narrowed[1:] == [["Modality"]]


async def test_summaries_complete_what_a_bare_listing_leaves_out() -> None:
    for bare in (False, True):
        catalog = Catalog(Archive(bare), None)  # type: ignore[arg-type]
        summaries = Summaries(catalog)
        study = (await catalog.studies())["1.1"]
        summary = await summaries.study_summary(study)
        assert summary["00080061"]["Value"] == ["CT", "SR"]
        assert summary["00201206"]["Value"] == [2] and summary["00201208"]["Value"] == [4]
        assert summary["00100010"]["Value"] == [{"Alphabetic": "DOE^JOHN"}]
        series = (await catalog.series_of(StudyRecord("1.1")))["1.1.2"]
        assert (await summaries.series_summary(series))["00080060"]["Value"] == ["SR"]


async def test_series_listed_from_local_data_are_matched_on_their_own_attributes() -> None:
    """(The IDC index: its instances would be read from the bucket, and name themselves only.)"""
    archive = Archive()
    list_series = archive.list_series

    async def lacking(study_uid: str) -> list[SeriesRecord]:  # series 1.1.2's listing lacks its Modality
        return [SeriesRecord(s.study_uid, s.uid, {} if s.uid == "1.1.2" else s.attrs)
                for s in await list_series(study_uid)]

    archive.list_series = lacking  # type: ignore[method-assign]
    listed: list[str] = []
    list_instances = archive.list_instances

    async def counting(series: SeriesRecord) -> list[InstanceRecord]:
        listed.append(series.uid)
        return await list_instances(series)

    archive.list_instances = counting  # type: ignore[method-assign]
    archive.local_listings = True  # type: ignore[attr-defined]
    assert await _uids(archive, "Modality=CT", level="series") == ["1.1.1"]
    assert await _uids(archive, "Modality=SR", level="series") == []  # (its instances say SR)
    assert listed == []


class WideArchive(Archive):
    """Many studies of many series, and when each study's series were listed."""

    def __init__(self, studies: int, series: int) -> None:
        super().__init__()
        self.study_attrs = {f"2.{n}": {"00080020": _v("DA", "20240105")} for n in range(studies)}
        self.series = {uid: [(f"{uid}.{k}", "CT") for k in range(series)] for uid in self.study_attrs}
        self.listed: list[str] = []

    async def list_series(self, study_uid: str) -> list[SeriesRecord]:
        self.listed.append(study_uid)
        return await super().list_series(study_uid)


async def test_series_come_in_batches_as_the_walk_finds_them() -> None:
    """A batch is handed on as soon as it is full, before the walk reaches the last study (so a
    caller printing it holds one batch, not the whole result); the batches, joined, are the
    whole result in the same order."""
    archive = WideArchive(studies=40, series=10)
    search = Search(Catalog(archive, None))  # type: ignore[arg-type]
    listed_at_each_batch: list[int] = []
    batches: list[list[SeriesRecord]] = []
    async for batch in search.series_batches(parse_query([]), size=25):
        listed_at_each_batch.append(len(archive.listed))
        batches.append(batch)
    assert listed_at_each_batch[0] < 40 and listed_at_each_batch == sorted(listed_at_each_batch)
    assert all(len(batch) >= 25 for batch in batches[:-1])
    whole = [s.uid for s in await Search(Catalog(WideArchive(40, 10), None)).series(parse_query([]))]  # type: ignore[arg-type]
    assert [s.uid for batch in batches for s in batch] == whole and len(whole) == 400


async def test_listing_rows_come_in_batches_equal_to_the_whole_listing() -> None:
    from contextlib import aclosing

    from dicomfs import listing

    for level in ("study", "series", "instance"):
        archive = WideArchive(studies=5, series=400)  # 2,000 series, 4,000 instances: several batches
        batches: list[list[dict[str, object]]] = []
        async with aclosing(listing.row_batches(Catalog(archive, None), parse_query([]), level)) as rows:  # type: ignore[arg-type]
            async for batch in rows:
                batches.append(batch)
        whole = await listing.rows(Catalog(WideArchive(5, 400), None), parse_query([]), level)  # type: ignore[arg-type]
        assert [row for batch in batches for row in batch] == whole
        assert len(batches) > 1 or level == "study", level


def test_a_table_row_stays_one_line_whatever_a_name_holds() -> None:
    rows = [{"StudyInstanceUID": "1.2.3", "PatientName": "Doe\nJohn\tthe\x1b[31mthird", "PatientID": "P\r1",
             "StudyDate": "20240101", "ModalitiesInStudy": ["CT", "M\x85R"], "StudyDescription": "a\x00b",
             "Series": 1, "Instances": 2}]
    header, line = list(table(rows, "study"))
    assert "Doe John the [31mthird" in line and "P 1" in line and "CT\\M R" in line and "a b" in line
    assert line.isprintable() and len(header) >= len("StudyInstanceUID  PatientName")
