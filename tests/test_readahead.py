"""Unit tests of study readahead (``dicomfs.readahead``) over a real blob store and catalog with a
scripted archive of one study of five series: the order series are fetched in, one at a time
after the previous one's bytes, a reader's series jumping the queue, the byte budget, the idle
stop, and the modes. Every request to the archive is counted."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
import trio.testing

from dicomfs.cache import BlobStore
from dicomfs.catalog import Catalog
from dicomfs.readahead import Mode, Readahead
from dicomfs.records import InstanceRecord, SeriesRecord, StudyRecord
from dicomfs.sources.base import SeriesSink
from tests.factory import make_instance

STUDY = "1.2.9"
SERIES = [SeriesRecord(STUDY, f"{STUDY}.{n}") for n in range(1, 6)]
FILES = {s.uid: {f"{s.uid}.{i}": make_instance(STUDY, s.uid, f"{s.uid}.{i}", pixel_bytes=4000, number=i)
                 for i in range(1, 4)} for s in SERIES}
SERIES_BYTES = sum(len(data) for data in FILES[SERIES[0].uid].values())


class Archive:
    """One study; each series retrieve waits for ``gate`` (when set) before its bytes go out."""

    description = "scripted"
    serves_files_in_place = False

    def __init__(self) -> None:
        self.started: list[str] = []  # series UIDs in the order their retrieves started
        self.running = 0
        self.most_at_once = 0
        self.gates: dict[str, trio.Event] = {}
        self.listings = 0  # series listings asked for
        self.instance_listings: list[str] = []  # series whose instances were listed, in order

    async def check(self) -> None:
        pass

    async def list_studies(self) -> list[StudyRecord]:
        return [StudyRecord(STUDY)]

    async def list_series(self, study_uid: str) -> list[SeriesRecord]:
        self.listings += 1
        return list(reversed(SERIES))  # the archive's order is not the one readahead follows

    async def list_instances(self, series: SeriesRecord) -> list[InstanceRecord]:
        self.instance_listings.append(series.uid)
        return [InstanceRecord(STUDY, series.uid, key, size=len(data)) for key, data in FILES[series.uid].items()]

    async def fetch_series(self, series: SeriesRecord, sink: SeriesSink) -> None:
        self.started.append(series.uid)
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            gate = self.gates.get(series.uid)
            if gate is not None:
                await gate.wait()
            for key, data in FILES[series.uid].items():
                sink.arrived(len(data))
                writer = await sink.begin(key, len(data))
                await writer.write(data)
                await writer.finish()
        finally:
            self.running -= 1

    def local_file(self, instance: InstanceRecord) -> None:
        return None

    async def aclose(self) -> None:
        pass


async def run(tmp_path: Path, body: Callable[[Archive, BlobStore, Readahead], Awaitable[None]],
              **options: object) -> Archive:
    archive = Archive()
    catalog = Catalog(archive, None)
    blobs = BlobStore(tmp_path / "cache", 1 << 30, archive)
    readahead = Readahead(blobs, catalog, **options)  # type: ignore[arg-type]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(blobs.run)
            await nursery.start(readahead.run)
            with trio.fail_after(30):
                await body(archive, blobs, readahead)
            nursery.cancel_scope.cancel()
    finally:
        blobs.close()
        catalog.close()
    return archive


async def read(blobs: BlobStore, readahead: Readahead, series: SeriesRecord, n: int = 1) -> bytes:
    """What ``InstanceFiles.open`` does: open through the blob store, tell readahead."""
    key = f"{series.uid}.{n}"
    handle = await blobs.open_instance(series, InstanceRecord(STUDY, series.uid, key))
    readahead.reading(series)
    try:
        return bytes(await handle.read(0, 1 << 20))
    finally:
        handle.close()


async def settled(blobs: BlobStore, archive: Archive, count: int) -> None:
    """Until ``count`` retrieves have started and every download has ended."""
    while len(archive.started) < count or blobs.downloads():
        await trio.sleep(0.01)


async def test_the_next_series_follow_one_at_a_time_in_listing_order(tmp_path: Path) -> None:
    async def body(archive: Archive, blobs: BlobStore, readahead: Readahead) -> None:
        assert await read(blobs, readahead, SERIES[1]) == FILES[SERIES[1].uid][f"{SERIES[1].uid}.1"]
        await settled(blobs, archive, 5)
        assert all(blobs.is_cached(s) for s in SERIES)

    archive = await run(tmp_path, body)
    # after the series read: the ones after it, then the ones before; each once, never two at once
    assert archive.started == [s.uid for s in (SERIES[1], SERIES[2], SERIES[3], SERIES[4], SERIES[0])]
    assert archive.most_at_once == 1


async def test_the_queue_follows_the_order_the_readers_view_gives(tmp_path: Path) -> None:
    """``cp -r`` walks a folder by inode (GNU cp sorts its entries so): readahead queues the
    series in the order the view says its reader takes, here the reverse of their UIDs."""
    async def body(archive: Archive, blobs: BlobStore, readahead: Readahead) -> None:
        handle = await blobs.open_instance(SERIES[2], InstanceRecord(STUDY, SERIES[2].uid, f"{SERIES[2].uid}.1"))
        readahead.reading(SERIES[2], order=lambda series: [s.uid for s in SERIES].index(series.uid) * -1)
        handle.close()
        await settled(blobs, archive, 5)

    archive = await run(tmp_path, body)
    assert archive.started == [s.uid for s in (SERIES[2], SERIES[1], SERIES[0], SERIES[4], SERIES[3])]
    assert archive.most_at_once == 1


async def test_the_next_starts_when_the_bytes_are_in_and_a_readers_series_jumps_the_queue(tmp_path: Path) -> None:
    async def body(archive: Archive, blobs: BlobStore, readahead: Readahead) -> None:
        archive.gates[SERIES[1].uid] = trio.Event()  # the next series' bytes are held back
        await read(blobs, readahead, SERIES[0])
        while archive.started[-1:] != [SERIES[1].uid]:
            await trio.sleep(0.01)
        # a reader opens series 4 while series 1 is held: it starts at once, beside readahead's
        assert await read(blobs, readahead, SERIES[3]) == FILES[SERIES[3].uid][f"{SERIES[3].uid}.1"]
        assert archive.started == [SERIES[0].uid, SERIES[1].uid, SERIES[3].uid]
        await trio.sleep(0.2)
        assert archive.started == [SERIES[0].uid, SERIES[1].uid, SERIES[3].uid]  # nothing else while held
        archive.gates[SERIES[1].uid].set()
        await settled(blobs, archive, 5)

    archive = await run(tmp_path, body)
    # series 4 was not fetched again: readahead skipped it
    assert archive.started == [s.uid for s in (SERIES[0], SERIES[1], SERIES[3], SERIES[2], SERIES[4])]


async def test_the_next_series_is_listed_while_the_one_before_downloads(tmp_path: Path) -> None:
    """A reader entering a series folder waits for its listing (``cp -r`` stood still 50-90 ms
    at each series of a study for it): readahead has the catalog list each queued series while
    the one before it downloads, one series ahead, each once."""
    async def body(archive: Archive, blobs: BlobStore, readahead: Readahead) -> None:
        archive.gates[SERIES[1].uid] = trio.Event()  # the first series read ahead is held
        await read(blobs, readahead, SERIES[0])
        while archive.started[-1:] != [SERIES[1].uid] or len(archive.instance_listings) < 2:
            await trio.sleep(0.01)
        await trio.sleep(0.1)
        # series 1 downloading: it and the next are listed, nothing beyond
        assert archive.instance_listings == [SERIES[1].uid, SERIES[2].uid]
        archive.gates[SERIES[1].uid].set()
        await settled(blobs, archive, 5)
        await trio.testing.wait_all_tasks_blocked()

    archive = await run(tmp_path, body)
    assert archive.instance_listings == [s.uid for s in SERIES[1:]]  # (series 0 was read, not listed)


async def test_no_readahead_beyond_the_budget_until_a_reader_catches_up(tmp_path: Path) -> None:
    async def body(archive: Archive, blobs: BlobStore, readahead: Readahead) -> None:
        await read(blobs, readahead, SERIES[0])
        await settled(blobs, archive, 2)
        await trio.sleep(0.3)
        assert archive.started == [SERIES[0].uid, SERIES[1].uid]  # one series ahead: the budget
        await read(blobs, readahead, SERIES[1])  # the reader catches up: one more may come
        await settled(blobs, archive, 3)
        await trio.sleep(0.3)
        assert archive.started == [SERIES[0].uid, SERIES[1].uid, SERIES[2].uid]

    await run(tmp_path, body, budget=SERIES_BYTES)


async def test_readahead_stops_when_the_reader_leaves(tmp_path: Path) -> None:
    async def body(archive: Archive, blobs: BlobStore, readahead: Readahead) -> None:
        archive.gates[SERIES[1].uid] = trio.Event()
        await read(blobs, readahead, SERIES[0])
        while archive.started[-1:] != [SERIES[1].uid]:
            await trio.sleep(0.01)
        await trio.sleep(0.6)  # nobody reads for longer than the idle time
        archive.gates[SERIES[1].uid].set()
        await settled(blobs, archive, 2)
        await trio.sleep(0.3)
        assert archive.started == [SERIES[0].uid, SERIES[1].uid]  # nothing after the reader left

    await run(tmp_path, body, idle=0.5)


async def test_series_mode_fetches_only_what_is_read(tmp_path: Path) -> None:
    async def body(archive: Archive, blobs: BlobStore, readahead: Readahead) -> None:
        await read(blobs, readahead, SERIES[2])
        await trio.sleep(0.3)
        assert archive.started == [SERIES[2].uid] and not blobs.downloads()

    await run(tmp_path, body, mode=Mode.SERIES)


class InstanceArchive(Archive):
    """An archive that can send one instance alone (COD's Range, IDC's object)."""

    def __init__(self) -> None:
        super().__init__()
        self.alone: list[str] = []

    async def fetch_instance(self, instance: InstanceRecord, sink: SeriesSink) -> None:
        self.alone.append(instance.key)
        data = FILES[instance.series_uid][instance.key]
        sink.arrived(len(data))
        writer = await sink.begin(instance.key, len(data))
        await writer.write(data)
        await writer.finish()


async def test_off_mode_fetches_each_instance_alone(tmp_path: Path) -> None:
    for alone in (True, False):
        archive = InstanceArchive()
        catalog = Catalog(archive, None)
        blobs = BlobStore(tmp_path / f"cache-{alone}", 1 << 30, archive,
                          instances_alone=alone)
        readahead = Readahead(blobs, catalog, mode=Mode.OFF if alone else Mode.SERIES)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(blobs.run)
                await nursery.start(readahead.run)
                with trio.fail_after(30):
                    for n in (1, 2, 3):
                        data = await read(blobs, readahead, SERIES[0], n)
                        assert data == FILES[SERIES[0].uid][f"{SERIES[0].uid}.{n}"]
                    await settled(blobs, archive, 0)
                nursery.cancel_scope.cancel()
        finally:
            blobs.close()
            catalog.close()
        if alone:  # off: three instances, three single fetches, never the series
            assert archive.alone == [f"{SERIES[0].uid}.{n}" for n in (1, 2, 3)] and archive.started == []
        else:  # series: the first alone, the second read fetches the series
            assert archive.alone == [f"{SERIES[0].uid}.1"] and archive.started == [SERIES[0].uid]


async def test_a_reader_coming_back_starts_it_again_and_a_finished_study_is_not_planned_anew(
        tmp_path: Path) -> None:
    async def body(archive: Archive, blobs: BlobStore, readahead: Readahead) -> None:
        archive.gates[SERIES[1].uid] = trio.Event()
        await read(blobs, readahead, SERIES[0])
        while archive.started[-1:] != [SERIES[1].uid]:
            await trio.sleep(0.01)
        await trio.sleep(0.4)  # the reader left: series 1 comes in, then nothing
        archive.gates[SERIES[1].uid].set()
        await settled(blobs, archive, 2)
        await trio.sleep(0.2)
        assert archive.started == [SERIES[0].uid, SERIES[1].uid]
        await read(blobs, readahead, SERIES[1])  # back: from the cache, and readahead goes on
        await settled(blobs, archive, 5)
        assert archive.started == [s.uid for s in SERIES[:2]] + [SERIES[2].uid, SERIES[3].uid, SERIES[4].uid]
        listings = archive.listings
        for series in SERIES:  # reading the whole study, all cached: no new plans
            for n in (1, 2, 3):
                await read(blobs, readahead, series, n)
        await trio.sleep(0.1)
        assert archive.listings == listings and len(archive.started) == 5

    await run(tmp_path, body, idle=0.3)
