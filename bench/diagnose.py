"""Where a cold copy's time goes: the download path of dicomfs measured without FUSE, in-process.

Three stages, each timed over the whole study (series after series, as ``cp -r`` reads them):

* ``httpx_raw_s``: httpx streaming each series' WADO-RS retrieve (stored bytes) to nowhere;
* ``fetch_series_s``: ``DicomwebSource.fetch_series`` (adds multipart parsing and naming parts)
  into a sink that drops the bytes;
* ``blobstore_s``: ``BlobStore.open_instance`` of every instance in order, which downloads each
  series into the cache (adds writing the blob, waking readers, the commit with its fsync).

Uses only dicomfs' source and blob-store interfaces, the ones the daemon itself uses.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from dicomfs.blobstore import BlobStore
from dicomfs.sources.base import Credentials
from dicomfs.sources.dicomweb import SERIES_ACCEPT, DicomwebSource


class _Discard:
    """A SeriesSink that takes every instance and keeps nothing."""

    def wants(self, key: str) -> bool:
        return True

    async def begin(self, key: str, size: int | None) -> _Discard:
        return self

    async def write(self, data: bytes) -> None:
        pass

    async def finish(self) -> None:
        pass


async def _stages(dicomweb: str, study_uid: str, cache_dir: Path) -> dict[str, float]:
    source = DicomwebSource(dicomweb, Credentials())
    try:
        series = sorted(await source.list_series(study_uid), key=lambda s: s.uid)
        instances = [sorted(await source.list_instances(s), key=lambda i: i.key) for s in series]
        out: dict[str, float] = {}

        async with httpx.AsyncClient(timeout=60) as client:
            await client.get(f"{dicomweb}/studies?limit=1")  # connect and warm up before timing
            started = time.perf_counter()
            for record in series:
                url = f"{dicomweb}/studies/{study_uid}/series/{record.uid}"
                async with client.stream("GET", url, headers={"Accept": SERIES_ACCEPT}) as response:
                    async for _ in response.aiter_raw():
                        pass
            out["httpx_raw_s"] = time.perf_counter() - started

        started = time.perf_counter()
        for record in series:
            await source.fetch_series(record, _Discard())
        out["fetch_series_s"] = time.perf_counter() - started

        shutil.rmtree(cache_dir, ignore_errors=True)
        store = BlobStore(cache_dir, 1 << 40, source)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                started = time.perf_counter()
                for record, members in zip(series, instances, strict=True):
                    for instance in members:
                        (await store.open_instance(record, instance)).close()
                out["blobstore_s"] = time.perf_counter() - started
                nursery.cancel_scope.cancel()
        finally:
            store.close()
            shutil.rmtree(cache_dir, ignore_errors=True)
        return out
    finally:
        await source.aclose()


def measure(dicomweb: str, study_uid: str, cache_dir: Path) -> dict[str, Any]:
    """One measurement of each stage, in seconds."""
    return trio.run(_stages, dicomweb, study_uid, cache_dir)
