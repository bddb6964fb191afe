"""``dicomfs export``: its arguments, and writing the static DICOMweb tree once its studies are
fetched.

Owns ``--dicomweb OUTDIR`` and the line that says what was exported; the selection, fetching,
progress, failures and Ctrl-C are prefetch's (``commands.prefetch.fetch``), and nothing is
exported unless every study was fetched. Must not walk or render the tree itself
(``dicomfs.export``).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from dicomfs.commands.options import add_fetch_options
from dicomfs.commands.prefetch import AfterFetch, fetch

if TYPE_CHECKING:
    from dicomfs.archive import Archive
    from dicomfs.materialise import OutputDir
    from dicomfs.records import StudyRecord


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = subparsers.add_parser("export", help="write the static DICOMweb tree of studies to a folder "
                                   "(what <mount>/dicomweb shows), fetching them first")
    export.add_argument("source")
    export.add_argument("--dicomweb", required=True, metavar="OUTDIR",
                        help="the folder to write (it plays the part of <mount>/dicomweb)")
    add_fetch_options(export)


def run(args: argparse.Namespace) -> int:
    return fetch(args, args.dicomweb, AfterFetch(
        "nothing exported: fix the failures above and run the same command again", _export))


async def _export(archive: Archive, studies: list[StudyRecord], to: OutputDir) -> list[str]:
    from dicomfs.export import export_tree

    assert archive.blobs is not None
    written, failures = await export_tree(archive.catalog, archive.blobs, studies, to)
    print(f"exported {len(studies)} studies to {to.path}: {written.files} files written "
          f"({written.bytes} bytes), {written.skipped} unchanged, {len(failures)} failed", flush=True)
    return failures
