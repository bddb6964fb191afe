"""Real mounts of an Imaging Data Commons layout: per-instance objects under series-UUID prefixes in
moto's S3 server (public-read, read anonymously as IDC's buckets are), listed from a small index
parquet in idc-index's schema that the tests write."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import generate_frames

from dicomfs.frames import split_frame_file
from dicomfs.sources.idc.source import PARALLEL_OBJECTS, WHOLE_AT_MOST
from dicomfs.webfiles import IN_TURN
from tests.factory import make_instance, slide
from tests.fsutil import hashes, listdir, p10_hashes, read_errno, sh
from tests.idc_bucket import IdcBucket
from tests.mounting import Mount, dicomfs
from tests.servers import CountingProxy, S3Server, wait_until

pytestmark = pytest.mark.mount  # real servers, processes or mounts (see conftest)

BIG_STUDY, BIG_SERIES = "1.2.826.0.1.3680043.8.498.9", "1.2.826.0.1.3680043.8.498.9.1"
EVIL_STUDY = "1.2.826.0.1.3680043.8.498.66"
NOT_DICOM = b"<html>this object is not DICOM</html>" * 10


@pytest.fixture(scope="module")
def idc(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[IdcBucket, Path, S3Server]]:
    with S3Server() as server:
        store = IdcBucket(server.create_bucket("idc-open-data", public=True))
        by_series: dict[tuple[str, str], list[bytes]] = defaultdict(list)
        for path in sorted(demo_dir.rglob("*.dcm")):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            by_series[(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))].append(path.read_bytes())
        studies = sorted({study for study, _ in by_series})
        for n, ((study, _), files) in enumerate(sorted(by_series.items())):
            # a study is in one collection; the first series also holds an object that is not
            # DICOM (skipped with a log line)
            store.add_series("coll_a" if studies.index(study) % 2 else "coll_b", files,
                             extra_objects={"junk.dcm": NOT_DICOM} if n == 0 else None)
        big = [make_instance(BIG_STUDY, BIG_SERIES, f"{BIG_SERIES}.{k}", pixel_bytes=20_000, number=k,
                             patient="SAME^ID", modality="CT") for k in range(1, 121)]
        store.add_series("coll_big", big)
        bad_row = {**store.rows[-1], "SeriesInstanceUID": "1.2.3.bad..uid", "StudyInstanceUID": "not a uid"}
        escaping = {**store.rows[-1], "StudyInstanceUID": EVIL_STUDY, "SeriesInstanceUID": EVIL_STUDY + ".1",
                    "crdc_series_uuid": "../../etc"}  # a prefix that would leave the series' folder
        index = store.write_index(tmp_path_factory.mktemp("idc") / "idc_index.parquet", [bad_row, escaping])
        yield store, index, server


def _mount(idc: tuple[IdcBucket, Path, S3Server], factory: Callable[..., Mount], *extra: str,
           endpoint: str | None = None, **kwargs: object) -> Mount:
    store, index, server = idc
    return factory("idc", "--idc-index", str(index), "--endpoint", endpoint or server.endpoint, *extra,
                   env=server.env(signed=False), **kwargs)


def test_every_file_is_byte_identical_and_collections_are_folders(idc: tuple[IdcBucket, Path, S3Server],
                                                                    mount_factory: Callable[..., Mount]) -> None:
    store = idc[0]
    mount = _mount(idc, mount_factory)
    assert p10_hashes(mount.path) == store.expected
    assert len(store.expected) == 54 + 120
    assert "not a DICOM Part 10 file" in mount.log and "junk.dcm" in mount.log
    assert sorted(listdir(mount.path)) == ["VERSION.txt", "collections", "dates", "dicomweb", "patients", "studies"]
    version = (mount.path / "VERSION.txt").read_text()
    assert version.startswith("Imaging Data Commons, index file idc_index.parquet\n") and str(idc[1]) in version
    assert sorted(listdir(mount.path / "collections")) == ["coll_a", "coll_b", "coll_big"]
    assert sorted(listdir(mount.path / "collections" / "coll_big")) == ["LICENSE.txt", "TEST-1"]  # the PatientID
    licence = (mount.path / "collections" / "coll_big" / "LICENSE.txt").read_text()
    assert licence.startswith("Collection: coll_big (coll_big), Imaging Data Commons\n")
    assert "  CC BY 4.0: 3 series\n" in licence  # (the index counts its two malformed rows too)
    series_a = sum(1 for row in store.rows if row["collection_id"] == "coll_a")
    assert f"  CC BY 4.0: {series_a} series\n" in (mount.path / "collections" / "coll_a" / "LICENSE.txt").read_text()
    # the readable names use the InstanceNumber each object's header gave
    patient = mount.path / "collections" / "coll_big" / "TEST-1"
    series_dirs = [series for study in patient.iterdir() for series in study.iterdir()]  # (the ../ study has none)
    assert len(series_dirs) == 1
    assert sorted(listdir(series_dirs[0])) == [f"{n:05d}.dcm" for n in range(1, 121)]
    # every file of the collections view is one of the sources' files
    view = {k: v for k, v in hashes(mount.path / "collections").items() if k.endswith(".dcm")}
    assert len(view) == len(store.expected)
    assert sorted(view.values()) == sorted(store.expected.values())
    mount.stop()
    mount.start()  # from the cache, and the headers read once are not read again
    assert p10_hashes(mount.path) == store.expected


def test_listing_needs_no_network_and_ls_takes_index_columns(idc: tuple[IdcBucket, Path, S3Server],
                                                              tmp_path: Path,
                                                              mount_factory: Callable[..., Mount]) -> None:
    store, index, server = idc
    dead = "http://127.0.0.1:9"  # nothing listens: a request would fail
    mount = _mount(idc, mount_factory, endpoint=dead)
    studies = {key.split("/")[1] for key in store.expected}
    assert sorted(listdir(mount.path / "studies")) == sorted(studies | {EVIL_STUDY})
    assert listdir(mount.path / "studies" / EVIL_STUDY) == []  # its one series names an unsafe prefix
    big = mount.path / "studies" / BIG_STUDY
    assert listdir(big) == [BIG_SERIES]
    assert read_errno(next((mount.path / "studies").iterdir()).joinpath("nothing.dcm")) == errno.ENOENT
    result = dicomfs("ls", "idc", "--idc-index", str(index), "--endpoint", dead, "--query", "collection_id=coll_big",
                     "--query", "Modality=CT", "--level", "series", "--json", "--cache-dir", str(tmp_path / "c"),
                     check=True)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["StudyInstanceUID"], r["SeriesInstanceUID"], r["Instances"]) for r in rows] == \
        [(BIG_STUDY, BIG_SERIES, 120)]
    assert rows[0]["source"] == "idc (index file idc_index.parquet)"  # which index release
    assert rows[0]["attributes"]["license_short_name"]["Value"] == ["CC BY 4.0"]
    result = dicomfs("ls", "idc", "--idc-index", str(index), "--endpoint", dead, "--query", "collection_id=coll_*",
                     "--json", "--cache-dir", str(tmp_path / "c"), check=True)
    found = {json.loads(line)["StudyInstanceUID"] for line in result.stdout.splitlines()}
    assert found == studies | {EVIL_STUDY}  # the row with a malformed UID is left out
    bad = dicomfs("ls", "idc", "--idc-index", str(tmp_path / "missing.parquet"), "--cache-dir", str(tmp_path / "d"))
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_transfer_accounting(idc: tuple[IdcBucket, Path, S3Server], tmp_path: Path,
                             mount_factory: Callable[..., Mount]) -> None:
    """One instance moves its own bytes plus the header reads; a series copy moves its bytes."""
    store, _, server = idc
    prefix = store.series_prefix[BIG_SERIES]
    sizes = {k: v for k, v in store.objects.items() if k.startswith(prefix)}
    heads = sum(min(size, 16 * 1024) for size in sizes.values())
    with CountingProxy(server.port, lambda path: "list" if "list-type" in path else "object") as proxy:
        mount = _mount(idc, mount_factory, endpoint=proxy.url)
        folder = mount.path / "studies" / BIG_STUDY / BIG_SERIES
        one = folder / f"{BIG_SERIES}.60.dcm"
        data = one.read_bytes()
        assert store.expected[f"studies/{BIG_STUDY}/{BIG_SERIES}/{one.name}"] == __import__("hashlib").sha256(
            data).hexdigest()
        assert proxy.bytes["object"] <= 1.1 * len(data) + heads, (proxy.bytes["object"], len(data), heads)
        before = proxy.bytes["object"]
        sh("cp", "-r", str(folder), str(tmp_path / "copy"))
        moved = proxy.bytes["object"] - before
        assert moved <= 1.05 * sum(sizes.values()), (moved, sum(sizes.values()))
        copied = {f"studies/{BIG_STUDY}/{BIG_SERIES}/{k}": v for k, v in hashes(tmp_path / "copy").items()}
        assert copied == {k: v for k, v in store.expected.items() if BIG_SERIES + "/" in k}
        assert len(copied) == 120


def test_the_instance_a_reader_waits_for_is_fetched_before_the_rest_of_its_series(
        idc: tuple[IdcBucket, Path, S3Server], mount_factory: Callable[..., Mount]) -> None:
    """A viewer that jumps to an instance while its series is fetched waits for that object, not
    for the objects before it in the bucket's order (the order a series is fetched in)."""
    store, _, server = idc
    in_order = sorted((key, path) for path, key in store.object_of.items() if BIG_SERIES + "/" in path)
    (_, first), (last_key, last) = in_order[0], in_order[-1]
    with CountingProxy(server.port, lambda path: "list" if "list-type" in path else "object") as proxy:
        mount = _mount(idc, mount_factory, endpoint=proxy.url)
        sh("ls", "-l", str(mount.path / "studies" / BIG_STUDY / BIG_SERIES))  # the listing and the headers
        heads = len(proxy.paths)
        proxy.throttle = 0.2  # each object now takes at least 0.2 s: the series fetch takes seconds
        assert hashes_of(mount, first) == store.expected[first]
        assert hashes_of(mount, last) == store.expected[last]  # the series' fetch is under way by now
        fetched = proxy.paths[heads:]
        # at most: the first instance fetched alone, the objects in flight when the reader came, then it
        assert f"/{store.handle.name}/{last_key}" in fetched[:PARALLEL_OBJECTS + 2], fetched
        proxy.throttle = 0
        wait_until(lambda: {f"/{store.handle.name}/{key}" for key, _ in in_order} <= set(proxy.paths), 60,
                   "the rest of the series")


def hashes_of(mount: Mount, path: str) -> str:
    return hashlib.sha256((mount.path / path).read_bytes()).hexdigest()


def test_an_object_too_large_to_hold_whole_is_streamed_into_its_series_byte_exact(
        tmp_path: Path, mount_factory: Callable[..., Mount]) -> None:
    """A series with an object above ``WHOLE_AT_MOST`` (slide microscopy objects run to
    gigabytes): it is written into the series' blob as it comes, beside objects read whole; every
    file byte-exact, the cache verified."""
    study, series = "1.2.826.0.1.3680043.8.498.12", "1.2.826.0.1.3680043.8.498.12.1"
    with S3Server() as server:
        store = IdcBucket(server.create_bucket("idc-large", public=True))
        store.add_series("coll_large", [
            make_instance(study, series, f"{series}.{k}", number=k, modality="SM",
                          pixel_bytes=WHOLE_AT_MOST + (1 << 20) if k == 2 else 5000) for k in (1, 2, 3)])
        index = store.write_index(tmp_path / "idc_index.parquet")
        mount = mount_factory("idc", "--idc-index", str(index), "--endpoint", server.endpoint,
                              env=server.env(signed=False))
        sh("cp", "-r", str(mount.path / "studies" / study), str(tmp_path / "copy"))
        copied = {f"studies/{study}/{k}": v for k, v in hashes(tmp_path / "copy").items()}
        assert copied == store.expected
        mount.stop()
        assert dicomfs("cache", "verify", "--cache-dir", str(mount.cache_dir)).returncode == 0


@pytest.mark.parametrize("how", ["series", "alone"])
def test_objects_that_contradict_the_listing_fail_alone(idc: tuple[IdcBucket, Path, S3Server],
                                                        mount_factory: Callable[..., Mount], how: str) -> None:
    """An object whose bytes are not what the listing says (another size, other bytes than its
    ETag's) or that always breaks off is EIO for its file, with a log line; the rest of its series
    is served, byte-exact. Read through the series (the first file alone, then the series' fetch
    for the others) and, with ``--readahead off``, every file alone (one GET, read, hashed and
    written in a worker thread)."""
    from tests.faultproxy import FaultProxy, Rule

    store, _, server = idc
    prefix = store.series_prefix[BIG_SERIES]
    objects = sorted(k for k in store.objects if k.startswith(prefix))
    with FaultProxy(server.port) as proxy:
        extra = ("--readahead", "off") if how == "alone" else ()
        mount = _mount(idc, mount_factory, "--listing-ttl", "2", *extra, endpoint=proxy.url)
        folder = mount.path / "studies" / BIG_STUDY / BIG_SERIES
        names = sorted(listdir(folder))  # the headers are read (through the proxy, unharmed)
        assert len(names) == 120
        shorter, other, forged = objects[3], objects[7], objects[11]
        proxy.add(Rule(lambda path: shorter in path, "body", body=b"DICM" * 100, content_type="application/dicom"))
        proxy.add(Rule(lambda path: other in path, "short", after=1000))  # breaks off, every time
        # the right size, other bytes: caught by the ETag (the MD5 of an object put in one part)
        proxy.add(Rule(lambda path: forged in path, "body", body=b"\0" * store.objects[forged],
                       content_type="application/dicom"))
        results = {name: read_errno(folder / name) for name in names}
        failed = {name for name, code in results.items() if code != 0}
        assert len(failed) == 3 and {results[name] for name in failed} == {errno.EIO}, results
        assert ("is not served" if how == "series" else "not its listed") in mount.log
        assert "do not match its ETag" in mount.log
        proxy.clear()
        expected = {k.rsplit("/", 1)[1]: v for k, v in store.expected.items() if BIG_SERIES + "/" in k}
        out = sh("sha256sum", *[str(folder / name) for name in names if name not in failed]).stdout
        served = {Path(line.split(maxsplit=1)[1]).name: line.split()[0] for line in out.splitlines()}
        assert len(served) == 117 and all(expected[name] == digest for name, digest in served.items())
        assert mount.alive()
        # the archive mended: the three are asked for again once the listing TTL (2 s here) has passed
        # since the retrieve that lacked them (not at every read before that), and served exactly
        wait_until(lambda: all(read_errno(folder / name) == 0 for name in failed), 60, "the mended objects")
        assert hashes(folder) == expected


def test_prefetch_of_a_collection_then_reads_without_the_bucket(idc: tuple[IdcBucket, Path, S3Server], tmp_path: Path,
                                                                mount_factory: Callable[..., Mount]) -> None:
    store, index, server = idc
    cache = tmp_path / "cache"
    with CountingProxy(server.port, lambda path: "list" if "list-type" in path else "object") as proxy:
        run = dicomfs("prefetch", "idc", "--idc-index", str(index), "--endpoint", proxy.url, "--query",
                      "collection_id=coll_a", "--jobs", "8", "--cache-dir", str(cache), env=server.env(signed=False),
                      timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    wanted = {row["SeriesInstanceUID"] for row in store.rows if row["collection_id"] == "coll_a"}
    assert 1 < len(wanted) < len(store.rows) - 2
    # each object's header is read once and the object fetched once (the listing a prefetch makes
    # and the retrieve it starts beside it share one header pass)
    prefixes = tuple(store.series_prefix[uid] for uid in wanted if uid in store.series_prefix)
    objects = [k for k in store.objects if k.startswith(prefixes)]
    assert objects and proxy.counts["object"] <= 2 * len(objects), (proxy.counts, len(objects))
    assert f"fetched {len(wanted)} series" in run.stdout, run.stdout
    expected = {k: v for k, v in store.expected.items() if k.split("/")[2] in wanted}
    # the bucket is gone (nothing listens at the endpoint): the prefetched collection is all there
    mount = mount_factory("idc", "--idc-index", str(index), "--endpoint", "http://127.0.0.1:9", "--cache-dir",
                          str(cache), env=server.env(signed=False))
    folders = {k.rsplit("/", 1)[0] for k in expected}
    got = {f"{folder}/{name}": v for folder in folders for name, v in hashes(mount.path / folder).items()}
    assert got == expected
    other = next(k for k in store.expected if k not in expected)
    # not prefetched, no bucket: its series cannot even be listed (EIO, at once)
    assert read_errno(mount.path / other) == errno.EIO
    assert mount.alive()


META_STUDY, META_SERIES = "1.2.826.0.1.3680043.8.498.67", "1.2.826.0.1.3680043.8.498.67.1"


def test_series_metadata_comes_from_the_headers_alone(idc: tuple[IdcBucket, Path, S3Server], tmp_path: Path,
                                                      mount_factory: Callable[..., Mount]) -> None:
    """The static DICOMweb tree's series metadata of an IDC series is each object's header read
    by ranges, not the series: the same attributes as pydicom reads from the uploaded files (its
    own bucket, in a collection of its own, of 24 instances of 1 MB), for a small part of the
    series' bytes: each object's first bytes, read once to name it, give its metadata too."""
    _, _, server = idc
    store = IdcBucket(server.create_bucket(f"idc-meta-{tmp_path.name[-12:].lower().strip('_')}", public=True))
    files = [make_instance(META_STUDY, META_SERIES, f"{META_SERIES}.{k}", pixel_bytes=1 << 20, number=k,
                           patient="META^DATA", modality="MR") for k in range(1, 25)]
    store.add_series("coll_meta", files)
    index = store.write_index(tmp_path / "idc_index.parquet")
    with CountingProxy(server.port, lambda path: "list" if "list-type" in path else "object") as proxy:
        mount = mount_factory("idc", "--idc-index", str(index), "--endpoint", proxy.url, env=server.env(signed=False))
        folder = mount.path / "dicomweb" / "studies" / META_STUDY / "series" / META_SERIES
        metadata = json.loads(gzip.decompress((folder / "metadata.gz").read_bytes()))
        moved = proxy.bytes["object"]
    assert moved < 0.05 * sum(map(len, files)), (moved, sum(map(len, files)))  # their first bytes
    # one request an object: the metadata made from the first bytes the listing read to name it
    assert proxy.counts["object"] == 24, proxy.paths
    assert len(metadata) == 24
    for instance in metadata:
        sop = instance["00080018"]["Value"][0]
        ds = pydicom.dcmread(io.BytesIO(files[int(sop.rsplit(".", 1)[1]) - 1]), stop_before_pixels=True)
        reference = json.loads(ds.to_json())
        for tag in ("00080016", "00200013", "0020000D", "0020000E", "00080060", "00100010", "00280010",
                    "00280100"):
            assert instance[tag]["Value"] == reference[tag]["Value"], (sop, tag)
        assert instance["00083002"]["Value"] == [ds.file_meta.TransferSyntaxUID]  # (AvailableTransferSyntaxUID)
        stored_vr = pydicom.dcmread(io.BytesIO(files[int(sop.rsplit(".", 1)[1]) - 1]))["PixelData"].VR
        assert instance["7FE00010"]["vr"] == stored_vr and instance["7FE00010"]["BulkDataURI"].endswith(
            f"series/{META_SERIES}/instances/{sop}/frames"), instance["7FE00010"]


SLIDE_STUDY, SLIDE_SERIES = "1.2.826.0.1.3680043.8.498.68", "1.2.826.0.1.3680043.8.498.68.1"


def test_a_tile_of_a_slide_level_is_read_alone(idc: tuple[IdcBucket, Path, S3Server], tmp_path: Path,
                                               mount_factory: Callable[..., Mount]) -> None:
    """A frame of a 10 MB level with a basic offset table is read alone from its object (its
    header up to the first frame, as the listing read it, the 8 bytes after the last, the frame),
    pydicom's frame to the byte; a level without an offset table of its own is fetched whole for its first frame, and
    its frames are pydicom's all the same."""
    _, _, server = idc
    store = IdcBucket(server.create_bucket(f"idc-slide-{tmp_path.name[-12:].lower().strip('_')}", public=True))
    levels = {name: slide(SLIDE_STUDY, SLIDE_SERIES, encapsulated=True, frames=150, frame_bytes=65536, number=n,
                          has_bot=name == "bot") for n, name in enumerate(("bot", "no-bot"), 1)}
    store.add_series("coll_slides", list(levels.values()))
    index = store.write_index(tmp_path / "idc_index.parquet")
    sop = {name: str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
           for name, data in levels.items()}
    reference = {name: list(generate_frames(pydicom.dcmread(io.BytesIO(data)).PixelData, number_of_frames=150))
                 for name, data in levels.items()}
    with CountingProxy(server.port, lambda path: "list" if "list-type" in path else "object") as proxy:
        mount = mount_factory("idc", "--idc-index", str(index), "--endpoint", proxy.url, env=server.env(signed=False))
        folder = mount.path / "dicomweb" / "studies" / SLIDE_STUDY / "series" / SLIDE_SERIES / "instances"
        json.loads(gzip.decompress((folder.parent / "metadata.gz").read_bytes()))  # (the headers: as a viewer starts)
        before, requests = proxy.bytes["object"], proxy.counts["object"]
        for number in (77, 150, 1):
            _, frame = split_frame_file((folder / sop["bot"] / "frames" / f"{number}.mht").read_bytes())
            assert bytes(frame) == reference["bot"][number - 1], number
        moved = proxy.bytes["object"] - before
        assert moved < 0.05 * len(levels["bot"]), (moved, len(levels["bot"]))  # three ~64 KB tiles, of 10 MB
        # the 8 bytes after the last frame, and each frame: the table and its check take the header
        # from the first bytes the listing read to name the object
        assert proxy.counts["object"] - requests == 1 + 3, proxy.paths[-8:]
        before = proxy.bytes["object"]
        for number in (77, 150):
            _, frame = split_frame_file((folder / sop["no-bot"] / "frames" / f"{number}.mht").read_bytes())
            assert bytes(frame) == reference["no-bot"][number - 1], number
        assert proxy.bytes["object"] - before >= len(levels["no-bot"])  # the level, whole


@pytest.mark.parametrize("command", ["ls -l", "cp -r", "one after another"])
def test_every_frame_of_a_slide_level_in_turn_reads_the_level_once(
        idc: tuple[IdcBucket, Path, S3Server], tmp_path: Path, mount_factory: Callable[..., Mount],
        command: str) -> None:
    """``ls -l`` or ``cp -r`` of a level's ``frames/`` asks for every frame (``cp`` in inode
    order, which is no order): once its folder is listed, the level is read whole at the second
    frame asked for. A program that opens frames 1, 2, 3 … by name lists nothing: the level is
    read whole once ``IN_TURN`` frames were asked for one after another. (Each was one request a
    frame: 150 here, 50,000 for a slide's largest level.) Sizes and bytes are pydicom's frames."""
    _, _, server = idc
    store = IdcBucket(server.create_bucket(f"idc-turn-{tmp_path.name[-12:].lower().strip('_')}", public=True))
    level = slide(SLIDE_STUDY, SLIDE_SERIES, encapsulated=True, frames=150, frame_bytes=65536, number=1)
    store.add_series("coll_slides", [level])
    index = store.write_index(tmp_path / "idc_index.parquet")
    sop = str(pydicom.dcmread(io.BytesIO(level), stop_before_pixels=True).SOPInstanceUID)
    reference = list(generate_frames(pydicom.dcmread(io.BytesIO(level)).PixelData, number_of_frames=150))
    with CountingProxy(server.port, lambda path: "list" if "list-type" in path else "object") as proxy:
        mount = mount_factory("idc", "--idc-index", str(index), "--endpoint", proxy.url, env=server.env(signed=False))
        folder = mount.path / "dicomweb" / "studies" / SLIDE_STUDY / "series" / SLIDE_SERIES / "instances" / sop
        json.loads(gzip.decompress((folder.parent.parent / "metadata.gz").read_bytes()))  # (as a viewer starts)
        before, requests = proxy.bytes["object"], proxy.counts["object"]
        names = [f"{number}.mht" for number in range(1, 151)]
        if command == "ls -l":
            lines = sh("ls", "-l", "--time-style=+", str(folder / "frames")).stdout.splitlines()[1:]
            sizes = {line.split()[-1]: int(line.split()[4]) for line in lines}
            read = {name: (folder / "frames" / name).read_bytes() for name in sizes}
        elif command == "cp -r":
            sh("cp", "-r", str(folder / "frames"), str(tmp_path / "frames"))
            read = {path.name: path.read_bytes() for path in (tmp_path / "frames").iterdir()}
            sizes = {name: len(data) for name, data in read.items()}
        else:
            sizes = {name: (folder / "frames" / name).stat().st_size for name in names}
            read = {name: (folder / "frames" / name).read_bytes() for name in names}
        assert sorted(read) == sorted(names)
        for name, data in read.items():
            assert sizes[name] == len(data), name
            _, frame = split_frame_file(data)
            assert bytes(frame) == reference[int(name.split(".")[0]) - 1], name
        moved, asked = proxy.bytes["object"] - before, proxy.counts["object"] - requests
        # the 8 bytes after the last frame (the table's check), the frames read alone, the level
        alone = 1 if command != "one after another" else IN_TURN - 1
        assert asked == 1 + alone + 1, (asked, proxy.paths[-8:])
        assert moved < len(level) + (alone + 1) * 70_000, (moved, len(level))
