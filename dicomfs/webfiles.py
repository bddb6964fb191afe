"""The bytes of every file in the static DICOMweb tree, and their exact sizes.

Owns rendering: QIDO index files and metadata from the catalog's listings and the archive's
metadata (never from series blobs, except for an archive without a metadata service, DIMSE,
whose series metadata is read from the headers of its retrieved instances), frames and bulk
data cut from the instance bytes the blob store serves (or a frame of a large instance read
alone from an archive that says where it lies, once that is checked, until every frame of the
instance is plainly wanted: then it is read whole, once), and the memory caches of rendered files.
A rendered file is a pure function of its inputs (``dicomjson`` encodes deterministically), so a
size, once told, stays true; a frame size announced from the metadata (native data) is checked
against the frame actually cut, and a mismatch is an error for that read, never a short or long
file. Must not know FUSE or the layout's names (``webtree`` does).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import cachetools
import trio

from dicomfs import clock, dicomjson, frames, instancemeta
from dicomfs.cache import BlobStore, InstanceHandle
from dicomfs.catalog import Catalog
from dicomfs.errors import DicomfsError, IntegrityError, NotFound, ProtocolError
from dicomfs.gcpause import paused, release_free_memory
from dicomfs.records import DicomJson, FrameTable, InstanceRecord, SeriesRecord, StudyRecord, json_value
from dicomfs.singleflight import SingleFlight
from dicomfs.sources.base import FrameRangeReader, MetadataSource
from dicomfs.summary import Summaries
from dicomfs.tasks import StopSignal, map_bounded, open_nursery, run_stoppable
from dicomfs.uids import is_key
from dicomfs.webtree import LISTING_FILES, MAX_FRAMES, WebKind, WebNode

log = logging.getLogger(__name__)

T = TypeVar("T")
LISTING_MEMORY = 128 << 20  # bytes of rendered index and series metadata files kept
FILE_MEMORY = 128 << 20  # bytes of rendered frames, bulk data and instance metadata kept
KNOWN_SIZES = 1_000_000
SERIES_JSON_MEMORY = 64 << 20  # bytes of canonical series metadata kept (a 1,500-instance CT series: ~9 MB)
INSTANCE_JSON_OVERHEAD = 300  # bytes an InstanceJson takes beyond its JSON (the object, its key)
PARALLEL = 8
FRAME_MAP_FRAGMENTS = frames.MAX_FRAGMENTS  # where fragments lie, remembered for all instances (~64 MB)
HOLD_SLACK = 1.0  # seconds a told size is held beyond the kernel's timeout (reply latency)
PARALLEL_CUTS = 2  # instances whose frames are being found at once (each is held in memory whole, or read through)
STREAM_CUT = 32 << 20  # bytes of an instance beyond which its frames are found without holding it whole
MAX_WHOLE_CUT = 512 << 20  # bytes of an instance cut in memory all the same (not stored as served): ~4 times that
READ_CHUNK = 8 << 20  # bytes of one read when a whole instance is read
RANGE_FRAMES_FROM = 8 << 20  # bytes of an uncached instance from which a frame is read alone (archive permitting)
MAX_RANGE_PREFIX = 64 << 20  # bytes before the first frame read to check the archive's offset table
READ_AHEAD_FRAME = 16 << 20  # bytes of a frame read while its instance's offset table is being checked, at most
IN_TURN = 32  # frames of an uncached instance asked for one after another (ls -l, cp -r) from which it is read whole
EVERY_FRAME_FOR = 5.0  # seconds after its frames/ is listed in which a second frame asked for reads an instance whole
TURNS_KEPT = 4096  # instances whose last frame asked for is remembered for that
ALL = ("all",)  # includefield=all: every attribute a QIDO object's source has
Include = tuple[str, ...]  # tags a QIDO object carries beyond its level's (or ALL)


@dataclass(frozen=True)
class InstanceJson:
    """One instance's canonical metadata as encoded JSON (a 1,500-instance series of CT headers
    is ~9 MB so, 300 MB as Python objects), with what the layout asks of it. Not compressed: a
    zlib call per instance cost 16 ms of a 1,500-instance series' first metadata request (each
    call sets up its own compressor for 1 KB) and a decompression per instance on every render;
    the memory it kept is bounded instead (``SERIES_JSON_MEMORY``)."""

    data: bytes  # the canonical JSON object (orjson, compact)
    frames: int  # frames of pixel data (0: none)
    native_frame_file: int | None  # exact size of a frame file when the metadata tells it
    bulk: tuple[str, ...]  # tag paths of its non-pixel bulk data
    transfer_syntax: str | None = None  # as stored (AvailableTransferSyntaxUID), when the metadata says

    def json(self) -> bytes:
        return self.data


@dataclass(frozen=True)
class SeriesJson:
    """A series' metadata in canonical form."""

    instances: dict[str, InstanceJson]  # instance key -> its metadata

    @functools.cached_property
    def size(self) -> int:
        """Bytes it takes in memory (roughly: its JSON and a fixed cost per instance)."""
        return sum(len(i.data) + INSTANCE_JSON_OVERHEAD for i in self.instances.values())

    @functools.cached_property
    def bulk(self) -> dict[str, list[str]]:
        return {key: list(i.bulk) for key, i in self.instances.items() if i.bulk}


@dataclass(frozen=True)
class _FrameMap:
    """Where an instance's frames lie in its bytes, and the transfer syntax they announce."""

    transfer_syntax: str
    pieces: frames.FrameRanges
    length: int  # of the instance the ranges are in: a copy fetched again must be the same size


@dataclass(frozen=True)
class _RangedFrames:
    """An instance whose frames are read alone from the archive: where its table places them
    (checked, ``frames.check_frame_table``), and the transfer syntax they announce."""

    transfer_syntax: str
    offsets: array[int]  # (arrays: 16 bytes a frame, where the table's tuples of ints take ~70)
    lengths: array[int]


_NOT_RANGED = "cut"  # remembered for an instance whose frames are cut from its bytes, not read alone


@dataclass
class _Listing:
    """A rendered listing file, and who may still count on its size."""

    data: bytes
    rendered: float  # clock.now()
    held_until: float = 0.0  # the kernel may trust the size it was told until then
    readers: int = 0  # open files reading these bytes


class WebFiles:
    def __init__(self, catalog: Catalog, blobs: BlobStore,
                 studies: Callable[[], Awaitable[dict[str, StudyRecord]]] | None = None) -> None:
        """``studies``: the studies the tree shows (default: the catalog's, as the mount shows)."""
        self.catalog = catalog
        self.blobs = blobs
        self.studies = studies or catalog.studies
        self.ttl = catalog.listing_ttl
        self.summaries = Summaries(catalog)
        self._listings: cachetools.LRUCache[WebNode, _Listing] = cachetools.LRUCache(
            LISTING_MEMORY, getsizeof=lambda entry: len(entry.data))
        # Listing files whose size the kernel may hold, or that open files read: outside the LRU,
        # so that neither its size limit nor its evictions can change what a reader gets.
        self._held: dict[WebNode, _Listing] = {}
        self._next_prune = 0.0
        self._files: cachetools.LRUCache[WebNode, bytes] = cachetools.LRUCache(FILE_MEMORY, getsizeof=len)
        self._sizes: cachetools.LRUCache[WebNode, int] = cachetools.LRUCache(KNOWN_SIZES)
        self._series_json: cachetools.TTLCache[str, SeriesJson] = cachetools.TTLCache(
            SERIES_JSON_MEMORY, catalog.metadata_ttl, timer=clock.now, getsizeof=lambda series: series.size)
        self._flights: SingleFlight[Any] = SingleFlight()
        # two levels, so that a study's task waiting for its series' tasks never starves them
        self._study_limit = trio.CapacityLimiter(PARALLEL)
        self._series_limit = trio.CapacityLimiter(PARALLEL)
        self._cut_limit = trio.CapacityLimiter(PARALLEL_CUTS)
        self._range_checks = trio.CapacityLimiter(PARALLEL_CUTS)  # (each holds up to MAX_RANGE_PREFIX)
        self._frame_maps: cachetools.LRUCache[tuple[str, str], _FrameMap] = cachetools.LRUCache(
            FRAME_MAP_FRAGMENTS, getsizeof=lambda frame_map: frame_map.pieces.fragments)
        self._ranged: cachetools.LRUCache[tuple[str, str], _RangedFrames | str] = cachetools.LRUCache(
            FRAME_MAP_FRAGMENTS, getsizeof=lambda r: len(r.offsets) if isinstance(r, _RangedFrames) else 1)
        # (frame, run, wanted) of each instance: its last frame asked for, how many before it in
        # turn, and when every frame of it was said to be wanted (``every_frame_wanted``), if so
        self._turns: cachetools.LRUCache[tuple[str, str], tuple[int, int, float | None]] = \
            cachetools.LRUCache(TURNS_KEPT)
        # tables read from the archive whose check is under way (``_first_frames_alone``)
        self._tables: cachetools.LRUCache[tuple[str, str], FrameTable] = cachetools.LRUCache(
            2 * MAX_RANGE_PREFIX, getsizeof=lambda table: len(table.head) + 16 * len(table.offsets) + 1)

    # --- sizes ------------------------------------------------------------------------------------
    def known_size(self, node: WebNode) -> int | None:
        """The size if it is known without any I/O (rendered before, or remembered).

        A listing file's size is told while an open file reads it (the size of those bytes) or
        while its rendering is younger than the listing TTL; the bytes told are then held for as
        long as the kernel may trust that size, and are what the next ``open`` reads.
        """
        if node.kind in LISTING_FILES:
            now = clock.now()
            held = self._held.get(node)
            if held is not None and held.readers > 0:
                return self._tell(node, held, now)
            fresh = self._fresh(node, now)
            return self._tell(node, fresh, now) if fresh is not None else None
        data = self._files.get(node)
        if data is not None:
            return len(data)
        if node.kind is WebKind.FRAME and node.series is not None and node.instance is not None:
            frame_map = self._frame_maps.get((node.series.key, node.instance.key))
            if frame_map is not None and 1 <= node.frame <= len(frame_map.pieces):
                return frames.frame_file_size(frame_map.pieces.frame_length(node.frame - 1), frame_map.transfer_syntax)
        return self._sizes.get(node)

    async def size(self, node: WebNode) -> int:
        """The exact size: from the metadata for native frames, otherwise by rendering the file
        (which for frames and bulk data means reading the instance)."""
        known = self.known_size(node)
        if known is not None:
            return known
        if node.kind in LISTING_FILES:
            return self._tell(node, await self._render_listing(node), clock.now())
        if node.kind is WebKind.FRAME:
            announced = await self._native_frame_file_size(node)
            if announced is not None:
                self._sizes[node] = announced
                return announced
        return len(await self.content(node))

    def _fresh(self, node: WebNode, now: float) -> _Listing | None:
        """The newest rendering of a listing file, if it is younger than the listing TTL."""
        latest = self._listings.get(node) or self._held.get(node)
        return latest if latest is not None and now - latest.rendered <= self.ttl else None

    def _tell(self, node: WebNode, entry: _Listing, now: float) -> int:
        """``entry``'s size is being told to the kernel, which may trust it for a listing TTL."""
        entry.held_until = max(entry.held_until, now + self.ttl + HOLD_SLACK)
        self._held[node] = entry
        if now >= self._next_prune:
            self._next_prune = now + self.ttl
            for stale in [n for n, e in self._held.items() if e.held_until < now and e.readers == 0]:
                del self._held[stale]
        return len(entry.data)

    # --- opening ----------------------------------------------------------------------------------
    async def open(self, node: WebNode) -> tuple[bytes, Callable[[], None] | None]:
        """The bytes an open file reads, and what to call when it is closed. A listing file
        reads the bytes whose size the kernel was last told (while it may trust it)."""
        if node.kind not in LISTING_FILES:
            return await self.content(node), None
        now = clock.now()
        entry = self._held.get(node)
        if entry is None or (entry.held_until < now and entry.readers == 0):
            entry = self._fresh(node, now) or await self._render_listing(node)
            self._held[node] = entry
        entry.readers += 1
        opened = entry

        def close() -> None:
            opened.readers -= 1

        return entry.data, close

    async def _native_frame_file_size(self, node: WebNode) -> int | None:
        return (await self._instance_json(node)).native_frame_file

    # --- contents ---------------------------------------------------------------------------------
    async def content(self, node: WebNode) -> bytes:
        """The file's bytes as they are now (``export``; the mount opens files with ``open``)."""
        if node.kind in LISTING_FILES:
            return (self._fresh(node, clock.now()) or await self._render_listing(node)).data
        data = self._files.get(node)
        if data is not None:
            return data

        async def render() -> bytes:
            rendered = await self._render(node)
            _keep(self._files, node, rendered)
            self._sizes[node] = len(rendered)
            return rendered

        return cast(bytes, await self._flights.run(("file", node), render))

    async def _render_listing(self, node: WebNode) -> _Listing:
        async def render() -> _Listing:
            entry = _Listing(await self._render(node), clock.now())
            _keep(self._listings, node, entry, len(entry.data))
            return entry

        return cast(_Listing, await self._flights.run(("listing", node), render))

    async def _render(self, node: WebNode) -> bytes:
        kind = node.kind
        if kind is WebKind.STUDIES_INDEX:
            studies = sorted((await self.studies()).values(), key=lambda s: s.uid)
            return await _json_file(await self._each(studies, self.study_object, self._study_limit,
                                                     skip_failures=True))
        if kind is WebKind.STUDY_INDEX:
            assert node.study is not None
            return await _json_file([await self.study_object(node.study)])
        if kind is WebKind.SERIES_INDEX:
            assert node.study is not None
            study = node.study
            series = sorted((await self.catalog.series_of(study)).values(), key=lambda s: s.uid)
            return await _json_file(await self._each(series, lambda s: self.series_object(study, s),
                                                     self._series_limit, skip_failures=True))
        if kind is WebKind.SERIES_SINGLETON:
            assert node.study is not None and node.series is not None
            return await _json_file([await self.series_object(node.study, node.series)])
        if kind is WebKind.INSTANCES_INDEX:
            assert node.series is not None
            instances = await self.catalog.instances_of(node.series)
            return await _json_file([instance_object(node.series, instances[key]) for key in sorted(instances)])
        if kind is WebKind.SERIES_METADATA:
            assert node.series is not None
            # Not intersected with the instance listing: that QIDO costs a 1,500-instance series
            # as much again as its metadata (both come from the same archive anyway).
            series_json = await self.series_json(node.series)
            return await _gzip_file(lambda: b"[" + b",".join(
                series_json.instances[key].json() for key in sorted(series_json.instances)) + b"]")
        if kind is WebKind.INSTANCE_METADATA:
            instance = await self._instance_json(node)
            return await _gzip_file(lambda: b"[" + instance.json() + b"]")
        if kind is WebKind.FRAME:
            return await self._frame(node)
        if kind is WebKind.BULK_FILE:
            return await self._bulk(node)
        raise NotFound(f"{node.name} is not a file")

    # --- QIDO objects -----------------------------------------------------------------------------
    async def study_object(self, study: StudyRecord, include: Include = ()) -> DicomJson:
        """The study's QIDO-RS object; ``include``: more tags (``ALL``: every one it has)."""
        summary = await self.summaries.study_summary(study)
        return dicomjson.qido_object(_tags(dicomjson.STUDY_TAGS, include, summary), summary,
                                     computed={"0020000D": dicomjson.strings("UI", [study.uid])})

    async def series_object(self, study: StudyRecord, series: SeriesRecord, include: Include = ()) -> DicomJson:
        computed = {"0020000D": dicomjson.strings("UI", [study.uid]),
                    "0020000E": dicomjson.strings("UI", [series.uid])}
        summary = await self.summaries.series_summary(series)
        return dicomjson.qido_object(_tags(dicomjson.SERIES_TAGS, include, summary), summary, computed=computed)

    async def _each(self, items: list[T], make: Callable[[T], Awaitable[Any]], limit: trio.CapacityLimiter,
                    *, skip_failures: bool = False) -> list[Any]:
        """``make`` of every item, in order, a few at a time. With ``skip_failures`` an item whose
        ``make`` fails is left out with a log line (one bad study must not hide the others)."""
        if not skip_failures:
            return await map_bounded(items, make, limit)
        failed = object()

        async def or_skip(item: T) -> Any:
            try:
                return await make(item)
            except DicomfsError as exc:
                log.warning("left out of a listing file: %s: %s", getattr(item, "uid", item), exc)
                return failed

        return [result for result in await map_bounded(items, or_skip, limit) if result is not failed]

    # --- metadata ---------------------------------------------------------------------------------
    async def series_json(self, series: SeriesRecord) -> SeriesJson:
        """The series' metadata in canonical form, made once per ``metadata_ttl``."""
        known = self._series_json.get(series.key)
        if known is not None:
            return known

        async def make() -> SeriesJson:
            if isinstance(self.catalog.source, MetadataSource):
                source = await self.catalog.series_metadata(series)
            else:
                source = await self._metadata_from_instances(series)
            made = await trio.to_thread.run_sync(paused, _canonical_series, series, source)
            del source
            await trio.to_thread.run_sync(release_free_memory)
            # (one huge series may take all of it: its frames need it)
            _keep(self._series_json, series.key, made, made.size, share=1)
            return made

        return cast(SeriesJson, await self._flights.run(("series json", series.key), make))

    async def _metadata_from_instances(self, series: SeriesRecord) -> dict[str, DicomJson]:
        """For an archive with no metadata service (DIMSE): the series retrieved into the cache
        (once), and each instance's header read there."""
        await self.blobs.fetch_series(series)
        out: dict[str, DicomJson] = {}
        for key, instance in (await self.catalog.instances_of(series)).items():
            handle = await self.blobs.open_instance(series, instance)
            try:
                out[key] = await trio.to_thread.run_sync(functools.partial(
                    instancemeta.metadata, fd=handle.fd, offset=handle.offset, length=handle.length))
            finally:
                handle.close()
        return out

    async def _instance_json(self, node: WebNode) -> InstanceJson:
        assert node.series is not None and node.instance is not None
        found = (await self.series_json(node.series)).instances.get(node.instance.key)
        if found is None:
            raise NotFound(f"no metadata for instance {node.instance.key}")
        return found

    async def frame_count(self, node: WebNode) -> int:
        return (await self._instance_json(node)).frames

    async def bulk_paths(self, series: SeriesRecord) -> dict[str, list[str]]:
        return (await self.series_json(series)).bulk

    # --- instance bytes -----------------------------------------------------------------------------
    async def _read_whole(self, handle: InstanceHandle, instance: InstanceRecord) -> bytes:
        """The whole instance, read in pieces (each off the event loop unless in the page cache)."""
        chunks = []
        for offset in range(0, handle.length, READ_CHUNK):
            chunk = await handle.read(offset, min(READ_CHUNK, handle.length - offset))
            if not chunk:
                raise IntegrityError(f"instance {instance.key} is shorter than recorded")
            chunks.append(chunk)
        return await trio.to_thread.run_sync(b"".join, chunks)

    async def _frame(self, node: WebNode) -> bytes:
        """A frame file. The first frame asked for in an instance finds where every frame lies in
        the instance's bytes (checked byte for byte); later frames are read from those ranges
        alone, so a 2 GB multi-frame instance costs one pass over it, not one per frame. Data not
        stored as served (big endian, deflated) is cut again each time a frame is not in the cache."""
        assert node.series is not None and node.instance is not None
        series, instance = node.series, node.instance
        frame_map = self._frame_maps.get((series.key, instance.key))
        files = None
        if frame_map is None:
            alone = await self._frame_alone(node)
            if alone is not None:
                return alone
            found = await self._flights.run(("frames", series.key, instance.key), lambda: self._cut(node))
            frame_map, files = (found, None) if isinstance(found, _FrameMap) else (None, found)
        if frame_map is not None:
            if node.frame > len(frame_map.pieces):
                raise NotFound(f"instance {instance.key} has {len(frame_map.pieces)} frames, not {node.frame}")
            data = await self._frame_from_ranges(series, instance, frame_map, node.frame)
        else:
            assert files is not None
            if node.frame > len(files):
                raise NotFound(f"instance {instance.key} has {len(files)} frames, not {node.frame}")
            data = files[node.frame - 1]
        announced = await self._native_frame_file_size(node)
        if announced is not None and announced != len(data):
            raise IntegrityError(f"frame {node.frame} of {instance.key} is {len(data)} bytes, "
                                 f"its metadata says {announced}")
        return data

    async def _frame_alone(self, node: WebNode, turn: bool = True) -> bytes | None:
        """The frame file read alone from the archive (a tile of a slide level: one small Range
        request, not the level), or None where that is not how this instance's frames are read:
        the archive says nothing of where they lie (or what it says does not hold), the instance
        is smaller than ``RANGE_FRAMES_FROM``, it is cached or on its way, or every frame of it is
        wanted (``_in_turn``: it is read whole). ``turn``: count this frame in the run."""
        assert node.series is not None and node.instance is not None
        series, instance = node.series, node.instance
        source = self.catalog.source
        key = (series.key, instance.key)
        if not isinstance(source, FrameRangeReader) or instance.size is None or instance.size < RANGE_FRAMES_FROM \
                or self._ranged.get(key) == _NOT_RANGED or await self.blobs.holds(series, instance):
            return None
        if turn and self._in_turn(key, node.frame):
            return None
        ranged = self._ranged.get(key)
        if ranged is None:
            return await self._first_frames_alone(source, node)
        if not isinstance(ranged, _RangedFrames):
            return None
        if node.frame > len(ranged.offsets):
            raise NotFound(f"instance {instance.key} has {len(ranged.offsets)} frames, not {node.frame}")
        index = node.frame - 1
        data = await source.read_instance_range(instance, ranged.offsets[index] - frames.ITEM_HEADER,
                                                ranged.lengths[index] + 2 * frames.ITEM_HEADER)
        return self._frame_in_item(node, ranged, data)

    def every_frame_wanted(self, node: WebNode) -> None:
        """Every frame of ``node``'s instance is likely to be asked for now: its ``frames/`` was
        listed (``ls -l``, ``cp -r``, ``rsync``, ``tar`` read every frame next), or all its frames
        were. A second frame asked for within ``EVERY_FRAME_FOR`` then reads an uncached instance
        whole. (Only that long: a plain ``ls`` followed, later, by a viewer's tiles, is not that.)"""
        if node.series is not None and node.instance is not None:
            self._turns[(node.series.key, node.instance.key)] = (0, 0, clock.now())

    def _in_turn(self, key: tuple[str, str], frame: int) -> bool:
        """Whether the instance is to be read whole rather than ``frame`` alone: every frame of it
        was just said to be wanted and this is a second one, or ``frame`` ends a run of ``IN_TURN``
        frames asked for one after another (1, 2, 3 …; the same one again keeps the run). One
        request a frame would be 50,000 for a slide's largest level; a viewer's tiles are neither
        (a viewport's row is not that wide). Said once: the whole read forgets the run."""
        last, run, wanted = self._turns.get(key, (0, 0, None))
        run = run + 1 if frame == last + 1 else run if frame == last else 1
        every = wanted is not None and clock.now() - wanted <= EVERY_FRAME_FOR and last != 0 and frame != last
        if run >= IN_TURN or every:
            self._turns.pop(key, None)
            return True
        self._turns[key] = (frame, run, wanted)
        return False

    async def _first_frames_alone(self, source: FrameRangeReader, node: WebNode) -> bytes | None:
        """``_frame_alone`` while the instance's table is not yet checked: the check (once, for all
        readers) and this frame's read side by side, so that a first tile costs one round trip
        after the table, not two; the frame read is used only once the check holds."""
        assert node.series is not None and node.instance is not None
        instance = node.instance
        key = (node.series.key, instance.key)
        table = self._tables.get(key)
        if table is None:
            table = await self._flights.run(("table", key), lambda: self._read_table(source, node))
            if table is None:
                return None
        index = node.frame - 1
        ahead: list[bytes] = []
        place = (table.offsets[index], table.lengths[index]) if index < len(table.offsets) else None

        async def read_ahead() -> None:  # (not more than a tile's worth, before the table is known to hold)
            if place is not None and place[1] <= READ_AHEAD_FRAME:
                # (a read that fails is made again once the check holds, and fails for the reader
                # then; if the check does not hold, the instance is cut whole)
                with contextlib.suppress(DicomfsError):
                    ahead.append(await source.read_instance_range(instance, place[0] - frames.ITEM_HEADER,
                                                                  place[1] + 2 * frames.ITEM_HEADER))

        async with open_nursery() as nursery:
            nursery.start_soon(read_ahead)
            ranged = await self._flights.run(("ranged", key), lambda: self._check_ranges(source, node, table))
            if not isinstance(ranged, _RangedFrames):
                nursery.cancel_scope.cancel()  # (the frame is cut from the whole instance)
        if not isinstance(ranged, _RangedFrames):
            return None
        if node.frame > len(ranged.offsets):
            raise NotFound(f"instance {instance.key} has {len(ranged.offsets)} frames, not {node.frame}")
        if not ahead or place != (ranged.offsets[index], ranged.lengths[index]):
            # (not read ahead: too large, or the read failed; or read where another reader's copy
            # of the table, the one checked, does not say)
            return await self._frame_alone(node, turn=False)  # (this frame's turn was counted)
        return self._frame_in_item(node, ranged, ahead[0])

    def _frame_in_item(self, node: WebNode, ranged: _RangedFrames, data: bytes) -> bytes | None:
        """The frame file of ``node`` from ``data``, its item read from where the checked table
        places it (with the item headers around it); None, and the instance's frames cut from
        its bytes from now on, where the item is not as the table says."""
        assert node.series is not None and node.instance is not None
        index = node.frame - 1
        next_length = ranged.lengths[index + 1] if index + 1 < len(ranged.lengths) else None
        try:
            frame = frames.frame_in_item(data, ranged.lengths[index], next_length)
        except ProtocolError as exc:
            log.warning("frame %d of instance %s is not where the archive's offset table says (%s): its frames "
                        "are cut from the whole instance", node.frame, node.instance.key, exc)
            self._ranged[(node.series.key, node.instance.key)] = _NOT_RANGED
            return None
        return frames.frame_file(frame, ranged.transfer_syntax)

    async def _read_table(self, source: FrameRangeReader, node: WebNode) -> FrameTable | None:
        """Where the archive says the frames of ``node``'s instance lie (unchecked), kept for
        ``_check_ranges``; None, and ``_NOT_RANGED`` remembered, where there is nothing to read
        alone: native frames (their table may be 8 bytes off), no table, or none to read."""
        assert node.series is not None and node.instance is not None
        instance = node.instance
        key = (node.series.key, instance.key)
        stored = (await self._instance_json(node)).transfer_syntax
        table = None
        if stored is None or not frames.is_native(stored):
            try:
                table = await source.frame_table(instance)
            except ProtocolError as exc:  # (what the archive holds: the cut says so again, to the reader)
                log.warning("where the frames of instance %s lie cannot be read (%s): they are cut from the whole "
                            "instance", instance.key, exc)
        if table is None or not 0 < len(table.offsets) <= frames.MAX_FRAME_COUNT \
                or not 0 < table.offsets[0] <= MAX_RANGE_PREFIX:
            # (a table of more frames than dicomfs cuts: the cut refuses the instance too)
            self._ranged[key] = _NOT_RANGED
            return None
        self._tables[key] = table
        return table

    async def _check_ranges(self, source: FrameRangeReader, node: WebNode, table: FrameTable) -> _RangedFrames | str:
        """Whether ``table``, the archive's offset table of ``node``'s instance, holds, read from
        the bytes around it (before the first frame, unless the archive read them already; after
        the last), remembered: the frames to read alone, or ``_NOT_RANGED``."""
        assert node.series is not None and node.instance is not None
        instance = node.instance
        key = (node.series.key, instance.key)
        if (known := self._ranged.get(key)) is not None:  # (checked while this reader waited)
            self._tables.pop(key, None)
            return known
        end = table.offsets[-1] + table.lengths[-1]
        read: dict[str, bytes] = {"prefix": table.head[:table.offsets[0]], "delimiter": b""}

        async def get(what: str, offset: int, length: int) -> None:
            read[what] = await source.read_instance_range(instance, offset, length)

        try:
            async with self._range_checks:  # (an index may claim a MAX_RANGE_PREFIX for every instance)
                async with open_nursery() as nursery:
                    if len(read["prefix"]) < table.offsets[0]:
                        nursery.start_soon(get, "prefix", 0, table.offsets[0])
                    if end + frames.ITEM_HEADER <= table.size:
                        nursery.start_soon(get, "delimiter", end, frames.ITEM_HEADER)
                try:
                    syntax = await trio.to_thread.run_sync(frames.check_frame_table, read["prefix"],
                                                           read["delimiter"], table)
                except ProtocolError as exc:
                    log.warning("the offset table of instance %s does not hold (%s): its frames are cut from the "
                                "whole instance", instance.key, exc)
                    self._ranged[key] = _NOT_RANGED
                    return _NOT_RANGED
        finally:
            self._tables.pop(key, None)
        ranged = _RangedFrames(syntax, array("Q", table.offsets), array("Q", table.lengths))
        self._ranged[key] = ranged
        return ranged

    async def _cut(self, node: WebNode) -> list[bytes] | _FrameMap:
        """Where the frames of ``node``'s instance lie, and their sizes. An instance up to
        ``STREAM_CUT`` is read whole and cut, and its frame files are kept (when they fit), since
        a viewer asks for them next: that is the frame files themselves. A larger one is parsed
        from its file, one frame in memory at a time: that is where its frames lie (or, if they
        are not stored as served, it too is cut whole)."""
        assert node.series is not None and node.instance is not None
        series, instance = node.series, node.instance
        async with self._cut_limit:  # each cut holds a whole instance in memory, or reads one through
            handle = await self.blobs.open_instance(series, instance)
            try:
                if handle.length > STREAM_CUT:
                    located = await run_stoppable(functools.partial(_locate_in_handle, handle))
                    if located is not None:
                        frame_map = _FrameMap(located.transfer_syntax, located.pieces, handle.length)
                        # (always kept, evicting others: every frame's size is the map's, known_size)
                        self._frame_maps[(series.key, instance.key)] = frame_map
                        return frame_map  # (the frames' sizes are the map's: known_size)
                if handle.length > MAX_WHOLE_CUT:
                    raise ProtocolError(f"instance {instance.key} is {handle.length:,} bytes, its frames not stored as "
                                        f"served (big endian or deflated): more than dicomfs cuts in "
                                        f"memory ({MAX_WHOLE_CUT:,})")
                data = await self._read_whole(handle, instance)
            finally:
                handle.close()
            syntax, files, located_pieces = await trio.to_thread.run_sync(_cut_and_locate, data)
        if located_pieces is not None:
            frame_map = _FrameMap(syntax, located_pieces, len(data))
            self._frame_maps[(series.key, instance.key)] = frame_map
        del data
        keep = sum(len(f) for f in files) <= self._files.maxsize // 4
        for number, file in enumerate(files, 1):
            sibling = WebNode(WebKind.FRAME, (*node.path[:-1], f"{number}.mht"), node.study, series,
                              instance, frame=number)
            if located_pieces is None:  # (otherwise the frame map tells the sizes: known_size)
                self._sizes[sibling] = len(file)
            if keep and number != node.frame:
                self._files[sibling] = file
        return files

    async def _frame_from_ranges(self, series: SeriesRecord, instance: InstanceRecord, frame_map: _FrameMap,
                                 number: int) -> bytes:
        handle = await self.blobs.open_instance(series, instance)
        try:
            if handle.length != frame_map.length:  # not the copy the ranges were found in
                self._frame_maps.pop((series.key, instance.key), None)
                raise IntegrityError(f"instance {instance.key} changed size since its frames were located")
            parts = []
            for offset, length in frame_map.pieces[number - 1]:
                part = await handle.read(offset, length)
                if len(part) != length:
                    raise IntegrityError(f"instance {instance.key} is shorter than its frame {number}")
                parts.append(part)
        finally:
            handle.close()
        return await trio.to_thread.run_sync(lambda: frames.frame_file(b"".join(parts), frame_map.transfer_syntax))

    async def _bulk(self, node: WebNode) -> bytes:
        """A bulk data value, parsed from the instance's file (large values left in it until the
        one asked for is read): a 2 GB slide's ICC profile does not read the slide into memory."""
        assert node.series is not None and node.instance is not None
        async with self._cut_limit:
            handle = await self.blobs.open_instance(node.series, node.instance)
            try:
                return await run_stoppable(functools.partial(_bulk_in_handle, handle, node.bulk))
            finally:
                handle.close()


def _locate_in_handle(handle: InstanceHandle, stop: StopSignal) -> frames.Located | None:
    """Blocking: ``frames.locate_in_file`` over an open instance (ends at a read once stopped)."""
    file = handle.blocking_file(stop.check)
    return frames.locate_in_file(file, file.read_at)


def _bulk_in_handle(handle: InstanceHandle, tags: str, stop: StopSignal) -> bytes:
    """Blocking: ``dicomjson.bulk_value`` of an open instance (ends at a read once stopped)."""
    file = handle.blocking_file(stop.check)
    return dicomjson.bulk_value(file, tags, file.read_at)


def _cut_and_locate(p10: bytearray | bytes) -> tuple[str, list[bytes], frames.FrameRanges | None]:
    """Blocking (CPU): the announced transfer syntax, every frame file of one instance, and where
    the frames lie in ``p10`` (None if they are not stored as served)."""
    cut = frames.cut_frames(p10)
    files = [frames.frame_file(frame, cut.transfer_syntax) for frame in cut.frames]
    located = frames.locate_in_bytes(p10)
    return cut.transfer_syntax, files, located.pieces if located is not None else None


def _keep(cache: cachetools.Cache[Any, Any], key: Any, value: Any, size: int | None = None, share: int = 4) -> None:
    """Cache ``value`` unless it would take more than a ``share``-th of the cache (cachetools
    refuses values larger than the whole cache, and one huge file should not flush everything else)."""
    if (size if size is not None else len(value)) <= cache.maxsize // share:
        cache[key] = value


async def _json_file(document: Any) -> bytes:
    """Encoded and gzip'd in a worker thread (a large series' metadata takes a tenth of a second)."""
    return await _gzip_file(lambda: dicomjson.encode(document))


async def _gzip_file(make: Callable[[], bytes]) -> bytes:
    return await trio.to_thread.run_sync(lambda: dicomjson.gzipped(make()))


def instance_object(series: SeriesRecord, instance: InstanceRecord, include: Include = ()) -> DicomJson:
    """The instance's QIDO-RS object; ``include``: more tags (``ALL``: every one it has)."""
    computed = {"0020000D": dicomjson.strings("UI", [series.study_uid]),
                "0020000E": dicomjson.strings("UI", [series.uid]),
                "00080018": dicomjson.strings("UI", [instance.key])}
    return dicomjson.qido_object(_tags(dicomjson.INSTANCE_TAGS, include, instance.attrs), instance.attrs,
                                 computed=computed)


def _tags(default: tuple[str, ...], include: Include, attrs: DicomJson) -> tuple[str, ...]:
    """A QIDO object's tags: the level's, and those ``include`` asks for (all of ``attrs``'s)."""
    if include == ALL:
        return (*default, *attrs)
    return (*default, *include)


def _canonical_series(series: SeriesRecord, source: dict[str, DicomJson]) -> SeriesJson:
    """Blocking (CPU): every instance's JSON made canonical, bulk data URIs pointing into the tree."""
    instances: dict[str, InstanceJson] = {}
    for key, raw in source.items():
        paths: list[str] = []

        def uri(path: dicomjson.TagPath, key: str = key, paths: list[str] = paths) -> str:
            if len(path) == 1 and path[0] in dicomjson.PIXEL_KEYS:
                return f"series/{series.uid}/instances/{key}/frames"
            tags = ".".join(path)
            paths.append(tags)
            return f"bulkdata/{series.uid}/{key}/{tags}"

        if not is_key(key):
            log.warning("series %s: metadata of an instance with an unusable key %r left out", series.uid, key[:80])
            continue
        try:
            meta = dicomjson.normalise(raw, uri)
            data = dicomjson.encode(meta)
        except Exception as exc:  # whatever odd data the archive sent: that instance is left out
            log.warning("instance %s: metadata left out: %s", key, exc)
            continue
        syntax = json_value(meta, dicomjson.AVAILABLE_TRANSFER_SYNTAX)
        instances[key] = InstanceJson(data, _frame_count(meta), _native_frame_file(meta), tuple(paths),
                                      syntax if isinstance(syntax, str) else None)
    return SeriesJson(instances)


def _frame_count(meta: DicomJson) -> int:
    """Frames of pixel data. Some archives (Orthanc) leave the pixel data element out of the
    metadata of compressed images: an image is anything with pixel data, or with the Image Pixel
    module's rows, columns, bits allocated and photometric interpretation."""
    if not any(tag in meta for tag in dicomjson.PIXEL_KEYS) and not all(
            tag in meta for tag in ("00280010", "00280011", "00280100", "00280004")):
        return 0
    count = json_value(meta, "00280008")
    return min(count, MAX_FRAMES) if isinstance(count, int) and count > 0 else 1


def _native_frame_file(meta: DicomJson) -> int | None:
    ts = json_value(meta, dicomjson.AVAILABLE_TRANSFER_SYNTAX)
    length = frames.native_frame_length(meta)
    if not isinstance(ts, str) or not frames.is_native(ts) or length is None:
        return None
    return frames.frame_file_size(length, frames.EXPLICIT_VR_LITTLE_ENDIAN)
