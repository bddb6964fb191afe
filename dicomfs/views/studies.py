"""The ``studies/`` view: ``studies/<study>/<series>/<instance>.dcm``, named by UIDs.

Owns the machine-friendly layout: folder and file names are the archive's UIDs (or hashed keys),
checked before they become names, so a path names at most one thing and is the same on every
mount. Must not read instance bytes (``InstanceFiles`` opens them) or know pyfuse3.
"""

from __future__ import annotations

from collections.abc import Sequence

from dicomfs.catalog import Catalog
from dicomfs.errors import NotFound
from dicomfs.gcpause import paused
from dicomfs.records import SeriesRecord, StudyRecord
from dicomfs.search import Shown
from dicomfs.uids import is_key
from dicomfs.views.base import STUDIES, SUFFIX, Handle, InstanceFiles, Node, instance_node, path_inode


class StudiesView:
    shows_instances = True

    def __init__(self, catalog: Catalog, shown: Shown, files: InstanceFiles, name: str = STUDIES) -> None:
        self.catalog = catalog
        self.shown = shown
        self.files = files
        self.name = name
        self.root = Node(name, path_inode(name), name, True)

    async def children(self, node: Node) -> Sequence[tuple[Node, int | None]]:
        depth = len(node.path)
        if depth == 0:
            studies = await self.shown.studies()
            # (the IDC index lists 168,000 studies: a folder each, with the collector paused)
            return paused(lambda: [(self._folder(node, uid, study=s), None) for uid, s in sorted(studies.items())])
        if depth == 1:
            assert node.study is not None
            series = await self.catalog.series_of(node.study)
            return [(self._folder(node, uid, series=s), None) for uid, s in sorted(series.items())]
        assert node.study is not None and node.series is not None
        instances = await self.catalog.instances_of(node.series)
        self.files.inodes.number(node.series, instances)
        # in inode order, which is the archive's (``InstanceInodes``): what reads a folder in the
        # order it lists it (tar, find, a script's os.listdir) reads the files as they arrive
        nodes = [instance_node(self.name, (*node.path, key + SUFFIX), self.files.inodes, node.study, node.series,
                               instance) for key, instance in instances.items()]
        return await self.files.sized(node.series, sorted(nodes, key=lambda n: n.inode))

    async def lookup(self, node: Node, name: str) -> Node:
        depth = len(node.path)
        if depth == 0 and is_key(name):
            study = await self.shown.study(name)
            if study is not None:
                return self._folder(node, name, study=study)
        elif depth == 1 and is_key(name):
            assert node.study is not None
            series = (await self.catalog.series_of(node.study)).get(name)
            if series is not None:
                return self._folder(node, name, series=series)
        elif depth == 2:
            assert node.study is not None and node.series is not None
            key = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else ""
            if is_key(key):
                instances = await self.catalog.instances_of(node.series)
                instance = instances.get(key)
                if instance is not None:
                    self.files.inodes.number(node.series, instances)
                    return instance_node(self.name, (*node.path, name), self.files.inodes, node.study, node.series,
                                         instance)
        raise NotFound(name)

    def _folder(self, parent: Node, name: str, study: StudyRecord | None = None,
                series: SeriesRecord | None = None) -> Node:
        path = (*parent.path, name)
        return Node(self.name, self._inode(*path), name, True, study=study or parent.study,
                    series=series or parent.series, path=path)

    def _inode(self, *path: str) -> int:
        return path_inode(self.name, *path)

    def _series_order(self, series: SeriesRecord) -> int:
        """The inode of a series' folder: the order in which ``cp -r`` (GNU cp sorts a folder's
        entries by inode number before copying them) goes through a study's series here."""
        return self._inode(series.study_uid, series.uid)

    async def size(self, node: Node) -> int:
        return await self.files.size(node)

    async def open(self, node: Node) -> Handle:
        return await self.files.open(node, self._series_order)

    def open_now(self, node: Node) -> Handle | None:
        return self.files.open_now(node, self._series_order)
