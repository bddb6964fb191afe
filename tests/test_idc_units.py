"""Unit tests of the IDC source's series listing (``dicomfs.sources.idc.source``) against a scripted
bucket: what a hostile or failing bucket listing does to it. The proof against a real S3 server is
tests/test_mount_idc.py."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from urllib3 import HTTPHeaderDict

import dicomfs.sources.idc.source as idc_source
from dicomfs.errors import IntegrityError, SourceError, SourceUnavailable
from dicomfs.records import SeriesRecord, StudyRecord
from dicomfs.sources.bucket import Chunks, ObjectInfo
from dicomfs.sources.idc.index import SeriesLocation
from dicomfs.sources.idc.source import IdcSource
from dicomfs.sources.s3 import S3Bucket
from dicomfs.tasks import Stopped, StopSignal
from tests.factory import MemorySink, make_instance

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.5", "1.2.826.0.1.3680043.8.498.5.1"
PREFIX = "0b1e6c4d-uuid/"
CHUNK = 1000  # what one read of an object brings


class ScriptedBucket:
    bucket = "idc-scripted"

    def __init__(self, objects: dict[str, bytes], listed: list[ObjectInfo] | None = None) -> None:
        self.objects = objects
        self.listed = listed if listed is not None else [ObjectInfo(k, len(v)) for k, v in objects.items()]
        self.failing: dict[str, SourceError] = {}
        self.asked: list[str] = []
        self.headers: dict[str, Mapping[str, str]] = {}  # an object's answer's headers (by name)

    async def list(self, prefix: str, *, delimiter: str | None = "/") -> tuple[list[str], list[ObjectInfo]]:
        return [], self.listed

    @contextmanager
    def stream_in_thread(self, name: str, start: int, end: int | None, stop: StopSignal) -> Iterator[Chunks]:
        self.asked.append(name)
        if name in self.failing:
            raise self.failing[name]
        data = self.objects[name][start:end]
        yield Chunks(iter([data[n:n + CHUNK] for n in range(0, len(data), CHUNK)]), self.headers.get(name, {}))

    async def aclose(self) -> None:
        pass


class Index:
    release = "scripted"

    def close(self) -> None:
        pass


def source(tmp_path: Path, bucket: ScriptedBucket) -> IdcSource:
    idc = IdcSource(Index(), tmp_path)  # type: ignore[arg-type]
    idc._locations[SERIES] = SeriesLocation(bucket.bucket, PREFIX, 3, 0)
    idc._bucket = lambda name: bucket  # type: ignore[assignment, method-assign, return-value]
    return idc


def files(count: int) -> dict[str, bytes]:
    return {f"{PREFIX}{n:02d}.dcm": make_instance(STUDY, SERIES, f"{SERIES}.{n}", pixel_bytes=64, number=n)
            for n in range(count)}


async def test_an_object_whose_header_is_refused_is_left_out_with_a_log_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bucket = ScriptedBucket(files(3))
    bucket.failing[f"{PREFIX}01.dcm"] = SourceError(f"object {PREFIX}01.dcm not found (HTTP 404)")
    idc = source(tmp_path, bucket)
    with caplog.at_level(logging.WARNING):
        instances = await idc.list_instances(SeriesRecord(STUDY, SERIES))
    assert sorted(i.key for i in instances) == [f"{SERIES}.0", f"{SERIES}.2"]
    assert any("01.dcm cannot be read" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    bucket.failing.clear()  # not remembered as read: listed again, it is there
    assert len(await idc.list_instances(SeriesRecord(STUDY, SERIES))) == 3
    await idc.aclose()


async def test_a_bucket_that_is_down_fails_the_listing_with_its_own_error(tmp_path: Path) -> None:
    bucket = ScriptedBucket(files(3))
    for name in bucket.objects:
        bucket.failing[name] = SourceUnavailable("the bucket answered HTTP 503 (scripted)")
    idc = source(tmp_path, bucket)
    with pytest.raises(SourceUnavailable, match="HTTP 503"):  # itself, not a group of them
        await idc.list_instances(SeriesRecord(STUDY, SERIES))
    await idc.aclose()


async def test_listed_objects_outside_the_prefix_or_too_short_are_never_asked_for(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    objects = files(2)
    listed = [ObjectInfo(k, len(v)) for k, v in objects.items()]
    listed += [ObjectInfo(f"{PREFIX}../../escape.dcm", 4000), ObjectInfo("other-uuid/x.dcm", 4000),
               ObjectInfo(f"{PREFIX}empty.dcm", 0), ObjectInfo(f"{PREFIX}tiny.dcm", 100)]
    bucket = ScriptedBucket(objects, listed)
    idc = source(tmp_path, bucket)
    with caplog.at_level(logging.WARNING):
        instances = await idc.list_instances(SeriesRecord(STUDY, SERIES))
    assert sorted(i.key for i in instances) == [f"{SERIES}.0", f"{SERIES}.1"]
    assert sorted(bucket.asked) == sorted(objects)
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 4, skipped
    await idc.aclose()


class StallingBucket(ScriptedBucket):
    """Header reads that never answer until stopped; counts the threads reading at once."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        super().__init__(objects)
        self.lock = threading.Lock()
        self.reading = self.most = self.stopped = 0

    @contextmanager
    def stream_in_thread(self, name: str, start: int, end: int | None, stop: StopSignal) -> Iterator[Chunks]:
        assert threading.current_thread() is not threading.main_thread()  # never on the event loop
        with self.lock:
            self.reading += 1
            self.most = max(self.most, self.reading)
        try:
            stop.wait(60)
        except Stopped:
            with self.lock:
                self.stopped += 1
            raise
        finally:
            with self.lock:
                self.reading -= 1
        yield Chunks(iter([]), {})  # (never reached: stopped first)


async def test_header_reads_run_in_worker_threads_a_bounded_few_at_once_and_stop_when_the_listing_is_cancelled(
        tmp_path: Path) -> None:
    bucket = StallingBucket(files(3 * idc_source.PARALLEL_HEADS))
    idc = source(tmp_path, bucket)
    with trio.move_on_after(0.5) as waited:
        await idc.list_instances(SeriesRecord(STUDY, SERIES))
    assert waited.cancelled_caught
    assert bucket.most == idc_source.PARALLEL_HEADS  # no more than that many at once, and as many
    assert bucket.stopped == idc_source.PARALLEL_HEADS and bucket.reading == 0  # each thread stopped and gone
    await idc.aclose()


async def test_an_object_too_large_to_hold_whole_is_streamed_into_its_series(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = files(2)
    big = f"{PREFIX}big.dcm"
    objects[big] = make_instance(STUDY, SERIES, f"{SERIES}.9", pixel_bytes=20_000, number=9)
    monkeypatch.setattr(idc_source, "WHOLE_AT_MOST", 10_000)
    bucket = ScriptedBucket(objects)
    idc = source(tmp_path, bucket)
    sink = MemorySink()
    await idc.fetch_series(SeriesRecord(STUDY, SERIES), sink)
    assert sink.files == {f"{SERIES}.{n}": data for n, data in ((0, objects[f"{PREFIX}00.dcm"]),
                                                                (1, objects[f"{PREFIX}01.dcm"]), (9, objects[big]))}
    assert sink.pieces[f"{SERIES}.9"] == -(-len(objects[big]) // CHUNK)  # as the reads brought it
    assert sink.pieces[f"{SERIES}.0"] == sink.pieces[f"{SERIES}.1"] == 1  # the small ones whole
    await idc.aclose()


async def test_a_large_search_reads_its_studies_series_in_batches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond ``SERIES_READ_WITH_SEARCH`` studies, the series of the studies a search walks are
    read ``SERIES_BATCH`` studies at a time (one scan of the index each: 0.1 s), not one by one."""
    monkeypatch.setattr(idc_source, "SERIES_READ_WITH_SEARCH", 10)
    monkeypatch.setattr(idc_source, "SERIES_BATCH", 10)
    uids = [f"1.2.{n}" for n in range(25)]
    scans: list[list[str]] = []

    class SearchIndex(Index):
        def studies(self, terms: object, narrowing: object) -> tuple[list[StudyRecord], list[object]]:
            return [StudyRecord(uid, {}) for uid in uids], []

        def series(self, study_uids: list[str]) -> dict[str, list[tuple[SeriesRecord, SeriesLocation]]]:
            scans.append(list(study_uids))
            return {uid: [(SeriesRecord(uid, f"{uid}.1"), SeriesLocation("b", "p/", 1, 1))] for uid in study_uids}

    idc = IdcSource(SearchIndex(), tmp_path)  # type: ignore[arg-type]
    studies, _ = await idc.search_studies([], [])
    for study in studies:  # in the search's order
        assert [s.uid for s in await idc.list_series(study.uid)] == [f"{study.uid}.1"]
    assert scans == [uids[:10], uids[10:20], uids[20:]]
    scans.clear()
    await idc.search_studies([], [])
    async with trio.open_nursery() as nursery:  # as a search walks them: several at a time, in any order
        for study in studies:
            nursery.start_soon(idc.list_series, study.uid)
    read = [uid for scan in scans for uid in scan]
    assert sorted(read) == sorted(uids) and len(scans) == 3, scans  # each study's series read once, by blocks
    await idc.aclose()


async def test_the_whole_listing_walked_in_order_reads_its_series_in_batches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a search (``ls idc --level series``, ``find``), studies asked for in the listing's
    order have their series read ``SERIES_BATCH`` studies at a time after the second; studies
    asked for out of order are read alone, with nothing read ahead for them."""
    monkeypatch.setattr(idc_source, "SERIES_BATCH", 10)
    uids = [f"1.3.{n}" for n in range(45)]
    scans: list[list[str]] = []

    class ListingIndex(Index):
        def studies(self) -> tuple[list[StudyRecord], list[object]]:
            return [StudyRecord(uid, {}) for uid in uids], []

        def series(self, study_uids: list[str]) -> dict[str, list[tuple[SeriesRecord, SeriesLocation]]]:
            scans.append(list(study_uids))
            return {uid: [(SeriesRecord(uid, f"{uid}.1"), SeriesLocation("b", "p/", 1, 1))] for uid in study_uids}

    idc = IdcSource(ListingIndex(), tmp_path)  # type: ignore[arg-type]
    studies = await idc.list_studies()
    for study in studies:
        assert [s.uid for s in await idc.list_series(study.uid)] == [f"{study.uid}.1"]
    assert scans == [uids[:1], uids[1:11], uids[11:21], uids[21:31], uids[31:41], uids[41:]]
    scans.clear()
    for uid in (uids[30], uids[5], uids[20]):  # out of order: alone
        await idc.list_series(uid)
    assert scans == [[uids[30]], [uids[5]], [uids[20]]]
    scans.clear()
    await idc.list_series(uids[21])  # right after the one before it: read ahead again
    assert scans == [uids[21:31]]
    await idc.aclose()


def test_idc_buckets_are_asked_for_in_their_own_region(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user whose AWS_REGION is set for their own work (eu-west-1) still reaches IDC's buckets in
    us-east-1, instead of a PermanentRedirect for every request; an s3:// bucket keeps following
    the configured region."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    idc = IdcSource(Index(), tmp_path)  # type: ignore[arg-type]
    try:
        bucket = idc._bucket("idc-open-data")
        assert bucket.region == "us-east-1"
        assert bucket.object_url("a/b.dcm") == "https://idc-open-data.s3.us-east-1.amazonaws.com/a/b.dcm"
        assert S3Bucket("my-bucket", sign=False).region == "eu-west-1"
    finally:
        idc._heads.close()


@pytest.mark.parametrize(("headers", "checked"), [
    ({}, True),
    ({"x-amz-server-side-encryption": "AES256"}, True),  # SSE-S3: the ETag is the MD5
    ({"x-amz-server-side-encryption": "aws:kms"}, False),
    ({"x-amz-server-side-encryption": "aws:kms:dsse"}, False),
    ({"x-amz-server-side-encryption-customer-algorithm": "AES256"}, False),  # SSE-C
    (HTTPHeaderDict({"X-Amz-Server-Side-Encryption": "aws:kms"}), False),  # as urllib3 gives them
])
def test_an_etag_is_taken_for_an_md5_unless_the_object_is_encrypted_with_a_kms_or_customer_key(
        headers: Mapping[str, str], checked: bool) -> None:
    """S3 gives objects encrypted with a KMS key or a customer's key a 32-hex ETag that is not the
    MD5 of their bytes: such an object's bytes are read without that check (one refused as
    damaged would be EIO however often it is read), everything else is held to it."""
    data = b"DICM" * 3000
    bucket = ScriptedBucket({"o": data})
    bucket.headers["o"] = headers
    info = ObjectInfo("o", len(data), etag="0123456789abcdef0123456789abcdef")  # not data's MD5
    taken: list[bytes] = []

    def read() -> None:
        idc_source._read_checked(bucket, info, taken.append, lambda size: None,  # type: ignore[arg-type]
                                 StopSignal())

    if checked:
        with pytest.raises(IntegrityError, match="do not match its ETag"):
            read()
    else:
        read()
        assert b"".join(taken) == data
    genuine = ObjectInfo("o", len(data), etag=hashlib.md5(data, usedforsecurity=False).hexdigest())
    taken.clear()
    idc_source._read_checked(bucket, genuine, taken.append, lambda size: None,  # type: ignore[arg-type]
                             StopSignal())
    assert b"".join(taken) == data
