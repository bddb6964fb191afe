"""``dicomfs ls``: its arguments, and listing what an archive holds (a table or JSON lines).

Owns finding the archive of a path inside a dicomfs mount (listed with that mount's cache), and
printing the rows. Must not search or format rows itself (``search``, ``listing``) nor open a
blob store.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dicomfs.commands.options import add_archive_options, archive_options, configure_logging
from dicomfs.query import Query

if TYPE_CHECKING:
    from dicomfs.archive import ArchiveOptions


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ls = subparsers.add_parser("ls", help="search the archive")
    ls.add_argument("source")
    ls.add_argument("--query", action="append", metavar="KEY=VALUE",
                    help="DICOM keyword=value; * and ? wildcards, YYYYMMDD-YYYYMMDD date ranges")
    ls.add_argument("--level", choices=["study", "series", "instance"], default="study")
    ls.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    add_archive_options(ls)


def run(args: argparse.Namespace) -> int:
    import trio

    from dicomfs.mount import mount_containing

    given = Path(args.source).expanduser()
    # (an existing path only: "demo" typed in a folder of a mount still means the demo)
    mounted = mount_containing(given) if "://" not in args.source and given.exists() else None
    if mounted is not None:
        point, spec, cache_dir = mounted
        print(f"dicomfs: {args.source} is in the dicomfs mount {point} of {spec.kind} {spec.location}: "
              "listing that archive", file=sys.stderr)
        if not args.cache_dir:
            args.cache_dir = str(cache_dir)
    options = archive_options(args, with_blobs=False, spec=mounted[1] if mounted is not None else None)
    query, options = options.query, dataclasses.replace(options, query=None)
    configure_logging("WARNING", "dicomfs: %(message)s")
    return trio.run(_run_ls, options, query or Query(), args.level, args.json)


async def _run_ls(options: ArchiveOptions, query: Query, level: str, as_json: bool) -> int:
    from dicomfs.archive import open_archive
    from dicomfs.listing import json_lines, rows, table

    async with open_archive(options) as archive:
        found = await rows(archive.catalog, query, level)
        for row in found:
            row["source"] = archive.source.description  # (IDC: which release of the index)
    for line in json_lines(found) if as_json else table(found, level):
        print(line)
    return 0
