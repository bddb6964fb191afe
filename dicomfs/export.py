"""``dicomfs export --dicomweb``: the static DICOMweb tree of chosen studies, written to a folder.

Owns the walk of the tree and the files it writes: ``OUTDIR`` is what ``<mount>/dicomweb`` shows,
for the chosen studies, byte for byte, because both come from the same ``webtree`` layout and
``webfiles`` rendering. The series are fetched first by the prefetch machinery (progress,
resumable, failures listed), so frames and bulk data are cut from the cache. Files that already
hold the same bytes are kept; nothing is written outside ``OUTDIR`` (every name is a validated
key or one of the layout's fixed names). Must not render anything itself.
"""

from __future__ import annotations

import os

import trio

from dicomfs.cache import BlobStore
from dicomfs.catalog import Catalog
from dicomfs.errors import DicomfsError, OutputError
from dicomfs.materialise import OutputDir, Written, write_bytes
from dicomfs.records import StudyRecord
from dicomfs.tasks import open_nursery
from dicomfs.webfiles import WebFiles
from dicomfs.webtree import ROOT, WebLayout, WebNode

PARALLEL_FILES = 8


async def export_tree(catalog: Catalog, blobs: BlobStore, studies: list[StudyRecord],
                      out: OutputDir) -> tuple[Written, list[str]]:
    """Write the tree of ``studies`` below ``out`` (which plays the part of ``dicomweb/``).
    A file that cannot be rendered (a broken instance, say) is listed in the failures returned,
    and the rest is written; a folder that cannot be listed fails its whole subtree the same way.
    An output error (disk full, permissions) stops everything."""
    chosen = {study.uid: study for study in studies}

    async def shown() -> dict[str, StudyRecord]:
        return chosen

    files = WebFiles(catalog, blobs, studies=shown)
    layout = WebLayout(catalog, files)
    written = Written()
    limit = trio.CapacityLimiter(PARALLEL_FILES)

    failures: list[str] = []

    async def write(node: WebNode) -> None:
        async with limit:
            try:
                data = await files.content(node)
            except DicomfsError as exc:
                if isinstance(exc, OutputError):
                    raise
                failures.append(f"{'/'.join(node.path)}: {exc}")
                return
            target = out.path.joinpath(*node.path)
            if await trio.to_thread.run_sync(write_bytes, target, data, out.file_mode):
                written.files += 1
                written.bytes += len(data)
            else:
                written.skipped += 1

    async def walk(node: WebNode, nursery: trio.Nursery) -> None:
        folder = out.path.joinpath(*node.path)
        try:
            await trio.to_thread.run_sync(out.mkdir, folder)
        except OSError as exc:
            raise OutputError(f"cannot create {folder}: {exc.strerror}") from None
        async with limit:
            try:
                children = await layout.children(node)
            except DicomfsError as exc:
                failures.append(f"{'/'.join(node.path) or '.'}/: {exc}")
                return
        for child in children:
            if child.is_dir:
                nursery.start_soon(walk, child, nursery)
            else:
                nursery.start_soon(write, child)

    async with open_nursery() as nursery:
        nursery.start_soon(walk, ROOT, nursery)
    await trio.to_thread.run_sync(os.sync)  # files are renamed into place unsynced: sync once
    return written, sorted(failures)
