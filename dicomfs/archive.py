"""An opened archive: the source, its catalog and its blob store, set up and torn down in order.

Owns what every command that talks to an archive shares (``mount``, ``prefetch``, ``ls``): a
shared hold on the cache directory, the source, the archive's one breaker (shared by catalog and
blob store), the catalog in the cache, the studies shown, checking the archive or going offline on the stored
catalog when it cannot be reached (while the blob store opens), and running the blob store.
Must not implement any command.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from dicomfs.breaker import Breaker
from dicomfs.cache import BlobStore, CacheUse, label, layout
from dicomfs.catalog import Catalog
from dicomfs.errors import AccessRefused, SourceUnavailable
from dicomfs.query import Query
from dicomfs.search import Shown
from dicomfs.sources import Credentials, Source, SourceOptions, SourceSpec, open_source
from dicomfs.sources.base import FetchPreparer
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
    turns out to be unusable before anything was done with it (no litter from a typo'd URL)."""
    fresh = not options.cache_dir.exists()
    lock = CacheUse(options.cache_dir)
    opened = False
    try:
        label(options.cache_dir, options.spec)
        source = open_source(options.spec, options.credentials, options.cache_dir, options.source_options)
        try:
            if options.cache_size and isinstance(source, FetchPreparer):
                await source.prepare_fetches()  # a blob store will open: retrieves may come
            breaker = Breaker(source.description)
            catalog = Catalog(source, layout.paths(options.cache_dir).catalog, listing_ttl=options.listing_ttl,
                              breaker=breaker)
            try:
                blobs = await _check_and_open_blobs(options, source, catalog, breaker)
                try:
                    async with open_nursery() as nursery:
                        if blobs is not None:
                            await nursery.start(blobs.run)
                        opened = True
                        yield Archive(source, catalog, blobs, Shown(catalog, options.query))
                        nursery.cancel_scope.cancel()
                finally:
                    if blobs is not None:
                        blobs.close()
            finally:
                catalog.close()
        finally:
            with trio.CancelScope(shield=True):
                await source.aclose()
    finally:
        lock.release()
        if fresh and not opened:
            shutil.rmtree(options.cache_dir, ignore_errors=True)


async def _check_and_open_blobs(options: ArchiveOptions, source: Source, catalog: Catalog,
                                breaker: Breaker) -> BlobStore | None:
    """The archive checked and the blob store opened at once: the check waits on the network,
    the opening on the disk (diskcache's sqlite files, the process folder: 10-20 ms for a fresh
    cache), each in a worker thread. A store opened when the check fails is closed again."""
    if not options.cache_size:
        await check_or_go_offline(source, catalog)
        return None
    size = options.cache_size
    opened: list[BlobStore] = []

    def open_blobs() -> None:
        opened.append(BlobStore(options.cache_dir, size, source, breaker=breaker, limits=options.limits,
                                missing_recheck=options.listing_ttl))

    try:
        async with open_nursery() as nursery:
            nursery.start_soon(check_or_go_offline, source, catalog)
            await trio.to_thread.run_sync(open_blobs)
    except BaseException:
        for blobs in opened:
            blobs.close()
        raise
    return opened[0]


async def check_or_go_offline(source: Source, catalog: Catalog) -> None:
    """Check the archive; when it cannot be reached but the cache holds a stored catalog, carry
    on with that (prefetched studies stay readable). Credentials refused is always an error."""
    try:
        with catalog.breaker.guard():
            await source.check()
    except SourceUnavailable as exc:
        if isinstance(exc, AccessRefused) or not await catalog.has_stored_listing():
            raise
        catalog.report_offline(exc)
