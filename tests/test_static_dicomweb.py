"""The static DICOMweb tree of real mounts, served by nginx with the documented config and read by
the real dicomweb-client: against Orthanc's own DICOMweb answers and the source files (pydicom)."""

from __future__ import annotations

import errno
import gzip
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset

from tests.cod_bucket import BUCKET, Bucket, mount_env
from tests.fsutil import hashes, listdir, read_errno, sh
from tests.mounting import Mount, dicomfs
from tests.nginx import serve_static_tree
from tests.reference import KEY_TAGS, reference_frames, source_files, value
from tests.servers import CountingProxy, OrthancServer, classify_gcs

pytestmark = pytest.mark.mount



def check_frames(client: DICOMwebClient, study: str, series: str, sop: str, path: Path, base: str) -> int:
    """Every frame of one instance through nginx equals pydicom's; returns the frame count."""
    syntax, expected = reference_frames(path)
    for number, frame in enumerate(expected, 1):
        got = client.retrieve_instance_frames(study, series, sop, frame_numbers=[number],
                                              media_types=(("application/octet-stream", "*"),))
        assert got == [frame], f"{path.name} frame {number}"
    # the part header names the transfer syntax
    import httpx

    body = httpx.get(f"{base}/studies/{study}/series/{series}/instances/{sop}/frames/1").content
    assert f";transfer-syntax={syntax}\r\n".encode() in body.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    return len(expected)


# --- Orthanc -------------------------------------------------------------------------------------
def test_orthanc_archive_through_nginx_and_dicomweb_client(
        orthanc: OrthancServer, demo_dir: Path, served_mount: Callable[..., Mount]) -> None:
    mount = served_mount(orthanc.dicomweb)
    files = source_files(demo_dir)
    theirs = DICOMwebClient(orthanc.dicomweb)
    with serve_static_tree(mount.path) as base:
        ours = DICOMwebClient(base)
        studies = ours.search_for_studies()
        reference = {value(s["0020000D"])[0]: s for s in theirs.search_for_studies(
            fields=["00201206", "00201208", "00080061"])}
        assert {value(s["0020000D"])[0] for s in studies} == set(reference)
        # a static server ignores filters
        assert ours.search_for_studies(search_filters={"PatientID": "nobody"}) == studies
        frames_checked = 0
        kinds: set[str] = set()
        for study in studies:
            uid = value(study["0020000D"])[0]
            for tag in ("00100010", "00100020", "00080020", "00201206", "00201208", "00080061"):
                assert value(study.get(tag)) == value(reference[uid].get(tag)), (uid, tag)
            their_series = {value(s["0020000E"])[0]: s for s in theirs.search_for_series(uid, fields=["00201209"])}
            our_series = ours.search_for_series(uid)
            assert {value(s["0020000E"])[0] for s in our_series} == set(their_series)
            for series in our_series:
                se = value(series["0020000E"])[0]
                for tag in ("00080060", "00200011", "00201209"):
                    if tag not in their_series[se]:
                        continue  # Orthanc takes these from one instance only; we look further
                    assert value(series.get(tag)) == value(their_series[se].get(tag)), (se, tag)
                metadata = ours.retrieve_series_metadata(uid, se)
                orthanc_metadata = {value(m["00080018"])[0]: m for m in theirs.retrieve_series_metadata(uid, se)}
                assert {value(m["00080018"])[0] for m in metadata} == set(orthanc_metadata)
                assert [value(i["00080018"])[0] for i in ours.search_for_instances(uid, se)] == \
                    sorted(orthanc_metadata)
                for instance in metadata:
                    sop = value(instance["00080018"])[0]
                    assert list(instance) == sorted(instance)
                    for tag in KEY_TAGS:
                        assert value(instance.get(tag)) == value(orthanc_metadata[sop].get(tag)), (sop, tag)
                    source = pydicom.dcmread(files[sop], stop_before_pixels=True)
                    assert value(instance["00280010"]) == [source.Rows]
                    assert ours.retrieve_instance_metadata(uid, se, sop) == instance
                    if "PixelData" not in pydicom.dcmread(files[sop]):
                        assert "7FE00010" not in instance
                        continue
                    if "7FE00010" in orthanc_metadata[sop]:  # Orthanc leaves it out for compressed data
                        assert instance["7FE00010"] == {"vr": instance["7FE00010"]["vr"],
                                                        "BulkDataURI": f"series/{se}/instances/{sop}/frames"}
                    frames_checked += check_frames(ours, uid, se, sop, files[sop], base)
                    kinds.add(str(source.file_meta.TransferSyntaxUID))
    # uncompressed (implicit, explicit, big endian, deflated), JPEG, JPEG-LS, JPEG 2000, RLE, multi-frame
    for syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
                   "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90",
                   "1.2.840.10008.1.2.5"):
        assert syntax in kinds
    assert frames_checked > len(files)  # multi-frame instances were among them


def test_listing_and_metadata_fetch_no_series_blob(orthanc: OrthancServer,
                                                   mount_factory: Callable[..., Mount]) -> None:
    with CountingProxy(orthanc.port) as proxy:
        mount = mount_factory(proxy.dicomweb)
        assert read_all_json(mount.path / "dicomweb" / "studies") > 54
        retrieves = [p for p in proxy.paths if p.split("?")[0].rstrip("/").split("/")[-1] not in
                     ("studies", "series", "instances", "metadata")]
        assert retrieves == [], retrieves
        assert proxy.counts["wado-series"] == 0


def read_all_json(web: Path) -> int:
    """Read every index and metadata file of a mounted dicomweb/studies tree; how many."""
    read = 0
    for study in [s for s in listdir(web) if s != "index.json.gz"]:
        for name in ("index.json.gz", "series/index.json.gz"):
            json.loads(gzip.decompress((web / study / name).read_bytes()))
        for series in [s for s in listdir(web / study / "series") if s != "index.json.gz"]:
            folder = web / study / "series" / series
            for name in ("metadata.gz", "series-singleton.json.gz", "instances/index.json.gz"):
                json.loads(gzip.decompress((folder / name).read_bytes()))
                read += 1
            for sop in [s for s in listdir(folder / "instances") if s != "index.json.gz"]:
                json.loads(gzip.decompress((folder / "instances" / sop / "metadata.gz").read_bytes()))
                read += 1
    json.loads(gzip.decompress((web / "index.json.gz").read_bytes()))
    return read


def test_export_is_byte_identical_to_the_mounted_tree(orthanc: OrthancServer, tmp_path: Path,
                                                      mount_factory: Callable[..., Mount]) -> None:
    mount = mount_factory(orthanc.dicomweb)
    out = tmp_path / "export"
    result = dicomfs("export", orthanc.dicomweb, "--all", "--dicomweb", str(out), "--cache-dir",
                     str(tmp_path / "export-cache"), timeout=600)
    assert result.returncode == 0, result.stderr
    assert "exported" in result.stdout
    exported = hashes(out)
    assert exported == hashes(mount.path / "dicomweb")
    assert sum(1 for name in exported if name.endswith(".mht")) > 54
    # a second run writes nothing new; one study alone gives that study's files, same bytes
    again = dicomfs("export", orthanc.dicomweb, "--all", "--dicomweb", str(out), "--cache-dir",
                    str(tmp_path / "export-cache"), timeout=600)
    assert again.returncode == 0 and "0 files written" in again.stdout, again.stdout
    study = next(name.split("/")[1] for name in exported if name.count("/") > 2)
    one = tmp_path / "one"
    single = dicomfs("export", orthanc.dicomweb, study, "--dicomweb", str(one), "--cache-dir",
                     str(tmp_path / "export-cache"), timeout=600)
    assert single.returncode == 0, single.stderr
    mine = hashes(one)
    assert mine.pop("studies/index.json.gz") != exported["studies/index.json.gz"]  # lists one study
    assert mine == {k: v for k, v in exported.items() if k.startswith(f"studies/{study}/")}
    listed = json.loads(gzip.decompress((one / "studies" / "index.json.gz").read_bytes()))
    assert [value(s["0020000D"]) for s in listed] == [[study]]


def test_export_bad_input_is_one_line_and_touches_nothing(orthanc: OrthancServer, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = dicomfs("export", orthanc.dicomweb, "--all", "--dicomweb", str(blocker), "--cache-dir",
                     str(tmp_path / "c"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not a directory" in result.stderr
    missing = dicomfs("export", orthanc.dicomweb, "1.2.3.999", "--dicomweb", str(tmp_path / "o"),
                      "--cache-dir", str(tmp_path / "c"))
    assert missing.returncode == 1 and "study 1.2.3.999: not found" in missing.stderr
    assert not any((tmp_path / "o").iterdir())
    nothing = dicomfs("export", orthanc.dicomweb, "--dicomweb", str(tmp_path / "o"))
    assert nothing.returncode == 2 and "say which studies" in nothing.stderr


# --- COD -----------------------------------------------------------------------------------------
def test_cod_bucket_through_nginx(bucket: Bucket, demo_dir: Path, served_mount: Callable[..., Mount]) -> None:
    mount = served_mount(f"gs://{BUCKET}/v2/dicomweb", env=mount_env(bucket))
    files = source_files(demo_dir)
    with serve_static_tree(mount.path) as base:
        client = DICOMwebClient(base)
        studies = client.search_for_studies()
        assert len(studies) == len({str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)
                                    for p in files.values()})
        seen = 0
        for study in studies:
            uid = value(study["0020000D"])[0]
            assert value(study["00201208"])[0] > 0 and value(study["00080061"])
            for series in client.search_for_series(uid):
                se = value(series["0020000E"])[0]
                assert value(series["00080060"])
                for instance in client.retrieve_series_metadata(uid, se):
                    sop = value(instance["00080018"])[0]
                    source = pydicom.dcmread(files[sop], stop_before_pixels=True)
                    assert value(instance["00083002"]) == [str(source.file_meta.TransferSyntaxUID)]
                    assert not [t for t in instance if t.startswith("0002")]
                    assert value(instance["00100020"]) == [source.PatientID]
                    check_frames(client, uid, se, sop, files[sop], base)
                    seen += 1
        assert seen == len(files)


def test_cod_listing_and_metadata_read_no_tar(bucket: Bucket, mount_factory: Callable[..., Mount]) -> None:
    with CountingProxy(bucket.emulator.port, classify_gcs) as proxy:
        mount = mount_factory(f"gs://{BUCKET}/v1/dicomweb", env={"STORAGE_EMULATOR_HOST": proxy.url})
        assert read_all_json(mount.path / "dicomweb" / "studies") > 54
        assert proxy.counts["tar"] == 0, proxy.paths
        assert proxy.counts["metadata"] == 20  # one metadata.json per series, read once


# --- local folders: metadata round trip and bad files ---------------------------------------------
def _bulk(tree: Path, study: str) -> Callable[[str, str, str], bytes]:
    def fetch(tag: str, vr: str, uri: str) -> bytes:
        return (tree / "studies" / study / uri).read_bytes()
    return fetch


def test_folder_metadata_round_trips_through_pydicom(demo_dir: Path, mount_factory: Callable[..., Mount]) -> None:
    """Dataset.from_json of the mounted metadata, bulk data read from the mounted bulkdata files,
    equals the source file's elements (pixel data aside)."""
    mount = mount_factory(str(demo_dir))
    tree = mount.path / "dicomweb"
    files = source_files(demo_dir)
    bulk_files = 0
    for sop, path in files.items():
        source = pydicom.dcmread(path, stop_before_pixels=True)
        study, series = str(source.StudyInstanceUID), str(source.SeriesInstanceUID)
        document = json.loads(gzip.decompress(
            (tree / "studies" / study / "series" / series / "instances" / sop / "metadata.gz").read_bytes()))[0]
        document.pop("7FE00010", None)
        bulk_files += json.dumps(document).count('"BulkDataURI"')
        ours = Dataset.from_json(document, bulk_data_uri_handler=_bulk(tree, study))
        for element in source:
            if element.tag.element == 0 or element.tag.group == 2:
                continue
            mine = ours[element.tag]
            if element.VR in ("OB", "OW", "UN"):
                assert bytes(mine.value) == bytes(element.value), (path.name, element.tag)
            elif element.VR not in ("SQ", "DS", "FD", "FL"):
                assert mine.value == element.value or (not mine.value and not element.value), \
                    (path.name, element.keyword, mine.value, element.value)
    assert bulk_files > 0  # some demo files do carry large non-pixel binaries


def test_an_unreadable_frame_is_eio_and_the_rest_is_served(tmp_path: Path,
                                                           mount_factory: Callable[..., Mount]) -> None:
    folder = tmp_path / "src"
    folder.mkdir()
    good_file = pydicom.data.get_testdata_file("CT_small.dcm")
    assert isinstance(good_file, str)  # a path (read=False), not a Dataset, and found
    good = Path(good_file)
    shutil.copy(good, folder / "good.dcm")
    bad_file = pydicom.data.get_testdata_file("MR_small.dcm")
    assert isinstance(bad_file, str)
    bad = pydicom.dcmread(bad_file)
    bad.PixelData = bad.PixelData[:1000]  # shorter than Rows x Columns x 2
    bad.save_as(folder / "bad.dcm")
    mount = mount_factory(str(folder))
    web = mount.path / "dicomweb" / "studies"

    def frame(ds: Dataset) -> Path:
        return (web / str(ds.StudyInstanceUID) / "series" / str(ds.SeriesInstanceUID) / "instances"
                / str(ds.SOPInstanceUID) / "frames" / "1.mht")

    assert read_errno(frame(bad)) == errno.EIO
    good_ds = pydicom.dcmread(good)
    assert read_errno(frame(good_ds)) == 0
    assert reference_frames(good)[1][0] in frame(good_ds).read_bytes()
    assert read_errno(frame(bad)) == errno.EIO  # still, and the mount still answers
    assert "frame" in mount.log or "Pixel" in mount.log or "pixel" in mount.log
    assert sh("ls", str(web)).returncode == 0
    # export writes everything else and lists the one file it could not make
    out = tmp_path / "export"
    result = dicomfs("export", str(folder), "--all", "--dicomweb", str(out), "--cache-dir", str(tmp_path / "c2"))
    assert result.returncode == 1
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and str(bad.SOPInstanceUID) in failed[0] and "frames/1.mht" in failed[0], result.stderr
    written = out / frame(good_ds).relative_to(mount.path / "dicomweb")
    assert written.read_bytes() == frame(good_ds).read_bytes()
