"""Unit tests of the prefetch's selection and plan (``dicomfs/prefetch.py``) against the scripted
in-memory archive of the catalog's tests; time is trio's mocked clock."""

from __future__ import annotations

from pathlib import Path

import trio
from trio.testing import MockClock

from dicomfs.cache import BlobStore
from dicomfs.errors import ProtocolError
from dicomfs.prefetch import select_studies
from dicomfs.query import Query
from dicomfs.records import StudyRecord
from tests.test_catalog import Archive as CatalogArchive
from tests.test_catalog import catalog


class Archive(CatalogArchive):
    def __init__(self) -> None:
        super().__init__()
        for uid, attrs in self.studies.items():
            attrs["0020000D"] = {"vr": "UI", "Value": [uid]}


async def test_the_series_of_a_named_study_are_asked_for_while_it_is_looked_up(autojump_clock: MockClock) -> None:
    archive = Archive()
    archive.slow = True  # every answer takes 1 s
    cat = catalog(archive, None)
    started = trio.current_time()
    studies, missing = await select_studies(cat, ["1.1"], False, Query())
    assert [s.uid for s in studies] == ["1.1"] and missing == []
    assert archive.asked["series"] == 1  # asked already, beside the study lookup ...
    await cat.series_of(StudyRecord("1.1"))  # ... so the plan's question is answered from the catalog
    assert archive.asked["series"] == 1
    assert trio.current_time() - started == 1  # one answer's time, not two in a row


async def test_a_series_listing_that_fails_beside_the_lookup_is_left_to_the_plan(autojump_clock: MockClock) -> None:
    archive = Archive()
    cat = catalog(archive, None)

    async def refused(study_uid: str) -> list[object]:
        raise ProtocolError("a malformed series listing (scripted)")

    archive.list_series = refused  # type: ignore[method-assign, assignment]
    studies, missing = await select_studies(cat, ["1.1", "9.9"], False, Query())
    assert [s.uid for s in studies] == ["1.1"] and missing == ["study 9.9: not found in the archive"]


async def test_an_instance_a_retrieve_held_is_written_only_if_it_says_it_is_of_the_series(tmp_path: Path) -> None:
    """What a retrieve held beyond the listing is written for ``--to`` only where its data set
    names the series' study and series (``_says_it_is_of``): an archive that answers a series'
    retrieve with another series' instance too does not get it copied into this series' folder."""
    from dicomfs.prefetch import _says_it_is_of
    from dicomfs.records import SeriesRecord
    from tests.factory import make_instance
    from tests.test_blobstore import ScriptedSource, with_store

    series = SeriesRecord("1.2", "1.2.3")
    files = {"1.2.3.1": make_instance("1.2", "1.2.3", "1.2.3.1", pixel_bytes=100),
             "1.2.4.1": make_instance("1.2", "1.2.4", "1.2.4.1", pixel_bytes=100),  # another series of the study
             "1.3.3.1": make_instance("1.3", "1.2.3", "1.3.3.1", pixel_bytes=100)}  # another study, this series UID

    async def body(store: BlobStore) -> None:
        await store.fetch_series(series)
        assert [key for key in files if await _says_it_is_of(store, series, key)] == ["1.2.3.1"]

    await with_store(tmp_path, ScriptedSource({series.key: files}), body)
