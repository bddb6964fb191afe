"""What several commands share: the archive options, the transfer options, the fetch options of
``prefetch`` and ``export``, the argument types, sizes, the default cache, logging.

Owns each of these rules once: an option that two commands take is added here, with one help text
and one default, and ``archive_options`` is the one way from parsed arguments to
``archive.ArchiveOptions``. Must not run a command, nor import at module level what only running
one needs (``dicomfs --version`` loads this module).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from dicomfs.dicomread import quiet_pydicom
from dicomfs.errors import UsageError
from dicomfs.query import parse_query
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

if TYPE_CHECKING:
    from dicomfs.archive import ArchiveOptions

DEFAULT_JOBS = 8  # series fetched at the same time by prefetch and export (--jobs)
DEFAULT_LISTING_TTL = 60.0
LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


MAX_SIZE = (1 << 63) - 1  # what sqlite (the cache index) can count


def parse_size(text: str) -> int:
    """``20G``, ``512M``, ``1.5T`` or a plain byte count (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise UsageError(f"invalid size {text!r} (examples: 20G, 512M, 1.5T)")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise UsageError(f"invalid size {text!r}: must be positive")
    if size > MAX_SIZE:
        raise UsageError(f"invalid size {text!r}: too large")
    return size


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "dicomfs"


def default_cache_size(cache_dir: Path) -> int:
    """A fifth of the free space where the cache lives (at least 1 GiB; that, if the place
    cannot be looked at: opening the cache then says why)."""
    probe = cache_dir
    try:
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
    except OSError:
        free = 0
    return max(free // 5, 1 << 30)


def port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}")
    return int(text)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return int(text)


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}: must be positive")
    return value


def seconds_or_zero(text: str) -> float:
    """``seconds``, or 0 (``--listing-ttl 0``: every listing asked for again)."""
    try:
        if float(text) == 0:
            return 0.0
    except ValueError:
        pass  # (seconds says what is wrong with it)
    return seconds(text)


def rate(text: str) -> int:
    """``--min-rate``: bytes per second, with the units of ``parse_size``; 0 turns it off."""
    if text.strip() == "0":
        return 0
    try:
        return parse_size(text.removesuffix("/s"))
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_archive_options(parser: argparse.ArgumentParser) -> None:
    """Which archive and how to reach it: every command that opens one."""
    parser.add_argument("--cache-dir", help="default: $XDG_CACHE_HOME/dicomfs/<source-id>")
    parser.add_argument("--user", help="HTTP basic auth user; password from DICOMFS_PASSWORD or --password-file")
    parser.add_argument("--password-file")
    parser.add_argument("--token-file", help="bearer token file (or DICOMFS_TOKEN)")
    parser.add_argument("--endpoint", help="object store endpoint for gs:// sources (default: "
                        "$STORAGE_EMULATOR_HOST or Google Cloud Storage), s3:// and idc sources (default: "
                        "$AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, or AWS S3 in $AWS_REGION, "
                        "$AWS_DEFAULT_REGION or us-east-1)")
    parser.add_argument("--user-project", help="project billed for requester-pays buckets")
    parser.add_argument("--idc-index", metavar="FILE", help="idc source: the IDC index parquet (default: the "
                        "installed idc-index-data package's)")
    parser.add_argument("--no-sign-request", action="store_true",
                        help="s3:// sources: anonymous requests, even where AWS credentials are set")
    parser.add_argument("--timeout", type=seconds, default=DEFAULT_WINDOW, metavar="SECONDS",
                        help="longest the archive may stay silent, and the window over which --min-rate is "
                        f"measured (default {DEFAULT_WINDOW:.0f})")
    dimse = parser.add_argument_group("DIMSE (dimse:// and dimse+tls:// sources)")
    dimse.add_argument("--ae-title", default=DEFAULT_AE_TITLE,
                       help=f"our calling AE title, as the PACS knows it (default {DEFAULT_AE_TITLE})")
    dimse.add_argument("--retrieve", choices=["get", "move", "auto"], default="auto",
                       help="C-GET, C-MOVE to dicomfs's storage SCP, or C-GET falling back to C-MOVE when the "
                       "PACS refuses it (default auto)")
    dimse.add_argument("--move-port", type=port, default=DEFAULT_MOVE_PORT,
                       help=f"port of the storage SCP for C-MOVE (default {DEFAULT_MOVE_PORT})")
    dimse.add_argument("--max-associations", type=positive, default=2,
                       help="associations open with the PACS at once (default 2)")
    dimse.add_argument("--tls-ca", metavar="FILE", help="CA certificates the PACS's TLS certificate is checked "
                       "against (default: the system's)")
    dimse.add_argument("--tls-cert", metavar="FILE", help="our TLS client certificate, if the PACS asks for one")
    dimse.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert")


def add_transfer_options(parser: argparse.ArgumentParser) -> None:
    """How slow a retrieve may be before it is abandoned (mount, serve, prefetch, export)."""
    parser.add_argument("--min-rate", type=rate, default=DEFAULT_MIN_RATE, metavar="RATE",
                        help="a retrieve that brings less per second over --timeout is abandoned, e.g. 64K, "
                        f"0 for no minimum (default {DEFAULT_MIN_RATE // 1024}K)")
    parser.add_argument("--retrieve-timeout", type=seconds, default=DEFAULT_DEADLINE, metavar="SECONDS",
                        help=f"longest one series retrieve may take (default {DEFAULT_DEADLINE:.0f})")


def add_fetch_options(parser: argparse.ArgumentParser) -> None:
    """What ``prefetch`` and ``export`` share: which studies, the archive, how to fetch them."""
    parser.add_argument("studies", nargs="*", metavar="STUDY_UID")
    parser.add_argument("--all", action="store_true", help="every study in the archive")
    parser.add_argument("--query", action="append", metavar="KEY=VALUE", help="studies matching the query")
    add_archive_options(parser)
    add_cache_size_option(parser)
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS,
                        help=f"series fetched at the same time (default {DEFAULT_JOBS})")
    add_transfer_options(parser)
    add_log_level_option(parser, "WARNING")


def add_cache_size_option(parser: argparse.ArgumentParser) -> None:
    """``--cache-size`` of the commands that open a blob store (read by ``archive_options``)."""
    parser.add_argument("--cache-size", help="cache size limit, e.g. 20G (default: the limit the cache "
                        "already has, else 1/5 of free disk)")


def add_listing_ttl_option(parser: argparse.ArgumentParser) -> None:
    """``--listing-ttl`` of the long-running commands (read by ``archive_options``)."""
    parser.add_argument("--listing-ttl", type=seconds_or_zero, default=DEFAULT_LISTING_TTL,
                        help=f"seconds a study, series or instance listing is trusted "
                        f"(default {DEFAULT_LISTING_TTL:.0f})")


def add_log_level_option(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--log-level", default=default, choices=LOG_LEVELS, type=str.upper)


def archive_options(args: argparse.Namespace, *, with_blobs: bool,
                    spec: SourceSpec | None = None) -> ArchiveOptions:
    """The archive the parsed arguments name (``spec`` if given, else ``args.source``), with a blob
    store's size limit only ``with_blobs``; options a command does not take get their defaults."""
    from dicomfs.archive import ArchiveOptions
    from dicomfs.cache import stored_size_limit

    spec = spec or parse_source(args.source)
    credentials = credentials_from_environment(args.user, args.password_file, args.token_file)
    cache_dir = Path(args.cache_dir).expanduser().resolve() if args.cache_dir else default_cache_root() / spec.source_id
    if spec.kind == "folder" and cache_dir.resolve().is_relative_to(Path(spec.location).resolve()):
        # (the cache would be written into the folder, and scanned with it on the next start)
        raise UsageError(f"the cache folder {cache_dir} is inside the source folder {spec.location}: "
                         "choose one outside it (--cache-dir)")
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
                          getattr(args, "listing_ttl", DEFAULT_LISTING_TTL), parse_query(args.query, query_keys(spec)),
                          limits)


def configure_logging(level: str, fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    logging.basicConfig(level=level, format=fmt)
    for noisy in ("httpx", "httpcore", "pyfuse3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    # pynetdicom logs every association, and its own (multi-line) account of each failure, which
    # dicomfs reports in one line of its own: only when debugging
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if level == "DEBUG" else logging.CRITICAL)
    quiet_pydicom(level == "DEBUG")
