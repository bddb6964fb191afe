"""Frames of large COD instances read alone, by Range, where the index's offset table holds
(``dicomfs serve`` of a COD bucket in a GCS emulator, every request counted by a proxy): each
frame as pydicom assembles it from the source file, a table that does not hold (or an instance
without an offset table of its own) falling back to the whole instance, and a cached instance's
frames read from the cache."""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.encaps import generate_frames

from dicomfs.webfiles import IN_TURN
from tests.cod_bucket import Bucket
from tests.cod_writer import CodSeriesFiles, frame_table
from tests.factory import slide
from tests.reference import parts
from tests.servers import CountingProxy, DicomfsServe, GcsEmulator, classify_gcs

pytestmark = pytest.mark.mount  # real servers, processes or mounts (see conftest)

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.61", "1.2.826.0.1.3680043.8.498.61.1"
FRAMES = 160
ANY_FRAME = "multipart/related; type=application/octet-stream; transfer-syntax=*"
STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def items(data: bytes) -> list[tuple[int, int]]:
    """(value offset, length) of every fragment item after the basic offset table."""
    at = data.rfind(b"\xe0\x7f\x10\x00")
    position = at + 12
    position += 8 + struct.unpack_from("<I", data, position + 4)[0]
    found = []
    while data[position:position + 4] == b"\xfe\xff\x00\xe0":
        length = struct.unpack_from("<I", data, position + 4)[0]
        found.append((position + 8, length))
        position += 8 + length
    return found


def spanning(data: bytes, split: int) -> dict[str, list[int]]:
    """A table with one entry a frame where frame ``split`` (1-based) is two fragments: its entry
    spans both (as the COD writer makes it from a basic offset table: up to the next frame)."""
    pieces = items(data)
    (offset, first), (_, second) = pieces[split - 1], pieces[split]
    merged = [*pieces[:split - 1], (offset, first + 8 + second), *pieces[split + 1:]]
    return {"CustomOffsetTable": [o for o, _ in merged], "CustomOffsetTableLengths": [n for _, n in merged]}


class Slides:
    def __init__(self) -> None:
        def make(number: int, **options: object) -> bytes:
            return slide(STUDY, SERIES, encapsulated=True, frames=FRAMES, frame_bytes=65536, number=number,
                         **options)  # type: ignore[arg-type]

        self.files = {"bot": make(1), "no-bot": make(2, has_bot=False), "shifted": make(3),
                      "split": make(4, split=(7,)), "small": slide(
                          STUDY, SERIES, encapsulated=True, frames=20, frame_bytes=65536, number=5)}
        self.sop = {name: str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
                    for name, data in self.files.items()}
        self.frames = {name: list(generate_frames(pydicom.dcmread(io.BytesIO(data)).PixelData,
                                                  number_of_frames=FRAMES if name != "small" else 20))
                       for name, data in self.files.items()}
        table = frame_table(self.files["shifted"])
        # the writer's quirk for native data (offsets 8 bytes on), met where it should not be
        self.tables = {self.sop["shifted"]: {**table, "CustomOffsetTable": [o + 8 for o in table["CustomOffsetTable"]]},
                       self.sop["split"]: spanning(self.files["split"], 7)}

    def url(self, server: DicomfsServe, name: str, frames: str) -> str:
        return f"{server.root}/studies/{STUDY}/series/{SERIES}/instances/{self.sop[name]}/frames/{frames}"


@pytest.fixture(scope="module")
def slides() -> Slides:
    return Slides()


@pytest.fixture(scope="module")
def emulator(slides: Slides) -> Iterator[GcsEmulator]:
    with GcsEmulator("cod-frames") as emulator:
        by_sop = {slides.sop[name]: data for name, data in slides.files.items()}
        Bucket(emulator).add("slides/dicomweb", [CodSeriesFiles(STUDY, SERIES, by_sop, version=2,
                                                               offset_tables=slides.tables)])
        yield emulator


@pytest.fixture
def served(emulator: GcsEmulator, tmp_path: Path) -> Iterator[Callable[[], tuple[DicomfsServe, CountingProxy]]]:
    """``dicomfs serve`` of the bucket (a fresh cache), through a proxy that counts its requests."""
    opened: list[tuple[DicomfsServe, CountingProxy]] = []

    def make() -> tuple[DicomfsServe, CountingProxy]:
        proxy = CountingProxy(emulator.port, classify_gcs).__enter__()
        server = DicomfsServe("gs://cod-frames/slides/dicomweb", tmp_path / f"serve{len(opened)}",
                              env={"STORAGE_EMULATOR_HOST": proxy.url})
        opened.append((server, proxy))
        server.start()
        return server, proxy

    yield make
    for server, proxy in reversed(opened):
        server.stop()
        proxy.__exit__(None, None, None)


def frames_of(response: httpx.Response) -> list[bytes]:
    assert response.status_code == 200, (response.status_code, response.text[:300])
    return [data for _, data in parts(response)]


def test_a_frame_of_a_large_instance_is_read_alone(served: Callable[[], tuple[DicomfsServe, CountingProxy]],
                                                   slides: Slides) -> None:
    """A tile of a 10 MB level costs two small reads to check the index's table (once an
    instance) and one small read, not the level."""
    server, proxy = served()
    with httpx.Client(timeout=60, headers={"Accept": ANY_FRAME}) as http:
        for name in ("bot",):
            size, reference = len(slides.files[name]), slides.frames[name]
            before_requests, before_bytes = proxy.counts["tar"], proxy.bytes["tar"]
            assert frames_of(http.get(slides.url(server, name, "1"))) == reference[:1]
            assert frames_of(http.get(slides.url(server, name, f"77,{FRAMES},2"))) == \
                [reference[76], reference[FRAMES - 1], reference[1]]
            assert frames_of(http.get(slides.url(server, name, "77"))) == [reference[76]]  # (kept in memory)
            moved = proxy.bytes["tar"] - before_bytes
            assert proxy.counts["tar"] - before_requests == 2 + 4, proxy.paths  # the check, then each frame once
            assert moved < 5 * 70_000, (moved, size)  # four ~64 KiB frames and a header, of a 10 MB instance
            assert http.get(slides.url(server, name, str(FRAMES + 1))).status_code == 404
    assert "does not hold" not in server.log


def test_a_first_tile_is_read_beside_the_check_of_its_table(
        served: Callable[[], tuple[DicomfsServe, CountingProxy]], slides: Slides) -> None:
    """The first frame asked for in a level is read together with the two reads that check the
    index's table (three requests at once: one round trip, not three), and served once the check
    holds; frames asked for at once share the one check."""
    server, proxy = served()
    with httpx.Client(timeout=60, headers={"Accept": ANY_FRAME}) as http:
        # (the series' metadata first, as a viewer does: only the tile's own reads are timed)
        metadata = http.get(f"{server.root}/studies/{STUDY}/series/{SERIES}/metadata",
                            headers={"Accept": "application/dicom+json"})
        assert metadata.status_code == 200
        before = proxy.counts["tar"]
        proxy.delay = 1.0  # (every request a long round trip: those asked for together overlap)
        reference = slides.frames["bot"]
        assert frames_of(http.get(slides.url(server, "bot", "5"))) == [reference[4]]
        assert proxy.counts["tar"] - before == 3, proxy.paths
        assert proxy.most_at_once["tar"] == 3
        assert frames_of(http.get(slides.url(server, "bot", "9,10,11"))) == reference[8:11]
        assert proxy.counts["tar"] - before == 6, proxy.paths  # (checked once)
    assert "does not hold" not in server.log


@pytest.mark.parametrize("asked", ["all", "in turn"])
def test_every_frame_of_a_level_asked_for_reads_the_level_once(
        served: Callable[[], tuple[DicomfsServe, CountingProxy]], slides: Slides, asked: str) -> None:
    """All the frames of a level (the ``frames`` URL of its pixel data's BulkDataURI), or frames
    asked for one after another (1, 2, 3 …): the level is read whole, once, past its first frames
    read alone, not one request a frame (160 here)."""
    server, proxy = served()
    reference = slides.frames["bot"]
    with httpx.Client(timeout=60, headers={"Accept": ANY_FRAME}) as http:
        before = proxy.counts["tar"]
        if asked == "all":
            url = slides.url(server, "bot", "1").rsplit("/", 1)[0]
            assert frames_of(http.get(url)) == reference
            alone = 1
        else:
            for number in range(1, FRAMES + 1):
                assert frames_of(http.get(slides.url(server, "bot", str(number)))) == [reference[number - 1]], number
            alone = IN_TURN - 1
        # the table's check (the bytes before the first frame, the 8 after the last), the frames
        # read alone, the level
        assert proxy.counts["tar"] - before == 2 + alone + 1, proxy.paths[-6:]
        assert proxy.bytes["tar"] < len(slides.files["bot"]) + (alone + 2) * 70_000


@pytest.mark.parametrize("name", ["shifted", "split", "no-bot"])
def test_a_table_that_does_not_hold_falls_back_to_the_whole_instance(
        served: Callable[[], tuple[DicomfsServe, CountingProxy]], slides: Slides, name: str) -> None:
    """Offsets 8 bytes on, or an instance without an offset table of its own (whose frames only a
    walk of all its items finds), refused before any frame is served (the first frame's read
    beside the check is thrown away); a frame of two fragments whose entry spans both, refused
    when that frame is read: every frame is still pydicom's, cut from the whole instance, fetched
    once."""
    server, proxy = served()
    reference = slides.frames[name]
    with httpx.Client(timeout=60, headers={"Accept": ANY_FRAME}) as http:
        assert frames_of(http.get(slides.url(server, name, "1"))) == reference[:1]
        assert frames_of(http.get(slides.url(server, name, "7,8,160"))) == [reference[6], reference[7], reference[159]]
        assert frames_of(http.get(slides.url(server, name, "6"))) == [reference[5]]
    assert proxy.bytes["tar"] >= len(slides.files[name])  # the instance, whole
    assert proxy.bytes["tar"] < 1.2 * len(slides.files[name])  # once
    said = {"shifted": "the first frame is not the first item after the basic offset table",
            "split": "frame 7 of instance", "no-bot": "has no offset table of its own"}[name]
    assert said in server.log, server.log[-2000:]


def test_frames_of_a_cached_or_small_instance_come_from_the_cache(
        served: Callable[[], tuple[DicomfsServe, CountingProxy]], slides: Slides) -> None:
    """An instance already fetched whole is not asked of the archive again, frame by frame; one
    below the size from which frames are read alone is fetched whole at its first frame."""
    server, proxy = served()
    with httpx.Client(timeout=60) as http:
        whole = parts(http.get(f"{server.root}/studies/{STUDY}/series/{SERIES}/instances/{slides.sop['bot']}",
                               headers={"Accept": STORED}))
        assert [data for _, data in whole] == [slides.files["bot"]]
        requests = proxy.counts["tar"]
        got = frames_of(http.get(slides.url(server, "bot", "3,150"), headers={"Accept": ANY_FRAME}))
        assert got == [slides.frames["bot"][2], slides.frames["bot"][149]]
        assert proxy.counts["tar"] == requests, proxy.paths
        small = frames_of(http.get(slides.url(server, "small", "2"), headers={"Accept": ANY_FRAME}))
        assert small == [slides.frames["small"][1]]
        assert proxy.bytes["tar"] >= len(slides.files["bot"]) + len(slides.files["small"])
