"""Cloud Optimized DICOM (COD) bucket source: series tars plus a metadata.json index each.

Owns the bucket layout (``<prefix>/studies/<St>/series/<Se>.tar`` and
``<Se>/metadata.json``), turning the index into records with exact sizes, and delivering
instance bytes from the tar: the whole tar in one GET, or one instance by a Range request, read
and cut in a worker thread (``bucket.stream_in_thread``, ``SeriesSink.in_thread``).
Every instance is checked against its size and CRC32C before it reaches the sink. Also the
index's frame tables and any range of an instance as stored (``FrameRangeReader``), which the
caller checks (``frames.check_frame_table``): a CRC32C covers a whole instance only.
The bucket is any object store (``bucket.Bucket``: GCS, S3). Must not cache blobs (the blob
store does), decide when to fetch a range or the whole tar, or know which store it reads.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cachetools
import google_crc32c
import trio

from dicomfs.errors import IntegrityError, NotFound, ProtocolError, TransferBroken
from dicomfs.records import DicomJson, FrameTable, InstanceRecord, SeriesRecord, StudyRecord
from dicomfs.singleflight import SingleFlight
from dicomfs.sources.base import BlockingMemberWriter, BlockingSink, SeriesSink
from dicomfs.sources.bucket import Bucket, ObjectInfo, read_range
from dicomfs.sources.cod_metadata import (
    MAX_METADATA_BYTES,
    CodInstance,
    CodSeries,
    parse_series_index,
)
from dicomfs.tasks import StopSignal, retrieve_limiter, run_stoppable
from dicomfs.uids import is_key

log = logging.getLogger(__name__)

PARALLEL_RANGES = 16  # ranges of instances (frames read alone) read at once


@dataclass(frozen=True)
class SeriesObjects:
    tar: ObjectInfo | None
    has_index: bool
    damaged: bool


class CodSource:
    """A COD datastore ``<prefix>`` in a bucket (GCS ``gs://``, S3 ``s3://``)."""

    serves_files_in_place = False

    def __init__(self, bucket: Bucket, prefix: str) -> None:
        self.prefix = prefix.strip("/")
        self.description = f"{bucket.description}/{self.prefix}"
        self.bucket = bucket
        self._objects: dict[tuple[str, str], SeriesObjects] = {}
        self._indexes: cachetools.LRUCache[tuple[str, str], CodSeries] = cachetools.LRUCache(64)
        self._flights: SingleFlight[CodSeries] = SingleFlight()
        self._retrieves = retrieve_limiter()
        self._ranges = trio.CapacityLimiter(PARALLEL_RANGES)  # (threads of their own: not disk work's)

    async def aclose(self) -> None:
        await self.bucket.aclose()

    def _path(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    async def check(self) -> None:
        await self.bucket.list(self._path("studies") + "/", max_pages=1)

    async def list_studies(self) -> list[StudyRecord]:
        base = self._path("studies") + "/"
        prefixes, _ = await self.bucket.list(base)
        return [StudyRecord(key) for key in _children(prefixes, base, "study")]

    async def list_series(self, study_uid: str) -> list[SeriesRecord]:
        base = self._path("studies", study_uid, "series") + "/"
        _, objects = await self.bucket.list(base, delimiter=None)
        found: dict[str, dict[str, ObjectInfo]] = {}
        for info in objects:
            rest = info.name[len(base):]
            if rest.endswith(".tar") and "/" not in rest:
                found.setdefault(rest[:-4], {})["tar"] = info
            elif rest.count("/") == 1:
                series, name = rest.split("/")
                found.setdefault(series, {})[name] = info
        records = []
        for series_key, parts in sorted(found.items()):
            if not is_key(series_key):
                log.warning("bucket lists a series with an unsafe name %r: skipped", series_key[:80])
                continue
            objects_ = SeriesObjects(parts.get("tar"), "metadata.json" in parts, "error.log" in parts)
            if objects_.tar is None or not objects_.has_index:
                log.warning("series %s in %s has no %s: skipped", series_key, self.description,
                            "tar" if objects_.tar is None else "metadata.json")
                continue
            if objects_.damaged:
                log.warning("series %s in %s is damaged (it has an error.log)", series_key, self.description)
            self._objects[(study_uid, series_key)] = objects_
            records.append(SeriesRecord(study_uid, series_key))
        return records

    async def list_instances(self, series: SeriesRecord) -> list[InstanceRecord]:
        index = await self._index(series)
        return [InstanceRecord(series.study_uid, series.uid, i.key, size=i.size, crc32c=i.crc32c,
                               mtime_ns=i.mtime_ns, attrs=i.metadata) for i in index.instances.values()]

    async def series_metadata(self, series: SeriesRecord) -> dict[str, DicomJson]:
        index = await self._index(series)
        return {key: entry.metadata for key, entry in index.instances.items()}

    def local_file(self, instance: InstanceRecord) -> Path | None:
        return None

    # --- the series index ---------------------------------------------------------------------
    async def _series_objects(self, series: SeriesRecord) -> SeriesObjects:
        known = self._objects.get((series.study_uid, series.uid))
        if known is None:
            await self.list_series(series.study_uid)  # after a remount the catalog skipped this
            known = self._objects.get((series.study_uid, series.uid))
        if known is None or known.tar is None:
            raise NotFound(f"series {series.uid} is no longer in {self.description}")
        return known

    async def _index(self, series: SeriesRecord) -> CodSeries:
        cached = self._indexes.get((series.study_uid, series.uid))
        if cached is not None:
            return cached

        async def load() -> CodSeries:
            objects = await self._series_objects(series)
            assert objects.tar is not None
            raw = await self.bucket.read(self._path("studies", series.study_uid, "series", series.uid,
                                                    "metadata.json"), MAX_METADATA_BYTES)
            index = parse_series_index(raw, objects.tar.size)
            self._indexes[(series.study_uid, series.uid)] = index
            return index

        return await self._flights.run((series.study_uid, series.uid), load)

    def _tar_name(self, series: SeriesRecord) -> str:
        return self._path("studies", series.study_uid, "series", f"{series.uid}.tar")

    # --- bytes ----------------------------------------------------------------------------------
    async def fetch_series(self, series: SeriesRecord, sink: SeriesSink) -> None:
        """The whole tar in one GET (from the first instance still wanted, after a break), read
        and cut in a worker thread."""
        index = await self._index(series)
        wanted = sorted((i for i in index.instances.values() if sink.wants(i.key)), key=lambda i: i.start)
        if not wanted:
            return
        await run_stoppable(partial(self._cut, self._tar_name(series), wanted, None, sink.in_thread()),
                            limiter=self._retrieves)

    async def fetch_instance(self, instance: InstanceRecord, sink: SeriesSink) -> None:
        """One instance by a Range request, read in a worker thread."""
        series, entry = await self._entry(instance)
        if not await run_stoppable(partial(self._cut, self._tar_name(series), [entry], entry.end, sink.in_thread()),
                                   limiter=self._retrieves):
            raise IntegrityError(f"instance {entry.key} failed its CRC32C check")

    async def frame_table(self, instance: InstanceRecord) -> FrameTable | None:
        """The index's offset table of the instance (``offset_tables``), as the writer put it."""
        _, entry = await self._entry(instance)
        if not entry.frame_offsets:
            return None
        offsets, lengths = zip(*entry.frame_offsets, strict=True)
        return FrameTable(offsets, lengths, entry.size)

    async def read_instance_range(self, instance: InstanceRecord, offset: int, length: int) -> bytes:
        """``length`` bytes of the instance from ``offset``: one Range request into the tar, read
        in a worker thread. Not checked by CRC32C (the index has one for the whole instance only):
        the caller checks what it reads (``frames.check_frame_table``)."""
        series, entry = await self._entry(instance)
        if offset < 0 or length < 0 or offset + length > entry.size:
            raise ProtocolError(f"bytes {offset}-{offset + length} are not within instance {entry.key} "
                                f"({entry.size} bytes)")
        start = entry.start + offset
        return await run_stoppable(partial(read_range, self.bucket, self._tar_name(series), start, start + length),
                                   limiter=self._ranges)

    async def _entry(self, instance: InstanceRecord) -> tuple[SeriesRecord, CodInstance]:
        series = SeriesRecord(instance.study_uid, instance.series_uid)
        entry = (await self._index(series)).instances.get(instance.key)
        if entry is None:
            raise NotFound(f"instance {instance.key} is not in its series index")
        return series, entry

    def _cut(self, tar: str, entries: list[CodInstance], end: int | None, sink: BlockingSink,
             stop: StopSignal) -> bool:
        try:
            with self.bucket.stream_in_thread(tar, entries[0].start, end, stop) as chunks:
                return _route(chunks, entries[0].start, entries, sink)
        finally:
            sink.publish()  # whatever was finished, also when the tar broke off: a resume skips it


class _Member:
    """One instance being cut out of the tar stream, with its running CRC32C."""

    def __init__(self, entry: CodInstance, writer: BlockingMemberWriter) -> None:
        self.entry = entry
        self.writer = writer
        self.crc = 0  # CRC32C of the bytes received so far
        self.received = 0


def _route(chunks: Iterable[bytes], position: int, entries: list[CodInstance], sink: BlockingSink) -> bool:
    """Cut ``entries`` (sorted by start) out of a byte stream that begins at ``position``.

    Instances whose CRC32C does not match are logged and not finished (so never served).
    Returns False if any instance was rejected; raises TransferBroken if the stream ends early.
    """
    pending = deque(entries)
    current: _Member | None = None
    all_good = True
    for chunk in chunks:
        sink.arrived(len(chunk))
        view = memoryview(chunk)
        while view:
            if current is None:
                if not pending:
                    sink.publish()
                    return all_good  # the rest of the tar is not ours to read
                entry = pending[0]
                if position < entry.start:  # tar headers and padding between instances
                    skip = min(entry.start - position, len(view))
                    view = view[skip:]
                    position += skip
                    continue
                if position > entry.start:
                    raise ProtocolError("COD byte ranges overlap or are out of order")
                pending.popleft()
                current = _Member(entry, sink.begin(entry.key, entry.size))
            need = current.entry.size - current.received
            piece = bytes(view[:need])
            view = view[len(piece):]
            position += len(piece)
            current.received += len(piece)
            current.crc = google_crc32c.extend(current.crc, piece)
            current.writer.write(piece)
            if current.received == current.entry.size:
                if _crc_ok(current):
                    current.writer.finish()
                else:
                    all_good = False
                current = None
        sink.publish()
    if current is not None or pending:
        raise TransferBroken("the tar ended before the instances its index names")
    return all_good


def _crc_ok(member: _Member) -> bool:
    expected = member.entry.crc32c
    if expected is None:
        return True
    actual = member.crc
    if actual != expected:
        log.error("instance %s: CRC32C mismatch (index %08x, bytes %08x): not served", member.entry.key,
                  expected, actual)
        return False
    return True


def _children(prefixes: list[str], base: str, level: str) -> list[str]:
    keys = []
    for prefix in prefixes:
        key = prefix[len(base):].rstrip("/") if prefix.startswith(base) else ""
        if is_key(key):
            keys.append(key)
        else:
            log.warning("bucket lists a %s with an unsafe name %r: skipped", level, key[:80])
    return sorted(set(keys))
