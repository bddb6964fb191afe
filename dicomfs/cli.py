"""The ``dicomfs`` command line: parse arguments, report errors in one line, pick an exit status.

Owns user-facing option handling, detaching (a child process in the foreground mode that reports
readiness through a pipe), and ``umount``. Must not implement mounting or fetching itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dicomfs import __version__
from dicomfs.errors import DicomfsError, UsageError
from dicomfs.query import Query, parse_query
from dicomfs.sources import (
    DEFAULT_AE_TITLE,
    DEFAULT_MOVE_PORT,
    SourceOptions,
    SourceSpec,
    credentials_from_environment,
    parse_source,
    query_keys,
)
from dicomfs.transferlimits import DEFAULT_DEADLINE, DEFAULT_MIN_RATE, DEFAULT_WINDOW, TransferLimits
from dicomfs.waiting import DEFAULT_READ_TIMEOUT

if TYPE_CHECKING:
    from dicomfs.archive import ArchiveOptions
    from dicomfs.materialise import OutputDir
    from dicomfs.mount import MountOptions

log = logging.getLogger("dicomfs")

DEFAULT_JOBS = 8
READY_TIMEOUT = 600.0
UMOUNT_TIMEOUT = 60.0
UMOUNT_GRACE = 5.0  # after unmounting, the daemon gets this long to see it before it is told to stop
UMOUNT_STOP_TIMEOUT = 15.0
PRIVATE_UMASK = 0o077  # what dicomfs writes into its cache and log is its user's alone
_ALLOW_OTHER_WARNING = ("--allow-other: every user of this machine can read {mountpoint} (patient data), "
                        "whatever the cache's own permissions")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    """``20G``, ``512M``, ``1.5T`` or a plain byte count (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise UsageError(f"invalid size {text!r} (examples: 20G, 512M, 1.5T)")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise UsageError(f"invalid size {text!r}: must be positive")
    return size


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "dicomfs"


def default_cache_size(cache_dir: Path) -> int:
    """A fifth of the free space where the cache lives (at least 1 GiB)."""
    probe = cache_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    return max(free // 5, 1 << 30)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomfs", description="Mount a DICOM archive as folders.")
    parser.add_argument("--version", action="version", version=f"dicomfs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    mount = commands.add_parser("mount", help="mount SOURCE (DICOMweb URL, gs:// COD bucket, dimse:// PACS, folder, "
                                "or 'demo') on MOUNTPOINT")
    mount.add_argument("source")
    mount.add_argument("mountpoint")
    _add_archive_options(mount)
    mount.add_argument("--query", action="append", metavar="KEY=VALUE",
                       help="show only matching studies (DICOM keyword, * ? wildcards, date ranges)")
    mount.add_argument("--foreground", action="store_true", help="do not detach")
    mount.add_argument("--cache-size", help="cache size limit, e.g. 20G (default: the limit the cache "
                       "already has, else 1/5 of free disk)")
    mount.add_argument("--log-level", default="INFO",
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper)
    mount.add_argument("--log-file", help="where the daemon logs, reopened on SIGHUP (default: <cache-dir>/dicomfs.log "
                       "when detached, stderr in the foreground)")
    mount.add_argument("--allow-other", action="store_true", help="let other users see the mount")
    mount.add_argument("--systemd", action="store_true",
                       help="stay in the foreground and send READY=1 to $NOTIFY_SOCKET when mounted")
    mount.add_argument("--listing-ttl", type=float, default=60.0,
                       help="seconds a study or series listing is trusted (default 60)")
    _add_transfer_options(mount)
    mount.add_argument("--read-timeout", type=_seconds, default=DEFAULT_READ_TIMEOUT, metavar="SECONDS",
                       help="longest a file system request waits for the archive before it fails with EIO; "
                       f"the download goes on (default {DEFAULT_READ_TIMEOUT:.0f})")
    mount.add_argument("--readahead", choices=["off", "series", "study"], default="study",
                       help="what is fetched before it is read: 'study' (default) the whole series of what is read "
                       "and then the study's next series, one after another; 'series' the whole series of what is "
                       "read; 'off' only what is read (one instance alone where the archive allows it)")
    mount.add_argument("--views", metavar="LIST", help="which views the mount's root shows, comma-separated "
                       "(default: studies,patients,dates,dicomweb)")
    mount.add_argument("--view", action="append", default=[], metavar="NAME=TEMPLATE",
                       help="add a view laid out by a template of DICOM keywords, e.g. "
                       "'by-accession={AccessionNumber}/{SeriesNumber} {SeriesDescription}/{InstanceNumber}.dcm'")
    mount.add_argument("--ascii-names", action="store_true",
                       help="fold the readable views' names to ASCII (e.g. for Samba shares)")
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    serve = commands.add_parser("serve", help="serve SOURCE as a DICOMweb service over HTTP (QIDO-RS, WADO-RS), "
                                "and a web viewer with --viewer; no mount needed")
    serve.add_argument("source")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                       "only; 0.0.0.0 for every network it is on)")
    serve.add_argument("--port", type=_port, default=8080, help="default 8080")
    _add_archive_options(serve)
    serve.add_argument("--query", action="append", metavar="KEY=VALUE",
                       help="serve only matching studies (DICOM keyword, * ? wildcards, date ranges)")
    serve.add_argument("--cache-size", help="cache size limit, e.g. 20G (default: the limit the cache "
                       "already has, else 1/5 of free disk)")
    serve.add_argument("--viewer", metavar="DIR", help="also serve this built web viewer at / (OHIF's dist/, "
                       "from scripts/get-ohif.sh), configured for this server's DICOMweb root")
    serve.add_argument("--cors-origin", metavar="ORIGIN", help="let pages from ORIGIN (e.g. "
                       "https://viewer.example.org, or *) read the responses (default: none; a --viewer needs none)")
    serve.add_argument("--systemd", action="store_true", help="send READY=1 to $NOTIFY_SOCKET once listening")
    serve.add_argument("--listing-ttl", type=float, default=60.0,
                       help="seconds a study or series listing is trusted (default 60)")
    _add_transfer_options(serve)
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper)
    serve.add_argument("--access-log", action="store_true", help="log every request")

    prefetch = commands.add_parser("prefetch", help="fetch whole studies into the cache (resumable)")
    prefetch.add_argument("source")
    _add_fetch_options(prefetch)
    prefetch.add_argument("--dry-run", action="store_true", help="print the plan, transfer nothing")
    prefetch.add_argument("--to", metavar="DIR", help="also write DIR/<study>/<series>/<instance>.dcm")
    prefetch.add_argument("--zip", action="store_true", help="with --to: one <study>.zip per study instead")

    export = commands.add_parser("export", help="write the static DICOMweb tree of studies to a folder "
                                 "(what <mount>/dicomweb shows), fetching them first")
    export.add_argument("source")
    export.add_argument("--dicomweb", required=True, metavar="OUTDIR",
                        help="the folder to write (it plays the part of <mount>/dicomweb)")
    _add_fetch_options(export)

    ls = commands.add_parser("ls", help="search the archive")
    ls.add_argument("source")
    ls.add_argument("--query", action="append", metavar="KEY=VALUE",
                    help="DICOM keyword=value; * and ? wildcards, YYYYMMDD-YYYYMMDD date ranges")
    ls.add_argument("--level", choices=["study", "series", "instance"], default="study")
    ls.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    _add_archive_options(ls)

    cache = commands.add_parser("cache", help="inspect, check or empty caches")
    cache.add_argument("action", choices=["stats", "verify", "clear"])
    cache.add_argument("--cache-dir", help="one cache (default: every cache under $XDG_CACHE_HOME/dicomfs)")

    umount = commands.add_parser("umount", help="unmount and wait for the daemon to exit")
    umount.add_argument("mountpoint")
    return parser


def _add_fetch_options(parser: argparse.ArgumentParser) -> None:
    """What ``prefetch`` and ``export`` share: which studies, the archive, how to fetch them."""
    parser.add_argument("studies", nargs="*", metavar="STUDY_UID")
    parser.add_argument("--all", action="store_true", help="every study in the archive")
    parser.add_argument("--query", action="append", metavar="KEY=VALUE", help="studies matching the query")
    _add_archive_options(parser)
    parser.add_argument("--cache-size", help="cache size limit, e.g. 20G (default: the limit the cache "
                        "already has, else 1/5 of free disk)")
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS,
                        help=f"series fetched at the same time (default {DEFAULT_JOBS})")
    _add_transfer_options(parser)
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        type=str.upper)


def _add_archive_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", help="default: $XDG_CACHE_HOME/dicomfs/<source-id>")
    parser.add_argument("--user", help="HTTP basic auth user; password from DICOMFS_PASSWORD or --password-file")
    parser.add_argument("--password-file")
    parser.add_argument("--token-file", help="bearer token file (or DICOMFS_TOKEN)")
    parser.add_argument("--endpoint", help="object store endpoint for gs:// sources (default: "
                        "$STORAGE_EMULATOR_HOST or Google Cloud Storage) and s3:// sources (default: "
                        "$AWS_ENDPOINT_URL or AWS S3 in $AWS_REGION)")
    parser.add_argument("--user-project", help="project billed for requester-pays buckets")
    parser.add_argument("--idc-index", metavar="FILE", help="idc source: the IDC index parquet (default: the "
                        "installed idc-index-data package's)")
    parser.add_argument("--no-sign-request", action="store_true",
                        help="s3:// sources: anonymous requests, even where AWS credentials are set")
    parser.add_argument("--timeout", type=_seconds, default=DEFAULT_WINDOW, metavar="SECONDS",
                        help="longest the archive may stay silent, and the window over which --min-rate is "
                        f"measured (default {DEFAULT_WINDOW:.0f})")
    dimse = parser.add_argument_group("DIMSE (dimse:// and dimse+tls:// sources)")
    dimse.add_argument("--ae-title", default=DEFAULT_AE_TITLE,
                       help=f"our calling AE title, as the PACS knows it (default {DEFAULT_AE_TITLE})")
    dimse.add_argument("--retrieve", choices=["get", "move", "auto"], default="auto",
                       help="C-GET, C-MOVE to dicomfs's storage SCP, or C-GET falling back to C-MOVE when the "
                       "PACS refuses it (default auto)")
    dimse.add_argument("--move-port", type=_port, default=DEFAULT_MOVE_PORT,
                       help=f"port of the storage SCP for C-MOVE (default {DEFAULT_MOVE_PORT})")
    dimse.add_argument("--max-associations", type=_positive, default=2,
                       help="associations open with the PACS at once (default 2)")
    dimse.add_argument("--tls-ca", metavar="FILE", help="CA certificates the PACS's TLS certificate is checked "
                       "against (default: the system's)")
    dimse.add_argument("--tls-cert", metavar="FILE", help="our TLS client certificate, if the PACS asks for one")
    dimse.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert")


def _add_transfer_options(parser: argparse.ArgumentParser) -> None:
    """How slow a retrieve may be before it is abandoned (mount, prefetch, export)."""
    parser.add_argument("--min-rate", type=_rate, default=DEFAULT_MIN_RATE, metavar="RATE",
                        help="a retrieve that brings less per second over --timeout is abandoned, e.g. 64K, "
                        f"0 for no minimum (default {DEFAULT_MIN_RATE // 1024}K)")
    parser.add_argument("--retrieve-timeout", type=_seconds, default=DEFAULT_DEADLINE, metavar="SECONDS",
                        help=f"longest one series retrieve may take (default {DEFAULT_DEADLINE:.0f})")


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}: must be positive")
    return value


def _rate(text: str) -> int:
    """``--min-rate``: bytes per second, with the units of ``parse_size``; 0 turns it off."""
    if text.strip() == "0":
        return 0
    try:
        return parse_size(text.removesuffix("/s"))
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _archive_options(args: argparse.Namespace, *, with_blobs: bool,
                     spec: SourceSpec | None = None) -> ArchiveOptions:
    from dicomfs.archive import ArchiveOptions
    from dicomfs.cache import stored_size_limit

    spec = spec or parse_source(args.source)
    credentials = credentials_from_environment(args.user, args.password_file, args.token_file)
    cache_dir = Path(args.cache_dir).expanduser().resolve() if args.cache_dir else default_cache_root() / spec.source_id
    cache_size = None
    if with_blobs:
        # The limit belongs to the cache: every process using it keeps the one set first (or
        # last given with --cache-size), not a default computed from today's free space.
        cache_size = (parse_size(args.cache_size) if args.cache_size
                      else stored_size_limit(cache_dir) or default_cache_size(cache_dir))
    limits = TransferLimits(args.timeout, getattr(args, "min_rate", DEFAULT_MIN_RATE),
                            getattr(args, "retrieve_timeout", DEFAULT_DEADLINE))
    source_options = SourceOptions(args.endpoint, args.user_project, args.timeout, ae_title=args.ae_title,
                                   retrieve=args.retrieve, move_port=args.move_port,
                                   max_associations=args.max_associations, tls_ca=args.tls_ca,
                                   tls_cert=args.tls_cert, tls_key=args.tls_key, idc_index=args.idc_index,
                                   sign=not args.no_sign_request)
    return ArchiveOptions(spec, cache_dir, credentials, source_options, cache_size,
                          getattr(args, "listing_ttl", 60.0), parse_query(args.query, query_keys(spec)), limits)


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ("prefetch", "export") and not any(e.startswith("-") for e in extra):
        args.studies += extra  # study UIDs after options: dicomfs prefetch SRC --cache-dir D UID...
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # The cache holds patient names: everything dicomfs creates there is private. Output files
    # (prefetch --to, export) get the user's own umask back explicitly (materialise.OutputDir).
    args.user_umask = os.umask(PRIVATE_UMASK)
    commands = {"umount": lambda: _umount(Path(args.mountpoint)), "prefetch": lambda: _prefetch(args),
                "export": lambda: _prefetch(args),
                "ls": lambda: _ls(args), "cache": lambda: _cache(args), "serve": lambda: _serve(args),
                "mount": lambda: _mount(args, list(sys.argv[1:] if argv is None else argv))}
    try:
        status = commands[args.command]()
        sys.stdout.flush()  # here, so that a closed pipe is reported below, not at interpreter exit
        return status
    except DicomfsError as exc:
        print(f"dicomfs: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except BrokenPipeError:  # the reader went away (``dicomfs ls … | head``): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        if args.command in ("prefetch", "export"):
            print("dicomfs: interrupted: complete series are kept; run the same command again to finish",
                  file=sys.stderr)
        return 130


def _mount(args: argparse.Namespace, argv: list[str]) -> int:
    from dicomfs.cache import layout
    from dicomfs.mount import MountOptions, check_mountpoint
    from dicomfs.readahead import Mode
    from dicomfs.views import COLLECTIONS, DEFAULT_VIEWS, ViewOptions

    spec = parse_source(args.source)
    defaults = (*DEFAULT_VIEWS, COLLECTIONS) if spec.kind == "idc" else DEFAULT_VIEWS
    views = ViewOptions.parse(args.views, args.view, args.ascii_names, defaults)
    archive = _archive_options(args, with_blobs=True, spec=spec)
    mountpoint = check_mountpoint(Path(args.mountpoint).expanduser())
    assert archive.cache_size is not None
    detach = not (args.foreground or args.systemd)
    log_file = Path(args.log_file).expanduser().absolute() if args.log_file else None
    if detach and log_file is None:
        log_file = layout.paths(archive.cache_dir).log
    options = MountOptions(archive.spec, mountpoint, archive.cache_dir, archive.cache_size, archive.credentials,
                           allow_other=args.allow_other, listing_ttl=args.listing_ttl,
                           source_options=archive.source_options, query=archive.query, limits=archive.limits,
                           read_timeout=args.read_timeout, log_file=log_file, views=views,
                           readahead=Mode(args.readahead))
    if args.allow_other and detach:
        print(f"dicomfs: warning: {_ALLOW_OTHER_WARNING.format(mountpoint=mountpoint)}", file=sys.stderr)
    if not detach:
        return _run_foreground(options, args)
    return _detach(options, argv)


def _prefetch(args: argparse.Namespace) -> int:
    import trio

    from dicomfs.materialise import check_output_dir

    if not (args.studies or args.all or args.query):
        raise UsageError("say which studies: STUDY_UID ..., --all, or --query KEY=VALUE")
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    exporting = args.command == "export"
    if not exporting and args.zip and not args.to:
        raise UsageError("--zip needs --to DIR")
    from dicomfs.uids import is_key

    bad = [uid for uid in args.studies if not is_key(uid)]
    if bad:
        raise UsageError(f"{bad[0][:80]!r} is not a study UID")
    options = _archive_options(args, with_blobs=True)
    # The selection is studies; the catalog itself shows all of them.
    selection = options.query or Query()
    options = dataclasses.replace(options, query=None)
    to: OutputDir | None
    if exporting:
        to = check_output_dir(Path(args.dicomweb), args.user_umask)
    else:
        to = check_output_dir(Path(args.to), args.user_umask) if args.to and not args.dry_run else None
    _configure_logging(args.log_level)
    return trio.run(_run_prefetch, options, args, selection, to)


async def _run_prefetch(options: ArchiveOptions, args: argparse.Namespace, selection: Query,
                        to: OutputDir | None) -> int:
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
            status = await _prefetch_archive(options, args, selection, to)
            nursery.cancel_scope.cancel()

        nursery.start_soon(on_signal)
        nursery.start_soon(work)
    if interrupted:
        raise KeyboardInterrupt
    return status


async def _prefetch_archive(options: ArchiveOptions, args: argparse.Namespace, selection: Query,
                            to: OutputDir | None) -> int:
    from dicomfs.archive import open_archive
    from dicomfs.prefetch import execute, make_plan, select_studies, summary

    started = time.monotonic()
    exporting = args.command == "export"
    dry_run = not exporting and args.dry_run
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
            return _report_failures(plan.failures)
        print(f"prefetching {len(plan.studies)} studies, {len(plan.series)} series "
              f"({len(plan.cached)} already cached)", flush=True)
        await archive.catalog.remember_studies(studies)
        outcome = await execute(plan, archive.catalog, archive.blobs, args.jobs, sys.stderr,
                                to=None if exporting else to, zip_output=not exporting and args.zip)
        print(summary(plan, outcome, time.monotonic() - started), flush=True)
        failures = plan.failures + outcome.failures
        if exporting and to is not None:
            if failures:
                _report_failures(failures)
                print("dicomfs: nothing exported: fix the failures above and run the same command again",
                      file=sys.stderr)
                return 1
            from dicomfs.export import export_tree

            written, failures = await export_tree(archive.catalog, archive.blobs, studies, to)
            print(f"exported {len(studies)} studies to {to.path}: {written.files} files written "
                  f"({written.bytes} bytes), {written.skipped} unchanged, {len(failures)} failed", flush=True)
    return _report_failures(failures)


def _report_failures(failures: list[str]) -> int:
    """One ``failed:`` line per failure on stderr; the exit status they call for."""
    for failure in failures:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _serve(args: argparse.Namespace) -> int:
    import trio

    from dicomfs.server.run import ServeOptions, serve

    if args.cors_origin is not None and args.cors_origin != "*" and not re.fullmatch(
            r"https?://[A-Za-z0-9.-]+(:\d{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:\d{1,5})?", args.cors_origin):
        raise UsageError(f"--cors-origin {args.cors_origin!r} is not an origin (scheme://host[:port], or *)")
    viewer = Path(args.viewer).expanduser() if args.viewer else None
    options = ServeOptions(_archive_options(args, with_blobs=True), args.host, args.port, args.cors_origin, viewer,
                           args.access_log)
    _configure_logging(args.log_level)

    def ready(root: str) -> None:
        print(f"dicomfs: serving {args.source} at {root}", flush=True)

    trio.run(functools.partial(serve, options, ready, systemd=args.systemd))
    return 0


def _ls(args: argparse.Namespace) -> int:
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
    options = _archive_options(args, with_blobs=False, spec=mounted[1] if mounted is not None else None)
    query, options = options.query, dataclasses.replace(options, query=None)
    _configure_logging("WARNING", "dicomfs: %(message)s")
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


def _cache(args: argparse.Namespace) -> int:
    from dicomfs.cache import admin
    from dicomfs.progress import human_bytes

    root = Path(args.cache_dir).expanduser().resolve() if args.cache_dir else default_cache_root()
    caches = admin.caches_under(root)
    if args.cache_dir and not caches:
        raise UsageError(f"{root} is not a dicomfs cache")
    status = 0
    for cache_dir in caches:
        if args.action == "stats":
            st = admin.stats(cache_dir)
            limit = human_bytes(st.size_limit) if st.size_limit else "none"
            print(f"{st.path}: {st.source}: {st.series} series, {st.instances} instances, "
                  f"{human_bytes(st.blob_bytes)} ({st.blob_bytes} bytes) of blobs"
                  + (f" and {st.single_instances} single-instance blobs" if st.single_instances else "")
                  + f", {human_bytes(st.disk_bytes)} on disk, limit {limit}" + (", in use" if st.in_use else ""))
        elif args.action == "verify":
            with admin.CacheUse(cache_dir):
                report = admin.verify(cache_dir)
            print(f"{report.path}: checked {report.checked} blobs ({report.bytes_checked} bytes, "
                  f"{report.crc_checked} instance CRC32Cs): {len(report.dropped)} bad, dropped"
                  + (f"; {report.orphans} unreferenced blob files deleted" if report.orphans else ""))
            for problem in report.dropped:
                print(f"dropped: {problem}", file=sys.stderr)
            if report.dropped:
                status = 1
        else:
            freed = admin.clear(cache_dir)
            print(f"{cache_dir}: cleared, {human_bytes(freed)} freed")
    if not caches:
        print(f"no caches under {root}")
    return status


def _configure_logging(level: str, fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    logging.basicConfig(level=level, format=fmt)
    for noisy in ("httpx", "httpcore", "pyfuse3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    # pynetdicom logs every association, and its own (multi-line) account of each failure, which
    # dicomfs reports in one line of its own: only when debugging
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if level == "DEBUG" else logging.CRITICAL)


def _run_foreground(options: MountOptions, args: argparse.Namespace) -> int:
    import trio

    from dicomfs.mount import open_log, sd_notify, serve

    if options.log_file is not None:
        try:
            open_log(options.log_file)
        except OSError as exc:
            raise UsageError(f"cannot write the log file {options.log_file}: {exc.strerror}") from None
    _configure_logging(args.log_level)
    if options.allow_other:
        log.warning(_ALLOW_OTHER_WARNING.format(mountpoint=options.mountpoint))
    ready_fd: int | None = args.ready_fd

    def on_ready() -> None:
        nonlocal ready_fd
        if args.systemd:
            sd_notify("READY=1")
        if ready_fd is not None:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)
            ready_fd = None

    try:
        trio.run(serve, options, on_ready)
    except DicomfsError as exc:
        log.error("%s", exc)
        if ready_fd is not None:
            os.write(ready_fd, f"error: {exc}\n".encode())
        raise
    except Exception as exc:
        log.exception("the daemon failed")
        if ready_fd is not None:
            os.write(ready_fd, f"error: {type(exc).__name__}: {exc}\n".encode())
        return 1
    return 0


def _detach(options: MountOptions, argv: list[str]) -> int:
    """Start the daemon (this command in the foreground, logging to the log file, which it
    reopens on SIGHUP) and wait until it says it is mounted, or why not."""
    from dicomfs.cache import make_private

    assert options.log_file is not None
    log_path = options.log_file
    try:
        make_private(options.cache_dir)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as exc:
        raise UsageError(f"cannot write the log file {log_path}: {exc.strerror}") from None
    read_fd, write_fd = os.pipe()
    child_argv = [sys.executable, "-m", "dicomfs", *argv, "--foreground", "--log-file", str(log_path),
                  "--ready-fd", str(write_fd)]
    try:
        child = subprocess.Popen(child_argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                                 pass_fds=(write_fd,), start_new_session=True)
    finally:
        os.close(log_fd)
    os.close(write_fd)
    message = b""
    deadline = time.monotonic() + READY_TIMEOUT
    while not message.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([read_fd], [], [], remaining)[0]:
            child.kill()
            raise DicomfsError(f"the daemon did not become ready in {READY_TIMEOUT:.0f}s (see {log_path})")
        chunk = os.read(read_fd, 4096)
        if not chunk:
            break
        message += chunk
    os.close(read_fd)
    text = message.decode(errors="replace").strip()
    if text == "ready":
        return 0
    if text.startswith("error: "):
        raise DicomfsError(text[len("error: "):])
    raise DicomfsError(f"the daemon exited with status {child.wait()} before mounting (see {log_path})")


def _umount(mountpoint: Path) -> int:
    """Unmount, and wait for the daemon to exit. A daemon that does not see its end (the mount is
    also held in another mount namespace, as containers do) is told to stop: its pid is known."""
    from dicomfs.mount import pidfile_for

    mountpoint = Path(os.path.abspath(mountpoint.expanduser()))
    pidfile = pidfile_for(mountpoint)
    try:
        pid: int | None = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        pid = None
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    command = [tool, "-u", str(mountpoint)] if tool else ["umount", str(mountpoint)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=UMOUNT_TIMEOUT)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["unmount failed"])[-1]
        raise DicomfsError(f"cannot unmount {mountpoint}: {reason}")
    if pid is None or _gone_within(pid, UMOUNT_GRACE):
        return 0
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return 0
        if _gone_within(pid, UMOUNT_STOP_TIMEOUT):
            if signum == signal.SIGKILL:
                raise DicomfsError(f"unmounted; the daemon (pid {pid}) did not stop on SIGTERM and was killed")
            return 0
    raise DicomfsError(f"unmounted, but the daemon (pid {pid}) did not exit")


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            return stat_file.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
