"""The virtual directory tree: nodes, names, stable inode numbers and attributes.

Owns the layout ``studies/<study>/<series>/<instance>.dcm`` and where the static DICOMweb tree
(``dicomweb/``, laid out by ``webtree``, rendered by ``webfiles``) hangs in it, the inode of every path (a hash of
its UIDs, so it survives remounts), mtimes from the archive or the DICOM dates, and the rule that
a size is only ever reported when it is exact. Testable without FUSE. Must not read instance
bytes (that is the blob store's job) and must not know pyfuse3.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import stat
from collections import Counter
from dataclasses import dataclass

from dicomfs.blobstore import BlobStore
from dicomfs.catalog import Catalog
from dicomfs.errors import NotADirectory, NotFound
from dicomfs.records import InstanceRecord, SeriesRecord, StudyRecord
from dicomfs.uids import is_key, is_probe_name
from dicomfs.webfiles import WebFiles
from dicomfs.webtree import LISTING_FILES, ROOT, WebLayout, WebNode

log = logging.getLogger(__name__)

ROOT_INODE = 1
STUDIES = "studies"
DICOMWEB = "dicomweb"
SUFFIX = ".dcm"
# Instances never change once stored: the kernel may keep their entries and attributes a day.
IMMUTABLE_TIMEOUT = 86400.0


class Kind(enum.Enum):
    ROOT = "root"
    STUDIES = "studies"
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"
    WEB = "dicomweb"  # anything below dicomweb/


@dataclass(frozen=True)
class Node:
    kind: Kind
    inode: int
    name: str
    study: StudyRecord | None = None
    series: SeriesRecord | None = None
    instance: InstanceRecord | None = None
    web: WebNode | None = None

    @property
    def is_dir(self) -> bool:
        if self.web is not None:
            return self.web.is_dir
        return self.kind is not Kind.INSTANCE


@dataclass(frozen=True)
class Attributes:
    inode: int
    mode: int
    size: int
    mtime_ns: int
    nlink: int
    entry_timeout: float
    attr_timeout: float


def path_inode(*parts: str) -> int:
    """A stable 63-bit inode number for a path below the root (never 0 or the root's)."""
    digest = hashlib.blake2b("/".join(parts).encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 1) | (1 << 32)


class Tree:
    def __init__(self, catalog: Catalog, blobs: BlobStore, *, listing_ttl: float = 60.0) -> None:
        self.catalog = catalog
        self.blobs = blobs
        self.listing_ttl = listing_ttl
        self.root = Node(Kind.ROOT, ROOT_INODE, "")
        self.studies_dir = Node(Kind.STUDIES, path_inode(STUDIES), STUDIES)
        self.web_files = WebFiles(catalog, blobs)
        self.web = WebLayout(catalog, self.web_files)
        self.dicomweb_dir = self._web_node(ROOT)
        self._permanent = (ROOT_INODE, self.studies_dir.inode, self.dicomweb_dir.inode)
        self._nodes: dict[int, Node] = {ROOT_INODE: self.root, self.studies_dir.inode: self.studies_dir,
                                        self.dicomweb_dir.inode: self.dicomweb_dir}
        self._lookups: Counter[int] = Counter()

    # --- inode bookkeeping (the kernel's lookup counts) -------------------------------------
    def get(self, inode: int) -> Node:
        node = self._nodes.get(inode)
        if node is None:
            raise NotFound(f"unknown inode {inode}")
        return node

    def remember(self, node: Node) -> None:
        """The kernel now holds one more reference to ``node``."""
        known = self._nodes.get(node.inode)
        if known is not None and (known.kind, known.name) != (node.kind, node.name):
            log.error("inode collision between %s and %s", known.name, node.name)
        self._nodes[node.inode] = node
        self._lookups[node.inode] += 1

    def forget(self, inode: int, count: int) -> None:
        self._lookups[inode] -= count
        if self._lookups[inode] <= 0:
            del self._lookups[inode]
            if inode not in self._permanent:
                self._nodes.pop(inode, None)

    @property
    def known_inodes(self) -> int:
        return len(self._nodes)

    # --- names ------------------------------------------------------------------------------
    async def lookup(self, parent: Node, name: str) -> Node:
        if is_probe_name(name):
            raise NotFound(name)
        if parent.kind is Kind.ROOT:
            if name == STUDIES:
                return self.studies_dir
            if name == DICOMWEB:
                return self.dicomweb_dir
        elif parent.web is not None:
            return self._web_node(await self.web.lookup(parent.web, name))
        elif parent.kind is Kind.STUDIES:
            if is_key(name):
                study = (await self.catalog.studies()).get(name)
                if study is not None:
                    return self._study_node(study)
        elif parent.kind is Kind.STUDY:
            assert parent.study is not None
            if is_key(name):
                series = (await self.catalog.series_of(parent.study.uid)).get(name)
                if series is not None:
                    return self._series_node(parent.study, series)
        elif parent.kind is Kind.SERIES:
            assert parent.study is not None and parent.series is not None
            key = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else ""
            if is_key(key):
                instance = (await self.catalog.instances_of(parent.series)).get(key)
                if instance is not None:
                    return self._instance_node(parent.study, parent.series, instance)
        raise NotFound(name)

    async def children(self, node: Node) -> list[tuple[Node, Attributes]]:
        """The entries of a directory with their attributes, in a stable order.

        Instance entries whose exact size is not known yet get size 0 with zero timeouts: the
        kernel then asks again (``lookup``) before any program can see that size.
        """
        if node.kind is Kind.ROOT:
            nodes = [self.studies_dir, self.dicomweb_dir]
        elif node.web is not None:
            if not node.web.is_dir:
                raise NotADirectory(node.name)
            # Sizes go out only for files that never change: a listing file's size must come from
            # a lookup, which the kernel then trusts from the moment of its reply.
            children = [self._web_node(child) for child in await self.web.children(node.web)]
            return [(child, self._web_attributes(
                        child, None if child.web is None or child.web.is_dir or child.web.kind in LISTING_FILES
                        else self.web_files.known_size(child.web)))
                    for child in children]
        elif node.kind is Kind.STUDIES:
            studies = await self.catalog.studies()
            nodes = [self._study_node(s) for _, s in sorted(studies.items())]
        elif node.kind is Kind.STUDY:
            assert node.study is not None
            series = await self.catalog.series_of(node.study.uid)
            nodes = [self._series_node(node.study, s) for _, s in sorted(series.items())]
        elif node.kind is Kind.SERIES:
            assert node.study is not None and node.series is not None
            instances = await self.catalog.instances_of(node.series)
            sizes = await self.blobs.known_sizes(node.series)
            out = []
            for key, instance in sorted(instances.items()):
                child = self._instance_node(node.study, node.series, instance)
                out.append((child, self._file_attributes(child, instance.size or sizes.get(key))))
            return out
        else:
            raise NotADirectory(node.name)
        return [(child, self._dir_attributes(child)) for child in nodes]

    # --- attributes -------------------------------------------------------------------------
    async def attributes(self, node: Node) -> Attributes:
        """Exact attributes; for an instance of unknown size this may fetch its series."""
        if node.web is not None:
            size = None if node.web.is_dir else await self.web_files.size(node.web)
            return self._web_attributes(node, size)
        if node.is_dir:
            return self._dir_attributes(node)
        assert node.series is not None and node.instance is not None
        size = await self.blobs.size_of(node.series, node.instance)
        return self._file_attributes(node, size)

    def _dir_attributes(self, node: Node) -> Attributes:
        mtime = node.study.mtime_ns if node.study is not None else 0
        return Attributes(node.inode, stat.S_IFDIR | 0o555, 0, mtime, 2,
                          self.listing_ttl, self.listing_ttl)

    def _file_attributes(self, node: Node, size: int | None) -> Attributes:
        assert node.study is not None and node.instance is not None
        mtime = node.instance.mtime_ns if node.instance.mtime_ns is not None else node.study.mtime_ns
        if size is None:
            return Attributes(node.inode, stat.S_IFREG | 0o444, 0, mtime, 1, 0.0, 0.0)
        return Attributes(node.inode, stat.S_IFREG | 0o444, size, mtime, 1,
                          IMMUTABLE_TIMEOUT, IMMUTABLE_TIMEOUT)

    def _web_attributes(self, node: Node, size: int | None) -> Attributes:
        """A static DICOMweb folder or file. Files that follow the listings are revalidated like
        them; frames, bulk data and instance metadata never change."""
        assert node.web is not None
        if node.web.is_dir:
            return self._dir_attributes(node)
        mtime = node.study.mtime_ns if node.study is not None else 0
        if size is None:
            return Attributes(node.inode, stat.S_IFREG | 0o444, 0, mtime, 1, 0.0, 0.0)
        timeout = self.web_files.ttl if node.web.kind in LISTING_FILES else IMMUTABLE_TIMEOUT
        return Attributes(node.inode, stat.S_IFREG | 0o444, size, mtime, 1, timeout, timeout)

    # --- node construction ------------------------------------------------------------------
    def _study_node(self, study: StudyRecord) -> Node:
        return Node(Kind.STUDY, path_inode(STUDIES, study.uid), study.uid, study=study)

    def _series_node(self, study: StudyRecord, series: SeriesRecord) -> Node:
        return Node(Kind.SERIES, path_inode(STUDIES, study.uid, series.uid), series.uid,
                    study=study, series=series)

    def _web_node(self, web: WebNode) -> Node:
        return Node(Kind.WEB, path_inode(DICOMWEB, *web.path), web.name, study=web.study,
                    series=web.series, instance=web.instance, web=web)

    def _instance_node(self, study: StudyRecord, series: SeriesRecord, instance: InstanceRecord) -> Node:
        name = instance.key + SUFFIX
        return Node(Kind.INSTANCE, path_inode(STUDIES, study.uid, series.uid, name), name,
                    study=study, series=series, instance=instance)
