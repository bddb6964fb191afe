"""The static DICOMweb tree through the Operations (no kernel): sizes that hold while the kernel may
trust them, and hostile archive metadata contained to the files it concerns."""

from __future__ import annotations

import dataclasses
import errno
import gzip
import json
import os
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
from trio.testing import MockClock

from dicomfs.cache import BlobStore
from dicomfs.catalog import Catalog
from dicomfs.errors import ProtocolError, TransferBroken
from dicomfs.records import DicomJson, FrameTable, InstanceRecord, SeriesRecord, StudyRecord
from dicomfs.webfiles import EVERY_FRAME_FOR, IN_TURN
from tests.test_operations import Mounted, ScriptedArchive, operations

STUDY, SERIES = "1.2.840.1", "1.2.840.1.1"


class MetadataArchive(ScriptedArchive):
    """A scripted archive that also answers WADO-RS metadata, as scripted."""

    def __init__(self, series: dict[str, dict[str, bytes]], metadata: dict[str, DicomJson]) -> None:
        super().__init__(series)
        self.metadata = metadata
        self.extra_studies: list[StudyRecord] = []
        self.study_attrs: DicomJson = {"00080020": {"vr": "DA", "Value": ["20200101"]}}

    async def list_studies(self) -> list[StudyRecord]:
        return [StudyRecord(STUDY, self.study_attrs), *self.extra_studies]

    async def series_metadata(self, series: SeriesRecord) -> dict[str, DicomJson]:
        return self.metadata


async def run_mounted(source: MetadataArchive, cache: Path, listing_ttl: float, test) -> None:  # type: ignore[no-untyped-def]
    blobs = BlobStore(cache, 1 << 30, source)  # type: ignore[arg-type]
    catalog = Catalog(source, None, listing_ttl=listing_ttl)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(blobs.run)
        await test(Mounted(operations(catalog, blobs, listing_ttl)))
        nursery.cancel_scope.cancel()
    blobs.close()


def plain_instance(key: str) -> DicomJson:
    return {"00080018": {"vr": "UI", "Value": [key]}, "0020000D": {"vr": "UI", "Value": [STUDY]},
            "0020000E": {"vr": "UI", "Value": [SERIES]}}


async def test_a_listing_file_reads_at_the_size_the_kernel_was_told(tmp_path: Path,
                                                                    mock_clock: MockClock) -> None:
    """The studies index changes when a study arrives; a reader that opens it while the kernel
    still holds the old size gets the old bytes (else it would read a truncated gzip). Time is
    trio's mock clock, moved by hand: the catalog and the rendered files age on it (``clock``)."""
    source = MetadataArchive({f"{STUDY}/{SERIES}": {f"{SERIES}.1": b"x"}}, {})
    ttl = 60.0

    async def read_inode(fs: Mounted, inode: int) -> bytes:
        """What a reader gets when the kernel opens an inode it knows (no lookup on the way)."""
        info = await fs.ops.open(inode, os.O_RDONLY, None)
        try:
            return bytes(await fs.ops.read(info.fh, 0, 1 << 20))
        finally:
            await fs.ops.release(info.fh)

    async def test(fs: Mounted) -> None:
        studies = await fs.resolve("dicomweb/studies")
        entry = await fs.ops.lookup(studies, b"index.json.gz")
        first, inode = entry.st_size, entry.st_ino
        assert entry.attr_timeout == ttl
        mock_clock.jump(0.6 * ttl)
        assert (await fs.ops.getattr(inode)).st_size == first  # the kernel trusts this until 1.6 ttl
        source.extra_studies.append(StudyRecord("1.2.840.2", {"00080020": {"vr": "DA", "Value": ["20210101"]}}))
        mock_clock.jump(0.6 * ttl)  # the catalog's listing has expired; the kernel's size has not
        old = await read_inode(fs, inode)
        assert len(old) == first
        assert len(json.loads(gzip.decompress(old))) == 1
        mock_clock.jump(0.6 * ttl)  # now the kernel asks again, and sees the new study
        second = (await fs.ops.getattr(inode)).st_size
        new = await read_inode(fs, inode)
        assert len(new) == second != first
        assert len(json.loads(gzip.decompress(new))) == 2
        # readdir never tells a listing file's size (its reply may reach the kernel much later)
        listed = await fs.listdir("dicomweb/studies")
        assert listed["index.json.gz"].st_size == 0 and listed["index.json.gz"].attr_timeout == 0
        # a file being read keeps the size of what it reads, even after the listing changes
        info = await fs.ops.open(inode, os.O_RDONLY, None)
        try:
            source.extra_studies.append(StudyRecord("1.2.840.3", {}))
            mock_clock.jump(1.2 * ttl)
            assert (await fs.ops.getattr(inode)).st_size == second
            assert len(await fs.ops.read(info.fh, 0, 1 << 20)) == second
        finally:
            await fs.ops.release(info.fh)
        mock_clock.jump(1.2 * ttl)
        third = (await fs.ops.getattr(inode)).st_size
        assert third > second and len(await read_inode(fs, inode)) == third

    await run_mounted(source, tmp_path / "cache", ttl, test)


async def test_a_told_size_survives_the_cache_dropping_its_file(tmp_path: Path, mock_clock: MockClock) -> None:
    source = MetadataArchive({f"{STUDY}/{SERIES}": {f"{SERIES}.1": b"x"}}, {})
    ttl = 60.0

    async def test(fs: Mounted) -> None:
        entry = await fs.ops.lookup(await fs.resolve("dicomweb/studies"), b"index.json.gz")
        source.extra_studies.append(StudyRecord("1.2.840.2", {}))
        mock_clock.jump(ttl + 0.5)  # the listing has expired; the size told is held a little longer
        files = fs.ops.tree.views["dicomweb"].files  # type: ignore[attr-defined]
        files._listings.clear()  # memory pressure: the rendered file is evicted
        info = await fs.ops.open(entry.st_ino, os.O_RDONLY, None)
        try:
            assert len(await fs.ops.read(info.fh, 0, 1 << 20)) == entry.st_size
        finally:
            await fs.ops.release(info.fh)

    await run_mounted(source, tmp_path / "cache", ttl, test)


async def test_hostile_metadata_is_contained(tmp_path: Path) -> None:
    hostile = {
        **plain_instance(f"{SERIES}.1"),
        "00281050": {"vr": "DS", "Value": [float("nan"), 10**20, 1e308]},
        "00280008": {"vr": "IS", "Value": [10**12]},
        "00280010": {"vr": "US", "Value": [10**15]},
        "00280011": {"vr": "US", "Value": [10]},
        "00280100": {"vr": "US", "Value": [16]},
        "00280004": {"vr": "CS", "Value": ["MONOCHROME2"]},
        "00083002": {"vr": "UI", "Value": ["1.2.840.10008.1.2.1"]},
        "00181000": {"vr": "LO", "InlineBinary": "AAAA"},
        "0009xxxx": {"vr": "LO", "Value": ["not a tag"]},
        "00100020": "not an element",
        "7FE00010": {"vr": "OW", "BulkDataURI": "http://archive/../../etc/passwd"},
    }
    source = MetadataArchive(
        {f"{STUDY}/{SERIES}": {f"{SERIES}.1": b"not DICOM at all", f"{SERIES}.2": b"x"}},
        {f"{SERIES}.1": hostile, f"{SERIES}.2": "garbage", "../../evil": plain_instance("1.2.3")})  # type: ignore[dict-item]
    source.study_attrs = {"00100010": {"vr": "PN", "BulkDataURI": "http://archive/bulk"},
                          "00080020": {"vr": "DA", "Value": ["20200101"]}}

    async def test(fs: Mounted) -> None:
        base = f"dicomweb/studies/{STUDY}/series/{SERIES}"
        metadata = json.loads(gzip.decompress(await fs.read(f"{base}/metadata.gz")),
                              parse_constant=lambda name: pytest.fail(f"{name} in the output"))
        assert [m["00080018"]["Value"] for m in metadata] == [[f"{SERIES}.1"]]  # garbage and "../" left out
        one = metadata[0]
        assert one["00281050"]["Value"] == [None, 1e20, 1e308]
        assert "00181000" not in one and "00100020" not in one
        assert one["7FE00010"]["BulkDataURI"] == f"series/{SERIES}/instances/{SERIES}.1/frames"
        frames = await fs.resolve(f"{base}/instances/{SERIES}.1/frames")
        for name in (b"1000001.mht", "\u00b2.mht".encode(), b"01.mht", b"0.mht", b"x.mht"):
            with pytest.raises(pyfuse3.FUSEError) as missing:
                await fs.ops.lookup(frames, name)
            assert missing.value.errno == errno.ENOENT, name
        # the frame can be named, but its bytes are not DICOM: EIO for that read only
        with pytest.raises(pyfuse3.FUSEError) as broken:
            await fs.ops.lookup(frames, b"1.mht")
        assert broken.value.errno == errno.EIO
        studies = json.loads(gzip.decompress(await fs.read("dicomweb/studies/index.json.gz")))
        assert studies[0]["00080020"]["Value"] == ["20200101"] and "00100010" not in studies[0]
        assert os.fsencode(f"{SERIES}.1") in [n.encode() for n in await fs.listdir(f"{base}/instances")]

    await run_mounted(source, tmp_path / "cache", 60.0, test)


def count_whole_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The instances ``WebFiles`` reads whole into memory from now on, one entry per read."""
    from dicomfs import webfiles

    reads: list[str] = []
    original = webfiles.WebFiles._read_whole

    async def counting(self: webfiles.WebFiles, handle: Any, instance: Any) -> bytes:
        reads.append(instance.key)
        return await original(self, handle, instance)

    monkeypatch.setattr(webfiles.WebFiles, "_read_whole", counting)
    return reads


@pytest.mark.parametrize("stream", [False, True], ids=["read-whole", "streamed"])
@pytest.mark.parametrize("name", ["examples_ybr_color.dcm", "rtdose.dcm", "SC_rgb_rle_2frame.dcm",
                                  "MR_small_bigendian.dcm"])
async def test_frames_after_the_first_are_read_from_their_ranges(tmp_path: Path, name: str, stream: bool,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With frame files too large to keep, each later frame is read from where it lies in the
    instance (not by reading and cutting the whole instance again), and is still pydicom's frame.
    An instance larger than ``STREAM_CUT`` (``streamed``) is never read whole when its frames are
    stored as served: where they lie is found by parsing its file."""
    import pydicom
    from pydicom.encaps import generate_frames

    from dicomfs import dicomjson, frames, webfiles

    file = pydicom.data.get_testdata_file(name)
    assert isinstance(file, str), name
    path = Path(file)
    data = path.read_bytes()
    ds = pydicom.dcmread(path)
    key = str(ds.SOPInstanceUID)
    count = int(ds.get("NumberOfFrames") or 1)
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        expected = list(generate_frames(ds.PixelData, number_of_frames=count))
    else:
        expected = frames.cut_frames(data).frames  # big endian: swapped, checked in test_frames
    source = MetadataArchive({f"{STUDY}/{SERIES}": {key: data}},
                             {key: dicomjson.dataset_json(pydicom.dcmread(path, defer_size=1024))})
    monkeypatch.setattr(webfiles, "FILE_MEMORY", 64)  # nothing fits: every frame is rendered on demand
    if stream:
        monkeypatch.setattr(webfiles, "STREAM_CUT", 0)
    whole_reads = count_whole_reads(monkeypatch)

    async def test(fs: Mounted) -> None:
        base = f"dicomweb/studies/{STUDY}/series/{SERIES}/instances/{key}/frames"
        assert sorted(await fs.listdir(base)) == sorted(f"{n}.mht" for n in range(1, count + 1))
        for number in [*range(count, 0, -1), 1]:
            body = await fs.read(f"{base}/{number}.mht")
            head, rest = body.split(b"\r\n\r\n", 1)
            assert rest[:-len(f"\r\n--{frames.BOUNDARY}--\r\n")] == expected[number - 1], number
            frame_inode = await fs.resolve(f"{base}/{number}.mht")
            assert (await fs.ops.getattr(frame_inode, None)).st_size == len(body), number
        located = frames.locate_in_bytes(data) is not None
        assert len(whole_reads) == ((0 if stream else 1) if located else count + 1)

    await run_mounted(source, tmp_path / "cache", 60.0, test)


async def test_a_large_instance_not_stored_as_served_is_refused_not_cut(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames stored other than as served (big endian here) can only be cut from the whole
    instance in memory: beyond ``MAX_WHOLE_CUT`` (made small here) that is EIO for the frame, not
    gigabytes of memory; the instance's other files are served."""
    import pydicom

    from dicomfs import dicomjson, webfiles

    file = pydicom.data.get_testdata_file("MR_small_bigendian.dcm")
    assert isinstance(file, str)
    data = Path(file).read_bytes()
    key = str(pydicom.dcmread(file).SOPInstanceUID)
    source = MetadataArchive({f"{STUDY}/{SERIES}": {key: data}},
                             {key: dicomjson.dataset_json(pydicom.dcmread(file, defer_size=1024))})
    monkeypatch.setattr(webfiles, "STREAM_CUT", 0)
    monkeypatch.setattr(webfiles, "MAX_WHOLE_CUT", len(data) - 1)
    reads = count_whole_reads(monkeypatch)

    async def test(fs: Mounted) -> None:
        base = f"dicomweb/studies/{STUDY}/series/{SERIES}/instances/{key}"
        with pytest.raises(pyfuse3.FUSEError) as refused:
            await fs.read(f"{base}/frames/1.mht")
        assert refused.value.errno == errno.EIO and not reads
        assert json.loads(gzip.decompress(await fs.read(f"{base}/metadata.gz")))[0]["00080018"]["Value"] == [key]

    await run_mounted(source, tmp_path / "cache", 60.0, test)


async def test_canonical_metadata_is_kept_by_its_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A series' canonical metadata is kept as JSON bytes (no compression on the way), and the
    memory it may take is a number of bytes: one series more than fits asks the archive again."""
    from collections import Counter

    from dicomfs import webfiles

    other = f"{SERIES}9"
    asked: Counter[str] = Counter()

    class Counting(MetadataArchive):
        async def series_metadata(self, series: SeriesRecord) -> dict[str, DicomJson]:
            asked[series.uid] += 1
            return {f"{series.uid}.{n}": {**plain_instance(f"{series.uid}.{n}"),
                                          "00081030": {"vr": "LO", "Value": ["x" * 1000]}} for n in range(20)}

    # room for one series of 20 instances of ~1.3 KB and their overhead, not two
    monkeypatch.setattr(webfiles, "SERIES_JSON_MEMORY", 20 * (1300 + webfiles.INSTANCE_JSON_OVERHEAD) * 3 // 2)
    source = Counting({f"{STUDY}/{uid}": {f"{uid}.{n}": b"x" for n in range(20)} for uid in (SERIES, other)}, {})

    async def test(fs: Mounted) -> None:
        def base(uid: str) -> str:
            return f"dicomweb/studies/{STUDY}/series/{uid}"

        first = json.loads(gzip.decompress(await fs.read(f"{base(SERIES)}/metadata.gz")))
        assert len(first) == 20 and first[0]["00081030"]["Value"] == ["x" * 1000]
        one = json.loads(gzip.decompress(await fs.read(f"{base(SERIES)}/instances/{SERIES}.1/metadata.gz")))
        assert one == [m for m in first if m["00080018"]["Value"] == [f"{SERIES}.1"]]
        assert asked == {SERIES: 1}  # kept
        await fs.read(f"{base(other)}/metadata.gz")
        await fs.read(f"{base(SERIES)}/instances/{SERIES}.2/metadata.gz")
        assert asked == {SERIES: 2, other: 1}  # the other series took its room

    await run_mounted(source, tmp_path / "cache", 60.0, test)


class RangedArchive(MetadataArchive):
    """A scripted archive that also says where an instance's frames lie and reads any range of it
    (``FrameRangeReader``), every range asked for recorded; the range ``fail_once`` fails once."""

    def __init__(self, data: bytes, key: str, table: FrameTable, metadata: dict[str, DicomJson]) -> None:
        super().__init__({f"{STUDY}/{SERIES}": {key: data}}, metadata)
        self.data, self.table = data, table
        self.ranges: list[tuple[int, int]] = []
        self.fail_once: tuple[int, int] | None = None

    async def list_instances(self, series: SeriesRecord) -> list[InstanceRecord]:
        return [InstanceRecord(series.study_uid, series.uid, key, size=len(data))
                for key, data in self.series[series.key].items()]

    async def frame_table(self, instance: InstanceRecord) -> FrameTable | None:
        return self.table

    async def read_instance_range(self, instance: InstanceRecord, offset: int, length: int) -> bytes:
        self.ranges.append((offset, length))
        await trio.sleep(0.01)  # (the check's reads and the tile's overlap)
        if (offset, length) == self.fail_once:
            self.fail_once = None
            raise TransferBroken("connection reset (scripted)")
        if offset < 0 or offset + length > len(self.data):
            raise ProtocolError("outside the instance (scripted)")
        return self.data[offset:offset + length]


def ranged_archive(**table_change: Any) -> tuple[RangedArchive, str, list[bytes]]:
    """A slide level of 130 frames (8.5 MB: read alone by Range) with a basic offset table, the
    archive's table of it (changed by ``table_change``), and pydicom's frames."""
    import io

    import pydicom
    from pydicom.encaps import generate_frames

    from tests.cod_writer import frame_table
    from tests.factory import slide

    data = slide(STUDY, SERIES, encapsulated=True, frames=130, frame_bytes=65536, number=1)
    ds = pydicom.dcmread(io.BytesIO(data))
    key = str(ds.SOPInstanceUID)
    written = frame_table(data)
    table = FrameTable(tuple(written["CustomOffsetTable"]), tuple(written["CustomOffsetTableLengths"]), len(data))
    metadata = {key: {**plain_instance(key), "00280008": {"vr": "IS", "Value": [130]},
                      "7FE00010": {"vr": "OB", "BulkDataURI": "pixels"}}}
    archive = RangedArchive(data, key, dataclasses.replace(table, **table_change), metadata)
    return archive, key, list(generate_frames(ds.PixelData, number_of_frames=130))


def frame_path(key: str, number: int) -> str:
    return f"dicomweb/studies/{STUDY}/series/{SERIES}/instances/{key}/frames/{number}.mht"


async def test_a_first_tile_whose_read_beside_the_check_fails_is_read_again(tmp_path: Path) -> None:
    """The tile read beside the check of its table fails (the connection broke): the check holds,
    and the tile is read again, not an error for the reader; the check's reads and the tile's went
    out together (three, then one more)."""
    from dicomfs.frames import split_frame_file

    archive, key, reference = ranged_archive()
    tile = (archive.table.offsets[4] - 8, archive.table.lengths[4] + 16)  # (frame 5 with its item headers)
    archive.fail_once = tile

    async def test(fs: Mounted) -> None:
        data = await fs.read(frame_path(key, 5))
        assert bytes(split_frame_file(data)[1]) == reference[4]
        assert len(archive.ranges) == 4 and archive.ranges.count(tile) == 2 and archive.ranges[-1] == tile, \
            archive.ranges

    await run_mounted(archive, tmp_path / "cache", 60.0, test)


async def test_a_table_of_more_frames_than_dicomfs_cuts_reads_no_range(tmp_path: Path) -> None:
    """An archive's table of more than ``MAX_FRAME_COUNT`` frames is not checked nor read from
    (not a range asked for: a hostile index could otherwise have tens of millions of entries
    held); the frame is cut from the whole instance, pydicom's."""
    from dicomfs.frames import MAX_FRAME_COUNT, split_frame_file

    huge = MAX_FRAME_COUNT + 1
    archive, key, reference = ranged_archive(offsets=tuple(range(1000, 1000 + huge)), lengths=(0,) * huge)

    async def test(fs: Mounted) -> None:
        data = await fs.read(frame_path(key, 7))
        assert bytes(split_frame_file(data)[1]) == reference[6]
        assert archive.ranges == []

    await run_mounted(archive, tmp_path / "cache", 60.0, test)


@pytest.mark.parametrize("listed, asked, whole_from", [
    (None, [5, 9, 10, 11, 5, 12, 40, 41, 40, 42, 3], None),  # a viewer's tiles
    (None, [*range(1, IN_TURN), 60, *range(61, 60 + IN_TURN - 1)], None),  # runs one short
    (None, [*range(1, IN_TURN), IN_TURN - 1, *range(IN_TURN, IN_TURN + 3)], IN_TURN + 1),  # (the same again)
    (0.0, [7, 7, 3, 4], 3),  # frames/ listed: its second frame
    (EVERY_FRAME_FOR + 1, [7, 3, 4], None),  # listed long before: a viewer's tiles
])
async def test_an_instance_is_read_whole_once_every_frame_of_it_is_asked_for(
        tmp_path: Path, mock_clock: MockClock, listed: float | None, asked: list[int], whole_from: int | None) -> None:
    """Frames asked for one after another (1, 2, 3 … ``IN_TURN`` of them), or a second frame just
    after the instance's ``frames/`` was listed (``listed``: seconds before the first is asked
    for): the instance is read whole from then on; a viewer's tiles, runs one shorter, or tiles
    asked for long after a listing are each read alone. Every frame is pydicom's."""
    from dicomfs.frames import split_frame_file

    archive, key, reference = ranged_archive()
    mock_clock.rate = 1.0  # (real time, but for the jump)

    async def test(fs: Mounted) -> None:
        if listed is not None:
            folder = frame_path(key, 1).rsplit("/", 1)[0]
            assert len(await fs.listdir(folder)) == 130
            mock_clock.jump(listed)
        for count, number in enumerate(asked, 1):
            assert bytes(split_frame_file(await fs.read(frame_path(key, number)))[1]) == reference[number - 1]
            whole = whole_from is not None and count >= whole_from
            assert archive.calls[f"{STUDY}/{SERIES}"] == (1 if whole else 0), (count, number)

    await run_mounted(archive, tmp_path / "cache", 60.0, test)
