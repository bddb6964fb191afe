"""``dicomfs cache stats|verify|clear``: its arguments, and reporting on one cache or every cache
under the default root.

Owns which caches an action applies to, its lines of output and its exit status (1 when verify
dropped anything, or when one cache of several could not be acted on: that one is said in a line,
the rest are done). Must not read or change a cache's files itself (``dicomfs.cache.admin``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dicomfs.commands.options import default_cache_root
from dicomfs.errors import CacheError, UsageError


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cache = subparsers.add_parser("cache", help="inspect, check or empty caches")
    cache.add_argument("action", choices=["stats", "verify", "clear"])
    cache.add_argument("--cache-dir", help="one cache (default: every cache under $XDG_CACHE_HOME/dicomfs)")


def run(args: argparse.Namespace) -> int:
    root = Path(args.cache_dir).expanduser().resolve() if args.cache_dir else default_cache_root()
    try:
        return _run(args, root)
    except BrokenPipeError:
        raise  # (the reader of the output went away: the caller's to handle)
    except OSError as exc:  # a cache, or the root, that is not this user's (or a disk that fails)
        raise _cache_error(exc, root) from None


def _cache_error(exc: OSError, where: Path) -> CacheError:
    return CacheError(f"{exc.filename or where}: {exc.strerror}")


def _run(args: argparse.Namespace, root: Path) -> int:
    from dicomfs.cache import admin

    caches = admin.caches_under(root)
    if args.cache_dir and not caches:
        raise UsageError(f"{root} is not a dicomfs cache")
    status = 0
    for cache_dir in caches:
        try:
            status = max(status, _act(args.action, cache_dir))
        except BrokenPipeError:
            raise
        except (OSError, CacheError) as exc:
            if len(caches) == 1:
                raise
            # one cache of several that cannot be read (another user's) or is in use: said, and the rest done
            error = _cache_error(exc, cache_dir) if isinstance(exc, OSError) else exc
            print(f"dicomfs: error: {error}", file=sys.stderr)
            status = 1
    if not caches:
        print(f"no caches under {root}")
    return status


def _act(action: str, cache_dir: Path) -> int:
    """``action`` on one cache: its lines of output, and its exit status."""
    from dicomfs.cache import admin
    from dicomfs.progress import human_bytes

    status = 0
    if action == "stats":
        st = admin.stats(cache_dir)
        limit = human_bytes(st.size_limit) if st.size_limit else "none"
        print(f"{st.path}: {st.source}: {st.series} series, {st.instances} instances, "
              f"{human_bytes(st.blob_bytes)} ({st.blob_bytes} bytes) of blobs"
              + (f" and {st.single_instances} single-instance blobs" if st.single_instances else "")
              + f", {human_bytes(st.disk_bytes)} on disk, limit {limit}" + (", in use" if st.in_use else ""))
    elif action == "verify":
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
    return status
