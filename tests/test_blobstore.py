"""Unit tests of the blob store with a scripted source: single-flight, early readers, failures,
crash leftovers, eviction of pinned blobs."""

from __future__ import annotations

import errno
import os
import re
import sys
import threading
import types
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import diskcache
import google_crc32c
import pytest
import trio

from dicomfs.breaker import Breaker
from dicomfs.cache import BlobStore, Manifest
from dicomfs.errors import IntegrityError, SourceError, SourceUnavailable, TransferBroken
from dicomfs.records import InstanceRecord, SeriesRecord
from dicomfs.sources.base import BlockingSink, SeriesSink
from dicomfs.tasks import Stopped, StopSignal, run_stoppable
from dicomfs.transferlimits import TransferLimits
from tests.factory import make_instance


class ScriptedSource:
    description = "scripted"

    def __init__(self, series: dict[str, dict[str, bytes]]) -> None:
        self.series = series
        self.calls: Counter[str] = Counter()
        self.before_instance: Callable[[str], Awaitable[None]] | None = None
        self.fail_after: int | None = None  # raise after this many instances, once
        self.lie_about_size = False
        self.down = False  # the archive cannot be reached

    async def fetch_series(self, series: SeriesRecord, sink: SeriesSink) -> None:
        self.calls[series.key] += 1
        if self.down:
            raise SourceUnavailable("cannot reach the archive (scripted)")
        for index, (key, data) in enumerate(self.series[series.key].items()):
            if self.fail_after is not None and index == self.fail_after:
                self.fail_after = None
                raise TransferBroken("connection reset (scripted)")
            if self.before_instance is not None:
                await self.before_instance(key)
            sink.arrived(len(data))
            if not sink.wants(key):
                continue
            writer = await sink.begin(key, len(data) - 1 if self.lie_about_size else len(data))
            await writer.write(data[:7])
            await trio.sleep(0)
            await writer.write(data[7:])
            await writer.finish()

    def local_file(self, instance: InstanceRecord) -> None:
        return None


SERIES = SeriesRecord("1.2", "1.2.3")
# Real Part 10 files: the store refuses anything else.
FILES = {f"1.2.3.{i}": make_instance("1.2", "1.2.3", f"1.2.3.{i}", pixel_bytes=1000 + i, number=i) for i in range(5)}


def instance(key: str) -> InstanceRecord:
    return InstanceRecord("1.2", "1.2.3", key)


async def read_all(store: BlobStore, key: str) -> bytes | bytearray | memoryview:
    handle = await store.open_instance(SERIES, instance(key))
    try:
        return await handle.read(0, 1 << 20)
    finally:
        handle.close()


async def wait_cached(store: BlobStore, series: SeriesRecord) -> None:
    """Until the series is in the index and its download has ended (the index row is written a
    moment before the download is done with)."""
    with trio.fail_after(5):
        while not store.is_cached(series) or store.running(series) is not None:
            await trio.sleep(0.01)


async def with_store(tmp_path: Path, source: ScriptedSource, body: Callable[[BlobStore], Awaitable[None]],
                     size_limit: int = 1 << 30,
                     **options: object) -> None:
    store = BlobStore(tmp_path / "cache", size_limit, source, **options)  # type: ignore[arg-type]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            with trio.fail_after(20):
                await body(store)
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def test_concurrent_readers_share_one_download(tmp_path: Path) -> None:
    source = ScriptedSource({SERIES.key: FILES})
    results: dict[str, bytes | bytearray | memoryview] = {}

    async def body(store: BlobStore) -> None:
        async def reader(key: str) -> None:
            results[key] = await read_all(store, key)

        async with trio.open_nursery() as readers:
            for key in list(FILES) * 3:
                readers.start_soon(reader, key)
        assert results == FILES
        assert source.calls[SERIES.key] == 1
        # served from disk afterwards, no new request
        assert await read_all(store, "1.2.3.2") == FILES["1.2.3.2"]
        assert await store.size_of(SERIES, instance("1.2.3.4")) == len(FILES["1.2.3.4"])
        assert source.calls[SERIES.key] == 1

    await with_store(tmp_path, source, body)


async def test_a_download_tells_its_source_which_instances_readers_wait_for(tmp_path: Path) -> None:
    """A source that fetches a series piece by piece takes first what readers wait for
    (``SeriesSink.awaited``): the readers of a download are known to it from its start, and one
    that has its instance is no longer counted."""
    source = ScriptedSource({SERIES.key: FILES})
    sinks: list[SeriesSink] = []
    fetch = source.fetch_series

    async def watching(series: SeriesRecord, sink: SeriesSink) -> None:
        sinks.append(sink)
        while set(sink.awaited()) != {"1.2.3.4", "1.2.3.1"}:  # (the readers may come after the start)
            await trio.sleep(0.01)
        await fetch(series, sink)

    source.fetch_series = watching  # type: ignore[method-assign]

    async def body(store: BlobStore) -> None:
        async with trio.open_nursery() as readers:
            for key in ("1.2.3.4", "1.2.3.1", "1.2.3.4"):
                readers.start_soon(read_all, store, key)
        assert len(sinks) == 1
        assert set(sinks[0].awaited()) == set()  # every reader has its instance

    await with_store(tmp_path, source, body)


async def test_one_size_is_looked_up_alone(tmp_path: Path) -> None:
    """A lookup asks for one file's size: the store answers from the manifest's entry for it, not
    by making the sizes of every member of the series (1,500 of them in a large series, per lookup)."""
    source = ScriptedSource({SERIES.key: FILES})

    async def body(store: BlobStore) -> None:
        await read_all(store, "1.2.3.1")
        download = store.running(SERIES)
        if download is not None:
            await download.done.wait()  # the series is cached: sizes from its manifest
        everything = await store.known_sizes(SERIES)
        assert len(everything) == len(FILES)

        async def not_all(series: SeriesRecord) -> dict[str, int]:
            raise AssertionError("the size of one instance made every member's")

        store.known_sizes = not_all  # type: ignore[method-assign]
        for key in FILES:
            assert await store.size_of(SERIES, instance(key)) == everything[key] == len(FILES[key])
        assert await store.known_size(SERIES, "1.2.3.404") is None

    await with_store(tmp_path, source, body)


async def test_reader_of_first_instance_does_not_wait_for_the_rest(tmp_path: Path) -> None:
    source = ScriptedSource({SERIES.key: FILES})
    release = trio.Event()

    async def hold_back(key: str) -> None:
        if key == "1.2.3.1":
            await release.wait()

    source.before_instance = hold_back

    async def body(store: BlobStore) -> None:
        assert await read_all(store, "1.2.3.0") == FILES["1.2.3.0"]  # would hang if it waited
        release.set()
        assert await read_all(store, "1.2.3.4") == FILES["1.2.3.4"]

    await with_store(tmp_path, source, body)


async def test_a_broken_transfer_is_resumed_without_refetching_instances(tmp_path: Path) -> None:
    source = ScriptedSource({SERIES.key: FILES})
    source.fail_after = 3
    delivered: list[str] = []

    async def note(key: str) -> None:
        delivered.append(key)

    source.before_instance = note

    async def body(store: BlobStore) -> None:
        assert await read_all(store, "1.2.3.4") == FILES["1.2.3.4"]
        for key, data in FILES.items():
            assert await read_all(store, key) == data
        assert source.calls[SERIES.key] == 2

    await with_store(tmp_path, source, body)


async def test_a_lying_archive_gives_errors_and_no_cached_blob(tmp_path: Path) -> None:
    source = ScriptedSource({SERIES.key: FILES})
    source.lie_about_size = True

    async def body(store: BlobStore) -> None:
        with pytest.raises(SourceError, match="longer than announced"):
            await read_all(store, "1.2.3.0")
        assert not store.is_cached(SERIES)
        assert list(store.partial_dir.glob("*.part")) == []
        source.lie_about_size = False
        assert await read_all(store, "1.2.3.0") == FILES["1.2.3.0"]  # the next reader tries again

    await with_store(tmp_path, source, body)


async def test_leftovers_of_a_crash_are_never_served(tmp_path: Path) -> None:
    dead = tmp_path / "cache" / "work" / "12345-deadbeef"  # a killed process's folder: its lock is free
    dead.mkdir(parents=True)
    (dead / ".lock").touch()
    (dead / "deadbeef.part").write_bytes(b"half a blob")
    source = ScriptedSource({SERIES.key: FILES})

    async def body(store: BlobStore) -> None:
        assert not dead.exists()
        assert [p.name for p in (tmp_path / "cache" / "work").iterdir()] == [store.partial_dir.name]
        assert await read_all(store, "1.2.3.1") == FILES["1.2.3.1"]
        assert source.calls[SERIES.key] == 1

    await with_store(tmp_path, source, body)


async def test_manifests_written_before_the_cache_package_are_still_read(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Manifests are pickled: those of caches made when the class was ``dicomfs.blobstore.Manifest``
    (small ones inside sqlite, large ones in files of their own) are read as today's."""
    source = ScriptedSource({SERIES.key: FILES})

    async def cache_it(store: BlobStore) -> None:
        await read_all(store, "1.2.3.0")
        await wait_cached(store, SERIES)

    await with_store(tmp_path, source, cache_it)

    @dataclass(frozen=True)
    class OldManifest:
        members: dict[str, tuple[int, int]]
        size: int
        crcs: dict[str, int] | None = None

    old_module = types.ModuleType("dicomfs.blobstore")
    OldManifest.__module__, OldManifest.__name__, OldManifest.__qualname__ = old_module.__name__, "Manifest", "Manifest"
    old_module.Manifest = OldManifest  # type: ignore[attr-defined]
    large = OldManifest({f"1.2.9.{i}": (i, 1) for i in range(5000)}, 5000)
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, old_module.__name__, old_module)
        with diskcache.Cache(str(tmp_path / "cache" / "manifests")) as manifests:
            stored = manifests.get(SERIES.key)
            manifests.set(SERIES.key, OldManifest(stored.members, stored.size, stored.crcs))
            manifests.set("1.2/1.2.9", large)
        assert list((tmp_path / "cache" / "manifests").rglob("*.val"))  # the large one is a file

    async def read_again(store: BlobStore) -> None:
        assert await read_all(store, "1.2.3.4") == FILES["1.2.3.4"]
        assert source.calls[SERIES.key] == 1  # from the cache, not fetched again
        assert store.manifests.get("1.2/1.2.9") == Manifest(large.members, large.size)

    await with_store(tmp_path, source, read_again)


async def test_eviction_spares_blobs_that_are_being_read(tmp_path: Path) -> None:
    many = {f"1.2.{n}": {f"1.2.{n}.1": make_instance("1.2", str(n), f"1.2.{n}.1", pixel_bytes=200_000)}
            for n in range(6)}
    source = ScriptedSource(many)

    async def body(store: BlobStore) -> None:
        first = SeriesRecord("1.2", "0")
        (await store.open_instance(first, InstanceRecord("1.2", "0", "1.2.0.1"))).close()
        await wait_cached(store, first)
        handle = await store.open_instance(first, InstanceRecord("1.2", "0", "1.2.0.1"))  # from disk
        source.series = {SeriesRecord("1.2", str(n)).key: many[f"1.2.{n}"] for n in range(6)}
        assert first.key in source.series
        for n in range(1, 6):
            series = SeriesRecord("1.2", str(n))
            h = await store.open_instance(series, InstanceRecord("1.2", str(n), f"1.2.{n}.1"))
            h.close()
            await trio.sleep(0.05)
        with trio.fail_after(5):
            while store.index.volume() > store.size_limit:
                await trio.sleep(0.05)
        assert not store.is_cached(first)  # the oldest blob was evicted...
        data = await handle.read(0, 300_000)  # ...but its reader still reads it whole
        assert data == many["1.2.0"]["1.2.0.1"]
        graveyard = store.partial_dir / "graveyard"
        assert len(list(graveyard.iterdir())) == 1
        handle.close()
        assert list(graveyard.iterdir()) == []

    source.series = {SeriesRecord("1.2", "0").key: many["1.2.0"]}
    await with_store(tmp_path, source, body, size_limit=700_000)


async def test_a_cached_blob_cut_short_is_fetched_again(tmp_path: Path) -> None:
    source = ScriptedSource({SERIES.key: FILES})

    async def body(store: BlobStore) -> None:
        await read_all(store, "1.2.3.0")
        await wait_cached(store, SERIES)
        with store.index.get(SERIES.key, read=True) as blob:
            path = blob.name
        os.truncate(path, 10)
        assert await read_all(store, "1.2.3.4") == FILES["1.2.3.4"]  # not wrong bytes, not EIO
        assert source.calls[SERIES.key] == 2
        await wait_cached(store, SERIES)
        assert store.is_cached(SERIES)  # the fetched copy replaced the cut one

    await with_store(tmp_path, source, body)


async def test_a_listed_instance_missing_from_the_retrieve_is_not_fetched_again_and_again(tmp_path: Path) -> None:
    source = ScriptedSource({SERIES.key: FILES})

    async def body(store: BlobStore) -> None:
        with pytest.raises(IntegrityError, match="missing from its series retrieve"):
            await read_all(store, "1.2.3.99")
        for _ in range(5):
            with pytest.raises(IntegrityError, match="was not in the retrieve of its series .* asked for again"):
                await read_all(store, "1.2.3.99")
            with pytest.raises(IntegrityError):
                await store.size_of(SERIES, instance("1.2.3.99"))
        assert source.calls[SERIES.key] == 1
        await trio.sleep(0.3)  # the recheck time (the listing TTL) is over: one more try
        with pytest.raises(IntegrityError, match="missing from its series retrieve"):
            await read_all(store, "1.2.3.99")
        assert source.calls[SERIES.key] == 2

    await with_store(tmp_path, source, body, missing_recheck=0.25)


async def test_a_grown_series_is_cached_anew_and_readers_of_the_old_copy_are_unharmed(tmp_path: Path) -> None:
    first = dict(list(FILES.items())[:3])
    source = ScriptedSource({SERIES.key: first})

    async def body(store: BlobStore) -> None:
        assert await read_all(store, "1.2.3.0") == FILES["1.2.3.0"]
        await wait_cached(store, SERIES)
        old = await store.open_instance(SERIES, instance("1.2.3.1"))  # a reader of the old copy
        source.series[SERIES.key] = FILES  # two instances arrived in the archive
        assert await read_all(store, "1.2.3.4") == FILES["1.2.3.4"]
        with trio.fail_after(5):
            while len((await store.manifest(SERIES.key) or Manifest({}, 0)).members) != 5:
                await trio.sleep(0.01)
        for key, data in FILES.items():
            assert await read_all(store, key) == data
        assert source.calls[SERIES.key] == 2  # once for the old copy, once for the new: no loop
        assert await old.read(0, 1 << 20) == FILES["1.2.3.1"]
        old.close()
        assert store.manifests.get(SERIES.key).members.keys() == FILES.keys()
        # a prefetch that expects what the cache holds fetches nothing more
        assert await store.fetch_series(SERIES, expect=set(FILES)) is None
        assert source.calls[SERIES.key] == 2

    # (no wait for the listing TTL: a listing could have shown the new instances at once)
    await with_store(tmp_path, source, body, missing_recheck=0)


async def test_prefetch_of_a_grown_series_fetches_it_once(tmp_path: Path) -> None:
    source = ScriptedSource({SERIES.key: dict(list(FILES.items())[:2])})

    async def body(store: BlobStore) -> None:
        assert await store.fetch_series(SERIES) is not None
        assert await store.fetch_series(SERIES, expect=set(FILES)) is None  # retrieved just now: it lacked them
        assert source.calls[SERIES.key] == 1
        source.series[SERIES.key] = FILES
        store.missing_recheck = 0
        download = await store.fetch_series(SERIES, expect=set(FILES))
        assert download is not None and set(download.members) == set(FILES) and download.replaced == 2
        assert source.calls[SERIES.key] == 2

    await with_store(tmp_path, source, body)


async def test_a_malformed_instance_is_refused_and_the_others_are_cached(tmp_path: Path) -> None:
    bad = dict(FILES)
    bad["1.2.3.2"] = FILES["1.2.3.2"] + b"\0" * 3  # three bytes after its last element
    source = ScriptedSource({SERIES.key: bad})

    async def body(store: BlobStore) -> None:
        with pytest.raises(IntegrityError, match="not a well-formed DICOM Part 10 file"):
            await read_all(store, "1.2.3.2")
        for key in ("1.2.3.0", "1.2.3.1", "1.2.3.3", "1.2.3.4"):
            assert await read_all(store, key) == FILES[key]
        await wait_cached(store, SERIES)
        assert set(store.manifests.get(SERIES.key).members) == {"1.2.3.0", "1.2.3.1", "1.2.3.3", "1.2.3.4"}
        with pytest.raises(IntegrityError, match="not a well-formed"):
            await read_all(store, "1.2.3.2")  # said again, not fetched again at once
        assert source.calls[SERIES.key] == 1

    await with_store(tmp_path, source, body)


async def test_while_the_archive_is_down_uncached_reads_fail_at_once(tmp_path: Path) -> None:
    source = ScriptedSource({SERIES.key: FILES})
    source.down = True

    async def body(store: BlobStore) -> None:
        with pytest.raises(SourceUnavailable, match="cannot reach"):
            await read_all(store, "1.2.3.0")
        for _ in range(10):
            with pytest.raises(SourceUnavailable, match="is unavailable"):
                await read_all(store, "1.2.3.1")
        assert source.calls[SERIES.key] == 1
        source.down = False
        with trio.fail_after(5):  # the probe after the cool-down finds it back
            while True:
                try:
                    assert await read_all(store, "1.2.3.1") == FILES["1.2.3.1"]
                    break
                except SourceUnavailable:
                    await trio.sleep(0.05)
        assert source.calls[SERIES.key] == 2

    await with_store(tmp_path, source, body, breaker=Breaker("scripted", first_cooldown=0.2))


async def test_a_stalled_source_is_abandoned_by_the_minimum_rate(tmp_path: Path) -> None:
    source = ScriptedSource({SERIES.key: FILES})

    async def stall(key: str) -> None:
        if key == "1.2.3.2":
            await trio.sleep_forever()

    source.before_instance = stall

    async def body(store: BlobStore) -> None:
        assert await read_all(store, "1.2.3.0") == FILES["1.2.3.0"]
        with pytest.raises(SourceUnavailable, match="less than the minimum"):
            await read_all(store, "1.2.3.4")
        assert not store.is_cached(SERIES)

    await with_store(tmp_path, source, body, limits=TransferLimits(window=0.5, min_rate=1000, deadline=60))


class ThreadedSource(ScriptedSource):
    """Delivers a series from a worker thread through the sink's thread face, as the DICOMweb
    source does: ``gate`` holds the thread after ``hold_after`` instances (and the first 100
    bytes of the next); ``stall`` makes it wait there until stopped; ``crash`` raises a bug."""

    def __init__(self, series: dict[str, dict[str, bytes]]) -> None:
        super().__init__(series)
        self.hold_after: int | None = None
        self.gate = threading.Event()
        self.stall = False
        self.crash = False
        self.stopped = False

    async def fetch_series(self, series: SeriesRecord, sink: SeriesSink) -> None:
        self.calls[series.key] += 1
        await run_stoppable(partial(self._job, self.series[series.key], sink.in_thread()))

    def _job(self, files: dict[str, bytes], sink: BlockingSink, stop: StopSignal) -> None:
        try:
            for index, (key, data) in enumerate(files.items()):
                writer = sink.begin(key, len(data))
                if index == self.hold_after:
                    writer.write(data[:100])
                    sink.publish()
                    if self.crash:
                        raise RuntimeError("a bug in the retrieve (scripted)")
                    if self.stall:
                        stop.wait(60)
                    self.gate.wait(20)
                sink.arrived(len(data))
                writer.write(data[100:] if index == self.hold_after else data)
                writer.finish()
                sink.publish()
        except Stopped:
            self.stopped = True
            raise


async def test_thread_retrieve_serves_early_readers_and_commits_with_crcs(tmp_path: Path) -> None:
    source = ThreadedSource({SERIES.key: FILES})
    source.hold_after = 3

    async def body(store: BlobStore) -> None:
        # instance 1 is readable while the thread is still held inside instance 3
        assert await read_all(store, "1.2.3.1") == FILES["1.2.3.1"]
        assert not source.gate.is_set()
        source.gate.set()
        assert await read_all(store, "1.2.3.4") == FILES["1.2.3.4"]
        await wait_cached(store, SERIES)
        manifest = await store.manifest(SERIES.key)
        assert manifest is not None and manifest.crcs == {k: google_crc32c.value(v) for k, v in FILES.items()}
        assert source.calls[SERIES.key] == 1

    await with_store(tmp_path, source, body)


async def test_a_stalled_thread_retrieve_is_stopped_and_leaves_no_committed_blob(tmp_path: Path) -> None:
    """The archive stops sending mid-body: the minimum rate cancels the download, its thread
    stops at once (it was waiting on the stop), readers of the rest get an error, nothing is
    committed and the partial file is gone."""
    source = ThreadedSource({SERIES.key: FILES})
    source.hold_after, source.stall = 2, True

    async def body(store: BlobStore) -> None:
        assert await read_all(store, "1.2.3.0") == FILES["1.2.3.0"]
        with pytest.raises(SourceUnavailable, match="less than the minimum"):
            await read_all(store, "1.2.3.4")
        assert source.stopped
        assert not store.is_cached(SERIES)
        assert await store.manifest(SERIES.key) is None
        assert not list(store.partial_dir.glob("*.part"))

    await with_store(tmp_path, source, body, limits=TransferLimits(window=0.5, min_rate=1000, deadline=60))


async def test_a_thread_retrieve_that_raises_is_an_error_for_its_readers_and_the_store_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    other = SeriesRecord("1.2", "1.2.9")
    other_files = {f"1.2.9.{i}": make_instance("1.2", "1.2.9", f"1.2.9.{i}", number=i) for i in range(2)}
    source = ThreadedSource({SERIES.key: FILES, other.key: other_files})
    source.hold_after, source.crash = 2, True

    async def body(store: BlobStore) -> None:
        with pytest.raises(SourceError) as info:
            await read_all(store, "1.2.3.4")
        assert info.value.errno == errno.EIO and "a bug in the retrieve" in str(info.value)
        assert "unexpected error while fetching" in caplog.text
        assert not store.is_cached(SERIES)
        source.crash, source.hold_after = False, None
        handle = await store.open_instance(other, InstanceRecord("1.2", "1.2.9", "1.2.9.1"))
        try:
            assert await handle.read(0, 1 << 20) == other_files["1.2.9.1"]
        finally:
            handle.close()

    await with_store(tmp_path, source, body)


async def test_a_manifest_that_does_not_describe_its_blob_is_not_believed(tmp_path: Path) -> None:
    """A commit replacing a cached copy, cut off between writing the new manifest and the index
    row, leaves a manifest beside a blob it does not describe: the series is fetched anew rather
    than read at the wrong offsets."""
    source = ScriptedSource({SERIES.key: FILES})

    async def fill(store: BlobStore) -> None:
        assert await read_all(store, "1.2.3.1") == FILES["1.2.3.1"]
        await wait_cached(store, SERIES)
        stored = store.manifests.get(SERIES.key)
        shifted = {k: (offset + 100, length) for k, (offset, length) in stored.members.items()}
        store.manifests.set(SERIES.key, Manifest(shifted, stored.size + 100, stored.crcs))

    async def read_again(store: BlobStore) -> None:
        assert not store.is_cached(SERIES)
        assert await read_all(store, "1.2.3.3") == FILES["1.2.3.3"]
        assert source.calls[SERIES.key] == 2
        await wait_cached(store, SERIES)
        assert await read_all(store, "1.2.3.4") == FILES["1.2.3.4"]

    await with_store(tmp_path, source, fill)
    await with_store(tmp_path, source, read_again)  # a new process: nothing remembered in memory


def test_writeback_is_started_a_step_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A download hands what it wrote to the kernel's writeback every WRITEBACK_STEP bytes, so
    the commit's fsync finds little left (measured: 100 ms to 5 ms for a 134 MB series at
    125 MB/s); and libc's sync_file_range is really there to call."""
    from dicomfs.cache import download

    assert download._libc_sync_file_range() is not None
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(download, "_sync_file_range", lambda fd, offset, length: calls.append((offset, length)))
    writeback = download._Writeback(-1)
    step = download.WRITEBACK_STEP
    for end in range(1 << 20, 3 * step + 1, 1 << 20):
        writeback.advance(end)
    assert calls == [(0, step), (step, step), (2 * step, step)]


def test_crc_input_copies_only_what_it_must() -> None:
    """The C CRC32C takes bytes only: a view of all of a bytes object is that object, no copy;
    a part of one, or a bytearray, is copied; the CRC is the same either way."""
    from dicomfs.cache.download import _crc_input

    chunk = bytes(range(256)) * 64
    assert _crc_input(chunk) is chunk
    assert _crc_input(memoryview(chunk)) is chunk
    part = memoryview(chunk)[10:-10]
    assert _crc_input(part) == chunk[10:-10] and _crc_input(part) is not chunk
    assert _crc_input(bytearray(chunk)) == chunk
    assert google_crc32c.extend(0, _crc_input(part)) == google_crc32c.value(chunk[10:-10])


# --- cache verify --------------------------------------------------------------------------------

VERIFIED = {f"1.2.{n}": SeriesRecord("1.2", f"1.2.{n}") for n in range(4)}


async def _cache_of_four_series(tmp_path: Path) -> None:
    files = {series.key: {f"{uid}.{i}": make_instance("1.2", uid, f"{uid}.{i}", pixel_bytes=3000, number=i)
                          for i in range(3)} for uid, series in VERIFIED.items()}

    async def body(store: BlobStore) -> None:
        for series in VERIFIED.values():
            await store.fetch_series(series)
            await wait_cached(store, series)

    await with_store(tmp_path, ScriptedSource(files), body)


def _blob_path(tmp_path: Path, key: str) -> Path:
    from dicomfs.cache import layout

    index, manifests = layout.open_indexes(tmp_path / "cache", None)
    try:
        blob = index.get(key, read=True)
        assert blob is not None
        with blob:
            return Path(blob.name)
    finally:
        index.close()
        manifests.close()


async def test_verify_drops_what_is_bad_and_keeps_the_rest(tmp_path: Path) -> None:
    from dicomfs.cache import admin, layout

    await _cache_of_four_series(tmp_path)
    keys = sorted(series.key for series in VERIFIED.values())
    good, flipped, missing, cut = keys
    path = _blob_path(tmp_path, flipped)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(data)
    _blob_path(tmp_path, missing).unlink()
    with open(_blob_path(tmp_path, cut), "r+b") as blob:
        blob.truncate(100)

    report = admin.verify(tmp_path / "cache")
    middle = f"{flipped.split('/')[1]}.1"  # (the instance whose bytes hold the blob's middle)
    assert sorted(report.dropped) == [f"{flipped}: instance {middle} fails its CRC32C check",
                                      f"{missing}: its file is missing",
                                      f"{cut}: 100 bytes on disk, {len(data)} recorded"]
    index, manifests = layout.open_indexes(tmp_path / "cache", None)
    try:
        assert sorted(index.iterkeys()) == [good] and sorted(manifests.iterkeys()) == [good]
    finally:
        index.close()
        manifests.close()
    assert admin.verify(tmp_path / "cache").dropped == []


async def test_verify_checks_bytes_without_the_commit_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mount's or a prefetch's commit must not wait while gigabytes are checked; and a blob
    evicted while it was checked is not reported."""
    import fcntl

    from dicomfs.cache import admin, layout

    await _cache_of_four_series(tmp_path)
    lock_path = layout.paths(tmp_path / "cache").commit_lock
    free: list[bool] = []
    evicted = sorted(series.key for series in VERIFIED.values())[1]
    path = _blob_path(tmp_path, evicted)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # bad: verify would drop it, but it is evicted meanwhile
    path.write_bytes(data)
    extend = google_crc32c.extend

    def checking(crc: int, chunk: bytes) -> int:
        with open(lock_path, "a+b") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                free.append(True)
                fcntl.flock(other, fcntl.LOCK_UN)
            except BlockingIOError:
                free.append(False)
        index, manifests = layout.open_indexes(tmp_path / "cache", None)
        try:
            index.delete(evicted)
            manifests.delete(evicted)
        finally:
            index.close()
            manifests.close()
        return int(extend(crc, chunk))

    monkeypatch.setattr(google_crc32c, "extend", checking)  # (the module admin.verify calls)
    report = admin.verify(tmp_path / "cache")
    assert free and all(free)
    assert report.dropped == []


async def test_a_local_file_cut_short_or_swapped_says_so_by_its_path(tmp_path: Path) -> None:
    """A folder source's file is served in place: what goes wrong with it is the file's, named
    by its path, not a cached blob's."""
    from dicomfs.cache.handles import open_local

    path = tmp_path / "a.dcm"
    path.write_bytes(b"x" * 4096)
    record = InstanceRecord("1.2", "1.2.3", "1.2.3.4", size=4096)
    handle = open_local(path, record)
    try:
        os.truncate(path, 1000)  # cut short while open
        with pytest.raises(IntegrityError, match=f"^{re.escape(str(path))} is shorter than when it was indexed"):
            await handle.read(0, 4096)
    finally:
        handle.close()
    with pytest.raises(IntegrityError, match=f"^{re.escape(str(path))} changed size since it was indexed"):
        open_local(path, record)
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(SourceError, match=f"^{re.escape(str(path))} is no longer a regular file$"):
        open_local(path, record)  # at once: not waiting for a writer
