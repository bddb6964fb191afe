"""The mount's tree: the inode table and a root whose folders are views.

Owns the kernel's view of the tree: which inodes it holds (lookup counts), the root folder (one
entry per view: ``studies/``, the readable views, ``dicomweb/``; and the source's notes, such as
IDC's ``VERSION.txt``), attributes (modes, exact sizes, mtimes from the archive or the DICOM
dates, link counts, how long the kernel may keep them) and opening files, and OS probe names
(``.Trash``, ``desktop.ini`` …: ENOENT at once, for every view, without asking it). A size is only
ever reported when it is exact; a file whose content follows the listings is revalidated like
them, everything else is immutable. An instance file is one file in
every view that shows it: one inode, ``st_nlink`` counting those views. The layouts are the views'
(``views/``). Testable without FUSE; must not read instance bytes or know pyfuse3.
"""

from __future__ import annotations

import logging
import stat
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dicomfs.errors import NotADirectory, NotFound
from dicomfs.uids import is_probe_name
from dicomfs.views.base import Handle, Node, RenderedFile, View, path_inode

log = logging.getLogger(__name__)

ROOT_INODE = 1
# Instances never change once stored: the kernel may keep their entries and attributes a day.
IMMUTABLE_TIMEOUT = 86400.0


@dataclass(frozen=True, slots=True)  # (one per entry of an open folder: 168,000 in IDC's studies/)
class Attributes:
    inode: int
    mode: int
    size: int
    mtime_ns: int
    nlink: int
    entry_timeout: float
    attr_timeout: float


class Tree:
    def __init__(self, views: Sequence[View], *, listing_ttl: float = 60.0,
                 notes: Mapping[str, bytes] | None = None) -> None:
        """``notes``: small files at the root beside the views (IDC's ``VERSION.txt``)."""
        self.views = {view.name: view for view in views}
        self.notes = {name: data for name, data in (notes or {}).items() if name not in self.views}
        self._note_nodes = {name: Node("", path_inode(name), name, False, path=(name,)) for name in self.notes}
        self.listing_ttl = listing_ttl
        self.root = Node("", ROOT_INODE, "", True)
        # an instance file's link count: the views it appears in
        self.instance_links = max(sum(1 for view in views if view.shows_instances), 1)
        self._permanent = {ROOT_INODE, *(view.root.inode for view in views),
                           *(node.inode for node in self._note_nodes.values())}
        self._nodes: dict[int, Node] = {ROOT_INODE: self.root, **{v.root.inode: v.root for v in views},
                                        **{node.inode: node for node in self._note_nodes.values()}}
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
        # one instance may be known by several paths (one per view); anything else by one only
        if known is not None and (known.shows_instance != node.shows_instance or (
                not node.shows_instance and (known.view, known.path) != (node.view, node.path))):
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
        if not parent.is_dir:
            raise NotADirectory(parent.name)
        if is_probe_name(name):  # for every view, at once, without asking it
            raise NotFound(name)
        if parent.inode == ROOT_INODE:
            view = self.views.get(name)
            if view is None:
                if name in self._note_nodes:
                    return self._note_nodes[name]
                raise NotFound(name)
            return view.root
        return await self.views[parent.view].lookup(parent, name)

    async def children(self, node: Node) -> Sequence[tuple[Node, int | None]]:
        """The entries of a directory in a stable order, each with its size when known (their
        attributes: ``listed_attributes``, made as each entry is handed out, so that a folder of
        168,000 entries holds no attributes while it is open).
        """
        if not node.is_dir:
            raise NotADirectory(node.name)
        if node.inode == ROOT_INODE:
            return [*((view.root, None) for view in self.views.values()),
                    *((note, len(self.notes[name])) for name, note in self._note_nodes.items())]
        return await self.views[node.view].children(node)

    def listed_attributes(self, node: Node, size: int | None) -> Attributes:
        """Attributes of a listed entry. A file whose exact size is not known yet gets size 0
        with zero timeouts: the kernel then asks again (``lookup``) before any program can see
        that size."""
        return self._attributes(node, size)

    # --- attributes and files ---------------------------------------------------------------
    async def attributes(self, node: Node) -> Attributes:
        """Exact attributes; for an instance of unknown size this may fetch its series."""
        if node.is_dir:
            return self._attributes(node, None)
        if not node.view:
            return self._attributes(node, len(self.notes[node.name]))
        return self._attributes(node, await self.views[node.view].size(node))

    async def open(self, node: Node) -> tuple[Handle, bool]:
        """An open file, and whether the kernel may keep its pages (not for files that follow
        the listings)."""
        if not node.view:
            return RenderedFile(self.notes[node.name]), True
        return await self.views[node.view].open(node), not node.follows_listings

    def open_now(self, node: Node) -> tuple[Handle, bool] | None:
        """``open``, when its answer is ready without waiting; else None (then ``open``)."""
        if not node.view:
            return None
        handle = self.views[node.view].open_now(node)
        return None if handle is None else (handle, not node.follows_listings)

    def _attributes(self, node: Node, size: int | None) -> Attributes:
        mtime = node.study.mtime_ns if node.study is not None else 0
        if node.is_dir:
            return Attributes(node.inode, stat.S_IFDIR | 0o555, 0, mtime, 2, self.listing_ttl, self.listing_ttl)
        if node.instance is not None and node.instance.mtime_ns is not None and node.shows_instance:
            mtime = node.instance.mtime_ns
        links = self.instance_links if node.shows_instance else 1
        if size is None:
            return Attributes(node.inode, stat.S_IFREG | 0o444, 0, mtime, links, 0.0, 0.0)
        timeout = self.listing_ttl if node.follows_listings else IMMUTABLE_TIMEOUT
        return Attributes(node.inode, stat.S_IFREG | 0o444, size, mtime, links, timeout, timeout)
