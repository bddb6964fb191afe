"""A minimal read-only pyfuse3 + trio passthrough filesystem: the baseline for warm reads.

    python -m bench.passthrough SOURCE_DIR MOUNTPOINT

Serves the files below SOURCE_DIR unchanged. It is deliberately the simplest thing a pyfuse3
filesystem can do (lookup/getattr/opendir/readdir/open/read with ``os.pread`` on the trio thread,
``keep_cache=True``), mounted with the same options and the same entry/attribute timeouts as
dicomfs (a day for files, a minute for directories) and the same read-ahead window (1 MiB FUSE
reads where run as root: ``dicomfs.mount.widen_read_window``), so that ``dicomfs`` serving its cached blobs
can be compared with "pyfuse3 serving plain files". Runs in the foreground until unmounted
(``fusermount3 -u``) or signalled.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from dicomfs.mount import widen_read_window

FILE_TIMEOUT = 86400.0  # as dicomfs.tree.IMMUTABLE_TIMEOUT
DIR_TIMEOUT = 60.0  # as dicomfs' default --listing-ttl


class Passthrough(pyfuse3.Operations):
    def __init__(self, source: str) -> None:
        super().__init__()
        self._paths: dict[int, str] = {pyfuse3.ROOT_INODE: source}
        self._inodes: dict[str, int] = {source: pyfuse3.ROOT_INODE}
        self._next_inode = pyfuse3.ROOT_INODE + 1
        self._dirs: dict[int, list[tuple[bytes, pyfuse3.EntryAttributes]]] = {}
        self._next_dir = 1

    # --- inodes and attributes --------------------------------------------------------------
    def _inode_of(self, path: str) -> int:
        inode = self._inodes.get(path)
        if inode is None:
            inode = self._next_inode
            self._next_inode += 1
            self._inodes[path] = inode
            self._paths[inode] = path
        return inode

    def _path(self, inode: int) -> str:
        try:
            return self._paths[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _attributes(self, path: str) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = self._inode_of(path)
        entry.generation = 0
        timeout = DIR_TIMEOUT if stat.S_ISDIR(st.st_mode) else FILE_TIMEOUT
        entry.entry_timeout = entry.attr_timeout = timeout
        entry.st_mode = (st.st_mode & ~0o222)  # read-only, like dicomfs
        entry.st_nlink = st.st_nlink
        entry.st_uid, entry.st_gid, entry.st_rdev = st.st_uid, st.st_gid, 0
        entry.st_size = st.st_size
        entry.st_blksize = 4096
        entry.st_blocks = (st.st_size + 511) // 512
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = st.st_mtime_ns
        return entry

    # --- operations -------------------------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attributes(os.path.join(self._path(parent_inode), os.fsdecode(name)))

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attributes(self._path(inode))

    async def opendir(self, inode: int, ctx: Any) -> int:
        path = self._path(inode)
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        fh = self._next_dir
        self._next_dir += 1
        self._dirs[fh] = [(os.fsencode(n), self._attributes(os.path.join(path, n))) for n in names]
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs[fh]
        for index in range(start_id, len(entries)):
            name, attrs = entries[index]
            if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        try:
            fd = os.open(self._path(inode), os.O_RDONLY)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    async def release(self, fh: int) -> None:
        os.close(fh)

    async def forget(self, inode_list: Any) -> None:
        pass  # a benchmark's tree is small: keep every inode

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)


async def _serve(mountpoint: Path) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signal)
        nursery.start_soon(widen_read_window, mountpoint)  # as dicomfs.mount: the same FUSE read size
        await pyfuse3.main(min_tasks=4, max_tasks=256)  # as dicomfs.mount
        nursery.cancel_scope.cancel()


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    args = parser.parse_args(argv)
    options = set(pyfuse3.default_options) | {"fsname=passthrough", "subtype=passthrough", "ro", "noatime"}
    pyfuse3.init(Passthrough(os.path.abspath(args.source)), args.mountpoint, options)
    try:
        trio.run(_serve, Path(os.path.abspath(args.mountpoint)))
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
