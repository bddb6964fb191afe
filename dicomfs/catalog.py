"""The catalog: which studies, series and instances exist, with their metadata.

Owns listing freshness: in-memory TTL caches (cachetools) in front of a persistent store
(diskcache, shared by every process using the cache) so that a remount does not re-query
everything, single-flight so that N callers cause one query, and the fallback to the last stored
listing when the archive is unreachable: while the archive's breaker is open (``breaker``), stored
listings are served without asking it. Studies that ``prefetch`` stored are
remembered so that an offline mount lists them even if the whole archive was never listed.
Which of them a mount shows (its ``--query``) is ``search.Shown``'s business. Also keeps each
series' full metadata (the static DICOMweb tree's input) the same way, and completes an instance
(series) listing whose search named fewer than the series (study) counts from the archive's
metadata (``searches_may_stop_short``). Ages in memory are on
``clock.now`` (mockable), the store's on wall time. Must not fetch instance data.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import cachetools
import diskcache
import orjson
import trio

from dicomfs import clock
from dicomfs.breaker import Breaker, is_outage
from dicomfs.errors import DicomfsError, SourceError
from dicomfs.gcpause import paused
from dicomfs.records import (
    SERIES_INSTANCES,
    STUDY_SERIES,
    DicomJson,
    InstanceRecord,
    SeriesRecord,
    StudyRecord,
    json_count,
    json_value,
)
from dicomfs.singleflight import SingleFlight
from dicomfs.sources.base import MetadataSource, Source
from dicomfs.uids import is_key, is_uid

log = logging.getLogger(__name__)

T = TypeVar("T")
KNOWN_STUDIES = ("known-studies",)
STUDY_UID, SERIES_UID = "0020000D", "0020000E"


class Catalog:
    def __init__(
        self,
        source: Source,
        store_dir: Path | None,
        *,
        listing_ttl: float = 60.0,
        metadata_ttl: float = 600.0,
        max_entries: int = 10_000,
        breaker: Breaker | None = None,
        wall: Callable[[], float] = clock.wall,
    ) -> None:
        """``wall``: the time the store's listings are stamped with and aged by (a test passes
        trio's clock here, so that one mocked clock ages memory and store alike)."""
        self.source = source
        self.breaker = breaker or Breaker(source.description)
        # Instance lists follow the listing TTL too: a study still arriving shows its new
        # instances as soon as its folders do. Series metadata is costly and kept longer.
        self.listing_ttl = listing_ttl
        self.metadata_ttl = metadata_ttl
        self._listings: cachetools.TTLCache[Any, Any] = cachetools.TTLCache(
            max_entries, listing_ttl, timer=clock.now)
        self._wall = wall
        self._store = diskcache.Cache(str(store_dir)) if store_dir is not None else None
        if self._store is not None:
            # diskcache names the file of a large value with the "hex" codec, which Python imports
            # on first use: 10 ms inside the first series metadata a server is asked for
            import encodings.hex_codec  # noqa: F401
        self._flights: SingleFlight[Any] = SingleFlight()
        self._offline_reported = False
        # study and series listings read from a local index (IDC) are not kept in the store: the
        # index is always there, and pickling 168,000 studies costs more than reading them again
        self._local = getattr(source, "local_listings", False)
        # its searches may name fewer than they count (``Source``): listings completed from metadata
        self._stops_short = getattr(source, "searches_may_stop_short", False)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    async def studies(self) -> dict[str, StudyRecord]:
        """Every study the archive lists."""
        async def query() -> dict[str, StudyRecord]:
            return {s.uid: s for s in await self.source.list_studies()}

        async def offline() -> dict[str, StudyRecord] | None:
            known = await self._load_stored(KNOWN_STUDIES)
            return dict(known[1]) if known is not None else None

        return await self._cached(("studies",), self._listings, self.listing_ttl, query, offline,
                                  local=self._local)

    async def remember_studies(self, studies: list[StudyRecord]) -> None:
        """Keep these studies listed while the archive is unreachable (prefetch calls this)."""
        stamp = self._wall()  # (here: the clock may be trio's, which a worker thread cannot read)

        def merge() -> None:
            assert self._store is not None
            with self._store.transact():
                known = self._store.get(KNOWN_STUDIES)
                merged = dict(known[1]) if known is not None else {}
                merged.update({s.uid: s for s in studies})
                self._store.set(KNOWN_STUDIES, (stamp, merged))

        if self._store is not None:
            await trio.to_thread.run_sync(merge)

    async def has_stored_listing(self) -> bool:
        """Whether an offline start has anything to show."""
        return (await self._load_stored(("studies",)) is not None
                or await self._load_stored(KNOWN_STUDIES) is not None)

    async def remembered(self, key: tuple[str, ...], compute: Callable[[], Awaitable[T]]) -> T:
        """A listing derived from the archive's (a search's result), kept the same way: in memory
        for the listing TTL, in the store for an offline start."""
        return await self._cached(key, self._listings, self.listing_ttl, compute)

    async def series_of(self, study: StudyRecord) -> dict[str, SeriesRecord]:
        """The study's series: its series search's answer, completed from the study's metadata
        where it named fewer than the study search counts (``_beyond_the_search``)."""
        listed = await self.series_listed(study.uid)
        counted = json_count(study.attrs, STUDY_SERIES)
        if counted is None or len(listed) >= counted or not self._stops_short:
            return listed
        beyond = await self._beyond_the_search(
            ("series", study.uid, "beyond"), f"the series of study {study.uid}", len(listed), counted,
            lambda: self._series_beyond(study, listed, counted))
        return {**beyond, **listed}

    async def series_listed(self, study_uid: str) -> dict[str, SeriesRecord]:
        """The study's series as its series search names them (``series_of`` is what to show)."""
        async def query() -> dict[str, SeriesRecord]:
            return {s.uid: s for s in await self.source.list_series(study_uid)}

        return await self._cached(("series", study_uid), self._listings, self.listing_ttl, query,
                                  local=self._local)

    async def instances_of(self, series: SeriesRecord) -> dict[str, InstanceRecord]:
        """The series' instances: its instance search's answer, completed from the series'
        metadata where it named fewer than the series search counts (``_beyond_the_search``)."""
        async def query() -> dict[str, InstanceRecord]:
            return {i.key: i for i in await self.source.list_instances(series)}

        listed = await self._cached(("instances", series.study_uid, series.uid), self._listings,
                                    self.listing_ttl, query)
        counted = json_count(series.attrs, SERIES_INSTANCES)
        if counted is None or len(listed) >= counted or not self._stops_short:
            return listed
        beyond = await self._beyond_the_search(("instances", series.study_uid, series.uid, "beyond"),
                                               f"the instances of series {series.uid}", len(listed), counted,
                                               lambda: self._instances_beyond(series, listed, counted))
        return {**beyond, **listed}

    async def _beyond_the_search(self, key: tuple[str, ...], what: str, named: int, counted: int,
                                 find: Callable[[], Awaitable[dict[str, T]]]) -> dict[str, T]:
        """What a search that named fewer than it counts left out (Orthanc with LimitFindResults or
        LimitFindInstances names 3 of 5 with no Warning and nothing at a further offset: a ``cp
        -r`` silently missed the rest), found by ``find`` in the archive's metadata. Only what it
        found is kept, never the metadata (a study's may be hundreds of MB), for the metadata TTL:
        an archive whose count stays wrong is asked again that seldom. Nothing where the metadata
        cannot be had: said in the log, or, while the archive is down, the breaker's to say (what
        was found before is served meanwhile)."""
        try:
            return await self._cached(key, self._listings, self.metadata_ttl, find)
        except DicomfsError as exc:
            if not is_outage(exc):
                log.warning("%s: the search for %s named %d of the %d it counts, and its metadata could not be read "
                            "for the rest: %s", self.source.description, what, named, counted, exc)
            return {}

    async def _series_beyond(self, study: StudyRecord, listed: dict[str, SeriesRecord], counted: int
                             ) -> dict[str, SeriesRecord]:
        """The series of ``study``'s metadata that ``listed`` misses, each with the attributes the
        search's rows carry (or QIDO's series-level ones) from its first instance, and its
        instances counted (so that their own listings are checked in turn)."""
        from dicomfs import dicomjson  # (only here: not at every command's start)

        study_metadata = getattr(self.source, "study_metadata", None)
        if study_metadata is None:
            return {}
        metadata: dict[str, DicomJson] = await study_metadata(study.uid)
        tags = {tag for series in listed.values() for tag in series.attrs} or set(dicomjson.SERIES_TAGS)
        found: dict[str, SeriesRecord] = {}
        for attrs in metadata.values():
            uid = json_value(attrs, SERIES_UID)
            if not isinstance(uid, str) or uid in listed or not is_uid(uid) \
                    or json_value(attrs, STUDY_UID) != study.uid:
                continue
            if uid in found:
                found[uid].attrs[SERIES_INSTANCES]["Value"][0] += 1
            else:
                kept = {tag: value for tag, value in attrs.items() if tag in tags}
                found[uid] = SeriesRecord(study.uid, uid, {**kept, SERIES_INSTANCES: dicomjson.count(1)})
        log.warning("%s: the search for the series of study %s named %d of the %d it counts; %d more from its "
                    "metadata", self.source.description, study.uid, len(listed), counted, len(found))
        return found

    async def _instances_beyond(self, series: SeriesRecord, listed: dict[str, InstanceRecord], counted: int
                                ) -> dict[str, InstanceRecord]:
        """The instances of ``series``' metadata that ``listed`` misses, each with the attributes
        the search's rows carry (or QIDO's instance-level ones), so that it lists, sorts and
        matches queries as they do."""
        from dicomfs.dicomjson import INSTANCE_TAGS  # (only here: not at every command's start)

        if not isinstance(self.source, MetadataSource):
            return {}
        metadata = await self.source.series_metadata(series)
        tags = {tag for instance in listed.values() for tag in instance.attrs} or set(INSTANCE_TAGS)
        found = {key: InstanceRecord(series.study_uid, series.uid, key,
                                     attrs={tag: value for tag, value in attrs.items() if tag in tags})
                 for key, attrs in metadata.items() if key not in listed and is_key(key)}
        log.warning("%s: the search for the instances of series %s named %d of the %d it counts; %d more from "
                    "its metadata", self.source.description, series.uid, len(listed), counted, len(found))
        return found

    async def series_metadata(self, series: SeriesRecord) -> dict[str, DicomJson]:
        """Every instance's DICOM JSON as the archive's metadata service gives it (see
        ``MetadataSource``; the caller asks only a source that has one)."""
        source = self.source
        assert isinstance(source, MetadataSource)

        async def query() -> dict[str, DicomJson]:
            return await source.series_metadata(series)

        # stored as JSON bytes: pickling a large series' dicts takes ten times as long
        # Not kept in memory: a large series' metadata is 300 MB as Python objects (1,500 CT
        # headers), and its one user (webfiles) keeps a compact canonical form of it.
        return await self._cached(("metadata", series.study_uid, series.uid), None,
                                  self.metadata_ttl, query, codec=(orjson.dumps, orjson.loads))

    async def _cached(self, key: tuple[str, ...], memory: cachetools.TTLCache[Any, Any] | None, ttl: float,
                      query: Callable[[], Awaitable[T]],
                      offline: Callable[[], Awaitable[T | None]] | None = None,
                      codec: tuple[Callable[[Any], Any], Callable[[Any], Any]] | None = None,
                      local: bool = False) -> T:
        """``key``'s listing: from memory, the store (if younger than ``ttl``, or whatever its age
        while offline) or ``query``; ``codec`` (encode, decode) is how the store keeps it.
        ``local``: the source reads this listing from local data, so neither the store nor the
        breaker (an unreachable bucket does not stop the index from being read) has a say."""
        if memory is None:
            memory = {}  # type: ignore[assignment]  # remembered nowhere but in the store
        assert memory is not None
        try:
            return cast(T, memory[key])
        except KeyError:
            pass

        async def load() -> T:
            stored = None if local else await self._load_stored(key, codec[1] if codec else None)
            fresh = stored is not None and self._wall() - stored[0] < ttl
            if stored is not None and (fresh or self.breaker.refusing):
                memory[key] = stored[1]
                return cast(T, stored[1])
            try:
                if local:
                    value = await query()
                else:
                    with self.breaker.guard():
                        value = await query()
            except SourceError as exc:
                fallback = stored[1] if stored is not None else None
                if is_outage(exc):
                    if offline is not None:
                        extra = await offline()
                        if extra is not None:
                            # listings are dicts: the stored listing wins over remembered studies
                            fallback = (cast(T, {**cast(dict[str, Any], extra), **cast(dict[str, Any], fallback)})
                                        if fallback is not None else extra)
                if fallback is None:
                    raise
                self.report_offline(exc)
                memory[key] = fallback
                return cast(T, fallback)
            if not local:
                self._offline_reported = False  # the archive answered
            memory[key] = value
            if not local:
                await self._save_stored(key, value, codec[0] if codec else None)
            return value

        return cast(T, await self._flights.run(key, load))  # (one SingleFlight for listings of every type)

    def report_offline(self, exc: BaseException) -> None:
        """Say once (until the archive answers again) that stored listings are being served."""
        if not self._offline_reported:
            log.warning("archive unreachable (%s): serving stored listings", exc)
            self._offline_reported = True

    async def _load_stored(self, key: tuple[str, ...],
                           decode: Callable[[Any], Any] | None = None) -> tuple[float, Any] | None:
        if self._store is None:
            return None

        def load() -> tuple[float, Any] | None:
            assert self._store is not None
            stored = self._store.get(key)
            if stored is not None and decode is not None:
                return stored[0], paused(decode, stored[1])
            return cast("tuple[float, Any] | None", stored)  # (diskcache gives Any)

        try:
            return await trio.to_thread.run_sync(load)
        except Exception as exc:  # a damaged store is a cache miss, not an outage
            log.warning("catalog store unreadable for %s: %s", key[0], exc)
            return None

    async def _save_stored(self, key: tuple[str, ...], value: Any,
                           encode: Callable[[Any], Any] | None = None) -> None:
        if self._store is not None:
            store, stamp = self._store, self._wall()
            try:
                await trio.to_thread.run_sync(
                    lambda: store.set(key, (stamp, encode(value) if encode is not None else value)))
            except Exception as exc:  # a listing that cannot be stored is only not remembered
                log.warning("catalog store cannot keep %s: %s", key[0], exc)
