"""The layout of the static DICOMweb tree below ``<mount>/dicomweb/`` (the Static-DICOMWeb layout).

Owns the names: which folders and files exist at each level, what each is (a ``WebNode``), and
which archive records it stands for. Directory URLs become ``index.json.gz``, leaf resources
``metadata.gz``, frames ``frames/<n>.mht``, bulk data ``studies/<st>/bulkdata/<se>/<sop>/<tags>``.
Names are looked up against the catalog, so a path that names nothing is ENOENT without a
download. Must not render file contents (``webfiles`` does) or know pyfuse3.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from dicomfs.catalog import Catalog
from dicomfs.errors import NotFound
from dicomfs.records import InstanceRecord, SeriesRecord, StudyRecord
from dicomfs.uids import is_key

INDEX = "index.json.gz"
METADATA = "metadata.gz"
SINGLETON = "series-singleton.json.gz"
FRAME_SUFFIX = ".mht"
MAX_FRAMES = 100_000  # a frames/ folder lists at most this many (a hostile count stays cheap)


class WebKind(enum.Enum):
    # folders
    ROOT = "dicomweb"
    STUDIES = "studies"
    STUDY = "study"
    SERIES_LIST = "series"
    SERIES = "one series"
    INSTANCES = "instances"
    INSTANCE = "instance"
    FRAMES = "frames"
    BULK = "bulkdata"
    BULK_SERIES = "bulkdata series"
    BULK_INSTANCE = "bulkdata instance"
    # files
    STUDIES_INDEX = "studies index"
    STUDY_INDEX = "study index"
    SERIES_INDEX = "series index"
    SERIES_METADATA = "series metadata"
    SERIES_SINGLETON = "series singleton"
    INSTANCES_INDEX = "instances index"
    INSTANCE_METADATA = "instance metadata"
    FRAME = "frame"
    BULK_FILE = "bulk data"


FOLDERS = frozenset({WebKind.ROOT, WebKind.STUDIES, WebKind.STUDY, WebKind.SERIES_LIST, WebKind.SERIES,
                     WebKind.INSTANCES, WebKind.INSTANCE, WebKind.FRAMES, WebKind.BULK,
                     WebKind.BULK_SERIES, WebKind.BULK_INSTANCE})
# Files whose content follows the archive's listings (they may change after the listing TTL).
LISTING_FILES = frozenset({WebKind.STUDIES_INDEX, WebKind.STUDY_INDEX, WebKind.SERIES_INDEX,
                           WebKind.SERIES_METADATA, WebKind.SERIES_SINGLETON, WebKind.INSTANCES_INDEX})


@dataclass(frozen=True)
class WebNode:
    kind: WebKind
    path: tuple[str, ...]  # names below dicomweb/
    study: StudyRecord | None = None
    series: SeriesRecord | None = None
    instance: InstanceRecord | None = None
    frame: int = 0  # 1-based, frames only
    bulk: str = ""  # the tag path ("0040A730.0.00282000"), bulk data files only

    @property
    def name(self) -> str:
        return self.path[-1] if self.path else WebKind.ROOT.value

    @property
    def is_dir(self) -> bool:
        return self.kind in FOLDERS

    def child(self, kind: WebKind, name: str, **records: object) -> WebNode:
        fields: dict[str, Any] = {"study": self.study, "series": self.series, "instance": self.instance}
        fields.update(records)
        return WebNode(kind, (*self.path, name), **fields)


ROOT = WebNode(WebKind.ROOT, ())


class WebLayout:
    """Names and children of the static tree; ``frames_of``/``bulk_of`` come from the metadata."""

    def __init__(self, catalog: Catalog, metadata: MetadataFacts) -> None:
        self.catalog = catalog
        self.metadata = metadata

    async def children(self, node: WebNode) -> list[WebNode]:
        kind = node.kind
        if kind is WebKind.ROOT:
            return [node.child(WebKind.STUDIES, "studies")]
        if kind is WebKind.STUDIES:
            studies = await self.metadata.studies()
            return [node.child(WebKind.STUDIES_INDEX, INDEX),
                    *(node.child(WebKind.STUDY, uid, study=s) for uid, s in sorted(studies.items()))]
        if kind is WebKind.STUDY:
            return [node.child(WebKind.STUDY_INDEX, INDEX), node.child(WebKind.SERIES_LIST, "series"),
                    node.child(WebKind.BULK, "bulkdata")]
        if kind is WebKind.SERIES_LIST:
            assert node.study is not None
            series = await self.catalog.series_of(node.study)
            return [node.child(WebKind.SERIES_INDEX, INDEX),
                    *(node.child(WebKind.SERIES, uid, series=s) for uid, s in sorted(series.items()))]
        if kind is WebKind.SERIES:
            return [node.child(WebKind.SERIES_METADATA, METADATA), node.child(WebKind.SERIES_SINGLETON, SINGLETON),
                    node.child(WebKind.INSTANCES, "instances")]
        if kind is WebKind.INSTANCES:
            assert node.series is not None
            instances = await self.catalog.instances_of(node.series)
            return [node.child(WebKind.INSTANCES_INDEX, INDEX),
                    *(node.child(WebKind.INSTANCE, key, instance=i) for key, i in sorted(instances.items()))]
        if kind is WebKind.INSTANCE:
            out = [node.child(WebKind.INSTANCE_METADATA, METADATA)]
            if await self.metadata.frame_count(node) > 0:
                out.append(node.child(WebKind.FRAMES, "frames"))
            return out
        if kind is WebKind.FRAMES:
            count = await self.metadata.frame_count(node)
            return [node.child(WebKind.FRAME, f"{n}{FRAME_SUFFIX}", frame=n) for n in range(1, count + 1)]
        if kind is WebKind.BULK:
            assert node.study is not None
            series = await self.catalog.series_of(node.study)
            out = []
            for uid, s in sorted(series.items()):
                if await self.metadata.bulk_paths(s):
                    out.append(node.child(WebKind.BULK_SERIES, uid, series=s))
            return out
        if kind is WebKind.BULK_SERIES:
            assert node.series is not None
            paths = await self.metadata.bulk_paths(node.series)
            instances = await self.catalog.instances_of(node.series)
            return [node.child(WebKind.BULK_INSTANCE, key, instance=instances[key])
                    for key in sorted(paths) if key in instances]
        if kind is WebKind.BULK_INSTANCE:
            assert node.series is not None and node.instance is not None
            tag_paths = (await self.metadata.bulk_paths(node.series)).get(node.instance.key, [])
            return [node.child(WebKind.BULK_FILE, tags, bulk=tags) for tags in sorted(tag_paths)]
        raise NotFound(node.name)

    async def lookup(self, node: WebNode, name: str) -> WebNode:
        kind = node.kind
        if name == INDEX and kind in _INDEXES:
            return node.child(_INDEXES[kind], INDEX)
        if kind is WebKind.STUDIES and is_key(name):
            study = (await self.metadata.studies()).get(name)
            if study is not None:
                return node.child(WebKind.STUDY, name, study=study)
        elif kind is WebKind.SERIES_LIST and is_key(name):
            assert node.study is not None
            series = (await self.catalog.series_of(node.study)).get(name)
            if series is not None:
                return node.child(WebKind.SERIES, name, series=series)
        elif kind in (WebKind.INSTANCES, WebKind.BULK_SERIES) and is_key(name):
            assert node.series is not None
            instance = (await self.catalog.instances_of(node.series)).get(name)
            if instance is not None:
                if kind is WebKind.INSTANCES:
                    return node.child(WebKind.INSTANCE, name, instance=instance)
                if name in await self.metadata.bulk_paths(node.series):
                    return node.child(WebKind.BULK_INSTANCE, name, instance=instance)
        elif kind is WebKind.FRAMES and name.endswith(FRAME_SUFFIX):
            digits = name[: -len(FRAME_SUFFIX)]
            if digits.isascii() and digits.isdigit() and not digits.startswith("0") and len(digits) <= 6:
                if int(digits) <= await self.metadata.frame_count(node):
                    return node.child(WebKind.FRAME, name, frame=int(digits))
        elif kind is WebKind.BULK and is_key(name):
            assert node.study is not None
            series = (await self.catalog.series_of(node.study)).get(name)
            if series is not None and await self.metadata.bulk_paths(series):
                return node.child(WebKind.BULK_SERIES, name, series=series)
        elif kind in (WebKind.ROOT, WebKind.STUDY, WebKind.SERIES, WebKind.INSTANCE, WebKind.BULK_INSTANCE):
            for child in await self.children(node):  # short, fixed lists (or cheap metadata)
                if child.name == name:
                    return child
        raise NotFound(name)


_INDEXES = {WebKind.STUDIES: WebKind.STUDIES_INDEX, WebKind.SERIES_LIST: WebKind.SERIES_INDEX,
            WebKind.INSTANCES: WebKind.INSTANCES_INDEX}


class MetadataFacts(Protocol):
    """What the layout needs to know beyond the listings: which studies the tree shows, frame
    counts and bulk data elements."""

    studies: Callable[[], Awaitable[dict[str, StudyRecord]]]

    async def frame_count(self, node: WebNode) -> int:
        """Frames of the instance ``node`` belongs to (0 without pixel data)."""
        ...

    async def bulk_paths(self, series: SeriesRecord) -> dict[str, list[str]]:
        """Instance key -> tag paths of its non-pixel bulk data elements (instances with none
        are left out)."""
        ...
