"""``dicomfs prefetch``: plan a selection of studies, fetch their series into the shared cache.

Owns the selection (study UIDs, ``--all``, ``--query``), the plan and its dry-run report, the
bounded pool of series fetches, collecting failures without stopping the others, progress, and
asking ``materialise`` for ``--to``/``--zip`` output. The blob store does the fetching and the
crash-safe commits (so an interrupted prefetch leaves nothing half-written that looks complete);
the catalog persists the listings (so an offline mount shows what was prefetched).
Must not know which kind of source it talks to.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TextIO

import trio

from dicomfs.cache import BlobStore
from dicomfs.catalog import Catalog
from dicomfs.errors import DicomfsError, NotFound, ProtocolError
from dicomfs.materialise import OutputDir, Written, write_series_files, write_study_zip
from dicomfs.p10check import Part10Check
from dicomfs.progress import Progress, human_bytes, human_duration
from dicomfs.query import Query, parse_query
from dicomfs.records import InstanceRecord, SeriesRecord, StudyRecord
from dicomfs.search import Search
from dicomfs.tasks import open_nursery

log = logging.getLogger(__name__)

PROGRESS_TICK = 0.1
SERIES_TAGS_WITHIN = 1 << 20  # bytes of an instance in which its study and series UIDs are looked for
_STUDY_UID, _SERIES_UID = 0x0020000D, 0x0020000E


@dataclass
class SeriesPlan:
    series: SeriesRecord
    instances: list[InstanceRecord] | None  # None: listed while the series is fetched
    size: int | None  # bytes of its instances, if known before fetching
    cached: bool  # complete in the cache (or served in place from a local source)


@dataclass
class Plan:
    studies: list[StudyRecord] = field(default_factory=list)
    series: list[SeriesPlan] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # what could not even be planned

    @property
    def instances(self) -> int:
        return sum(len(s.instances or ()) for s in self.series)

    @property
    def total_bytes(self) -> int | None:
        sizes = [s.size for s in self.series]
        return None if None in sizes else sum(s for s in sizes if s is not None)

    @property
    def cached(self) -> list[SeriesPlan]:
        return [s for s in self.series if s.cached]

    @property
    def to_fetch(self) -> list[SeriesPlan]:
        return [s for s in self.series if not s.cached]

    def describe(self) -> list[str]:
        cached_bytes = sum(s.size or 0 for s in self.cached)
        fetch_sizes = [s.size for s in self.to_fetch]
        total = self.total_bytes
        lines = [
            f"plan: {len(self.studies)} studies, {len(self.series)} series, {self.instances} instances, "
            + (f"{human_bytes(total)} ({total} bytes)" if total is not None else "size unknown"),
            f"already cached: {len(self.cached)} series, {human_bytes(cached_bytes)} ({cached_bytes} bytes)",
        ]
        if None in fetch_sizes:
            unknown = fetch_sizes.count(None)
            lines.append(f"to fetch: {len(self.to_fetch)} series, size unknown for {unknown} of them "
                         "(the archive reports no sizes before a retrieve)")
        else:
            to_fetch = sum(s for s in fetch_sizes if s is not None)
            lines.append(f"to fetch: {len(self.to_fetch)} series, {human_bytes(to_fetch)} ({to_fetch} bytes)")
        return lines


@dataclass
class Outcome:
    fetched_series: int = 0
    fetched_bytes: int = 0
    failures: list[str] = field(default_factory=list)
    written: Written = field(default_factory=Written)


async def select_studies(catalog: Catalog, uids: list[str], everything: bool,
                         query: Query) -> tuple[list[StudyRecord], list[str]]:
    """The studies asked for, and one message per UID the archive does not have."""
    search = Search(catalog)
    chosen: dict[str, StudyRecord] = {}
    missing: list[str] = []
    if everything:
        chosen.update(await catalog.studies())
    if query:
        chosen.update({s.uid: s for s in await search.studies(query)})
    found: dict[str, list[StudyRecord]] = {}

    async def find(uid: str) -> None:
        found[uid] = await search.studies(parse_query([f"StudyInstanceUID={uid}"]))

    async def list_series(uid: str) -> None:
        # The plan asks for these next; asked meanwhile (the catalog keeps the answer), the first
        # retrieve starts one round trip sooner. A failure here is the plan's to report.
        with contextlib.suppress(DicomfsError):
            await catalog.series_listed(uid)

    async with open_nursery() as nursery:
        for uid in dict.fromkeys(uids):
            nursery.start_soon(find, uid)
            nursery.start_soon(list_series, uid)
    for uid in dict.fromkeys(uids):
        if found[uid]:
            chosen[uid] = found[uid][0]
        else:
            missing.append(f"study {uid}: not found in the archive")
    return list(chosen.values()), missing


async def make_plan(catalog: Catalog, blobs: BlobStore, studies: list[StudyRecord], jobs: int, *,
                    list_instances: bool = True) -> Plan:
    """Studies -> series (-> instances, sizes). Without ``list_instances`` the instances are left
    to ``execute``, which lists them while it fetches (a retrieve need not wait for the listing)."""
    plan = Plan(studies=studies)
    limit = trio.CapacityLimiter(jobs)
    per_study: dict[str, list[SeriesPlan]] = {}
    in_place = blobs.source.serves_files_in_place

    async def plan_series(series: SeriesRecord, into: list[SeriesPlan]) -> None:
        async with limit:
            cached = in_place or await trio.to_thread.run_sync(blobs.is_cached, series)
            item = SeriesPlan(series, None, None, cached)
            if list_instances:
                await _list_instances(catalog, blobs, item)
            into.append(item)

    async def plan_study(study: StudyRecord) -> None:
        try:
            async with limit:
                series = list((await catalog.series_of(study)).values())
        except DicomfsError as exc:
            plan.failures.append(f"study {study.uid}: {exc}")
            return
        into = per_study.setdefault(study.uid, [])
        async with open_nursery() as nursery:
            for record in series:
                nursery.start_soon(_guard, plan.failures, f"series {record.uid}", plan_series, record, into)

    async with open_nursery() as nursery:
        for study in studies:
            nursery.start_soon(plan_study, study)
    order = {s.uid: n for n, s in enumerate(studies)}
    for study_uid in sorted(per_study, key=order.__getitem__):
        plan.series.extend(sorted(per_study[study_uid], key=lambda p: p.series.uid))
    return plan


async def _list_instances(catalog: Catalog, blobs: BlobStore, item: SeriesPlan) -> None:
    item.instances = list((await catalog.instances_of(item.series)).values())
    sizes = await blobs.known_sizes(item.series)
    total: int | None = 0
    for instance in item.instances:
        size = instance.size if instance.size is not None else sizes.get(instance.key)
        total = None if size is None or total is None else total + size
    item.size = total


async def _guard(failures: list[str], what: str, function: Callable[..., Awaitable[object]], *args: object) -> None:
    try:
        await function(*args)
    except DicomfsError as exc:
        failures.append(f"{what}: {exc}")


async def execute(plan: Plan, catalog: Catalog, blobs: BlobStore, jobs: int, stream: TextIO, *,
                  to: OutputDir | None = None, zip_output: bool = False) -> Outcome:
    """Fetch every series of the plan that is not cached (listing instances meanwhile where the
    plan has not), check each retrieve holds every listed instance; then write ``--to`` output."""
    outcome = Outcome()
    progress = Progress(stream, len(plan.series), plan.total_bytes)
    done_bytes = sum(s.size or 0 for s in plan.cached)
    done_series = len(plan.cached)
    limit = trio.CapacityLimiter(jobs)
    listings = trio.CapacityLimiter(jobs)
    ok: set[str] = set()

    async def list_instances(item: SeriesPlan) -> None:
        async with listings:
            await _list_instances(catalog, blobs, item)

    async def fetch(item: SeriesPlan) -> None:
        nonlocal done_bytes, done_series
        download = None
        try:
            async with open_nursery() as both:
                if item.instances is None:
                    both.start_soon(list_instances, item)
                if not item.cached:
                    async with limit:
                        download = await blobs.fetch_series(item.series)
            assert item.instances is not None
            stored = set(download.members) if download is not None else set(await blobs.known_sizes(item.series))
            listed = {i.key for i in item.instances}
            if listed - stored and not blobs.source.serves_files_in_place:
                # The series grew since it was cached: fetch it anew (the blob store does not
                # ask again for what a retrieve it just made did not hold).
                async with limit:
                    again = await blobs.fetch_series(item.series, expect=listed)
                if again is not None:
                    download, stored = again, set(again.members)
                missing = listed - stored
                if missing:
                    raise NotFound(f"{len(missing)} listed instances were not in the retrieve")
            unlisted = stored - listed
            if to is not None and download is not None and unlisted and not blobs.source.serves_files_in_place:
                await _write_unlisted_too(blobs, item, sorted(unlisted))
        except DicomfsError as failure:
            outcome.failures.append(f"series {item.series.uid} (study {item.series.study_uid}): {failure}")
            if not item.cached:
                done_series += 1
            return
        ok.add(item.series.key)
        if not item.cached:
            done_series += 1
        if download is not None:  # None: it was cached already, or another process cached it
            size = download.manifest().size
            outcome.fetched_series += 1
            outcome.fetched_bytes += size
            done_bytes += size

    async with open_nursery() as nursery:
        async def tick() -> None:
            while True:
                in_flight = sum(d.received for d in blobs.downloads())
                progress.update(done_bytes + in_flight, done_series)
                await trio.sleep(PROGRESS_TICK)

        nursery.start_soon(tick)
        async with open_nursery() as workers:
            for item in plan.series:
                workers.start_soon(fetch, item)
        progress.update(done_bytes, done_series, force=True)
        nursery.cancel_scope.cancel()
    progress.close()
    if not blobs.source.serves_files_in_place:
        for item in plan.series:
            if item.series.key in ok and not await trio.to_thread.run_sync(blobs.is_cached, item.series):
                ok.discard(item.series.key)
                outcome.failures.append(
                    f"series {item.series.uid} (study {item.series.study_uid}): evicted again at once: the "
                    f"selection is larger than the cache limit ({blobs.size_limit} bytes); raise --cache-size")
    if to is not None:
        await _materialise(plan, blobs, ok, to, zip_output, jobs, outcome)
    return outcome


async def _write_unlisted_too(blobs: BlobStore, item: SeriesPlan, unlisted: list[str]) -> None:
    """An archive that cuts its search answers short without saying so (Orthanc with
    LimitFindInstances: a page of 3 of 5, no Warning, nothing at a further offset), where the
    catalog could not complete the listing (the series search gave no count, or the series'
    metadata could not be read), named fewer instances than the retrieve just made held: those of
    them that say they are of this series are written too. (Only from a retrieve of this run:
    what a cached series holds beyond the listing may have been deleted from the archive since.)"""
    assert item.instances is not None
    ours = [key for key in unlisted if await _says_it_is_of(blobs, item.series, key)]
    if ours:
        log.warning("series %s: its retrieve held %d instances its listing did not name (the archive's search "
                    "answers are cut short?): they are written too", item.series.uid, len(ours))
        item.instances = [*item.instances, *(InstanceRecord(item.series.study_uid, item.series.uid, key)
                                             for key in ours)]
    if len(ours) < len(unlisted):
        log.warning("series %s: its retrieve held %d instances of another series (or unreadable): not written",
                    item.series.uid, len(unlisted) - len(ours))


async def _says_it_is_of(blobs: BlobStore, series: SeriesRecord, key: str) -> bool:
    """Whether the stored instance ``key`` of ``series`` names that study and series in its data
    set (read from its first ``SERIES_TAGS_WITHIN`` bytes)."""
    handle = await blobs.open_instance(series, InstanceRecord(series.study_uid, series.uid, key))
    try:
        check = Part10Check(keep=(_STUDY_UID, _SERIES_UID))
        head = await handle.read(0, min(handle.length, SERIES_TAGS_WITHIN))
        with contextlib.suppress(ProtocolError):  # (a data set cut off where the head ends)
            check.feed(head)
    finally:
        handle.close()
    return check.kept_uid(_STUDY_UID) == series.study_uid and check.kept_uid(_SERIES_UID) == series.uid


async def _materialise(plan: Plan, blobs: BlobStore, ok: set[str], to: OutputDir, zip_output: bool, jobs: int,
                       outcome: Outcome) -> None:
    limit = trio.CapacityLimiter(jobs)
    by_study: dict[str, list[SeriesPlan]] = {}
    for item in plan.series:
        by_study.setdefault(item.series.study_uid, []).append(item)

    async def write_study(study_uid: str, items: list[SeriesPlan]) -> None:
        async with limit:
            try:
                if zip_output:
                    if any(i.series.key not in ok for i in items):
                        outcome.failures.append(f"study {study_uid}: not zipped, some of its series failed")
                        return
                    await write_study_zip(blobs, study_uid, [(i.series, i.instances or []) for i in items], to,
                                          outcome.written)
                else:
                    for item in items:
                        if item.series.key in ok:
                            await write_series_files(blobs, item.series, item.instances or [], to,
                                                     outcome.written)
            except DicomfsError as exc:
                outcome.failures.append(f"study {study_uid}: writing to {to.path} failed: {exc}")

    async with open_nursery() as nursery:
        for study_uid, items in by_study.items():
            nursery.start_soon(write_study, study_uid, items)


def summary(plan: Plan, outcome: Outcome, seconds: float) -> str:
    rate = outcome.fetched_bytes / seconds if seconds > 0 else 0.0
    failed = len(plan.failures) + len(outcome.failures)
    text = (f"prefetched {len(plan.studies)} studies, {len(plan.series)} series, {plan.instances} instances: "
            f"fetched {outcome.fetched_series} series, {human_bytes(outcome.fetched_bytes)} "
            f"({outcome.fetched_bytes} bytes) in {human_duration(seconds)} ({human_bytes(rate)}/s); "
            f"{len(plan.cached)} series already cached; {failed} failed")
    if outcome.written.files or outcome.written.skipped:
        text += f"; wrote {outcome.written.files} files, {outcome.written.skipped} identical ones kept"
    return text
