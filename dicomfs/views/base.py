"""What every view is: nodes, the view protocol, stable inode numbers, and instance files.

Owns the ``Node`` a view hands the tree (its name, whether it is a folder, the records it stands
for, and whether its content follows the listings), the ``View`` protocol the tree calls, the
inode rule (a hash of a path, so it survives remounts; an instance file has one inode in every
view, made from its UIDs), ``InstanceFiles``, which sizes and opens the P10 files of every view
through the blob store (telling ``readahead`` of every open), and ``RenderedFile``, an open file
of bytes made when it was opened (a rendered DICOMweb resource, a note). Must not know pyfuse3 or
a particular view's layout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from dicomfs.cache import BlobStore
from dicomfs.readahead import Readahead, SeriesOrder
from dicomfs.records import InstanceRecord, SeriesRecord, StudyRecord
from dicomfs.webtree import WebNode

SUFFIX = ".dcm"
STUDIES = "studies"


@dataclass(frozen=True, slots=True)  # (one per entry the kernel knows: 168,000 for IDC's studies/)
class Node:
    view: str  # the view's folder name ("" for the root)
    inode: int
    name: str
    is_dir: bool
    study: StudyRecord | None = None  # the records it stands for, when it stands for one
    series: SeriesRecord | None = None
    instance: InstanceRecord | None = None
    follows_listings: bool = False  # a file whose bytes change with the listings (an index)
    web: WebNode | None = None  # the static DICOMweb tree's own node
    path: tuple[str, ...] = ()  # names below the view's folder
    shows_instance: bool = False  # a P10 file: the same file (inode) in every view that shows it


class Handle(Protocol):
    async def read(self, off: int, size: int, reply: bytearray | None = None) -> bytes | bytearray | memoryview:
        """``size`` bytes from ``off``. ``reply``: a buffer the caller is done with once it has
        sent the result on, before it awaits anything (the FUSE layer's reply): the result may
        be a view of it instead of new memory."""
        ...

    def close(self) -> None: ...


class RenderedFile:
    """An open file of bytes made when it was opened."""

    def __init__(self, data: bytes, release: Callable[[], None] | None = None) -> None:
        self._data = memoryview(data)
        self._release = release

    async def read(self, off: int, size: int, reply: bytearray | None = None) -> memoryview:
        return self._data[off:off + size]

    def close(self) -> None:
        self._data = memoryview(b"")
        if self._release is not None:
            self._release()
            self._release = None


class View(Protocol):
    """One folder of the mount's root and everything below it."""

    name: str
    root: Node
    shows_instances: bool  # its files are the archive's P10 instances

    async def children(self, node: Node) -> Sequence[tuple[Node, int | None]]:
        """The folder's entries in a stable order, with each file's size when it is known without
        I/O (None: the tree asks ``size`` before telling a program)."""
        ...

    async def lookup(self, node: Node, name: str) -> Node:
        """The entry ``name`` of a folder; NotFound when there is none."""
        ...

    async def size(self, node: Node) -> int:
        """A file's exact size (may fetch)."""
        ...

    async def open(self, node: Node) -> Handle:
        ...


def path_inode(*parts: str) -> int:
    """A stable 63-bit inode number for a path below the root (never 0 or the root's)."""
    digest = hashlib.blake2b("/".join(parts).encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 1) | (1 << 32)


def instance_node(view: str, path: tuple[str, ...], study: StudyRecord, series: SeriesRecord,
                  instance: InstanceRecord) -> Node:
    """An instance's P10 file at ``path`` in ``view``: its inode is the one it has in ``studies/``."""
    inode = path_inode(STUDIES, study.uid, series.uid, instance.key + SUFFIX)
    return Node(view, inode, path[-1], False, study=study, series=series, instance=instance, path=path,
                shows_instance=True)


class InstanceFiles:
    """Sizes and opens the P10 files of any view (the blob store's instances)."""

    def __init__(self, blobs: BlobStore, readahead: Readahead | None = None) -> None:
        self.blobs = blobs
        self.readahead = readahead  # told of every instance opened (a study's next series)

    async def sized(self, series: SeriesRecord, nodes: list[Node]) -> list[tuple[Node, int | None]]:
        """``nodes`` (instances of ``series``) with the sizes known without a download."""
        sizes = await self.blobs.known_sizes(series)
        return [(n, n.instance.size or sizes.get(n.instance.key)) if n.instance is not None else (n, None)
                for n in nodes]

    async def size(self, node: Node) -> int:
        assert node.series is not None and node.instance is not None
        return await self.blobs.size_of(node.series, node.instance)

    async def open(self, node: Node, order: SeriesOrder | None = None) -> Handle:
        """Open an instance's file; ``order``: the order in which a reader of the view it is
        opened in goes through the study's series (for readahead; by default their UIDs)."""
        assert node.series is not None and node.instance is not None
        handle = await self.blobs.open_instance(node.series, node.instance)
        if self.readahead is not None:  # (after the open: the series' own download is running now)
            self.readahead.reading(node.series, order)
        return handle
