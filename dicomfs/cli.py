"""The ``dicomfs`` command line: build the parser from the commands, run one, pick an exit status.

Owns the top-level parser (each module of ``dicomfs.commands`` adds its subcommand), study UIDs
given after options, the umask 077 under which every command runs (the cache holds patient data;
the user's own umask is kept in ``args.user_umask`` for outputs), keeping what is loaded before a
command runs out of the garbage collector's walks (``gc.freeze``), and turning what a command
raises into one line and an exit status, and ending the process with that status when a
library's thread would hold its exit (``entry``). Must not own any command's arguments or
behaviour.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import threading
import traceback
from typing import NoReturn

from dicomfs import __version__
from dicomfs.commands import cache, export, ls, mount, prefetch, serve, umount
from dicomfs.errors import DicomfsError, UsageError

PRIVATE_UMASK = 0o077  # what dicomfs writes into its cache and log is its user's alone
COMMANDS = (mount, serve, prefetch, export, ls, cache, umount)  # in the order --help lists them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomfs", description="Mount a DICOM archive as folders.")
    parser.add_argument("--version", action="version", version=f"dicomfs {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ("prefetch", "export") and not any(e.startswith("-") for e in extra):
        args.studies += extra  # study UIDs after options: dicomfs prefetch SRC --cache-dir D UID...
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # The cache holds patient names: everything dicomfs creates there is private. Output files
    # (prefetch --to, export) get the user's own umask back explicitly (materialise.OutputDir).
    args.user_umask = os.umask(PRIVATE_UMASK)
    # What is loaded by now (trio, the commands: ~40,000 objects) lives until exit: keep it out of
    # every collection. Each full collection walked all of it, and interpreter exit runs several:
    # 50 ms of a one-study prefetch, side by side. What a command creates is collected as before.
    gc.freeze()
    try:
        if args.command == "mount":
            status = mount.run(args, list(sys.argv[1:] if argv is None else argv))
        else:
            status = {"serve": serve.run, "prefetch": prefetch.run, "export": export.run, "ls": ls.run,
                      "cache": cache.run, "umount": umount.run}[args.command](args)
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


def entry() -> NoReturn:
    """The console script and ``python -m dicomfs`` (``__main__.main``): ``main``, then the process ends with its
    status, also when a library's thread would hold the interpreter's exit. pynetdicom's threads
    are not daemons: one still opening an association with a PACS that says nothing goes on for
    up to four times ``--timeout`` after the command ended or was interrupted (Ctrl-C waited 19 s
    with ``--timeout 10``). Everything of ours is closed by then; such a thread only waits."""
    try:
        status = main()
    except SystemExit as exc:  # (argparse: --help, a usage error)
        status = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except KeyboardInterrupt:  # (before a command ran)
        status = 130
    except BaseException:  # a bug: its traceback, then the same way out
        traceback.print_exc()
        status = 1
    if any(thread.is_alive() and not thread.daemon and thread is not threading.main_thread()
           for thread in threading.enumerate()):
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:
                pass
        os._exit(status)
    sys.exit(status)
