"""The Imaging Data Commons as a source: listings from the index, instances from S3 buckets.

Owns the IDC layout: a series is the objects ``<aws_bucket>/<crdc_series_uuid>/*.dcm``, one Part 10
file each. Studies and series come from the index (``index``: no network). A series' instances come
from one prefix listing (names and exact sizes) and a ranged read of each object's first bytes in a
worker thread, ``PARALLEL_HEADS`` at a time (its SOP Instance UID, by the one naming rule of
``uids.instance_key``, and the InstanceNumber and SOPClassUID the readable views name files by),
done once per object and kept in the source's work folder (objects under a series UUID never change:
a revised series gets a new UUID). A series' metadata (``MetadataSource``) is each object's header
read by ranges up to its pixel data, the same number at a time (the catalog stores it); where its
frames lie, by its own offset table, and any range of it, for a frame read alone (``FrameRangeReader``).
A series is fetched as its objects, ``PARALLEL_OBJECTS`` at a
time (in the bucket's order, but an instance a reader waits for is taken next), each read and hashed
in a worker thread and handed to the sink whole as soon as it is in, or, above ``WHOLE_AT_MOST``,
streamed into it (so memory holds at most ``PARALLEL_OBJECTS`` objects of that size); an object that
contradicts its listing is logged and left out: EIO for that file only; one that breaks off is
resumed by the blob store, the others go on); one instance opened alone is one GET, read, hashed and
written in a worker thread. Must not cache blobs (the blob store does) or know about views.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import cachetools
import diskcache
import trio

from dicomfs import frames, instancemeta
from dicomfs.breaker import is_outage
from dicomfs.errors import IntegrityError, NotFound, ProtocolError, SourceError, TransferBroken
from dicomfs.gcpause import paused
from dicomfs.p10check import Part10Check
from dicomfs.query import Term
from dicomfs.records import DicomJson, FrameTable, InstanceRecord, SeriesRecord, StudyRecord
from dicomfs.singleflight import SingleFlight
from dicomfs.sources.base import BlockingSink, SeriesSink
from dicomfs.sources.bucket import ObjectFile, ObjectInfo, read_range
from dicomfs.sources.http import DEFAULT_TIMEOUT
from dicomfs.sources.idc.index import IdcIndex, SeriesLocation
from dicomfs.sources.s3 import S3Bucket
from dicomfs.tasks import StopSignal, open_nursery, retrieve_limiter, run_stoppable
from dicomfs.uids import instance_key, is_uid

log = logging.getLogger(__name__)

IDC_REGION = "us-east-1"  # where IDC's public buckets are, whatever AWS_REGION says for the user's own
HEAD_BYTES = 16 * 1024  # where a Part 10 file names its SOP instance (group 0002, then 0008)
SOP_CLASS_UID, INSTANCE_NUMBER = 0x00080016, 0x00200013  # kept from the head, for names
PARALLEL_OBJECTS = 8  # objects of one series in flight at once
WHOLE_AT_MOST = 16 << 20  # a larger object is streamed into its series' blob, not read whole first
PART10_MINIMUM = 132 + 12  # preamble, DICM and one element: anything shorter is no DICOM file
PARALLEL_HEADS = 16
MAX_HEADER = 64 << 20  # bytes of an object read for its metadata or its offset table, at most
MAX_INSTANCES = 100_000
SERIES_READ_WITH_SEARCH = 20_000  # studies
SERIES_BATCH = 2_000  # studies whose series one scan of the index reads, beyond those (a scan: ~0.1 s however many)
Head = tuple[str, DicomJson]  # what an object's first bytes tell: its instance key, attributes for names
HEADS_KEPT = 32 << 20  # bytes of objects' first bytes kept from a listing, for their metadata and frame tables
HEAD_KEPT = 4 << 20  # bytes of an object's header kept for the check of its frame table, at most (else it reads them)
LOCATIONS_KEPT = 65_536  # series whose bucket prefix is remembered


class IdcSource:
    serves_files_in_place = False
    local_listings = True  # studies and series come from the index file (see ``Source``)
    narrows_by_series = True  # a search's series terms narrow its studies in the index (``StudySearcher``)

    def __init__(self, index: IdcIndex, work_dir: Path, *, endpoint: str | None = None, sign: bool = False,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.index = index
        self.description = f"idc ({index.release})"
        self._endpoint = endpoint
        self._sign = sign
        self._timeout = timeout
        self._buckets: dict[str, S3Bucket] = {}
        # (bounded: walking the whole index lists a million series; a miss asks the index again)
        self._locations: cachetools.LRUCache[str, SeriesLocation] = cachetools.LRUCache(LOCATIONS_KEPT)
        self._series_read: cachetools.LRUCache[str, list[tuple[SeriesRecord, SeriesLocation]]] = \
            cachetools.LRUCache(SERIES_READ_WITH_SEARCH)
        self._listed: cachetools.LRUCache[str, dict[str, tuple[ObjectInfo, DicomJson]]] = cachetools.LRUCache(256)
        self._heads = diskcache.Cache(str(work_dir / "idc-heads"))  # object -> what its header told (Head)
        # object -> its first HEAD_BYTES, as a listing read them: a series' metadata, asked for next,
        # starts from them instead of reading them again (a header of a few KB: no request at all)
        self._head_bytes: cachetools.LRUCache[str, bytes] = cachetools.LRUCache(HEADS_KEPT, getsizeof=len)
        self._limit = trio.CapacityLimiter(PARALLEL_HEADS)
        self._ranges = trio.CapacityLimiter(PARALLEL_HEADS)  # frame tables and tiles: not behind a listing's heads
        self._retrieves = retrieve_limiter()
        self._listings: SingleFlight[dict[str, tuple[ObjectInfo, DicomJson]]] = SingleFlight()
        self._searched: list[str] = []  # the studies of the last search, in order, and where each is
        self._searched_at: dict[str, int] = {}
        self._listing_order: list[str] = []  # the studies of the last whole listing, in order
        self._walk_next: int | None = None  # where in it a walk in its order (ls, find) goes next
        self._reading_series = trio.Lock()

    async def aclose(self) -> None:
        for bucket in self._buckets.values():
            await bucket.aclose()
        self._heads.close()
        self.index.close()

    def _bucket(self, name: str) -> S3Bucket:
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = S3Bucket(name, endpoint=self._endpoint, sign=self._sign,
                                                    timeout=self._timeout, region_name=IDC_REGION)
        return bucket

    def local_file(self, instance: InstanceRecord) -> Path | None:
        return None

    async def check(self) -> None:
        """The index is the listing: nothing to reach before the first retrieve."""

    async def root_notes(self) -> dict[str, str]:
        return {"VERSION.txt": await trio.to_thread.run_sync(self.index.version_text)}

    async def collection_notes(self, collection: str) -> dict[str, str]:
        text = await trio.to_thread.run_sync(self.index.license_text, collection)
        return {"LICENSE.txt": text} if text is not None else {}

    async def list_studies(self) -> list[StudyRecord]:
        studies, _ = await trio.to_thread.run_sync(paused, self.index.studies)  # (168,000 records)
        self._listing_order = [study.uid for study in studies]
        self._walk_next = None
        return studies

    async def search_studies(self, terms: Sequence[Term], narrowing: Sequence[Term] = ()
                             ) -> tuple[list[StudyRecord], list[Term]]:
        """The studies matching ``terms`` that have a series matching the index columns among
        ``narrowing``; the series of a search's studies are read with them, in one scan of the
        index (a search walks them next: one scan per study costs 0.1 s each)."""
        studies, unchecked = await trio.to_thread.run_sync(paused, self.index.studies, terms, narrowing)
        self._searched = [s.uid for s in studies]
        self._searched_at = {uid: n for n, uid in enumerate(self._searched)}
        if len(studies) <= SERIES_READ_WITH_SEARCH:
            self._series_read.update(await trio.to_thread.run_sync(self.index.series, self._searched))
        return studies, unchecked

    async def list_series(self, study_uid: str) -> list[SeriesRecord]:
        found = self._series_read.pop(study_uid, None)
        if found is None:
            async with self._reading_series:  # (callers at the same time: one batch read for them all)
                found = self._series_read.pop(study_uid, None)
                if found is None:
                    found = await self._read_series(study_uid)
        for record, location in found:
            self._locations[record.uid] = location
        return [record for record, _ in found]

    async def _read_series(self, study_uid: str) -> list[tuple[SeriesRecord, SeriesLocation]]:
        """The study's series, read with those of its block of ``SERIES_BATCH`` studies of the last
        search (which walks its studies next, several at a time in any order), in one scan of the
        index. Outside a search, a study asked for right after the one before it in the whole
        listing (``ls`` of every series, ``find``: 168,000 scans of 0.1 s otherwise) is read with
        the ``SERIES_BATCH`` studies after it; a study asked for out of that order, alone."""
        batch = [study_uid]
        at = self._searched_at.get(study_uid)
        if at is not None:  # its block, whatever the order the search walks them in
            start = at - at % SERIES_BATCH
            batch += [uid for uid in self._searched[start:start + SERIES_BATCH]
                      if uid in self._searched_at and uid != study_uid]
        else:
            batch += self._walk_ahead(study_uid)
        for uid in batch:  # (read once per search: asked again later, a study is read alone)
            self._searched_at.pop(uid, None)
        read = await trio.to_thread.run_sync(self._scan_series, batch, len(batch) == 1)
        found = read.pop(study_uid)
        self._series_read.update(read)
        return found

    def _walk_ahead(self, study_uid: str) -> list[str]:
        """The ``SERIES_BATCH`` studies after ``study_uid`` when a walk of the whole listing reached
        it in order (and the walk moved past them), else none."""
        at = self._walk_next
        if at is None or at >= len(self._listing_order) or self._listing_order[at] != study_uid:
            return []
        ahead = self._listing_order[at + 1:at + SERIES_BATCH]
        self._walk_next = at + 1 + len(ahead)
        return ahead

    def _scan_series(self, batch: list[str], alone: bool) -> dict[str, list[tuple[SeriesRecord, SeriesLocation]]]:
        """Blocking: one scan of the index for ``batch``'s series; for a study read ``alone``, the
        walk of the whole listing goes on after it (found here, off the event loop: 168,000 UIDs)."""
        read = self.index.series(batch)
        if alone:
            order = self._listing_order
            try:
                self._walk_next = order.index(batch[0]) + 1
            except ValueError:  # not in the whole listing (a search's study)
                self._walk_next = None
        return read

    async def _location(self, series: SeriesRecord) -> SeriesLocation:
        location = self._locations.get(series.uid)
        if location is None:
            location = await trio.to_thread.run_sync(self.index.series_location, series.uid)
            if location is None:
                raise NotFound(f"series {series.uid} is not in the IDC index")
            self._locations[series.uid] = location
        return location

    async def list_instances(self, series: SeriesRecord) -> list[InstanceRecord]:
        objects = await self._objects(series, fresh=True)
        return [InstanceRecord(series.study_uid, series.uid, key, size=info.size, attrs=dict(attrs))
                for key, (info, attrs) in objects.items()]

    async def _objects(self, series: SeriesRecord, fresh: bool = False) -> dict[str, tuple[ObjectInfo, DicomJson]]:
        """instance key -> its object and the attributes its header gave (InstanceNumber,
        SOPClassUID): the series' prefix listing, each object named by its header (read once,
        then remembered in the work folder). Callers at the same time share one listing (a
        prefetch lists a series and starts its retrieve together)."""
        known = self._listed.get(series.uid)
        if known is not None and not fresh:
            return known
        return await self._listings.run(series.uid, lambda: self._list_objects(series))

    async def _list_objects(self, series: SeriesRecord) -> dict[str, tuple[ObjectInfo, DicomJson]]:
        location = await self._location(series)
        bucket = self._bucket(location.bucket)
        _, found = await bucket.list(location.prefix, delimiter=None)
        listed = []
        for info in found:
            if not info.name.endswith(".dcm"):
                continue  # not an instance (IDC puts nothing else there)
            inside = info.name.startswith(location.prefix) and "/" not in info.name[len(location.prefix):]
            if not inside or info.size < PART10_MINIMUM:
                why = "not directly below the series' prefix" if not inside else f"{info.size} bytes, too short"
                log.warning("series %s: listed object %s/%s is %s: skipped", series.uid, location.bucket,
                            info.name[:200], why)
                continue
            listed.append(info)
        if len(listed) > MAX_INSTANCES:
            raise ProtocolError(f"series {series.uid}: {len(listed)} objects is implausibly many")

        def head_key(info: ObjectInfo) -> str:
            return _object_key(location.bucket, info)

        remembered = await trio.to_thread.run_sync(self._known_heads, [head_key(o) for o in listed])
        names = {o.name: remembered[head_key(o)] for o in listed if head_key(o) in remembered}
        read: dict[str, Head] = {}

        async def name(info: ObjectInfo) -> None:
            try:
                head, first = await self._read_head(bucket, info.name, info.size)
            except SourceError as exc:
                if is_outage(exc):
                    raise  # the bucket as a whole, not this object: the listing fails
                log.warning("object %s/%s cannot be read (%s): skipped", bucket.bucket, info.name, exc)
                return
            if head is not None:
                read[head_key(info)] = names[info.name] = head
                self._head_bytes[head_key(info)] = first

        async with open_nursery() as nursery:
            for info in listed:
                if info.name not in names:
                    nursery.start_soon(name, info)
        if read:
            await trio.to_thread.run_sync(self._remember_heads, read)
        objects: dict[str, tuple[ObjectInfo, DicomJson]] = {}
        for info in sorted(listed, key=lambda o: o.name):
            head = names.get(info.name)
            if head is None:
                continue
            key, attrs = head
            if key in objects:
                log.warning("series %s: two objects hold instance %s (%s, %s): the first is served", series.uid,
                            key, objects[key][0].name, info.name)
                continue
            objects[key] = (info, attrs)
        if len(objects) != location.instances:
            log.info("series %s: the index counts %d instances, the bucket holds %d", series.uid,
                     location.instances, len(objects))
        self._listed[series.uid] = objects
        return objects

    def _known_heads(self, keys: list[str]) -> dict[str, Head]:
        """What the headers read before gave, by object (blocking)."""
        found: dict[str, Head] = {}
        for key in keys:
            value = self._heads.get(key)
            if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) \
                    and isinstance(value[1], dict):
                found[key] = value
        return found

    def _remember_heads(self, read: dict[str, Head]) -> None:
        with self._heads.transact():  # one transaction for a series (blocking)
            for key, value in read.items():
                self._heads.set(key, value)

    async def _read_head(self, bucket: S3Bucket, name: str, size: int) -> tuple[Head | None, bytes]:
        """The instance key of one object, and the attributes for names (``head_attrs``), from
        its first bytes, read in a worker thread (``_head_in_thread``); None (logged) if it is not
        DICOM. And those bytes."""
        return await run_stoppable(partial(_head_in_thread, bucket, name, size), limiter=self._limit)

    async def series_metadata(self, series: SeriesRecord) -> dict[str, DicomJson]:
        """Every instance's DICOM JSON from its object's header, read by ranges up to the pixel data
        (``instancemeta.header_metadata``), ``PARALLEL_HEADS`` objects at a time: a series'
        metadata without its bytes (a slide's levels are gigabytes; their headers a few KB each).
        An object whose header cannot be read is left out, with a log line; an outage of the
        bucket fails the whole."""
        location = await self._location(series)
        bucket = self._bucket(location.bucket)
        found: dict[str, DicomJson] = {}

        async def read(key: str, info: ObjectInfo) -> None:
            first = self._head_bytes.get(_object_key(location.bucket, info), b"")
            try:
                found[key] = await run_stoppable(partial(_metadata_in_thread, bucket, info, first), limiter=self._limit)
            except SourceError as exc:
                if is_outage(exc):
                    raise
                log.warning("object %s/%s: its metadata cannot be read (%s): left out", bucket.bucket, info.name, exc)

        async with open_nursery() as nursery:
            for key, (info, _) in (await self._objects(series)).items():
                nursery.start_soon(read, key, info)
        return found

    async def frame_table(self, instance: InstanceRecord) -> FrameTable | None:
        """Where the instance's frames lie by its own offset table (``frames.own_frame_table``),
        read by ranges up to its first frame: the index has no table of its own to give."""
        bucket, info = await self._object(instance)
        first = self._head_bytes.get(_object_key(bucket.bucket, info), b"")
        return await run_stoppable(partial(_frame_table_in_thread, bucket, info, first), limiter=self._ranges)

    async def read_instance_range(self, instance: InstanceRecord, offset: int, length: int) -> bytes:
        """``length`` bytes of the instance's object from ``offset``: one Range request, in a worker
        thread. Not checked by its MD5 (which covers the whole object): the caller checks it."""
        bucket, info = await self._object(instance)
        if offset < 0 or length < 0 or offset + length > info.size:
            raise ProtocolError(f"bytes {offset}-{offset + length} are not within instance {instance.key} "
                                f"({info.size} bytes)")
        return await run_stoppable(partial(read_range, bucket, info.name, offset, offset + length),
                                   limiter=self._ranges)

    async def _object(self, instance: InstanceRecord) -> tuple[S3Bucket, ObjectInfo]:
        series = SeriesRecord(instance.study_uid, instance.series_uid)
        location = await self._location(series)
        objects = await self._objects(series)
        if instance.key not in objects:
            raise NotFound(f"instance {instance.key} is no longer in its series' bucket prefix")
        return self._bucket(location.bucket), objects[instance.key][0]

    # --- bytes ----------------------------------------------------------------------------------
    async def fetch_series(self, series: SeriesRecord, sink: SeriesSink) -> None:
        location = await self._location(series)
        bucket = self._bucket(location.bucket)
        objects = await self._objects(series)
        # in the bucket's order, but an instance a reader is waiting for is taken next
        pending = {key: info for key, (info, _) in sorted(objects.items(), key=lambda kv: kv[1][0].name)
                   if sink.wants(key)}
        writing = trio.Lock()
        broken: list[TransferBroken] = []

        def next_object() -> tuple[str, ObjectInfo] | None:
            for key in sink.awaited():
                info = pending.pop(key, None)
                if info is not None:
                    return key, info
            if not pending:
                return None
            key = next(iter(pending))
            return key, pending.pop(key)

        async def reader() -> None:
            while (taken := next_object()) is not None:
                key, info = taken
                try:
                    if info.size > WHOLE_AT_MOST:
                        # streamed into the blob as it comes, in a worker thread (not held whole:
                        # slide microscopy objects run to gigabytes); the sink takes it alone
                        async with writing:
                            await run_stoppable(partial(_whole_in_thread, bucket, info, key, sink.in_thread(),
                                                        arrived=_told_on_the_loop(sink)), limiter=self._retrieves)
                        continue
                    body = await _whole(bucket, info, sink, self._retrieves)
                except (IntegrityError, ProtocolError) as exc:
                    # this object is not what its listing says: EIO for its file, the rest is served
                    log.error("series %s: instance %s is not served: %s", series.uid, key, exc)
                    continue
                except TransferBroken as exc:  # the others go on; the blob store resumes this one
                    broken.append(exc)
                    continue
                async with writing:  # a sink takes one member at a time (and a reader holds one body)
                    await _deliver(sink, key, body)

        async with open_nursery() as nursery:
            for _ in range(min(PARALLEL_OBJECTS, len(pending))):
                nursery.start_soon(reader)
        if broken:
            raise TransferBroken(f"{len(broken)} of the series' objects broke off (first: {broken[0]})")

    async def fetch_instance(self, instance: InstanceRecord, sink: SeriesSink) -> None:
        """One object, read, checked and written in a worker thread (``_whole_in_thread``)."""
        bucket, info = await self._object(instance)
        await run_stoppable(partial(_whole_in_thread, bucket, info, instance.key, sink.in_thread()),
                            limiter=self._retrieves)


def _object_key(bucket: str, info: ObjectInfo) -> str:
    """An object as it is now: its bucket, name, size and ETag (a header read is true of it)."""
    return f"{bucket}/{info.name}:{info.size}:{info.etag}"


def _head_in_thread(bucket: S3Bucket, name: str, size: int, stop: StopSignal) -> tuple[Head | None, bytes]:
    """``IdcSource._read_head``'s blocking part (urllib3): what the object's first ``HEAD_BYTES``
    name, and those bytes."""
    check = Part10Check(keep=(SOP_CLASS_UID, INSTANCE_NUMBER))
    head = bytearray()
    try:
        with bucket.stream_in_thread(name, 0, min(size, HEAD_BYTES), stop) as chunks:
            for chunk in chunks:
                head += chunk
                if len(head) >= HEAD_BYTES:
                    break
        check.feed(bytes(head[:HEAD_BYTES]))
    except ProtocolError as exc:
        if check.meta is None:
            log.warning("object %s/%s is not a DICOM Part 10 file (%s): skipped", bucket.bucket, name, exc)
            return None, b""
    if check.meta is None:
        log.warning("object %s/%s has no complete DICOM file meta in its first %d bytes: skipped", bucket.bucket,
                    name, HEAD_BYTES)
        return None, b""
    key = instance_key(check.dataset_uid, check.meta.sop_instance_uid)
    if key is None:
        log.warning("object %s/%s names no valid SOP Instance UID: skipped", bucket.bucket, name)
        return None, b""
    return (key, head_attrs(check.values)), bytes(head[:HEAD_BYTES])



def _metadata_in_thread(bucket: S3Bucket, info: ObjectInfo, first: bytes, stop: StopSignal) -> DicomJson:
    """``IdcSource.series_metadata``'s blocking part for one object (pydicom over ranged reads,
    from ``first``, its first bytes if a listing kept them)."""
    return instancemeta.header_metadata(ObjectFile(bucket, info.name, info.size, stop, first_block=HEAD_BYTES,
                                                   limit=MAX_HEADER, first=first),
                                        f"object {bucket.bucket}/{info.name}")


def _frame_table_in_thread(bucket: S3Bucket, info: ObjectInfo, first: bytes, stop: StopSignal) -> FrameTable | None:
    """``IdcSource.frame_table``'s blocking part for one object (pydicom over ranged reads, from
    ``first`` as ``_metadata_in_thread``), with the bytes read from its start (the check of the
    table needs them up to the first frame)."""
    file = ObjectFile(bucket, info.name, info.size, stop, first_block=HEAD_BYTES, limit=MAX_HEADER,
                      keep_head=HEAD_KEPT, first=first)
    table = frames.own_frame_table(file, info.size)
    return None if table is None else dataclasses.replace(table, head=file.head)


async def _deliver(sink: SeriesSink, key: str, body: bytearray) -> None:
    """One whole object to the sink as the instance ``key`` (its size checked by ``_whole``)."""
    writer = await sink.begin(key, len(body))
    await writer.write(body)
    await writer.finish()


def head_attrs(values: Mapping[int, bytes]) -> DicomJson:
    """InstanceNumber and SOPClassUID, for the readable views' names, from the values a
    ``Part10Check`` kept from a Part 10 file's first bytes (none of what is missing or unreadable)."""
    attrs: DicomJson = {}
    number = values.get(INSTANCE_NUMBER, b"").strip(b"\0 ").decode("ascii", "replace")
    if number:
        try:
            attrs["00200013"] = {"vr": "IS", "Value": [int(number)]}
        except ValueError:  # not an integer string (or several values)
            pass
    sop_class = values.get(SOP_CLASS_UID, b"").rstrip(b"\0 ").decode("ascii", "replace")
    if is_uid(sop_class):
        attrs["00080016"] = {"vr": "UI", "Value": [sop_class]}
    return attrs


async def _whole(bucket: S3Bucket, info: ObjectInfo, sink: SeriesSink,
                 limiter: trio.CapacityLimiter) -> bytearray:
    """One object, read in a worker thread of ``limiter`` (``_read_checked``; each read's progress
    handed to the event loop), whole."""
    body = bytearray()
    await run_stoppable(partial(_read_checked, bucket, info, body.extend, _told_on_the_loop(sink)),
                        limiter=limiter)
    return body  # (the sink's writer keeps it until written: nothing changes it after this)


def _told_on_the_loop(sink: SeriesSink) -> Callable[[int], object]:
    """``sink.arrived`` for a worker thread of one of several readers: run on the event loop, so
    the download's progress counters keep one writer. (Made on the loop.)"""
    loop = trio.lowlevel.current_trio_token()
    return lambda size: loop.run_sync_soon(sink.arrived, size)


def _whole_in_thread(bucket: S3Bucket, info: ObjectInfo, key: str, sink: BlockingSink, stop: StopSignal, *,
                     arrived: Callable[[int], object] | None = None) -> None:
    """One object (read alone, or too large to hold whole), in a worker thread
    (``run_stoppable``): its bytes go to the instance's writer as they come, and the instance is
    finished only once ``_read_checked`` has checked them (an object that fails is never
    readable; what it wrote is overwritten by the next member or cut off at the commit)."""
    writer = sink.begin(key, info.size)
    try:
        _read_checked(bucket, info, writer.write, arrived or sink.arrived, stop)
        writer.finish()
    finally:
        sink.publish()


def _read_checked(bucket: S3Bucket, info: ObjectInfo, take: Callable[[bytes], object],
                  arrived: Callable[[int], object], stop: StopSignal) -> None:
    """Blocking (urllib3, large reads): every piece of one object to ``take`` as it comes (its size
    to ``arrived``), checked against the object's listed size and, where its ETag is the MD5 of its
    bytes (an object uploaded in one part, not encrypted with a KMS or customer key), against
    that, hashed on the way."""
    md5 = hashlib.md5(usedforsecurity=False) if _etag_md5(info) is not None else None
    length = 0
    with bucket.stream_in_thread(info.name, 0, None, stop) as chunks:
        if md5 is not None and not etag_is_md5(chunks.headers):
            md5 = None
        for chunk in chunks:
            arrived(len(chunk))
            length += len(chunk)
            _check_length(info, length)
            if md5 is not None:
                md5.update(chunk)
            take(chunk)
    _check_length(info, length, whole=True)
    if md5 is not None:
        _check_md5(info, md5.hexdigest())


def etag_is_md5(headers: Mapping[str, str]) -> bool:
    """False when an object's answer says its ETag is not the MD5 of its bytes whatever it looks
    like: objects encrypted with a KMS key or a customer's key (S3's SSE-KMS, DSSE-KMS, SSE-C)."""
    encryption = (headers.get("x-amz-server-side-encryption") or "").strip().lower()
    return not encryption.startswith("aws:kms") and not headers.get("x-amz-server-side-encryption-customer-algorithm")


def _etag_md5(info: ObjectInfo) -> str | None:
    """The object's MD5 as its listed ETag gives it (an object uploaded in one part), or None.
    Whether the object's answer rules that out (a KMS or customer key) is ``etag_is_md5``'s."""
    etag = (info.etag or "").lower()
    return etag if len(etag) == 32 and all(c in "0123456789abcdef" for c in etag) else None


def _check_length(info: ObjectInfo, length: int, whole: bool = False) -> None:
    """Raise unless ``length`` bytes may (``whole``: do) make the object its listing sizes."""
    if length > info.size:
        raise IntegrityError(f"object {info.name} is longer than its listed size {info.size}")
    if whole and length != info.size:
        raise IntegrityError(f"object {info.name} is {length} bytes, not its listed {info.size}")


def _check_md5(info: ObjectInfo, digest: str) -> None:
    if digest != _etag_md5(info):
        raise IntegrityError(f"object {info.name}: its bytes do not match its ETag (MD5)")
