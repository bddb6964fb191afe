"""An opened archive: the source, its catalog and its blob store, set up and torn down in order.

Owns what every command that talks to an archive shares (``mount``, ``serve``, ``prefetch``,
``export``, ``ls``): a
shared hold on the cache directory, the source, the archive's one breaker (shared by catalog and
blob store), the catalog in the cache, the studies shown, checking the archive or going offline on the stored
catalog when it cannot be reached (while catalog and blob store open), and running the blob store.
Must not implement any command.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from dicomfs.breaker import Breaker
from dicomfs.cache import BlobStore, CacheUse, label, layout
from dicomfs.catalog import Catalog
from dicomfs.errors import AccessRefused, SourceUnavailable
from dicomfs.query import Query
from dicomfs.search import Shown
from dicomfs.sources import Credentials, Source, SourceOptions, SourceSpec, open_source
from dicomfs.sources.base import FetchPreparer, KeepsProgress
from dicomfs.tasks import open_nursery
from dicomfs.transferlimits import TransferLimits


@dataclass(frozen=True)
class ArchiveOptions:
    spec: SourceSpec
    cache_dir: Path
    credentials: Credentials
    source_options: SourceOptions
    cache_size: int | None = None  # None: no blob store (listing only)
    listing_ttl: float = 60.0
    query: Query | None = None  # the studies shown (``Archive.shown``) are those matching it
    limits: TransferLimits = field(default_factory=TransferLimits)


@dataclass
class Archive:
    source: Source
    catalog: Catalog
    blobs: BlobStore | None
    shown: Shown


@asynccontextmanager
async def open_archive(options: ArchiveOptions) -> AsyncIterator[Archive]:
    """The opened archive. A cache directory created here is removed again if the archive
    turns out to be unusable before anything was done with it (no litter from a typo'd URL, also
    when the command is interrupted meanwhile), unless it was interrupted after the source stored
    work there (``KeepsProgress``: a folder's index of the files it has read), kept for the next
    run."""
    try:
        fresh = not options.cache_dir.exists()
    except OSError:
        fresh = False  # cannot tell (its parent is not ours to look into): CacheUse says so
    lock = CacheUse(options.cache_dir)
    opened = interrupted = False
    source: Source | None = None
    try:
        label(options.cache_dir, options.spec)
        source = open_source(options.spec, options.credentials, options.cache_dir, options.source_options)
        try:
            if options.cache_size and isinstance(source, FetchPreparer):
                await source.prepare_fetches()  # a blob store will open: retrieves may come
            with ExitStack() as closing:
                catalog, blobs = await _open_checked(options, source, closing)
                async with open_nursery() as nursery:
                    if blobs is not None:
                        await nursery.start(blobs.run)
                    opened = True
                    yield Archive(source, catalog, blobs, Shown(catalog, options.query))
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await source.aclose()
    except (trio.Cancelled, KeyboardInterrupt):
        interrupted = True
        raise
    finally:
        lock.release()
        progress = interrupted and isinstance(source, KeepsProgress) and source.stored_progress()
        if fresh and not opened and not progress:
            shutil.rmtree(options.cache_dir, ignore_errors=True)


async def _open_checked(options: ArchiveOptions, source: Source,
                        closing: ExitStack) -> tuple[Catalog, BlobStore | None]:
    """The catalog and the blob store, opened while the archive is checked: the check waits on
    the network, the openings on the disk (a fresh cache's three sqlite files: 10-20 ms), each in
    a worker thread. Whatever was opened is closed by ``closing``, also when something failed;
    the check's failure is the one reported when both fail. An archive that cannot be reached is
    gone offline from, on the stored catalog, when the cache holds one (prefetched studies stay
    readable); refused credentials are always an error. (Opening a cache whose archive then
    refuses us changes nothing the next start would not: its work folder, ballast, size limit.)"""
    breaker = Breaker(source.description)  # one for the catalog and the blob store
    size = options.cache_size
    catalogs: list[Catalog] = []
    stores: list[BlobStore] = []
    failed: dict[str, BaseException] = {}

    def open_catalog() -> None:
        catalog = Catalog(source, layout.paths(options.cache_dir).catalog, listing_ttl=options.listing_ttl,
                          breaker=breaker)
        catalogs.append(catalog)
        catalog.close()  # this thread's sqlite connection: diskcache opens one per thread, as used

    def open_blobs(size: int) -> None:
        blobs = BlobStore(options.cache_dir, size, source, breaker=breaker, limits=options.limits,
                          missing_recheck=options.listing_ttl)
        stores.append(blobs)
        blobs.close_connections()

    async def attempt(what: str, step: Callable[[], Awaitable[object]]) -> None:
        try:
            await step()
        except Exception as exc:  # (each reported below, in a fixed order)
            failed[what] = exc

    async def check() -> None:
        with breaker.guard():
            await source.check()

    try:
        async with open_nursery() as nursery:
            nursery.start_soon(attempt, "check", check)
            if size:
                nursery.start_soon(attempt, "blobs", partial(trio.to_thread.run_sync, open_blobs, size))
            await attempt("catalog", partial(trio.to_thread.run_sync, open_catalog))
    finally:  # (a thread's opening outlives a cancellation: it is closed all the same)
        for catalog in catalogs:
            closing.callback(catalog.close)
        for blobs in stores:
            closing.callback(blobs.close)  # (first: the stack closes in reverse)
    unreachable = failed.pop("check", None)
    if unreachable is not None and (not isinstance(unreachable, SourceUnavailable)
                                    or isinstance(unreachable, AccessRefused)):
        raise unreachable
    for what in ("catalog", "blobs"):
        if what in failed:
            raise failed[what]
    catalog = catalogs[0]
    if unreachable is not None:
        if not await catalog.has_stored_listing():
            raise unreachable
        catalog.report_offline(unreachable)
    return catalog, stores[0] if stores else None
