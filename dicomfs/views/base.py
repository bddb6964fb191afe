"""What every view is: nodes, the view protocol, stable inode numbers, and instance files.

Owns the ``Node`` a view hands the tree (its name, whether it is a folder, the records it stands
for, and whether its content follows the listings), the ``View`` protocol the tree calls, the
inode rules (a folder's: a hash of its path, so it survives remounts; an instance file's:
``InstanceInodes``, one inode in every view, numbered in the archive's listing order),
``InstanceFiles``, which sizes and opens the P10 files of every view
through the blob store (telling ``readahead`` of every open), and ``RenderedFile``, an open file
of bytes made when it was opened (a rendered DICOMweb resource, a note). Must not know pyfuse3 or
a particular view's layout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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

    def open_now(self, node: Node) -> Handle | None:
        """``open``'s answer when it is ready without waiting (an instance already in the cache),
        else None: the tree then calls ``open``. A warm ``cat`` opens every file this way."""
        ...


def path_inode(*parts: str) -> int:
    """A stable 63-bit inode number for a path below the root (never 0 or the root's)."""
    digest = hashlib.blake2b("/".join(parts).encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 1) | (1 << 32)


SERIES_BLOCK = 1 << 16  # instance inodes numbered per series: a series' block of numbers


class InstanceInodes:
    """An instance file's inode number: the same in every view, and in a series folder in the
    order the archive lists the series' instances.

    GNU ``cp -r`` copies a folder's files in inode order, and a series retrieve sends the
    instances in the archive's own order, which is its listing order (Orthanc: the order they
    were stored in; checked by a mount test). Path hashes put the files in a random order: ``cp``
    then waited for files still on the wire while others were ready, and when the last byte of a
    study was in, most of its last series was still to be copied (0.3 s of a 5 s copy on a
    1 Gbit/s link). Numbered in listing order, ``cp`` reads the files as they arrive.

    A series gets a block of ``SERIES_BLOCK`` numbers (from the hash of its ``studies/`` path,
    never the block of another series of this mount), its instances the next free number in the
    order they are first listed. A number, once given, is that instance's for the life of the
    mount and is never given to another (a listing that changes does not move it): the kernel may
    hold an inode for a day, and a number that moved to another file would show it that file's
    cached pages. The same listing numbers the same way after a remount. A series beyond the
    block, or an instance not yet listed, has its path hash (as folders do).
    """

    def __init__(self) -> None:
        self._tables: dict[tuple[str, str], _Numbers] = {}
        self._blocks: set[int] = set()

    def number(self, series: SeriesRecord, listing: Mapping[str, object]) -> None:
        """Number the instances of ``listing`` (the series' listing, in the archive's order)
        that have no number yet. Cheap when ``listing`` is the listing numbered last time (the
        catalog hands out one dict per listing; were a new one ever taken for it, its new
        instances would keep their path hashes until the next listing numbers them)."""
        table = self._tables.get((series.study_uid, series.uid))
        if table is None:
            table = self._tables[(series.study_uid, series.uid)] = _Numbers(self._block(series))
        seen = (id(listing), len(listing))  # (not the listing itself: kept, it would outlive the catalog's)
        if table.seen == seen:
            return
        for key in listing:
            if key not in table.numbers and len(table.numbers) < SERIES_BLOCK - 1:
                table.numbers[key] = table.block + len(table.numbers) + 1
        table.seen = seen

    def inode(self, study: StudyRecord, series: SeriesRecord, instance: InstanceRecord) -> int:
        table = self._tables.get((series.study_uid, series.uid))
        number = table.numbers.get(instance.key) if table is not None else None
        return number if number is not None else path_inode(STUDIES, study.uid, series.uid, instance.key + SUFFIX)

    def _block(self, series: SeriesRecord) -> int:
        block = path_inode(STUDIES, series.study_uid, series.uid, "") & ~(SERIES_BLOCK - 1)
        while block in self._blocks:  # two series of this mount with one block: the next one
            block = ((block + SERIES_BLOCK) & ((1 << 63) - 1)) | (1 << 32)
        self._blocks.add(block)
        return block


@dataclass(slots=True)
class _Numbers:
    block: int
    numbers: dict[str, int] = field(default_factory=dict)  # instance key -> inode
    seen: tuple[int, int] = (0, 0)  # id and length of the listing numbered last (the catalog's dict)


def instance_node(view: str, path: tuple[str, ...], inodes: InstanceInodes, study: StudyRecord,
                  series: SeriesRecord, instance: InstanceRecord) -> Node:
    """An instance's P10 file at ``path`` in ``view``: its inode is the same in every view."""
    return Node(view, inodes.inode(study, series, instance), path[-1], False, study=study, series=series,
                instance=instance, path=path, shows_instance=True)


class InstanceFiles:
    """Sizes and opens the P10 files of any view (the blob store's instances)."""

    def __init__(self, blobs: BlobStore, readahead: Readahead | None = None) -> None:
        self.blobs = blobs
        self.readahead = readahead  # told of every instance opened (a study's next series)
        self.inodes = InstanceInodes()  # (one numbering for every view)

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
            self.readahead.reading(node.series, order, node.study)
        return handle

    def open_now(self, node: Node, order: SeriesOrder | None = None) -> Handle | None:
        """``open``, when the instance is in the cache and nothing is to be waited for; else None."""
        assert node.series is not None and node.instance is not None
        handle = self.blobs.open_now(node.series, node.instance)
        if handle is not None and self.readahead is not None:
            self.readahead.reading(node.series, order, node.study)
        return handle
