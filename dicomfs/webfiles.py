"""The bytes of every file in the static DICOMweb tree, and their exact sizes.

Owns rendering: QIDO index files and metadata from the catalog's listings and the archive's
metadata (never from series blobs), frames and bulk data cut from the instance bytes the blob
store serves, and the memory caches of rendered files. A rendered file is a pure function of its
inputs (``dicomjson`` encodes deterministically), so a size, once told, stays true; a frame size
announced from the metadata (native data) is checked against the frame actually cut, and a
mismatch is an error for that read, never a short or long file. Must not know FUSE or the layout's
names (``webtree`` does).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import cachetools
import trio

from dicomfs import dicomjson, frames
from dicomfs.blobstore import BlobStore
from dicomfs.catalog import Catalog
from dicomfs.errors import IntegrityError, NotFound
from dicomfs.gcpause import paused
from dicomfs.records import DicomJson, InstanceRecord, SeriesRecord, StudyRecord, json_value
from dicomfs.search import Search
from dicomfs.singleflight import SingleFlight
from dicomfs.tasks import open_nursery
from dicomfs.webtree import LISTING_FILES, WebKind, WebNode

log = logging.getLogger(__name__)

T = TypeVar("T")
LISTING_MEMORY = 64 << 20  # bytes of rendered index and series metadata files kept
FILE_MEMORY = 128 << 20  # bytes of rendered frames, bulk data and instance metadata kept
KNOWN_SIZES = 1_000_000
NORMALISED_SERIES = 32
PARALLEL = 8


@dataclass(frozen=True)
class SeriesJson:
    """A series' metadata in canonical form, and what the layout needs to know from it."""

    source: dict[str, DicomJson]  # the catalog's object it was made from
    instances: dict[str, DicomJson]  # instance key -> canonical DICOM JSON
    bulk: dict[str, list[str]]  # instance key -> non-pixel bulk data tag paths


class WebFiles:
    def __init__(self, catalog: Catalog, blobs: BlobStore,
                 studies: Callable[[], Awaitable[dict[str, StudyRecord]]] | None = None) -> None:
        """``studies``: the studies the tree shows (default: the catalog's, as the mount shows)."""
        self.catalog = catalog
        self.blobs = blobs
        self.studies = studies or catalog.studies
        self._search = Search(catalog)
        self._listing_files: cachetools.TTLCache[WebNode, bytes] = cachetools.TTLCache(
            LISTING_MEMORY, catalog.listing_ttl, getsizeof=len)
        self._files: cachetools.LRUCache[WebNode, bytes] = cachetools.LRUCache(FILE_MEMORY, getsizeof=len)
        self._sizes: cachetools.LRUCache[WebNode, int] = cachetools.LRUCache(KNOWN_SIZES)
        self._series_json: cachetools.LRUCache[str, SeriesJson] = cachetools.LRUCache(NORMALISED_SERIES)
        self._flights: SingleFlight[Any] = SingleFlight()
        # two levels, so that a study's task waiting for its series' tasks never starves them
        self._study_limit = trio.CapacityLimiter(PARALLEL)
        self._series_limit = trio.CapacityLimiter(PARALLEL)

    # --- sizes ------------------------------------------------------------------------------------
    def known_size(self, node: WebNode) -> int | None:
        """The size if it is known without any I/O (rendered before, or remembered)."""
        cache = self._listing_files if node.kind in LISTING_FILES else self._files
        data = cache.get(node)
        if data is not None:
            return len(data)
        return self._sizes.get(node)

    async def size(self, node: WebNode) -> int:
        """The exact size: from the metadata for native frames, otherwise by rendering the file
        (which for frames and bulk data means reading the instance)."""
        known = self.known_size(node)
        if known is not None:
            return known
        if node.kind is WebKind.FRAME:
            announced = await self._native_frame_file_size(node)
            if announced is not None:
                self._sizes[node] = announced
                return announced
        return len(await self.content(node))

    async def _native_frame_file_size(self, node: WebNode) -> int | None:
        meta = await self._instance_json(node)
        ts = json_value(meta, dicomjson.AVAILABLE_TRANSFER_SYNTAX)
        length = frames.native_frame_length(meta)
        if not isinstance(ts, str) or not frames.is_native(ts) or length is None:
            return None
        return frames.frame_file_size(length, frames.EXPLICIT_VR_LITTLE_ENDIAN)

    # --- contents ---------------------------------------------------------------------------------
    async def content(self, node: WebNode) -> bytes:
        listing = node.kind in LISTING_FILES
        cache = self._listing_files if listing else self._files
        data = cache.get(node)
        if data is not None:
            return data

        async def render() -> bytes:
            rendered = await self._render(node)
            cache[node] = rendered
            if not listing:
                self._sizes[node] = len(rendered)
            return rendered

        return await self._flights.run(("file", node), render)  # type: ignore[no-any-return]

    async def _render(self, node: WebNode) -> bytes:
        kind = node.kind
        if kind is WebKind.STUDIES_INDEX:
            studies = sorted((await self.studies()).values(), key=lambda s: s.uid)
            return _json_file(await self._each(studies, self._study_object, self._study_limit))
        if kind is WebKind.STUDY_INDEX:
            assert node.study is not None
            return _json_file([await self._study_object(node.study)])
        if kind is WebKind.SERIES_INDEX:
            assert node.study is not None
            study = node.study
            series = sorted((await self.catalog.series_of(study.uid)).values(), key=lambda s: s.uid)
            return _json_file(await self._each(series, lambda s: self._series_object(study, s),
                                               self._series_limit))
        if kind is WebKind.SERIES_SINGLETON:
            assert node.study is not None and node.series is not None
            return _json_file([await self._series_object(node.study, node.series)])
        if kind is WebKind.INSTANCES_INDEX:
            assert node.series is not None
            instances = await self.catalog.instances_of(node.series)
            return _json_file([_instance_object(node.series, instances[key]) for key in sorted(instances)])
        if kind is WebKind.SERIES_METADATA:
            assert node.series is not None
            series_json = await self.series_json(node.series)
            return _json_file([series_json.instances[key] for key in sorted(series_json.instances)])
        if kind is WebKind.INSTANCE_METADATA:
            return _json_file([await self._instance_json(node)])
        if kind is WebKind.FRAME:
            return await self._frame(node)
        if kind is WebKind.BULK_FILE:
            return await self._bulk(node)
        raise NotFound(f"{node.name} is not a file")

    # --- QIDO objects -----------------------------------------------------------------------------
    async def _study_object(self, study: StudyRecord) -> DicomJson:
        attrs = await self._search.study_attrs(study)
        computed: DicomJson = {"0020000D": dicomjson.strings("UI", [study.uid])}
        if any(tag not in attrs for tag in ("00080061", "00201206", "00201208")):
            series = list((await self.catalog.series_of(study.uid)).values())
            modalities = await self._each(series, self._modality, self._series_limit)
            counts = await self._each(series, self._instance_count, self._series_limit)
            computed["00080061"] = dicomjson.strings("CS", sorted({m for m in modalities if m}))
            computed["00201206"] = dicomjson.count(len(series))
            computed["00201208"] = dicomjson.count(sum(counts))
        return dicomjson.qido_object(dicomjson.STUDY_TAGS, attrs, computed=computed)

    async def _series_object(self, study: StudyRecord, series: SeriesRecord) -> DicomJson:
        sources = [series.attrs]
        if "00080060" not in series.attrs:  # the archive lists series without attributes (COD)
            sources.append(await self._first_instance_attrs(series))
        computed = {"0020000D": dicomjson.strings("UI", [study.uid]),
                    "0020000E": dicomjson.strings("UI", [series.uid])}
        if "00201209" not in series.attrs:
            computed["00201209"] = dicomjson.count(await self._instance_count(series))
        return dicomjson.qido_object(dicomjson.SERIES_TAGS, *sources, computed=computed)

    async def _modality(self, series: SeriesRecord) -> str | None:
        value = json_value(series.attrs, "00080060")
        if value is None:
            value = json_value(await self._first_instance_attrs(series), "00080060")
        return value if isinstance(value, str) else None

    async def _instance_count(self, series: SeriesRecord) -> int:
        value = json_value(series.attrs, "00201209")
        if isinstance(value, int) and value >= 0:
            return value
        return len(await self.catalog.instances_of(series))

    async def _first_instance_attrs(self, series: SeriesRecord) -> DicomJson:
        """Series-level attributes from the instances, each from the first instance (by key) that
        has it: an instance may lack an attribute its neighbours carry (Modality, say)."""
        instances = await self.catalog.instances_of(series)
        merged: DicomJson = {}
        for key in sorted(instances):
            attrs = instances[key].attrs
            merged.update({t: attrs[t] for t in dicomjson.SERIES_TAGS if t in attrs and t not in merged})
        return merged

    async def _each(self, items: list[T], make: Callable[[T], Awaitable[Any]],
                    limit: trio.CapacityLimiter) -> list[Any]:
        """``make`` of every item, in order, a few at a time."""
        results: list[Any] = [None] * len(items)

        async def one(index: int, item: T) -> None:
            async with limit:
                results[index] = await make(item)

        async with open_nursery() as nursery:
            for index, item in enumerate(items):
                nursery.start_soon(one, index, item)
        return results

    # --- metadata ---------------------------------------------------------------------------------
    async def series_json(self, series: SeriesRecord) -> SeriesJson:
        """The series' metadata in canonical form (made again when the catalog's changes)."""
        source = await self.catalog.series_metadata(series)
        known = self._series_json.get(series.key)
        if known is not None and known.source is source:
            return known
        made = await trio.to_thread.run_sync(paused, _canonical_series, series, source)
        self._series_json[series.key] = made
        return made

    async def _instance_json(self, node: WebNode) -> DicomJson:
        assert node.series is not None and node.instance is not None
        found = (await self.series_json(node.series)).instances.get(node.instance.key)
        if found is None:
            raise NotFound(f"no metadata for instance {node.instance.key}")
        return found

    async def frame_count(self, node: WebNode) -> int:
        meta = await self._instance_json(node)
        # Some archives (Orthanc) leave the pixel data element out of the metadata of compressed
        # images: an image is anything with pixel data or with rows and columns.
        if not any(tag in meta for tag in (*dicomjson.PIXEL_TAGS, "00280010")):
            return 0
        count = json_value(meta, "00280008")
        return count if isinstance(count, int) and count > 0 else 1

    async def bulk_paths(self, series: SeriesRecord) -> dict[str, list[str]]:
        return (await self.series_json(series)).bulk

    # --- instance bytes -----------------------------------------------------------------------------
    async def _instance_bytes(self, series: SeriesRecord, instance: InstanceRecord) -> bytes:
        handle = await self.blobs.open_instance(series, instance)
        try:
            return bytes(await handle.read(0, handle.length))
        finally:
            handle.close()

    async def _frame(self, node: WebNode) -> bytes:
        assert node.series is not None and node.instance is not None
        series, instance = node.series, node.instance

        async def cut() -> list[bytes]:
            data = await self._instance_bytes(series, instance)
            cut = await trio.to_thread.run_sync(frames.cut_frames, data)
            return [frames.frame_file(frame, cut.transfer_syntax) for frame in cut.frames]

        files = await self._flights.run(("frames", series.key, instance.key), cut)
        if node.frame > len(files):
            raise NotFound(f"instance {instance.key} has {len(files)} frames, not {node.frame}")
        data: bytes = files[node.frame - 1]
        announced = await self._native_frame_file_size(node)
        if announced is not None and announced != len(data):
            raise IntegrityError(f"frame {node.frame} of {instance.key} is {len(data)} bytes, "
                                 f"its metadata says {announced}")
        for number, other in enumerate(files, 1):  # the viewer asks for the others next
            if number != node.frame:
                sibling = WebNode(WebKind.FRAME, (*node.path[:-1], f"{number}.mht"), node.study, series,
                                  instance, frame=number)
                self._files[sibling] = other
                self._sizes[sibling] = len(other)
        return data

    async def _bulk(self, node: WebNode) -> bytes:
        assert node.series is not None and node.instance is not None
        data = await self._instance_bytes(node.series, node.instance)
        return await trio.to_thread.run_sync(dicomjson.bulk_value, data, node.bulk)


def _json_file(document: Any) -> bytes:
    return dicomjson.gzipped(dicomjson.encode(document))


def _instance_object(series: SeriesRecord, instance: InstanceRecord) -> DicomJson:
    computed = {"0020000D": dicomjson.strings("UI", [series.study_uid]),
                "0020000E": dicomjson.strings("UI", [series.uid]),
                "00080018": dicomjson.strings("UI", [instance.key])}
    return dicomjson.qido_object(dicomjson.INSTANCE_TAGS, instance.attrs, computed=computed)


def _canonical_series(series: SeriesRecord, source: dict[str, DicomJson]) -> SeriesJson:
    """Blocking (CPU): every instance's JSON made canonical, bulk data URIs pointing into the tree."""
    instances: dict[str, DicomJson] = {}
    bulk: dict[str, list[str]] = {}
    for key, raw in source.items():
        paths: list[str] = []

        def uri(path: dicomjson.TagPath, key: str = key, paths: list[str] = paths) -> str:
            if len(path) == 1 and path[0] in dicomjson.PIXEL_TAGS:
                return f"series/{series.uid}/instances/{key}/frames"
            tags = ".".join(path)
            paths.append(tags)
            return f"bulkdata/{series.uid}/{key}/{tags}"

        try:
            instances[key] = dicomjson.normalise(raw, uri)
        except ValueError as exc:
            log.warning("instance %s: metadata left out: %s", key, exc)
            continue
        if paths:
            bulk[key] = paths
    return SeriesJson(source, instances, bulk)
