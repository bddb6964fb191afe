"""Unit tests of the catalog: listing TTLs on the (mockable) trio clock, single flight, the
persistent store shared by processes, and the fallback to stored listings while the archive is
down. A scripted in-memory archive; time is ``mock_clock``, moved by hand."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from dicomfs.catalog import Catalog
from dicomfs.errors import NotFound, ProtocolError, SourceUnavailable
from dicomfs.query import parse_query
from dicomfs.records import InstanceRecord, SeriesRecord, StudyRecord
from dicomfs.search import Shown

TTL = 60.0


class Archive:
    description = "scripted archive"

    def __init__(self) -> None:
        self.studies = {"1.1": {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^JOHN"}]}},
                        "1.2": {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "ROE^JANE"}]}}}
        self.asked: Counter[str] = Counter()
        self.down = False
        self.slow = False

    async def _ask(self, what: str) -> None:
        self.asked[what] += 1
        if self.slow:
            await trio.sleep(1)
        if self.down:
            raise SourceUnavailable("cannot reach the archive (scripted)")

    async def list_studies(self) -> list[StudyRecord]:
        await self._ask("studies")
        return [StudyRecord(uid, attrs) for uid, attrs in self.studies.items()]

    async def list_series(self, study_uid: str) -> list[SeriesRecord]:
        await self._ask("series")
        return [SeriesRecord(study_uid, f"{study_uid}.1", {"00080060": {"vr": "CS", "Value": ["CT"]}})]

    async def list_instances(self, series: SeriesRecord) -> list[InstanceRecord]:
        await self._ask("instances")
        return [InstanceRecord(series.study_uid, series.uid, f"{series.uid}.1")]


def catalog(archive: Archive, store: Path | None) -> Catalog:
    # the store's stamps follow trio's clock too, so that one mocked clock ages both
    return Catalog(archive, store, listing_ttl=TTL, wall=trio.current_time)  # type: ignore[arg-type]


async def test_a_listing_is_kept_for_the_ttl_then_asked_again(mock_clock: MockClock) -> None:
    archive = Archive()
    cat = catalog(archive, None)
    first = await cat.studies()
    mock_clock.jump(TTL - 1)
    assert await cat.studies() is first and archive.asked["studies"] == 1
    archive.studies["1.3"] = {}
    mock_clock.jump(2)
    assert sorted(await cat.studies()) == ["1.1", "1.2", "1.3"] and archive.asked["studies"] == 2


async def test_concurrent_callers_share_one_query(autojump_clock: MockClock) -> None:
    archive = Archive()
    archive.slow = True
    cat = catalog(archive, None)
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(cat.series_of, StudyRecord("1.1"))
    assert archive.asked["series"] == 1


async def test_the_store_serves_another_catalog_while_fresh(tmp_path: Path, mock_clock: MockClock) -> None:
    archive = Archive()
    cat = catalog(archive, tmp_path / "store")
    await cat.studies()
    await cat.series_of(StudyRecord("1.1"))
    cat.close()
    again = catalog(archive, tmp_path / "store")  # a remount, or another process
    assert sorted(await again.studies()) == ["1.1", "1.2"]
    assert list(await again.series_of(StudyRecord("1.1"))) == ["1.1.1"]
    assert archive.asked == {"studies": 1, "series": 1}
    mock_clock.jump(TTL + 1)  # stale in the store too: asked again
    await again.studies()
    assert archive.asked["studies"] == 2
    again.close()


async def test_stored_listings_are_served_while_the_archive_is_down(tmp_path: Path, mock_clock: MockClock,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    archive = Archive()
    cat = catalog(archive, tmp_path / "store")
    await cat.studies()
    await cat.series_of(StudyRecord("1.1"))
    archive.down = True
    mock_clock.jump(10 * TTL)  # long stale: still better than nothing while offline
    assert sorted(await cat.studies()) == ["1.1", "1.2"]
    assert list(await cat.series_of(StudyRecord("1.1"))) == ["1.1.1"]
    assert sum("serving stored listings" in r.message for r in caplog.records) == 1  # said once
    with pytest.raises(SourceUnavailable):  # never listed: nothing to fall back on
        await cat.series_of(StudyRecord("1.2"))
    cat.close()


async def test_prefetched_studies_stay_listed_offline(tmp_path: Path, mock_clock: MockClock) -> None:
    archive = Archive()
    cat = catalog(archive, tmp_path / "store")
    await cat.remember_studies([StudyRecord("1.9", {})])  # what prefetch stored; never listed whole
    assert await cat.has_stored_listing()
    archive.down = True
    assert sorted(await cat.studies()) == ["1.9"]
    cat.close()


async def test_the_studies_a_query_shows_are_kept_like_a_listing(tmp_path: Path, mock_clock: MockClock) -> None:
    archive = Archive()
    cat = catalog(archive, tmp_path / "store")
    shown = Shown(cat, parse_query(["PatientName=DOE*"]))
    assert list(await shown.studies()) == ["1.1"]
    assert await shown.study("1.2") is None and list(await Shown(cat).studies()) == ["1.1", "1.2"]
    cat.close()
    archive.down = True
    mock_clock.jump(10 * TTL)
    offline = catalog(archive, tmp_path / "store")  # an offline remount with the same --query
    assert list(await Shown(offline, parse_query(["PatientName=DOE*"])).studies()) == ["1.1"]
    offline.close()


class IndexedArchive(Archive):
    """Studies and series from a local index (IDC), instances from a bucket that may be down."""

    local_listings = True

    async def list_studies(self) -> list[StudyRecord]:
        self.asked["studies"] += 1  # (local: never down)
        return [StudyRecord(uid, attrs) for uid, attrs in self.studies.items()]

    async def list_series(self, study_uid: str) -> list[SeriesRecord]:
        self.asked["series"] += 1
        return [SeriesRecord(study_uid, f"{study_uid}.1")]


async def test_local_listings_are_neither_stored_nor_stopped_by_the_breaker(tmp_path: Path,
                                                                            mock_clock: MockClock) -> None:
    archive = IndexedArchive()
    cat = catalog(archive, tmp_path / "store")
    archive.down = True
    with pytest.raises(SourceUnavailable):
        await cat.instances_of(SeriesRecord("1.1", "1.1.1"))  # the bucket is down: the breaker opens
    assert cat.breaker.refusing
    assert set(await cat.studies()) == {"1.1", "1.2"}  # the index is read all the same
    assert set(await cat.series_of(StudyRecord("1.2"))) == {"1.2.1"}
    mock_clock.jump(TTL + 1)
    assert set(await cat.series_of(StudyRecord("1.2"))) == {"1.2.1"} and archive.asked["series"] == 2
    assert not await cat.has_stored_listing()  # nothing of the index was pickled into the store
    cat.close()


class ShortSearchArchive(Archive):
    """A series of 5 instances whose search names 3 (Orthanc with LimitFindInstances: no Warning,
    nothing further on); its metadata service has all 5."""

    searches_may_stop_short = True

    def __init__(self) -> None:
        super().__init__()
        self.metadata_error: Exception | None = None

    def row(self, number: int) -> dict[str, dict[str, object]]:
        return {"00080018": {"vr": "UI", "Value": [f"1.1.1.{number}"]}, "00200013": {"vr": "IS", "Value": [number]}}

    async def list_instances(self, series: SeriesRecord) -> list[InstanceRecord]:
        await self._ask("instances")
        return [InstanceRecord(series.study_uid, series.uid, f"1.1.1.{n}", attrs=self.row(n)) for n in (1, 2, 3)]

    async def series_metadata(self, series: SeriesRecord) -> dict[str, dict[str, object]]:
        await self._ask("metadata")
        if self.metadata_error is not None:
            raise self.metadata_error
        return {f"1.1.1.{n}": {**self.row(n), "7FE00010": {"vr": "OB", "BulkDataURI": "http://x/bulk"},
                               "00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^JOHN"}]}} for n in range(1, 6)}


def counted(count: object) -> SeriesRecord:
    return SeriesRecord("1.1", "1.1.1", {} if count is None else {"00201209": {"vr": "IS", "Value": [count]}})


@pytest.mark.parametrize("count", [5, "5", " 5"])
async def test_an_instance_search_that_names_fewer_than_its_series_counts_is_completed_from_the_metadata(
        tmp_path: Path, mock_clock: MockClock, count: object) -> None:
    """The two the search left out are listed, with the attributes the search's rows carry (not the
    bulk data nor the rest of the metadata); what the metadata added is kept for the metadata TTL
    (in the store too: a remount), while the search is asked again at each listing TTL."""
    archive = ShortSearchArchive()
    cat = catalog(archive, tmp_path / "store")
    found = await cat.instances_of(counted(count))
    assert sorted(found) == [f"1.1.1.{n}" for n in range(1, 6)]
    assert all(sorted(i.attrs) == ["00080018", "00200013"] for i in found.values())
    assert found["1.1.1.5"].attrs["00200013"]["Value"] == [5]
    mock_clock.jump(TTL + 1)
    assert len(await cat.instances_of(counted(count))) == 5
    remount = catalog(archive, tmp_path / "store")
    assert len(await remount.instances_of(counted(count))) == 5
    remount.close()
    assert archive.asked == {"instances": 2, "metadata": 1}
    mock_clock.jump(cat.metadata_ttl)
    assert len(await cat.instances_of(counted(count))) == 5
    assert archive.asked == {"instances": 3, "metadata": 2}
    cat.close()


@pytest.mark.parametrize("count, flag", [(None, True), (3, True), (2, True), ("a lot", True), (-1, True),
                                         (True, True), (5, False)])
async def test_the_metadata_is_asked_for_only_when_the_count_says_instances_are_missing(
        count: object, flag: bool) -> None:
    archive = ShortSearchArchive()
    archive.searches_may_stop_short = flag
    cat = catalog(archive, None)
    assert len(await cat.instances_of(counted(count))) == 3
    assert archive.asked == {"instances": 1}


@pytest.mark.parametrize("error", [SourceUnavailable("the archive timed out (scripted)"),
                                   ProtocolError("series metadata is not a JSON array (scripted)"),
                                   NotFound("no metadata service (scripted)")])
async def test_a_listing_whose_metadata_cannot_be_read_stays_the_search_s(
        error: Exception, caplog: pytest.LogCaptureFixture) -> None:
    """An outage is the breaker's (it opens; said once, as for any listing); any other failure
    is said in the log."""
    archive = ShortSearchArchive()
    archive.metadata_error = error
    cat = catalog(archive, None)
    assert sorted(await cat.instances_of(counted(5))) == ["1.1.1.1", "1.1.1.2", "1.1.1.3"]
    said = "named 3 of the 5 it counts, and its metadata could not be read" in caplog.text
    assert cat.breaker.refusing == isinstance(error, SourceUnavailable) != said


class ShortSeriesSearchArchive(ShortSearchArchive):
    """A study of 3 series whose series search names 1 (Orthanc with LimitFindResults); its
    metadata has every instance of the 3 (and, hostile, one of another study and one with a bad
    series UID)."""

    async def study_metadata(self, study_uid: str) -> dict[str, dict[str, dict[str, object]]]:
        await self._ask("study metadata")
        if self.metadata_error is not None:
            raise self.metadata_error

        def instance(series: str, number: int, study: str = study_uid) -> dict[str, dict[str, object]]:
            return {"0020000D": {"vr": "UI", "Value": [study]}, "0020000E": {"vr": "UI", "Value": [series]},
                    "00080060": {"vr": "CS", "Value": ["MR"]}, "0008103E": {"vr": "LO", "Value": [f"s{series}"]},
                    "00200013": {"vr": "IS", "Value": [number]}, "7FE00010": {"vr": "OB", "BulkDataURI": "x"}}

        rows = [instance("1.1.1", 1), instance("1.1.2", 1), instance("1.1.2", 2), instance("1.1.3", 1),
                instance("1.9.9", 1, study="1.9"), instance("../etc", 1)]
        return {f"9.9.{k}": row for k, row in enumerate(rows)}


def study_counted(count: object) -> StudyRecord:
    return StudyRecord("1.1", {} if count is None else {"00201206": {"vr": "IS", "Value": [count]}})


async def test_a_series_search_that_names_fewer_than_its_study_counts_is_completed_from_the_metadata(
        tmp_path: Path, mock_clock: MockClock) -> None:
    """The two series the search left out are listed, with the attributes the search's rows carry
    and their instances counted (so that their own instance listings can be checked in turn);
    nothing of another study or with a bad UID; the study's metadata asked for once."""
    archive = ShortSeriesSearchArchive()
    cat = catalog(archive, tmp_path / "store")
    found = await cat.series_of(study_counted(3))
    assert sorted(found) == ["1.1.1", "1.1.2", "1.1.3"]
    assert found["1.1.2"].attrs == {"00080060": {"vr": "CS", "Value": ["MR"]},
                                    "00201209": {"vr": "IS", "Value": [2]}}
    assert found["1.1.3"].attrs["00201209"]["Value"] == [1]
    mock_clock.jump(TTL + 1)
    assert sorted(await cat.series_of(study_counted(3))) == ["1.1.1", "1.1.2", "1.1.3"]
    assert archive.asked == {"series": 2, "study metadata": 1}
    assert list(await cat.series_listed("1.1")) == ["1.1.1"]  # (the search's answer, as it is)
    cat.close()


@pytest.mark.parametrize("count, flag", [(None, True), (1, True), (0, True), ("many", True), (3, False)])
async def test_the_study_metadata_is_asked_for_only_when_the_count_says_series_are_missing(
        count: object, flag: bool) -> None:
    archive = ShortSeriesSearchArchive()
    archive.searches_may_stop_short = flag
    cat = catalog(archive, None)
    assert list(await cat.series_of(study_counted(count))) == ["1.1.1"]
    assert archive.asked == {"series": 1}


async def test_a_series_listing_whose_study_metadata_cannot_be_read_stays_the_search_s(
        caplog: pytest.LogCaptureFixture) -> None:
    archive = ShortSeriesSearchArchive()
    archive.metadata_error = ProtocolError("study metadata is not a JSON array (scripted)")
    cat = catalog(archive, None)
    assert list(await cat.series_of(study_counted(3))) == ["1.1.1"]
    assert "named 1 of the 3 it counts, and its metadata could not be read" in caplog.text
    archive.metadata_error = SourceUnavailable("the archive timed out (scripted)")
    cat = catalog(archive, None)
    assert list(await cat.series_of(study_counted(3))) == ["1.1.1"]
    assert cat.breaker.refusing  # (the completion's request told the breaker of the outage)


async def test_a_series_listing_never_completed_is_served_as_stored_while_the_archive_is_down(
        tmp_path: Path, mock_clock: MockClock) -> None:
    """The search's answer was stored (prefetch asks it while it looks the study up), never the
    completed listing: while the archive is down, the stored answer is shown, not an error."""
    archive = ShortSeriesSearchArchive()
    cat = catalog(archive, tmp_path / "store")
    assert list(await cat.series_listed("1.1")) == ["1.1.1"]
    archive.down = True
    with pytest.raises(SourceUnavailable):
        await cat.instances_of(SeriesRecord("1.1", "1.1.9"))  # (the breaker opens)
    assert cat.breaker.refusing
    assert list(await cat.series_of(study_counted(3))) == ["1.1.1"]
    cat.close()
