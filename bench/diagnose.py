"""Where a cold copy's time goes: the download path of dicomfs measured without FUSE, in-process.

Three stages, each timed over the whole study (series after series, as ``cp -r`` reads them):

* ``httpx_raw_s``: httpx streaming each series' WADO-RS retrieve (stored bytes) to nowhere;
* ``fetch_series_s``: ``DicomwebSource.fetch_series`` (adds multipart parsing and naming parts)
  into a sink that drops the bytes;
* ``blobstore_s``: ``BlobStore.open_instance`` of every instance in order, which downloads each
  series into the cache (adds writing the blob, waking readers, the commit with its fsync).

``measure_cod`` does the same for one COD series (``httpx_raw_s``: the tar object, with the
Range header dicomfs sends: from the first instance's bytes on; ``fetch_series_s``:
``CodSource.fetch_series``, which adds cutting the instances out of the tar and their CRC32C;
``blobstore_s`` as above, so it includes the first instance fetched alone),
plus the single-instance path of row 2 of ``bench/cod.py``: ``range_raw_s`` (httpx, one Range
GET of the instance), ``fetch_instance_s`` (``CodSource.fetch_instance``) and ``open_one_s``
(``BlobStore.open_instance`` of that instance on an empty cache: all the daemon does for the
``open()`` except FUSE); these three are medians of 5 tries, measured before the tar.

Uses only dicomfs' source and blob-store interfaces, the ones the daemon itself uses.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Awaitable, Collection
from pathlib import Path
from typing import Any

import httpx
import trio

from dicomfs.cache import BlobStore
from dicomfs.records import InstanceRecord, SeriesRecord
from dicomfs.sources.base import Credentials, Source
from dicomfs.sources.cod import CodSource
from dicomfs.sources.dicomweb import SERIES_ACCEPT, DicomwebSource
from dicomfs.sources.gcs import GcsBucket


class _Discard:
    """A SeriesSink that takes every instance and keeps nothing."""

    def wants(self, key: str) -> bool:
        return True

    def awaited(self) -> Collection[str]:
        return ()

    async def begin(self, key: str, size: int | None) -> _Discard:
        return self

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    async def finish(self) -> None:
        pass

    def arrived(self, size: int) -> None:
        pass

    def in_thread(self) -> _DiscardInThread:
        return _DiscardInThread()


class _DiscardInThread:
    """``_Discard`` for a retrieve running in a worker thread."""

    def wants(self, key: str) -> bool:
        return True

    def begin(self, key: str, size: int | None) -> _DiscardInThread:
        return self

    def write(self, data: bytes | memoryview) -> None:
        pass

    def finish(self) -> None:
        pass

    def arrived(self, size: int) -> None:
        pass

    def publish(self) -> None:
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

        out["blobstore_s"] = await _open_all(source, list(zip(series, instances, strict=True)), cache_dir)
        return out
    finally:
        await source.aclose()


async def _open_all(source: Source, work: list[tuple[SeriesRecord, list[InstanceRecord]]], cache_dir: Path) -> float:
    """Seconds to ``BlobStore.open_instance`` (and close) every instance, in order, on an empty cache."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    store = BlobStore(cache_dir, 1 << 40, source)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            started = time.perf_counter()
            for record, members in work:
                for instance in members:
                    (await store.open_instance(record, instance)).close()
            elapsed = time.perf_counter() - started
            nursery.cancel_scope.cancel()
        return elapsed
    finally:
        store.close()
        shutil.rmtree(cache_dir, ignore_errors=True)


async def _cod_stages(endpoint: str, bucket: str, prefix: str, study_uid: str, series_uid: str, tar_name: str,
                      probe: str, ranges: dict[str, tuple[int, int]], cache_dir: Path) -> dict[str, float]:
    gcs = GcsBucket(endpoint, bucket, Credentials())
    source = CodSource(gcs, prefix)
    try:
        record = next(s for s in await source.list_series(study_uid) if s.uid == series_uid)
        instances = sorted(await source.list_instances(record), key=lambda i: i.key)
        one = next(i for i in instances if i.key == probe)
        url = gcs.object_url(tar_name)
        probe_range, first = ranges[probe], min(start for start, _ in ranges.values())

        async def httpx_get(client: httpx.AsyncClient, start: int, end: str) -> None:
            async with client.stream("GET", url, headers={"Range": f"bytes={start}-{end}"}) as response:
                async for _ in response.aiter_raw():
                    pass

        # the single instance first (tries of a few ms: the median of 5), then the whole tar
        tries: dict[str, list[float]] = {}
        async with httpx.AsyncClient(timeout=60) as client:
            for _ in range(5):
                tries.setdefault("range_raw_s", []).append(await _seconds(
                    httpx_get(client, probe_range[0], str(probe_range[1] - 1))))
                tries.setdefault("fetch_instance_s", []).append(await _seconds(
                    source.fetch_instance(one, _Discard())))
                tries.setdefault("open_one_s", []).append(await _open_all(source, [(record, [one])], cache_dir))
            out = {name: statistics.median(values) for name, values in tries.items()}
            # the same request as dicomfs makes: from the first instance's bytes on
            out["httpx_raw_s"] = await _seconds(httpx_get(client, first, ""))
        out["fetch_series_s"] = await _seconds(source.fetch_series(record, _Discard()))
        out["blobstore_s"] = await _open_all(source, [(record, instances)], cache_dir)
        return out
    finally:
        await source.aclose()


async def _dimse_stages(source_text: str, study_uid: str, cache_dir: Path) -> dict[str, float]:
    from dicomfs.sources import open_source, parse_source

    source = open_source(parse_source(source_text), Credentials(), cache_dir.parent)
    try:
        series = sorted(await source.list_series(study_uid), key=lambda s: s.uid)
        instances = [sorted(await source.list_instances(s), key=lambda i: i.key) for s in series]
        started = time.perf_counter()
        for record in series:
            await source.fetch_series(record, _Discard())
        out = {"fetch_series_s": time.perf_counter() - started}
        out["blobstore_s"] = await _open_all(source, list(zip(series, instances, strict=True)), cache_dir)
        return out
    finally:
        await source.aclose()


async def _seconds(work: Awaitable[object]) -> float:
    started = time.perf_counter()
    await work
    return time.perf_counter() - started


def measure(dicomweb: str, study_uid: str, cache_dir: Path) -> dict[str, Any]:
    """One measurement of each stage, in seconds."""
    return trio.run(_stages, dicomweb, study_uid, cache_dir)


def measure_dimse(source: str, study_uid: str, cache_dir: Path) -> dict[str, float]:
    """One measurement of the DIMSE stages: ``fetch_series_s`` (``DimseSource.fetch_series`` of
    each series, C-GET, into a sink that drops the bytes) and ``blobstore_s`` (as for DICOMweb)."""
    return trio.run(_dimse_stages, source, study_uid, cache_dir)


def measure_cod(endpoint: str, bucket: str, prefix: str, study_uid: str, series_uid: str, tar_name: str,
                probe: str, ranges: dict[str, tuple[int, int]], cache_dir: Path) -> dict[str, float]:
    """One measurement of each COD stage, in seconds; ``ranges``: instance key -> [start, end) in the tar."""
    return trio.run(_cod_stages, endpoint, bucket, prefix, study_uid, series_uid, tar_name, probe, ranges, cache_dir)
