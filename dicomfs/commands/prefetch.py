"""``dicomfs prefetch``: its arguments, and the fetching machinery ``export`` shares.

Owns checking a selection of studies (``STUDY_UID``, ``--all``, ``--query``, ``--jobs``),
running ``dicomfs.prefetch``'s select, plan and execute in an opened archive (``fetch``), the
dry-run report, the ``failed:`` lines and their exit status, and stopping cleanly on Ctrl-C or
SIGTERM (complete series stay cached). A command that does something with the fetched studies
(``export``) passes it as an ``AfterFetch``. Must not plan, fetch or write files itself
(``dicomfs.prefetch``, ``dicomfs.materialise``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dicomfs.commands.options import add_fetch_options, archive_options, configure_logging
from dicomfs.errors import UsageError
from dicomfs.query import Query

if TYPE_CHECKING:
    from dicomfs.archive import Archive, ArchiveOptions
    from dicomfs.materialise import OutputDir
    from dicomfs.records import StudyRecord


@dataclasses.dataclass(frozen=True)
class AfterFetch:
    """What a command does with its studies once every one of them is fetched (``export``)."""

    refusal: str  # said when something failed to be fetched: then nothing is done
    run: Callable[[Archive, list[StudyRecord], OutputDir], Awaitable[list[str]]]  # returns its failures


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    prefetch = subparsers.add_parser("prefetch", help="fetch whole studies into the cache (resumable)")
    prefetch.add_argument("source")
    add_fetch_options(prefetch)
    prefetch.add_argument("--dry-run", action="store_true", help="print the plan, transfer nothing")
    prefetch.add_argument("--to", metavar="DIR", help="also write DIR/<study>/<series>/<instance>.dcm")
    prefetch.add_argument("--zip", action="store_true", help="with --to: one <study>.zip per study instead")


def run(args: argparse.Namespace) -> int:
    return fetch(args, args.to if args.to and not args.dry_run else None)


def fetch(args: argparse.Namespace, output: str | None, after: AfterFetch | None = None) -> int:
    """Fetch the studies the arguments select (``add_fetch_options``) into the cache: with
    ``--to`` files written into ``output``; with ``after``, that run on them (``output`` its
    folder). The exit status."""
    import trio

    from dicomfs.materialise import check_output_dir
    from dicomfs.uids import is_key

    if not (args.studies or args.all or args.query):
        raise UsageError("say which studies: STUDY_UID ..., --all, or --query KEY=VALUE")
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    if after is None and args.zip and not args.to:
        raise UsageError("--zip needs --to DIR")
    bad = [uid for uid in args.studies if not is_key(uid)]
    if bad:
        raise UsageError(f"{bad[0][:80]!r} is not a study UID")
    options = archive_options(args, with_blobs=True)
    # The selection is studies; the catalog itself shows all of them.
    selection = options.query or Query()
    options = dataclasses.replace(options, query=None)
    to = check_output_dir(Path(output), args.user_umask) if output is not None else None
    configure_logging(args.log_level)
    return trio.run(_run_prefetch, options, args, selection, to, after)


async def _run_prefetch(options: ArchiveOptions, args: argparse.Namespace, selection: Query,
                        to: OutputDir | None, after: AfterFetch | None) -> int:
    """The prefetch, cancelled cleanly by Ctrl-C or SIGTERM: downloads stop, partial files are
    removed, complete series stay cached (a rerun finishes the rest)."""
    import signal

    import trio

    from dicomfs.tasks import open_nursery

    interrupted = False
    status = 1
    async with open_nursery() as nursery:
        async def on_signal() -> None:
            nonlocal interrupted
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    interrupted = True
                    nursery.cancel_scope.cancel()
                    return

        async def work() -> None:
            nonlocal status
            status = await _prefetch_archive(options, args, selection, to, after)
            nursery.cancel_scope.cancel()

        nursery.start_soon(on_signal)
        nursery.start_soon(work)
    if interrupted:
        raise KeyboardInterrupt
    return status


async def _prefetch_archive(options: ArchiveOptions, args: argparse.Namespace, selection: Query,
                            to: OutputDir | None, after: AfterFetch | None) -> int:
    from dicomfs.archive import open_archive
    from dicomfs.prefetch import execute, make_plan, select_studies, summary

    started = time.monotonic()
    dry_run = after is None and args.dry_run
    async with open_archive(options) as archive:
        assert archive.blobs is not None
        studies, missing = await select_studies(archive.catalog, args.studies, args.all, selection)
        plan = await make_plan(archive.catalog, archive.blobs, studies, args.jobs, list_instances=dry_run)
        plan.failures[:0] = missing
        if dry_run:
            for line in plan.describe():
                print(line, flush=True)
            if plan.total_bytes is not None and plan.total_bytes > archive.blobs.size_limit:
                print(f"note: that is more than the cache limit ({archive.blobs.size_limit} bytes): "
                      "raise --cache-size, or the first series fetched will be evicted again", flush=True)
            return report_failures(plan.failures)
        print(f"prefetching {len(plan.studies)} studies, {len(plan.series)} series "
              f"({len(plan.cached)} already cached)", flush=True)
        await archive.catalog.remember_studies(studies)
        outcome = await execute(plan, archive.catalog, archive.blobs, args.jobs, sys.stderr,
                                to=None if after else to, zip_output=after is None and args.zip)
        print(summary(plan, outcome, time.monotonic() - started), flush=True)
        failures = plan.failures + outcome.failures
        if after is not None and to is not None:
            if failures:
                report_failures(failures)
                print(f"dicomfs: {after.refusal}", file=sys.stderr)
                return 1
            failures = await after.run(archive, studies, to)
    return report_failures(failures)


def report_failures(failures: list[str]) -> int:
    """One ``failed:`` line per failure on stderr; the exit status they call for."""
    for failure in failures:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if failures else 0
