"""Study readahead: while a reader works through one series of a study, fetch the next.

Owns which series are fetched before anyone asks for them and when. When a reader opens an
instance of a study (``reading``), the study's other series are queued in the order the reader
is expected to take (the view it reads in says: in the order ``cp -r`` walks it, by the inodes
of the series' folders; by UID only where those folders gather no series), starting after the
series being read; the next one starts as soon as the previous one's bytes are in (the
download's ``fetched``, not its commit: the wire is never idle while the disk catches up), one
at a time (starting them all at once measured no gain). Each queued series' instances are listed
while the series before it downloads, so that a reader entering its folder does not wait for
that listing. A series a reader opens is no longer queued: its own request started it at once.
Readahead stops for a study when the bytes fetched ahead of its readers would pass the budget
(1 GiB, at most a quarter of the cache; the next series is taken to be as large as the last one
fetched) until a reader opens one of them, and when nobody has opened anything in the study for
``idle`` seconds; a readahead that fails is logged and stops, nothing else. Must not read
instance bytes, retry a failed download (a reader's open will) or know about views.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import cachetools
import trio

from dicomfs import clock
from dicomfs.cache import BlobStore, SeriesDownload
from dicomfs.catalog import Catalog
from dicomfs.errors import DicomfsError
from dicomfs.records import SeriesRecord, StudyRecord

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 1 << 30  # bytes fetched ahead of the readers of one study
DEFAULT_IDLE = 30.0  # seconds without a reader before a study's readahead stops
STUDIES_KEPT = 256


SeriesOrder = Callable[[SeriesRecord], "int | str"]


def _by_uid(series: SeriesRecord) -> str:
    return series.uid


class Mode(enum.Enum):
    OFF = "off"  # fetch what is read: an instance alone where the source can (never its series)
    SERIES = "series"  # the whole series of what is read
    STUDY = "study"  # and the study's next series, one after another


@dataclass
class _Study:
    record: StudyRecord  # (its attrs: the count by which the catalog completes its series listing)
    first: SeriesRecord  # the series a reader opened first: the queue starts after it
    last_read: float
    order: SeriesOrder  # the order readers are expected to take through the study's series
    opened: set[str] = field(default_factory=set)  # series (UIDs) a reader opened
    ahead: dict[str, SeriesDownload] = field(default_factory=dict)  # fetched ahead, not yet opened
    changed: trio.Event = field(default_factory=trio.Event)
    running: bool = True
    stopped_idle: bool = False  # ended because nobody read: a reader coming back starts it again

    @property
    def uid(self) -> str:
        return self.record.uid

    def ahead_bytes(self) -> int:
        return sum(download.received for uid, download in self.ahead.items() if uid not in self.opened)

    def poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class Readahead:
    def __init__(self, blobs: BlobStore, catalog: Catalog, *, mode: Mode = Mode.STUDY,
                 budget: int = DEFAULT_BUDGET, idle: float = DEFAULT_IDLE) -> None:
        self.blobs = blobs
        self.catalog = catalog
        self.mode = mode
        self.budget = min(budget, blobs.size_limit // 4)  # (a small cache is not filled ahead of readers)
        self.idle = idle
        # studies read ahead, running or done (kept, so that every open of a study read to its end
        # does not plan it again)
        self._studies: cachetools.LRUCache[str, _Study] = cachetools.LRUCache(STUDIES_KEPT)
        self._nursery: trio.Nursery | None = None

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled (the mount's nursery runs this)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def reading(self, series: SeriesRecord, order: SeriesOrder | None = None,
                study_record: StudyRecord | None = None) -> None:
        """A reader opened an instance of ``series`` (of ``study_record``, if known); ``order``, the key by
        which it is expected to walk the study's series (the view it reads in knows; by default
        their UIDs)."""
        if self.mode is not Mode.STUDY or self._nursery is None:
            return
        study = self._studies.get(series.study_uid)
        if study is None or (not study.running and study.stopped_idle):
            record = study_record if study_record is not None else StudyRecord(series.study_uid)
            study = self._studies[series.study_uid] = _Study(record, series, clock.now(),
                                                             order or _by_uid)
            self._nursery.start_soon(self._follow, study)
        study.last_read = clock.now()  # (the waits look at it again on their own: no poke for this)
        if series.uid not in study.opened:  # (every open of a file comes here: only news wakes the queue)
            study.opened.add(series.uid)
            study.poke()

    async def _follow(self, study: _Study) -> None:
        try:
            await self._read_ahead(study)
        except DicomfsError as exc:  # a listing that failed: the readers' own opens will say so
            log.info("readahead in study %s stopped: %s", study.uid, exc)
        except Exception as exc:  # (a full disk's sqlite error, a bug): never the daemon's end
            log.warning("readahead in study %s stopped: %s: %s", study.uid, type(exc).__name__, exc)
        finally:
            study.running = False
            study.stopped_idle = self._idle(study)

    async def _read_ahead(self, study: _Study) -> None:
        listed = sorted((await self.catalog.series_of(study.record)).values(), key=study.order)
        at = next((n for n, s in enumerate(listed) if s.uid == study.first.uid), -1)
        queue = listed[at + 1:] + listed[:max(at, 0)]
        previous = self.blobs.running(study.first)
        estimate = 0  # the next series' size, guessed from the last one fetched
        for series in queue:
            self._list_soon(series)  # while the one before downloads: its folder is then listed when a reader comes
            if previous is not None:
                if not await self._wait(study, previous.fetched):
                    return
                estimate = previous.received
            while study.ahead_bytes() + estimate > self.budget:
                if not await self._wait(study, study.changed):  # until a reader opens one
                    return
            if self._idle(study):
                return
            if series.uid in study.opened:
                continue  # a reader opened it: its own request fetched it
            download = await self.blobs.read_ahead(series)
            if download is not None:
                log.debug("reading ahead: series %s of study %s", series.uid, study.uid)
                study.ahead[series.uid] = download
            previous = download

    def _list_soon(self, series: SeriesRecord) -> None:
        """Have the catalog list the instances of ``series`` in the background (a reader entering
        its folder waited for that listing: 50-90 ms a series on a local Orthanc, while ``cp -r``
        stood still)."""
        if self._nursery is not None:
            self._nursery.start_soon(self._list, series)

    async def _list(self, series: SeriesRecord) -> None:
        try:
            await self.catalog.instances_of(series)
        except Exception as exc:  # (the reader's own listing asks again, and says what failed)
            log.debug("listing series %s ahead of its readers failed: %s: %s", series.uid, type(exc).__name__, exc)

    async def _wait(self, study: _Study, event: trio.Event) -> bool:
        """Wait for ``event`` while readers are about; False once the study has been idle."""
        while not event.is_set():
            remaining = study.last_read + self.idle - clock.now()
            if remaining <= 0:
                log.debug("readahead in study %s stopped: no reader for %.0f s", study.uid, self.idle)
                return False
            with trio.move_on_after(remaining):
                await event.wait()
        return not self._idle(study)

    def _idle(self, study: _Study) -> bool:
        return clock.now() - study.last_read >= self.idle
