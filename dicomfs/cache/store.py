"""The blob store: the policy of the series cache of one source.

Owns when a blob is downloaded and how readers get it: single-flight (one ``SeriesDownload``
per blob key in this process, joined by every reader), one instance first for sources that
can fetch one cheaply, resuming a broken transfer that brought something, the breaker and the
transfer limits around every download, waiting for another process's download (prefetch only),
the commit (and replacing a copy that lacked instances), opening cached instances, sizes, and
the maintenance task (LRU times, eviction; making room on a full disk). Must not know FUSE,
inodes or the tree, nor write blob bytes or name paths itself (``download``, ``disk``,
``layout``). The design, its invariants and locks: docs/cache.md.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import cachetools
import trio

from dicomfs import clock
from dicomfs.breaker import Breaker
from dicomfs.cache import layout
from dicomfs.cache.admin import fit_size_limit
from dicomfs.cache.disk import (
    Ballast,
    CompletedBlob,
    Pins,
    ProcessFolder,
    disk_class,
    flocked,
    lock_free,
    try_lock,
    unlink_quietly,
)
from dicomfs.cache.download import WRITE_BATCH, Fetch, SeriesDownload
from dicomfs.cache.handles import InstanceHandle, open_local
from dicomfs.cache.layout import Manifest, has_valid_entry, open_indexes
from dicomfs.errors import CacheError, DicomfsError, IntegrityError, SourceError, TransferBroken
from dicomfs.progress import human_bytes
from dicomfs.records import InstanceRecord, SeriesRecord
from dicomfs.sources.base import InstanceFetcher, Source
from dicomfs.tasks import leaves, open_nursery, plain
from dicomfs.transferlimits import TransferLimits, enforce

log = logging.getLogger(__name__)

RESUMES = 2  # a transfer that broke off after bringing new instances is resumed at most this often
RESUME_DELAY = 0.5
JOIN_ATTEMPTS = 4
ROOM_STEP = 16 << 20  # a full disk: evict an eighth of the limit, at least 4 MiB, at most this
LRU_FLUSH_SECONDS = 5.0
LOCK_POLL_SECONDS = 0.1
MAX_WAIT_FOR_OTHER_PROCESS = 3600.0  # a prefetch waits this long for another process's download


class BlobStore:
    """The disk cache of series blobs for one source."""

    def __init__(self, cache_dir: Path, size_limit: int, source: Source, *, breaker: Breaker | None = None,
                 limits: TransferLimits | None = None, missing_recheck: float = 60.0,
                 instances_alone: bool = False) -> None:
        """``missing_recheck``: an instance that a retrieve of its series did not hold is not asked
        for again sooner (the listing TTL: within it, the archive is taken to be as listed).
        ``instances_alone`` (``--readahead off``): a source that can fetch one instance cheaply is
        asked for each instance opened, never for its whole series on a second read."""
        self.source = source
        self.cache_dir = cache_dir
        self.size_limit = size_limit
        self.breaker = breaker or Breaker(source.description)
        self.limits = limits or TransferLimits()
        self.missing_recheck = missing_recheck
        self.instances_alone = instances_alone
        try:
            self._folder = ProcessFolder(cache_dir)
        except OSError as exc:
            raise CacheError(f"cannot use the cache in {cache_dir}: {exc.strerror}") from None
        self.partial_dir = self._folder.path
        self._pins = Pins(self._folder.graveyard)
        where = layout.paths(cache_dir)
        self._commit_lock = where.commit_lock
        where.locks.mkdir(exist_ok=True)  # the download locks (layout.download_lock)
        try:
            self.index, self.manifests = open_indexes(cache_dir, size_limit, disk_class(self._pins))
        except CacheError:
            self._folder.close()
            raise
        self._index_lock = threading.Lock()  # cull and the full-disk eviction, one at a time
        self._fit_limit()
        self._ballast = Ballast(where.ballast)
        self._ballast.keep()
        self._manifest_memory: cachetools.LRUCache[str, Manifest] = cachetools.LRUCache(4096)
        # blob key -> (file, the manifest read with it): a path is only ever used with its manifest
        self._blob_paths: cachetools.LRUCache[str, tuple[str, Manifest]] = cachetools.LRUCache(4096)
        self._recently_used: set[str] = set()
        self._downloads: dict[str, SeriesDownload] = {}
        self._nursery: trio.Nursery | None = None
        self._cull_wanted = trio.Event()
        self._commits: Counter[str] = Counter()  # completed downloads per blob key
        self._series_touched: set[str] = set()  # series with an instance opened since start
        self._instance_blobs: dict[str, set[str]] = {}  # series -> its single-instance blobs
        # series -> (when, instance keys) of its last complete retrieve here: an instance listed
        # but not in it is not asked for again at once (no retrieve per read of a missing file)
        self._retrieved: cachetools.LRUCache[str, tuple[float, frozenset[str], dict[str, str]]] = \
            cachetools.LRUCache(4096)

    def close(self) -> None:
        self.index.close()
        self.manifests.close()
        self._folder.close()

    def close_connections(self) -> None:
        """Close the calling thread's sqlite connections (diskcache keeps one per thread and opens
        it again when that thread uses the store): for a worker thread that opened the store."""
        self.index.close()
        self.manifests.close()

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Own the downloads and the maintenance task; returns when cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._maintenance_loop()
        finally:
            self._nursery = None

    def stop(self) -> None:
        """Shutting down: cancel every download (their readers get an error at once) and take no
        new ones."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _maintenance_loop(self) -> None:
        while True:
            with trio.move_on_after(LRU_FLUSH_SECONDS):
                await self._cull_wanted.wait()
            cull = self._cull_wanted.is_set()
            self._cull_wanted = trio.Event()
            used, self._recently_used = self._recently_used, set()
            if cull or used:
                await trio.to_thread.run_sync(self._maintain, used, cull)

    def _maintain(self, used: set[str], cull: bool) -> None:
        """Record recent use for the LRU order, then evict down to the size limit. Blocking."""
        try:
            for key in used:
                blob = self.index.get(key, read=True)  # updates the access time
                if blob is not None:
                    blob.close()
            if cull:
                with self._index_lock:
                    removed: int = self.index.cull()
                if removed:
                    log.info("evicted %d blobs to stay under the cache size limit", removed)
        except Exception as exc:
            log.warning("cache maintenance failed: %s", exc)

    # --- the space the cache may take -------------------------------------------------------
    def _fit_limit(self) -> None:
        """Never start with a limit the filesystem holding the cache cannot honour (what the cache
        holds and what is free). A disk that fills up later is met by ``_make_room``, not by a
        lower limit: a transient shortage must not shrink the cache for good. Blocking."""
        try:
            fitted = fit_size_limit(self.cache_dir, self.size_limit, self.index.volume())
        except Exception as exc:  # only a precaution: the cache works without it
            log.warning("cannot tell how much space the cache's filesystem has: %s", exc)
            return
        if fitted < self.size_limit:
            log.warning("cache size limit %s is more than the filesystem holding %s can hold: using %s",
                        human_bytes(self.size_limit), self.cache_dir, human_bytes(fitted))
            self.index.reset("size_limit", fitted)
            self.size_limit = fitted

    async def _make_room(self) -> bool:
        """The disk is full (ENOSPC): evict the least recently used blobs, below the limit (one in
        use by a reader here only leaves the index, its bytes stay until it is closed), and say
        whether anything was evicted, so the write is tried once more."""
        return await trio.to_thread.run_sync(self._evict_for_space)

    def _evict_for_space(self) -> bool:
        # sqlite needs a little space to record an eviction: the ballast file gives it back
        self._ballast.drop()
        try:
            with self._index_lock:
                volume = self.index.volume()
                target = max(volume - min(ROOM_STEP, max(self.size_limit // 8, 4 * WRITE_BATCH)), 0)
                self.index.reset("size_limit", target, update=False)  # this process, this once
                try:
                    removed: int = self.index.cull()
                finally:
                    self.index.reset("size_limit", self.size_limit, update=False)
        except Exception as exc:
            log.warning("the disk holding the cache is full, and eviction failed: %s", exc)
            return False
        finally:
            self._ballast.keep()
        log.warning("the disk holding the cache is full: evicted %d blobs to make room", removed)
        return removed > 0

    # --- sizes ------------------------------------------------------------------------------
    async def manifest(self, blob_key: str) -> Manifest | None:
        manifest = self._manifest_memory.get(blob_key)
        if manifest is None:
            manifest = await trio.to_thread.run_sync(self.manifests.get, blob_key)
            if manifest is not None:
                self._manifest_memory[blob_key] = manifest
        return manifest

    async def known_sizes(self, series: SeriesRecord) -> dict[str, int]:
        """Sizes known without downloading: from a stored manifest or a running download."""
        manifest = await self.manifest(series.key)
        sizes = {k: length for k, (_, length) in manifest.members.items()} if manifest else {}
        download = self._downloads.get(series.key)
        if download is not None:
            sizes.update({k: m.length for k, m in download.members.items()})
        return sizes

    async def known_size(self, series: SeriesRecord, key: str) -> int | None:
        """``known_sizes(series).get(key)``, without making every member's entry (a lookup asks
        for one file of a series that may have thousands)."""
        manifest = await self.manifest(series.key)
        download = self._downloads.get(series.key)
        member = download.members.get(key) if download is not None else None
        if member is not None:
            return member.length
        entry = manifest.members.get(key) if manifest is not None else None
        return entry[1] if entry is not None else None

    async def holds(self, series: SeriesRecord, instance: InstanceRecord) -> bool:
        """Whether the instance is cached (in its series' blob or alone) or being downloaded here:
        opening it then costs no more than the rest of its download."""
        alone = layout.instance_blob_key(series.key, instance.key)
        if series.key in self._downloads or alone in self._downloads:
            return True
        for blob_key in (series.key, alone):
            manifest = await self.manifest(blob_key)
            if manifest is not None and instance.key in manifest.members:
                return True
        return False

    async def size_of(self, series: SeriesRecord, instance: InstanceRecord) -> int:
        """The exact size of an instance, downloading its series if nothing else knows it."""
        if instance.size is not None:
            return instance.size
        for _ in range(JOIN_ATTEMPTS):
            commits = self._commits[series.key]
            size = await self.known_size(series, instance.key)
            if size is not None:
                return size
            if self._commits[series.key] != commits:
                continue  # a download finished while we looked: look again
            download = self._downloads.get(series.key)
            if download is None:
                self._not_recently_missing(series, instance.key)
                download = self._series_download(series)
            member = await download.wait_member(instance.key)
            if member is not None:
                return member.length
        raise SourceError(f"series {series.uid} keeps changing in the cache; giving up")

    # --- reading ----------------------------------------------------------------------------
    async def open_instance(self, series: SeriesRecord, instance: InstanceRecord) -> InstanceHandle:
        """Open an instance, fetching what is needed: the series blob, or first just the instance.

        Policy for sources that can fetch one instance cheaply (COD: a Range request): the first
        instance opened in a series that is not cached is fetched alone; opening a second one
        means someone is reading through the series, so the whole series is fetched once.
        """
        local = self.source.local_file(instance)
        if local is not None:
            return await trio.to_thread.run_sync(open_local, local, instance)
        for _ in range(JOIN_ATTEMPTS):
            download = self._downloads.get(series.key)
            if download is None:
                commits = self._commits[series.key]
                handle = await self._open_cached(series.key, instance.key)
                if handle is None and isinstance(self.source, InstanceFetcher):
                    handle = await self._open_instance_alone(series, instance, self.source)
                if handle is not None:
                    return handle
                if self._commits[series.key] != commits:
                    continue  # a download finished while we looked: look again
                self._not_recently_missing(series, instance.key)
                download = self._series_download(series)
            handle = await download.open_member(instance.key)
            if handle is not None:
                return handle
        raise SourceError(f"series {series.uid} keeps changing in the cache; giving up")

    def _not_recently_missing(self, series: SeriesRecord, key: str) -> None:
        """Raise at once if ``key`` was not in (or was refused from) a retrieve of its series that
        ended less than ``missing_recheck`` seconds ago: reading a missing file again and again
        must not retrieve its series every time."""
        seen = self._retrieved.get(series.key)
        if seen is None or key in seen[1]:
            return
        age = clock.now() - seen[0]
        if age >= self.missing_recheck:
            return
        reason = seen[2].get(key, "is listed but was not in the retrieve of its series")
        raise IntegrityError(f"instance {key} {reason} {age:.0f} s ago; asked for again after "
                             f"{self.missing_recheck:.0f} s")

    async def _open_instance_alone(self, series: SeriesRecord, instance: InstanceRecord,
                                   source: InstanceFetcher) -> InstanceHandle | None:
        blob_key = layout.instance_blob_key(series.key, instance.key)
        for _ in range(JOIN_ATTEMPTS):
            download = self._downloads.get(blob_key)
            if download is None:
                commits = self._commits[blob_key]
                handle = await self._open_cached(blob_key, instance.key)
                if handle is not None:
                    return handle
                if self._commits[blob_key] != commits:
                    continue
                if not self.instances_alone and (series.key in self._series_touched
                                                 or series.key in self._downloads):
                    return None  # reading through the series: fetch all of it
                self._series_touched.add(series.key)
                self._instance_blobs.setdefault(series.key, set()).add(blob_key)

                async def fetch(sink: SeriesDownload) -> None:
                    await source.fetch_instance(instance, sink)

                download = self._start(blob_key, series, fetch)
            handle = await download.open_member(instance.key)
            if handle is not None:
                return handle
        return None

    async def _open_cached(self, blob_key: str, key: str) -> InstanceHandle | None:
        manifest = await self.manifest(blob_key)
        if manifest is None or key not in manifest.members:
            return None
        opened = self._open_known_path(blob_key)
        if opened is None:
            def open_blob() -> tuple[int, str, Manifest | None] | None:
                # The blob and its manifest are read together: another process may have
                # replaced an evicted blob since our copy of the manifest was loaded.
                blob = self.index.get(blob_key, read=True)
                if blob is None:
                    return None
                with blob:
                    return os.dup(blob.fileno()), blob.name, self.manifests.get(blob_key)

            found = await trio.to_thread.run_sync(open_blob)
            if found is None:
                return None
            fd, path, fresh = found
            if fresh is None:
                os.close(fd)
                return None
            self._blob_paths[blob_key] = (path, fresh)
            self._manifest_memory[blob_key] = fresh
            opened = fd, path, fresh
        return self._handle(blob_key, key, *opened)

    def open_now(self, series: SeriesRecord, instance: InstanceRecord) -> InstanceHandle | None:
        """``open_instance``'s answer when no wait is needed: the series' blob is one this store
        has opened before (its path and manifest in memory) and no download of it runs. None
        otherwise (not an error: ``open_instance`` then does the rest)."""
        if series.key in self._downloads or self.source.local_file(instance) is not None:
            return None
        opened = self._open_known_path(series.key)
        return None if opened is None else self._handle(series.key, instance.key, *opened)

    def _handle(self, blob_key: str, key: str, fd: int, path: str, manifest: Manifest) -> InstanceHandle | None:
        """Member ``key`` of the blob open at ``fd``, or None (the fd closed) if the blob does not
        hold it, or is not the file its manifest describes."""
        # offsets always from the manifest that came with this file
        if key not in manifest.members:
            os.close(fd)
            return None
        offset, length = manifest.members[key]
        if os.fstat(fd).st_size != manifest.size:
            # Not the blob this manifest describes (a commit that replaced a cached copy was cut
            # off between the two, or a power cut): absent, so the series is fetched anew.
            os.close(fd)
            log.warning("cached blob %s does not match its manifest: fetched again", blob_key)
            self._blob_paths.pop(blob_key, None)
            self._manifest_memory.pop(blob_key, None)
            return None
        self._pins.pin(path)
        return InstanceHandle(fd, offset, length, release=lambda: self._pins.unpin(path))

    def _open_known_path(self, blob_key: str) -> tuple[int, str, Manifest] | None:
        """Open a blob whose file we have seen, without asking the index (no thread, no SQL).

        The index's access time is brought up to date later, in the background."""
        known = self._blob_paths.get(blob_key)
        if known is None:
            return None
        path, manifest = known
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # evicted since
            del self._blob_paths[blob_key]
            return None
        self._recently_used.add(blob_key)
        return fd, path, manifest

    def is_cached(self, series: SeriesRecord) -> bool:
        """Whether the series' blob is in the index, its file present and its manifest stored.
        Blocking (sqlite, open): call in a worker thread."""
        return has_valid_entry(self.index, self.manifests, series.key)

    async def fetch_series(self, series: SeriesRecord, expect: set[str] | None = None) -> SeriesDownload | None:
        """Make sure the whole series is cached: None if it already was, else the finished
        download (joined if one was running). Raises the download's error if it failed.
        With ``expect`` (the listed instance keys), a cached copy that lacks some of them is
        fetched again (the series grew), at most once per ``missing_recheck``."""
        for _ in range(JOIN_ATTEMPTS):
            download = self._downloads.get(series.key)
            if download is None:
                if await trio.to_thread.run_sync(self.is_cached, series) and not await self._lacks(series, expect):
                    return None
                if await self._waited_for_another_process(series.key):
                    continue  # it was downloading this series: look at the cache again
                download = self._series_download(series)
            await download.done.wait()
            if download.error is not None:
                raise download.error if isinstance(download.error, DicomfsError) else \
                    SourceError(f"series {series.uid} could not be fetched: {download.error}")
            if not download.committed_elsewhere:
                return download
            if expect is not None:
                return None  # the cache had all this retrieve had: the caller checks what is missing
        raise SourceError(f"series {series.uid} keeps changing in the cache; giving up")

    async def _lacks(self, series: SeriesRecord, expect: set[str] | None) -> bool:
        """Whether the cached copy lacks an expected instance that a recent retrieve did not
        already look for in vain."""
        if not expect:
            return False
        manifest = await self.manifest(series.key)
        missing = expect - set(manifest.members) if manifest is not None else expect
        if not missing:
            return False
        seen = self._retrieved.get(series.key)
        return seen is None or clock.now() - seen[0] >= self.missing_recheck

    async def _waited_for_another_process(self, blob_key: str) -> bool:
        """If another process is downloading ``blob_key`` (it holds the key's lock), wait until it
        is done and return True; False at once if nobody is."""
        try:
            fd = os.open(layout.download_lock(self.cache_dir, blob_key), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return False  # no usable lock: just download
        waited = False
        try:
            with trio.move_on_after(MAX_WAIT_FOR_OTHER_PROCESS) as patience:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break  # free (and released again below: we only wanted to know)
                    except BlockingIOError:
                        waited = True
                        await trio.sleep(LOCK_POLL_SECONDS)
            return waited and not patience.cancelled_caught  # out of patience: download it ourselves
        finally:
            os.close(fd)

    def downloads(self) -> list[SeriesDownload]:
        """The downloads running now (for progress reports)."""
        return list(self._downloads.values())

    def running(self, series: SeriesRecord) -> SeriesDownload | None:
        """The download of the whole series running in this process, if any."""
        return self._downloads.get(series.key)

    async def read_ahead(self, series: SeriesRecord) -> SeriesDownload | None:
        """Start downloading the whole series for a reader to come (``readahead``): the running
        download if there is one, None if it is cached or another process is fetching it."""
        download = self.running(series)
        if download is not None:
            return download
        if await trio.to_thread.run_sync(self.is_cached, series):
            return None
        if not lock_free(layout.download_lock(self.cache_dir, series.key)):
            return None  # another process (a prefetch) is fetching it
        return self._series_download(series)  # (the running one, if one started while we looked)

    # --- downloading ------------------------------------------------------------------------
    def _series_download(self, series: SeriesRecord) -> SeriesDownload:
        """The running download of ``series``, started if there is none."""
        download = self._downloads.get(series.key)
        if download is not None:
            return download

        async def fetch(sink: SeriesDownload) -> None:
            await self.source.fetch_series(series, sink)

        self._series_touched.add(series.key)
        return self._start(series.key, series, fetch)

    def _start(self, blob_key: str, series: SeriesRecord, fetch: Fetch) -> SeriesDownload:
        if self._nursery is None:
            raise CacheError("the blob store is not running")
        probe = self.breaker.admit()  # refused at once while the archive is known to be down
        download = SeriesDownload(blob_key, series, self.partial_dir / layout.part_name(), fetch,
                                  make_room=self._make_room)
        try:
            self._nursery.start_soon(self._run_download, download, probe)
        except RuntimeError:  # shutting down: the nursery takes no new downloads
            os.close(download.fd)
            unlink_quietly(str(download.path))
            if probe:
                self.breaker.release()
            raise CacheError("the blob store is shutting down") from None
        self._downloads[blob_key] = download
        return download

    async def _run_download(self, download: SeriesDownload, probe: bool) -> None:
        what = download.blob_key
        # Say that this process is downloading the blob, for a prefetch in another process that
        # would rather wait than fetch it twice. If someone else holds the lock, go on anyway:
        # a reader here should not wait for a whole series that another process streams.
        lock_fd = try_lock(layout.download_lock(self.cache_dir, what))
        committed = False
        try:
            async with trio.open_nursery() as writer:
                writer.start_soon(download.write_loop)
                try:
                    async with open_nursery() as watch:
                        watch.start_soon(enforce, self.limits, lambda: download.wire,
                                         f"the retrieve of {what} from {self.source.description}")
                        await self._fetch_resuming(download)
                        watch.cancel_scope.cancel()
                finally:
                    download.fetched.set()
                    download.close_writes()
            await self._commit(download)
            committed = True
        except* DicomfsError as group:
            first = plain(group)
            log.error("%s could not be fetched from %s: %s", what, self.source.description, first)
            download.error = first
        except* Exception as group:  # a bug must not take the daemon down with it
            log.error("%s: unexpected error while fetching", what, exc_info=group)
            download.error = leaves(group)[0]
        finally:
            if isinstance(download.error, SourceError):
                self.breaker.failed(download.error)
            elif committed:
                self.breaker.succeeded()
            elif probe:
                self.breaker.release()  # stopped, or failed here (the disk): nothing learnt of the archive
            if download.error is None and not committed:  # cancelled: dicomfs is shutting down
                download.error = SourceError("the download was stopped: dicomfs is shutting down")
            if committed and download.blob_key == download.series.key:
                self._retrieved[download.blob_key] = (clock.now(), frozenset(download.members),
                                                      dict(download.rejected))
            download.finished = True
            del self._downloads[download.blob_key]
            download.notify()
            download.fetched.set()
            download.done.set()
            if lock_fd is not None:
                os.close(lock_fd)
            os.close(download.fd)
            unlink_quietly(str(download.path))

    async def _fetch_resuming(self, download: SeriesDownload) -> None:
        """The source's fetch; a transfer that broke off after bringing new instances is resumed
        (instances already in are skipped), at most ``RESUMES`` times. Nothing else is retried
        here: the HTTP layer has its own one retry of failed requests."""
        for resume in range(RESUMES + 1):
            done_before = len(download.delivered) + len(download.rejected)
            download.on_answer = self.breaker.succeeded  # the archive answers: tell the breaker
            try:
                await download.fetch(download)
                return
            except TransferBroken as exc:
                progressed = len(download.delivered) + len(download.rejected) > done_before
                if not progressed or resume == RESUMES:
                    raise
                log.warning("%s: %s; resuming (%d instances are in)", download.blob_key, exc,
                            len(download.delivered))
                await trio.sleep(RESUME_DELAY * 2**resume)

    async def _commit(self, download: SeriesDownload) -> None:
        manifest = download.manifest()

        blob_key = download.blob_key
        # A whole series makes the single instances fetched from it before redundant.
        redundant = self._instance_blobs.pop(blob_key, set()) if blob_key == download.series.key else set()

        blob = CompletedBlob(str(download.path), manifest.size)

        def commit() -> None:
            os.ftruncate(download.fd, manifest.size)
            os.fsync(download.fd)
            with flocked(self._commit_lock):
                cached = self.manifests.get(blob_key) if has_valid_entry(self.index, self.manifests, blob_key) \
                    else None
                if cached is not None:
                    if not set(manifest.members) - set(cached.members):
                        download.committed_elsewhere = True  # nothing new in ours: keep the cached copy
                        return
                    download.replaced = len(cached.members)  # the series grew: ours is the new version
                self.manifests.set(blob_key, manifest)
                # Replacing an entry removes the old file through BlobDisk.remove: a file that
                # readers of this process hold goes to the graveyard until they close it.
                self.index.set(blob_key, blob)
                for key in redundant:
                    self.index.delete(key)
                    self.manifests.delete(key)

        try:
            await trio.to_thread.run_sync(commit)
        except OSError as exc:
            raise CacheError(f"cannot commit {blob_key} to the cache: {exc.strerror or exc}") from None
        except sqlite3.Error as exc:
            raise CacheError(f"cannot commit {blob_key} to the cache: {exc}") from None
        if download.committed_elsewhere:
            self._manifest_memory.pop(blob_key, None)
            self._commits[blob_key] += 1
            log.info("%s: the cache already holds its %d instances; this copy is discarded", blob_key,
                     len(manifest.members))
            return
        self._manifest_memory[blob_key] = manifest
        if blob.stored_at is not None:
            self._blob_paths[blob_key] = (blob.stored_at, manifest)
        for key in redundant:
            self._manifest_memory.pop(key, None)
            self._blob_paths.pop(key, None)
        self._commits[blob_key] += 1
        self._cull_wanted.set()
        if download.replaced is not None:
            log.info("%s cached anew: %d instances (the cached copy had %d), %d bytes", blob_key,
                     len(manifest.members), download.replaced, manifest.size)
        else:
            log.info("%s cached: %d instances, %d bytes", blob_key, len(manifest.members), manifest.size)
