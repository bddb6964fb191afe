"""The pyfuse3 Operations: a thin translation of kernel requests into calls on the tree.

Owns file and directory handles and the mapping of dicomfs errors to errno; every request that may
wait for the archive runs under ``waiting.Waits`` (deadline, killed caller, shutdown). Must not
contain caching, fetching or naming logic: it knows only the tree (``tree``, and the views and
blob store behind it).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import pyfuse3

from dicomfs.errors import DicomfsError
from dicomfs.tree import Attributes, Tree
from dicomfs.views.base import Handle, Node
from dicomfs.waiting import Waits

log = logging.getLogger(__name__)
MAX_READ = 1 << 20  # the largest read the kernel asks of a FUSE file system (256 pages)

BLOCK_SIZE = 4096


class _Edge:
    """Around a request's work: dicomfs errors become their errno, anything else EIO with the
    traceback logged. (A class: it is around every request, where a generator's cost showed.)"""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        pass

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None or isinstance(exc, pyfuse3.FUSEError):
            return
        if isinstance(exc, DicomfsError):
            if exc.errno == errno.EINTR:
                log.info("%s", exc)
            elif exc.errno != errno.ENOENT:
                log.warning("%s: %s", self.what, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        if isinstance(exc, Exception):
            log.error("%s: unexpected error", self.what, exc_info=exc)
            raise pyfuse3.FUSEError(errno.EIO) from None


class _Request(_Edge):
    """``_Edge`` around ``waiting.Waits.bounded``: a request that may wait for the archive."""

    __slots__ = ("wait",)

    def __init__(self, what: str, wait: AbstractContextManager[None]) -> None:
        super().__init__(what)
        self.wait = wait

    def __enter__(self) -> None:
        self.wait.__enter__()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        try:
            self.wait.__exit__(kind, exc, tb)  # type: ignore[arg-type]  # (the stub wants a traceback)
        except BaseException as raised:  # the wait's own ending (timeout, killed, shutdown)
            super().__exit__(type(raised), raised, raised.__traceback__)
            raise
        super().__exit__(kind, exc, tb)


def entry_attributes(attrs: Attributes, uid: int, gid: int) -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = attrs.inode
    entry.generation = 0
    entry.entry_timeout = attrs.entry_timeout
    entry.attr_timeout = attrs.attr_timeout
    entry.st_mode = attrs.mode
    entry.st_nlink = attrs.nlink
    entry.st_uid = uid
    entry.st_gid = gid
    entry.st_rdev = 0
    entry.st_size = attrs.size
    entry.st_blksize = BLOCK_SIZE
    entry.st_blocks = (attrs.size + 511) // 512
    entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = attrs.mtime_ns
    return entry


class DicomOperations(pyfuse3.Operations):
    def __init__(self, tree: Tree, capacity: Callable[[], int], waits: Waits | None = None) -> None:
        """``capacity``: the cache's size limit in bytes now, what ``statfs`` reports."""
        super().__init__()
        self.tree = tree
        self.capacity = capacity
        self.waits = waits or Waits()
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._handles = itertools.count(1)
        self._files: dict[int, Handle] = {}
        self._dirs: dict[int, Sequence[tuple[Node, int | None]]] = {}  # open folders: entries and known sizes
        self._reply = bytearray(MAX_READ)  # what read replies are read into (see read)

    def _entry(self, attrs: Attributes) -> pyfuse3.EntryAttributes:
        return entry_attributes(attrs, self._uid, self._gid)

    def _request(self, what: str, ctx: Any) -> _Request:
        """A request that may wait for the archive: bounded, and errors mapped to errno."""
        return _Request(what, self.waits.bounded(getattr(ctx, "pid", 0), what))

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        text = os.fsdecode(name)
        with self._request(f"lookup {text!r}", ctx):
            node = await self.tree.lookup(self.tree.get(parent_inode), text)
            attrs = await self.tree.attributes(node)
            self.tree.remember(node)
            return self._entry(attrs)

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        with self._request("getattr", ctx):
            return self._entry(await self.tree.attributes(self.tree.get(inode)))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.tree.forget(inode, count)

    async def opendir(self, inode: int, ctx: Any) -> int:
        with self._request("opendir", ctx):
            entries = await self.tree.children(self.tree.get(inode))
            fh = next(self._handles)
            self._dirs[fh] = entries
            return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs.get(fh)
        if entries is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        with _Edge("readdir"):
            for index in range(start_id, len(entries)):
                node, size = entries[index]
                attrs = self.tree.listed_attributes(node, size)
                if not pyfuse3.readdir_reply(token, node.name.encode(), self._entry(attrs), index + 1):
                    break
                self.tree.remember(node)

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        with _Edge("open"):
            node = self.tree.get(inode)
            if node.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR)
            opened = self.tree.open_now(node)  # a cached instance: no wait, so nothing to bound
        if opened is None:
            with self._request("open", ctx):
                opened = await self.tree.open(node)
        handle, keep_cache = opened
        fh = next(self._handles)
        self._files[fh] = handle
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache)

    async def read(  # type: ignore[override]  # pyfuse3 replies with any buffer; its stub says bytes
            self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:
        handle = self._files.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        with _Edge("read"):
            # pyfuse3 sends the reply as soon as this returns, before any other request runs:
            # one buffer serves every read (no fresh, zeroed megabyte per read)
            return await handle.read(off, size, self._reply)

    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh, None)
        if handle is not None:
            handle.close()

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        stats = pyfuse3.StatvfsData()
        stats.f_bsize = stats.f_frsize = BLOCK_SIZE
        stats.f_blocks = max(self.capacity() // BLOCK_SIZE, 1)
        stats.f_bfree = stats.f_bavail = 0
        stats.f_files = self.tree.known_inodes
        stats.f_ffree = stats.f_favail = 0
        stats.f_namemax = 255
        return stats

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return []

    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        return not mode & os.W_OK  # read-only; the kernel checks the rest (default_permissions)
