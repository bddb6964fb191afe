"""The ``dicomweb/`` view: the static DICOMweb tree as a view of the mount.

Owns the adaptation of ``webtree`` (the layout) and ``webfiles`` (the bytes) to the view protocol,
and opening a rendered resource (``base.RenderedFile``). Which files follow the listings (index files, series
metadata) is ``webtree.LISTING_FILES``; this module only carries that onto the node. Must not
render or lay out anything itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from dicomfs.views.base import Handle, Node, RenderedFile, path_inode
from dicomfs.webfiles import WebFiles
from dicomfs.webtree import LISTING_FILES, ROOT, WebKind, WebLayout, WebNode

DICOMWEB = "dicomweb"


class DicomwebView:
    name = DICOMWEB
    shows_instances = False

    def __init__(self, files: WebFiles) -> None:
        self.files = files
        self.layout = WebLayout(files.catalog, files)
        self.root = self._node(ROOT)

    async def children(self, node: Node) -> Sequence[tuple[Node, int | None]]:
        assert node.web is not None
        # Sizes go out only for files that never change: a listing file's size must come from a
        # lookup, which the kernel then trusts from the moment of its reply.
        out = []
        if node.web.kind is WebKind.FRAMES:
            self.files.every_frame_wanted(node.web)  # (a listed frames/ is read whole next, mostly)
        for web in await self.layout.children(node.web):
            child = self._node(web)
            out.append((child, None if child.is_dir or child.follows_listings else self.files.known_size(web)))
        return out

    async def lookup(self, node: Node, name: str) -> Node:
        assert node.web is not None
        return self._node(await self.layout.lookup(node.web, name))

    async def size(self, node: Node) -> int:
        assert node.web is not None
        return await self.files.size(node.web)

    async def open(self, node: Node) -> Handle:
        assert node.web is not None
        return RenderedFile(*await self.files.open(node.web))

    def open_now(self, node: Node) -> Handle | None:
        return None  # (rendered on open: may ask the archive)

    def _node(self, web: WebNode) -> Node:
        return Node(DICOMWEB, path_inode(DICOMWEB, *web.path), web.name, web.is_dir, study=web.study,
                    series=web.series, instance=web.instance, follows_listings=web.kind in LISTING_FILES,
                    web=web, path=web.path)
