"""``dicomfs ls``: its arguments, and listing what an archive holds (a table or JSON lines).

Owns finding the archive of a path inside a dicomfs mount (listed with that mount's cache), and
printing the rows (JSON lines a batch at a time as they are found; a table once all are in). Must
not search or format rows itself (``search``, ``listing``) nor open a blob store.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
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
    mounted = mount_containing(given) if "://" not in args.source and os.path.exists(given) else None
    if mounted is not None:
        point, spec, cache_dir = mounted
        print(f"dicomfs: {args.source} is in the dicomfs mount {point} of {spec.kind} {spec.location}: "
              "listing that archive", file=sys.stderr)
        if not args.cache_dir:
            args.cache_dir = str(cache_dir)
    options = archive_options(args, with_blobs=False, spec=mounted[1] if mounted is not None else None)
    query, options = options.query, dataclasses.replace(options, query=None)
    configure_logging("WARNING", "dicomfs: %(message)s")
    # A listing makes records and rows by the hundred thousand, freed by their reference counts:
    # the cyclic collector's walks of them took a third of a 592,600-series listing (61 -> 43 s
    # without them, the same peak memory). Off for the listing only.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return trio.run(_run_ls, options, query or Query(), args.level, args.json)
    finally:
        if enabled:
            gc.enable()


async def _run_ls(options: ArchiveOptions, query: Query, level: str, as_json: bool) -> int:
    from contextlib import aclosing

    from dicomfs.archive import open_archive
    from dicomfs.listing import json_lines, row_batches, rows, table

    if not as_json:  # a table's columns fit its widest cell: it is printed once every row is in
        async with open_archive(options) as archive:
            found = await rows(archive.catalog, query, level)
        for line in table(found, level):
            print(line)
        return 0
    # JSON lines are printed a batch at a time (a thousand rows or more) as the search finds them,
    # not held until the end (a whole IDC collection's 592,600 series took 2.2 GB as one list);
    # after an error, what was found before it has been printed (the exit status says it failed)
    reader_gone = False
    async with open_archive(options) as archive:
        async with aclosing(row_batches(archive.catalog, query, level)) as batches:
            async for batch in batches:
                for row in batch:
                    row["source"] = archive.source.description  # (IDC: which release of the index)
                try:
                    print("\n".join(json_lines(batch)), flush=True)
                except BrokenPipeError:  # (``| head``): stop searching; reported once the archive is closed
                    reader_gone = True
                    break
    if reader_gone:
        raise BrokenPipeError
    return 0
