"""``dicomfs serve``: its arguments, checking them, and handing over to ``dicomfs.server.run``.

Owns the options of the DICOMweb service (address, ``--viewer``, ``--cors-origin``,
``--access-log``) and the line that says where it serves. Must not answer requests or run the
server itself.
"""

from __future__ import annotations

import argparse
import functools
import re
from pathlib import Path

from dicomfs.commands.options import (
    add_archive_options,
    add_cache_size_option,
    add_listing_ttl_option,
    add_log_level_option,
    add_transfer_options,
    archive_options,
    configure_logging,
    port,
    seconds,
)
from dicomfs.errors import UsageError

SEND_TIMEOUT = 60.0  # as nginx's send_timeout


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = subparsers.add_parser("serve", help="serve SOURCE as a DICOMweb service over HTTP (QIDO-RS, WADO-RS), "
                                  "and a web viewer with --viewer; no mount needed")
    serve.add_argument("source")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                       "only; 0.0.0.0 for every network it is on)")
    serve.add_argument("--port", type=port, default=8080, help="default 8080")
    add_archive_options(serve)
    serve.add_argument("--query", action="append", metavar="KEY=VALUE",
                       help="serve only matching studies (DICOM keyword, * ? wildcards, date ranges)")
    add_cache_size_option(serve)
    serve.add_argument("--viewer", metavar="DIR", help="also serve this built web viewer at / (OHIF's dist/, "
                       "from scripts/get-ohif.sh), configured for this server's DICOMweb root")
    serve.add_argument("--cors-origin", metavar="ORIGIN", help="let pages from ORIGIN (e.g. "
                       "https://viewer.example.org, or *) read the responses (default: none; a --viewer needs none)")
    serve.add_argument("--systemd", action="store_true", help="send READY=1 to $NOTIFY_SOCKET once listening")
    serve.add_argument("--send-timeout", type=seconds, default=SEND_TIMEOUT, metavar="SECONDS",
                       help="a client that takes none of its answer's bytes for this long is disconnected "
                       f"(default {SEND_TIMEOUT:.0f})")
    add_listing_ttl_option(serve)
    add_transfer_options(serve)
    add_log_level_option(serve, "INFO")
    serve.add_argument("--access-log", action="store_true", help="log every request")


def run(args: argparse.Namespace) -> int:
    import trio

    from dicomfs.server.run import ServeOptions, serve

    if args.cors_origin is not None and args.cors_origin != "*" and not re.fullmatch(
            r"https?://[A-Za-z0-9.-]+(:\d{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:\d{1,5})?", args.cors_origin):
        raise UsageError(f"--cors-origin {args.cors_origin!r} is not an origin (scheme://host[:port], or *)")
    viewer = Path(args.viewer).expanduser() if args.viewer else None
    options = ServeOptions(archive_options(args, with_blobs=True), args.host, args.port, args.cors_origin, viewer,
                           args.access_log, args.send_timeout)
    configure_logging(args.log_level)

    def ready(root: str) -> None:
        print(f"dicomfs: serving {args.source} at {root}", flush=True)

    trio.run(functools.partial(serve, options, ready, systemd=args.systemd))
    return 0
