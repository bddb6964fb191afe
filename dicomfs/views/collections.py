"""The ``collections/`` view (IDC): ``collections/<collection_id>/<PatientID>/<study>/<series>/``,
with each collection's notes (``LICENSE.txt``) in its folder.

Owns adding a collection's note files to the folders of the ``collections`` template, whose
layout is ``named``'s; the words come from the source (``NotesSource``), asked once per collection
per mount. A collection folder is named by its collection_id (IDC's are safe names already).
Must not know pyfuse3 or read the index itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from dicomfs.errors import NotFound
from dicomfs.views.base import Handle, Node, RenderedFile, path_inode
from dicomfs.views.named import NamedView

Notes = Callable[[str], Awaitable[dict[str, str]]]


def _may_be_note(node: Node) -> bool:
    """Whether a node is where a collection's notes are: a file in a collection's folder."""
    return not node.is_dir and len(node.path) == 2


class CollectionsView:
    shows_instances = True

    def __init__(self, named: NamedView, notes: Notes) -> None:
        self.named = named
        self.name = named.name
        self.root = named.root
        self._ask = notes
        self._notes: dict[str, dict[str, bytes]] = {}

    async def children(self, node: Node) -> Sequence[tuple[Node, int | None]]:
        entries = list(await self.named.children(node))
        if len(node.path) == 1:
            notes = await self._notes_of(node.path[0])
            taken = {child.name for child, _ in entries}
            entries += [(self._note(node, name), len(data)) for name, data in notes.items() if name not in taken]
        return entries

    async def lookup(self, node: Node, name: str) -> Node:
        if len(node.path) == 1 and name in await self._notes_of(node.path[0]):
            return self._note(node, name)
        return await self.named.lookup(node, name)

    async def size(self, node: Node) -> int:
        note = await self._note_bytes(node)
        return len(note) if note is not None else await self.named.size(node)

    async def open(self, node: Node) -> Handle:
        note = await self._note_bytes(node)
        return RenderedFile(note) if note is not None else await self.named.open(node)

    def open_now(self, node: Node) -> Handle | None:
        return None if _may_be_note(node) else self.named.open_now(node)

    def _note(self, folder: Node, name: str) -> Node:
        path = (*folder.path, name)
        return Node(self.name, path_inode(self.name, *path), name, False, path=path)

    async def _note_bytes(self, node: Node) -> bytes | None:
        if not _may_be_note(node):
            return None
        data = (await self._notes_of(node.path[0])).get(node.name)
        if data is None:
            raise NotFound(node.name)
        return data

    async def _notes_of(self, collection: str) -> dict[str, bytes]:
        known = self._notes.get(collection)
        if known is None:
            known = self._notes[collection] = {k: v.encode() for k, v in (await self._ask(collection)).items()}
        return known
