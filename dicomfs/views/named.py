"""Readable views: ``patients/``, ``dates/`` and ``--view NAME=TEMPLATE``, laid out by a template.

Owns how a template's path levels become folders: which studies, series or instances each folder
gathers, the names of its entries (``template`` renders them, ``names`` makes them safe) and
collisions (every member of a group of entries that would share a name but stand for different
things gets the suffix of what it stands for, so a name never depends on listing order). Each
folder's entries are made once from the listings they come from and reused while those listings
are the same objects (the catalog keeps a listing for its TTL). Names come only from listings
(``summary``): listing a view never downloads instance data. Files are the archive's instances,
opened by ``InstanceFiles``, with the inode they have in ``studies/``, and the order in which a
``cp -r`` here goes through a study's series (for readahead). Must not know pyfuse3.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import cachetools
import trio

from dicomfs.catalog import Catalog
from dicomfs.errors import NotFound
from dicomfs.gcpause import paused
from dicomfs.readahead import SeriesOrder
from dicomfs.records import DicomJson, InstanceRecord, SeriesRecord, StudyRecord, json_value
from dicomfs.search import Shown
from dicomfs.singleflight import SingleFlight
from dicomfs.summary import Summaries
from dicomfs.tasks import map_bounded
from dicomfs.views import names
from dicomfs.views.base import Handle, InstanceFiles, Node, instance_node, path_inode
from dicomfs.views.template import SUFFIX, Component, Level, Names, Template

FOLDERS_KEPT = 4096  # folders whose entries are kept (a listing of 10,000 studies is one of them)
PARALLEL = 8
IN_THREAD = 2000  # items from which a folder's names are made in a worker thread
LAST = 1 << 63  # (above every inode: path_inode is 63 bits)
WIDE_SUFFIX = 16  # hex digits, for the (improbable) case that two short suffixes meet


class Item(NamedTuple):  # (a tuple: made 10,000 times for a listing of 10,000 studies)
    """One thing a folder gathers: a study, a series of it, or an instance of that."""

    study: StudyRecord
    series: SeriesRecord | None = None
    instance: InstanceRecord | None = None

    def identity(self, level: Level) -> str:
        if level is Level.STUDY:
            return self.study.uid
        assert self.series is not None
        if level is Level.SERIES:
            return self.series.key
        assert self.instance is not None
        return f"{self.series.key}/{self.instance.key}"


@dataclass
class Folder:
    """A folder's entries (name -> what it gathers), and the listings they were made from."""

    inputs: tuple[object, ...]
    entries: dict[str, list[Item]]  # (lists, never changed once made)
    nodes: list[Node] | None = None  # its entries' nodes, once listed


class NamedView:
    shows_instances = True

    def __init__(self, name: str, template: Template, catalog: Catalog, shown: Shown, files: InstanceFiles,
                 *, ascii_names: bool = False) -> None:
        self.name = name
        self.template = template
        self.catalog = catalog
        self.shown = shown
        self.summaries = Summaries(catalog)
        self.files = files
        self.ascii_names = ascii_names
        self.root = Node(name, path_inode(name), name, True)
        self._folders: cachetools.LRUCache[tuple[str, ...], Folder] = cachetools.LRUCache(FOLDERS_KEPT)
        self._flights: SingleFlight[Folder] = SingleFlight()
        self._limit = trio.CapacityLimiter(PARALLEL)

    # --- the view protocol ------------------------------------------------------------------
    async def children(self, node: Node) -> Sequence[tuple[Node, int | None]]:
        folder = await self._folder(node.path)
        if folder.nodes is None:
            folder.nodes = [self._node(node.path, name, items) for name, items in folder.entries.items()]
        nodes = folder.nodes
        if len(node.path) + 1 < self.template.depth:
            return [(child, None) for child in nodes]
        by_series: dict[str, list[Node]] = defaultdict(list)
        for child in nodes:
            assert child.series is not None
            by_series[child.series.key].append(child)
        sized: dict[int, int | None] = {}
        for group in by_series.values():
            assert group[0].series is not None
            sized.update((child.inode, size) for child, size in await self.files.sized(group[0].series, group))
        return [(child, sized[child.inode]) for child in nodes]

    async def lookup(self, node: Node, name: str) -> Node:
        if len(node.path) >= self.template.depth:
            raise NotFound(name)
        items = (await self._folder(node.path)).entries.get(name)
        if items is None:
            raise NotFound(name)
        return self._node(node.path, name, items)

    async def size(self, node: Node) -> int:
        return await self.files.size(node)

    async def open(self, node: Node) -> Handle:
        return await self.files.open(node, self._series_order(node.path))

    def open_now(self, node: Node) -> Handle | None:
        return self.files.open_now(node, self._series_order(node.path))

    def _series_order(self, path: tuple[str, ...]) -> SeriesOrder | None:
        """The order in which ``cp -r`` reaches the study's series in this view, for the instance
        at ``path``: by the inodes of the folders beside the instance's folder (GNU cp sorts a
        folder's entries by inode, and ours are path hashes, not in name order), each series at
        its first folder there; series with no folder there last. None (by UID) when the folders
        beside it gather no series (a template whose files sit in a study's folder)."""
        beside = self._folders.get(path[:-2]) if len(path) >= 2 else None
        if beside is None:
            return None
        inodes: dict[str, int] = {}
        for name, items in beside.entries.items():
            inode = path_inode(self.name, *path[:-2], name)
            for item in items:
                if item.series is not None and inode < inodes.get(item.series.uid, LAST):
                    inodes[item.series.uid] = inode
        if not inodes:
            return None
        return lambda series: inodes.get(series.uid, LAST)

    # --- folders ----------------------------------------------------------------------------
    def _node(self, parent: tuple[str, ...], name: str, items: Sequence[Item]) -> Node:
        path = (*parent, name)
        first = items[0]
        if len(path) == self.template.depth:
            assert first.series is not None and first.instance is not None
            return instance_node(self.name, path, self.files.inodes, first.study, first.series, first.instance)
        study: StudyRecord | None = first.study
        series: SeriesRecord | None = first.series
        if len(items) > 1:
            study = first.study if all(i.study is first.study for i in items) else None
            series = first.series if study is not None and all(i.series is first.series for i in items) else None
        return Node(self.name, path_inode(self.name, *path), name, True, study=study, series=series, path=path)

    async def _folder(self, path: tuple[str, ...]) -> Folder:
        """The entries of the folder at ``path``, made again only when a listing it comes from
        has changed."""
        known = self._folders.get(path)
        component = self.template.components[len(path)]
        if path:
            parent = await self._folder(path[:-1])
            items = parent.entries.get(path[-1])
            if items is None:
                raise NotFound("/".join(path))
            inputs: tuple[object, ...] = (parent,)
        else:
            studies = await self.shown.studies()
            if known is not None and known.inputs[0] is studies and component.level is Level.STUDY:
                return known  # the same listing: skip even ordering it again
            items = [Item(study) for study in studies.values()]
            inputs = (studies,)
        expanded, listings = await self._expand(items, component.level)
        inputs += listings
        if known is not None and len(known.inputs) == len(inputs) and all(
                a is b for a, b in zip(known.inputs, inputs, strict=False)):
            return known

        async def make() -> Folder:
            made = Folder(inputs, await self._entries(component, expanded, last=len(path) + 1 == self.template.depth))
            self._folders[path] = made
            return made

        return await self._flights.run(path, make)

    async def _expand(self, items: Sequence[Item], level: Level) -> tuple[list[Item], tuple[object, ...]]:
        """``items`` taken down to ``level`` (a study's series, a series' instances), and the
        listings that took."""
        out = list(items)
        listings: list[object] = []
        if level >= Level.SERIES and out and out[0].series is None:
            series_of = await map_bounded([i.study for i in out], self.catalog.series_of, self._limit)
            listings.extend(series_of)
            out = [Item(i.study, s) for i, found in zip(out, series_of, strict=False) for _, s in sorted(found.items())]
        if level is Level.INSTANCE and out and out[0].instance is None:
            instances_of = await map_bounded([i.series for i in out], self._instances_of, self._limit)
            listings.extend(instances_of)
            for item, found in zip(out, instances_of, strict=True):
                assert item.series is not None
                self.files.inodes.number(item.series, found)
            out = [Item(i.study, i.series, inst) for i, found in zip(out, instances_of, strict=False)
                   for _, inst in sorted(found.items())]
        return out, tuple(listings)

    async def _instances_of(self, series: SeriesRecord | None) -> dict[str, InstanceRecord]:
        assert series is not None
        return await self.catalog.instances_of(series)

    async def _entries(self, component: Component, items: list[Item], *, last: bool) -> dict[str, list[Item]]:
        """Entry name -> the items it gathers, in name order; colliding names get suffixes."""
        levels = {p.level for p in component.pieces if not isinstance(p, str)}
        study_attrs = await self._attrs_of_studies(items) if Level.STUDY in levels or \
            component.names is Names.PATIENT else {}
        series_attrs = await self._attrs_of_series(items) if Level.SERIES in levels else {}
        if len(items) < IN_THREAD:
            return self._name(component, items, study_attrs, series_attrs, last)
        # a large folder (all studies of a big archive) is named in a worker thread, with the
        # collector paused: 10,000 names make objects enough to set off full collections
        return await trio.to_thread.run_sync(paused, self._name, component, items, study_attrs, series_attrs, last)

    def _name(self, component: Component, items: list[Item], study_attrs: dict[str, DicomJson],
              series_attrs: dict[str, DicomJson], last: bool) -> dict[str, list[Item]]:
        """Blocking (CPU): the entries of a folder from its items and their attributes."""
        extension = SUFFIX if last else ""
        kind, level, ascii_only, render = component.names, component.level, self.ascii_names, component.render
        empty: DicomJson = {}
        attrs: list[DicomJson] = [empty, empty, empty]  # by Level (an IntEnum); refilled per item
        by_name: dict[str, list[Item]] = {}
        for item in items:  # (most of the cost of listing 10,000 studies: one name, one list each)
            attrs[0] = study_attrs.get(item.study.uid) or item.study.attrs
            attrs[1] = series_attrs.get(item.series.key, empty) if item.series is not None else empty
            attrs[2] = item.instance.attrs if item.instance is not None else empty
            name = render(attrs, key=item.instance.key if item.instance else "", ascii_only=ascii_only,
                          extension=extension)
            found = by_name.get(name)
            if found is None:
                by_name[name] = [item]
            else:
                found.append(item)
        # What a name stands for is only asked where several items share it: merged when they
        # stand for one thing (a patient's studies), suffixed when for different things.
        shared: dict[str, dict[str, list[Item]]] = {}
        if kind is not Names.GROUP:
            for name, members in by_name.items():
                if len(members) == 1:
                    continue
                identities: dict[str, list[Item]] = {}
                for item in members:
                    identity = (item.identity(level) if kind is Names.ENTITY
                                else _patient(study_attrs.get(item.study.uid) or item.study.attrs, name))
                    identities.setdefault(identity, []).append(item)
                if len(identities) > 1:
                    shared[name] = identities
        for name, identities in shared.items():
            del by_name[name]
            for identity, group in identities.items():
                suffixed = names.with_suffix(name, identity, extension)
                if suffixed in by_name:
                    suffixed = names.with_suffix(name, identity, extension, WIDE_SUFFIX)
                by_name.setdefault(suffixed, []).extend(group)
        return {name: by_name[name] for name in sorted(by_name)}

    async def _attrs_of_studies(self, items: list[Item]) -> dict[str, DicomJson]:
        """The attributes of the studies whose listing carries none (COD), completed; the others'
        are their own (``_name`` reads them there)."""
        listed = self.summaries.listed_study_attrs
        missing = list({i.study.uid: i.study for i in items if listed(i.study) is None}.values())
        completed = await map_bounded(missing, self.summaries.study_attrs, self._limit)
        return {study.uid: attrs for study, attrs in zip(missing, completed, strict=False)}

    async def _attrs_of_series(self, items: list[Item]) -> dict[str, DicomJson]:
        out: dict[str, DicomJson] = {}
        missing: list[SeriesRecord] = []
        for item in items:
            if item.series is None or item.series.key in out:
                continue
            listed = self.summaries.listed_series_attrs(item.series)
            if listed is None:
                missing.append(item.series)
                out[item.series.key] = {}
            else:
                out[item.series.key] = listed
        found = await map_bounded(missing, self.summaries.series_attrs, self._limit)
        for series, attrs in zip(missing, found, strict=True):
            out[series.key] = attrs
        return out


def _patient(study_attrs: DicomJson, name: str) -> str:
    """What a patient folder stands for: the patient's ID (with its issuer), else its name."""
    patient_id = json_value(study_attrs, "00100020")
    if patient_id is None or not str(patient_id).strip():
        return f"name:{name}"
    issuer = json_value(study_attrs, "00100021")
    return f"id:{str(patient_id).strip()}|{issuer or ''}"
