"""The catalog: which studies, series and instances exist, with their metadata.

Owns listing freshness: in-memory TTL caches (cachetools) in front of a persistent store
(diskcache) so that a remount does not re-query everything, single-flight so that N callers cause
one query, and the fallback to the last stored listing when the archive is unreachable.
Must not fetch instance data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import cachetools
import diskcache
import trio

from dicomfs.errors import NotFound, SourceError
from dicomfs.records import InstanceRecord, SeriesRecord, StudyRecord
from dicomfs.singleflight import SingleFlight
from dicomfs.sources.base import Source

log = logging.getLogger(__name__)

T = TypeVar("T")


class Catalog:
    def __init__(
        self,
        source: Source,
        store_dir: Path | None,
        *,
        listing_ttl: float = 60.0,
        instance_ttl: float = 600.0,
        max_entries: int = 10_000,
    ) -> None:
        self.source = source
        self.listing_ttl = listing_ttl
        self.instance_ttl = instance_ttl
        self._listings: cachetools.TTLCache[Any, Any] = cachetools.TTLCache(max_entries, listing_ttl)
        self._instance_lists: cachetools.TTLCache[Any, Any] = cachetools.TTLCache(max_entries, instance_ttl)
        self._store = diskcache.Cache(str(store_dir)) if store_dir is not None else None
        self._flights: SingleFlight[Any] = SingleFlight()
        self._offline_reported = False

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    async def studies(self) -> dict[str, StudyRecord]:
        async def query() -> dict[str, StudyRecord]:
            return {s.uid: s for s in await self.source.list_studies()}

        return await self._cached(("studies",), self._listings, self.listing_ttl, query)

    async def study(self, study_uid: str) -> StudyRecord:
        study = (await self.studies()).get(study_uid)
        if study is None:
            raise NotFound(f"no study {study_uid}")
        return study

    async def series_of(self, study_uid: str) -> dict[str, SeriesRecord]:
        async def query() -> dict[str, SeriesRecord]:
            return {s.uid: s for s in await self.source.list_series(study_uid)}

        return await self._cached(("series", study_uid), self._listings, self.listing_ttl, query)

    async def instances_of(self, series: SeriesRecord) -> dict[str, InstanceRecord]:
        async def query() -> dict[str, InstanceRecord]:
            return {i.key: i for i in await self.source.list_instances(series)}

        return await self._cached(("instances", series.study_uid, series.uid), self._instance_lists,
                                  self.instance_ttl, query)

    async def _cached(self, key: tuple[str, ...], memory: cachetools.TTLCache[Any, Any], ttl: float,
                      query: Callable[[], Awaitable[T]]) -> T:
        try:
            return memory[key]  # type: ignore[no-any-return]
        except KeyError:
            pass

        async def load() -> T:
            stored = await self._load_stored(key)
            if stored is not None and time.time() - stored[0] < ttl:
                memory[key] = stored[1]
                return stored[1]  # type: ignore[no-any-return]
            try:
                value = await query()
            except SourceError as exc:
                if stored is None:
                    raise
                if not self._offline_reported:
                    log.warning("archive unreachable (%s): serving stored listings", exc)
                    self._offline_reported = True
                memory[key] = stored[1]
                return stored[1]  # type: ignore[no-any-return]
            self._offline_reported = False
            memory[key] = value
            await self._save_stored(key, value)
            return value

        return await self._flights.run(key, load)

    async def _load_stored(self, key: tuple[str, ...]) -> tuple[float, Any] | None:
        if self._store is None:
            return None
        try:
            return await trio.to_thread.run_sync(self._store.get, key)  # type: ignore[no-any-return]
        except Exception as exc:  # a damaged store is a cache miss, not an outage
            log.warning("catalog store unreadable for %s: %s", key[0], exc)
            return None

    async def _save_stored(self, key: tuple[str, ...], value: Any) -> None:
        if self._store is not None:
            await trio.to_thread.run_sync(self._store.set, key, (time.time(), value))
