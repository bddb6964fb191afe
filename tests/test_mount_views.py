"""Real mounts of the readable views: ``patients/`` and ``dates/`` show the same files as
``studies/`` (same bytes, same inode), listing them downloads nothing, names stay the same after a
remount, and real programs (rsync -H, dcmdump, pydicom) use them. Sources: the demo, a folder,
Orthanc (DICOMweb) and a COD bucket."""

from __future__ import annotations

import gzip
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest

from tests.cod_bucket import BUCKET, Bucket
from tests.factory import make_instance
from tests.fsutil import hashes, sh
from tests.mounting import Mount
from tests.servers import CountingProxy, OrthancServer, classify_gcs

pytestmark = pytest.mark.mount

VIEWS = ("studies", "patients", "dates")


def names_below(root: Path) -> list[str]:
    """Every path below ``root`` (folders and files) from readdir alone: no stat, no read."""
    out = sh("find", str(root), "-mindepth", "1", "-printf", "%P\\0").stdout
    return sorted(p for p in out.split("\0") if p)


def inodes(root: Path) -> dict[str, tuple[int, int, int]]:
    """relative path -> (inode, st_nlink, size) of every file below ``root``, in a subprocess."""
    out = sh("find", str(root), "-type", "f", "-printf", "%P\\0%i\\0%n\\0%s\\0").stdout.split("\0")
    return {out[i]: (int(out[i + 1]), int(out[i + 2]), int(out[i + 3])) for i in range(0, len(out) - 1, 4)}


@contextmanager
def counted(kind: str, orthanc: OrthancServer, bucket: Bucket, demo_dir: Path) -> Iterator[tuple[str, dict[str, str],
                                                                                                  Callable[[], int]]]:
    """The source to mount, its environment, and how many retrieves it has served so far."""
    if kind == "orthanc":
        with CountingProxy(orthanc.port) as proxy:
            yield proxy.dicomweb, {}, lambda: proxy.counts["wado-series"] + proxy.counts["wado-other"]
    elif kind == "cod":
        with CountingProxy(bucket.emulator.port, classify_gcs) as proxy:
            yield f"gs://{BUCKET}/v1/dicomweb", {"STORAGE_EMULATOR_HOST": proxy.url}, lambda: proxy.counts["tar"]
    elif kind == "folder":
        yield str(demo_dir), {}, lambda: 0
    else:
        yield "demo", {}, lambda: 0


@pytest.mark.parametrize("kind", ["demo", "folder", "orthanc", "cod"])
def test_every_view_shows_the_same_files(kind: str, orthanc: OrthancServer, bucket: Bucket, demo_dir: Path,
                                         demo_expected: dict[str, str], mount_factory: Callable[..., Mount]) -> None:
    with counted(kind, orthanc, bucket, demo_dir) as (source, env, retrieves):
        mount = mount_factory(source, env=env)
        assert sorted(os.listdir(mount.path)) == sorted([*VIEWS, "dicomweb"])
        listed = {view: names_below(mount.path / view) for view in VIEWS}
        assert retrieves() == 0, "listing the views fetched instance data"
        files = {view: [p for p in listed[view] if p.endswith(".dcm")] for view in VIEWS}
        assert len(files["studies"]) == len(files["patients"]) == len(files["dates"]) == len(demo_expected) == 54
        # ls -l everywhere: exact sizes, one inode per instance across the views, three links each
        stats = {view: inodes(mount.path / view) for view in VIEWS}
        by_inode = {inode: path for path, (inode, _, _) in stats["studies"].items()}
        for view in ("patients", "dates"):
            assert sorted(i for i, _, _ in stats[view].values()) == sorted(by_inode)
            assert {links for _, links, _ in stats[view].values()} == {3}
            for inode, _, size in stats[view].values():
                assert size == stats["studies"][by_inode[inode]][2]
        # the bytes: each readable path hashes as the source file of its studies/ twin
        for view in ("patients", "dates"):
            digests = hashes(mount.path / view)
            for path, digest in digests.items():
                assert digest == demo_expected["studies/" + by_inode[stats[view][path][0]]], path
        # a remount names everything the same
        mount.stop()
        mount.start()
        assert {view: names_below(mount.path / view) for view in VIEWS} == listed


def test_rsync_hard_links_store_each_file_once(demo_expected: dict[str, str], tmp_path: Path,
                                               mount_factory: Callable[..., Mount]) -> None:
    mount = mount_factory("demo")
    out = tmp_path / "copy"
    sh("rsync", "-aH", str(mount.path / "studies"), str(mount.path / "patients"), f"{out}/")
    copied = list(out.rglob("*.dcm"))
    assert len(copied) == 2 * len(demo_expected)
    assert len({p.stat().st_ino for p in copied}) == len(demo_expected)  # hard links, not copies
    assert Counter(hashes(out / "patients").values()) == Counter(demo_expected.values())
    # tar sees hard links too: the second path of each file is a link entry, not its bytes again
    listing = sh("tar", "-cvf", str(tmp_path / "all.tar"), "-C", str(mount.path), "studies", "patients").stdout
    size = (tmp_path / "all.tar").stat().st_size
    assert size < 1.3 * sum(p.stat().st_size for p in (out / "studies").rglob("*.dcm")) + 200_000, listing


def _awkward_archive(folder: Path) -> dict[str, bytes]:
    """Files whose attributes make awkward names: a slash, carets, an apostrophe, non-ASCII
    letters, a missing description and instance number, two patients who read the same."""
    folder.mkdir()
    made: dict[str, bytes] = {}

    def add(name: str, study: str, series: str, sop: str, **attrs: object) -> None:
        data = make_instance(study, series, sop, patient=attrs.pop("patient", "TEST^PATIENT"))  # type: ignore[arg-type]
        ds = pydicom.dcmread(io.BytesIO(data))
        for keyword, value in attrs.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        path = folder / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        made[sop] = path.read_bytes()

    add("a", "1.9.1", "1.9.1.1", "1.9.1.1.1", patient="O'Brien^Seán", PatientID="A/1",
        StudyDescription="CT Chest/Abdomen", SeriesDescription="Axial 1.25mm", InstanceNumber=3)
    add("b", "1.9.1", "1.9.1.1", "1.9.1.1.2", patient="O'Brien^Seán", PatientID="A/1",
        StudyDescription="CT Chest/Abdomen", SeriesDescription="Axial 1.25mm", InstanceNumber=None)
    add("c", "1.9.2", "1.9.2.1", "1.9.2.1.1", patient="MÜLLER^Zoë", PatientID="A_1", StudyDescription=None,
        SeriesNumber=7, Modality="MR", SeriesDescription=None)
    add("d", "1.9.3", "1.9.3.1", "1.9.3.1.1", patient="O'Brien^Seán", PatientID="A_1", StudyDate="20240302",
        StudyDescription="..hidden", SeriesDescription="x")
    return made


def test_awkward_names_are_safe_and_readable(tmp_path: Path, mount_factory: Callable[..., Mount]) -> None:
    made = _awkward_archive(tmp_path / "archive")
    mount = mount_factory(str(tmp_path / "archive"), "--view",
                          "flat={PatientName}/{StudyDescription}/{SOPInstanceUID}.dcm")
    patients = [p for p in names_below(mount.path / "patients") if p.endswith(".dcm")]
    # "O'Brien Seán (A_1)" names two patients (IDs A/1 and A_1): both get a suffix; Zoë is alone
    obrien = sorted({p.split("/")[0] for p in patients if p.startswith("O'Brien")})
    assert len(obrien) == 2 and all(p.startswith("O'Brien Seán (A_1) [") for p in obrien), obrien
    first = next(p for p in patients if p.endswith("00003.dcm"))
    assert first.split("/")[1:] == ["2024-01-02 CT Chest_Abdomen", "001 OT Axial 1.25mm", "00003.dcm"]
    assert any(p.endswith("/1.9.1.1.2.dcm") for p in patients)  # no InstanceNumber: the UID
    assert "MÜLLER Zoë (A_1)/2024-01-02 unnamed/007 MR unnamed/00001.dcm" in patients
    assert any("/2024-03-02 ..hidden/" in p for p in patients)
    flat = [p for p in names_below(mount.path / "flat") if p.endswith(".dcm")]
    assert "MÜLLER Zoë/unnamed/1.9.2.1.1.dcm" in flat and len(flat) == 4
    assert any(p.startswith("O'Brien Seán [") and p.endswith("/hidden/1.9.3.1.1.dcm") for p in flat)  # no leading dots
    for path in patients:
        sop = pydicom.dcmread(mount.path / "patients" / path, stop_before_pixels=True).SOPInstanceUID
        assert (mount.path / "patients" / path).read_bytes() == made[sop]
    ascii_mount = mount_factory(str(tmp_path / "archive"), "--ascii-names", "--views", "patients",
                                name="mnt2", cache="cache2")
    assert os.listdir(ascii_mount.path) == ["patients"]
    assert "MULLER Zoe (A_1)" in os.listdir(ascii_mount.path / "patients")


def test_a_bad_view_option_is_a_one_line_usage_error(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    for extra in (["--view", "x={Nope}/{InstanceNumber}.dcm"], ["--views", "studies,people"]):
        result = sh(sys.executable, "-m", "dicomfs", "mount", "demo", str(tmp_path / "mnt"), *extra,
                    "--cache-dir", str(tmp_path / "cache"), check=False, timeout=60)
        assert result.returncode == 2, result
        assert len(result.stderr.strip().splitlines()) == 1 and "view" in result.stderr, result.stderr
    assert not (tmp_path / "cache").exists()


def test_dicom_tools_open_readable_paths(mount_factory: Callable[..., Mount]) -> None:
    mount = mount_factory("demo")
    series = mount.path / "patients" / "Doe Archibald (77654033)" / "1995-09-03 CT, HEAD_BRAIN WO CONTRAST" / \
        "002 CT Routine Brain"
    files = sorted(series.iterdir())
    assert [f.name for f in files] == ["00018.dcm", "00180.dcm", "00181.dcm", "00182.dcm"]
    dump = sh("dcmdump", "+P", "InstanceNumber", str(files[0])).stdout
    assert "[18]" in dump
    ds = pydicom.dcmread(files[1])
    assert int(ds.InstanceNumber) == 180 and ds.pixel_array.size > 0


def test_ls_of_a_path_inside_a_mount_lists_its_source(tmp_path: Path, demo_expected: dict[str, str],
                                                      mount_factory: Callable[..., Mount]) -> None:
    mount = mount_factory("demo")
    inside = sh(sys.executable, "-m", "dicomfs", "ls", str(mount.path / "patients"), "--json")
    assert f"is in the dicomfs mount {mount.path} of demo" in inside.stderr
    direct = sh(sys.executable, "-m", "dicomfs", "ls", "demo", "--json", "--cache-dir", str(tmp_path / "other"))
    studies = {path.split("/")[1] for path in demo_expected}

    def rows(out: str) -> list[dict[str, object]]:  # (each names its source: here a folder in its cache)
        return [{k: v for k, v in json.loads(line).items() if k != "source"} for line in out.splitlines()]

    assert rows(inside.stdout) == rows(direct.stdout)
    assert all(json.loads(line)["source"].endswith("/demo-archive") for line in inside.stdout.splitlines())
    assert sorted(json.loads(line)["StudyInstanceUID"] for line in inside.stdout.splitlines()) == sorted(studies)


@pytest.mark.parametrize("kind", ["demo", "folder", "orthanc", "cod"])
def test_ls_and_the_dicomweb_tree_give_the_same_answers(kind: str, orthanc: OrthancServer, bucket: Bucket,
                                                        demo_dir: Path, tmp_path: Path,
                                                        mount_factory: Callable[..., Mount]) -> None:
    """One module computes counts and modalities for both (they once disagreed for COD)."""
    with counted(kind, orthanc, bucket, demo_dir) as (source, env, _):
        mount = mount_factory(source, env=env)
        index = json.loads(gzip.decompress((mount.path / "dicomweb/studies/index.json.gz").read_bytes()))
        rows = [json.loads(line) for line in sh(sys.executable, "-m", "dicomfs", "ls", source, "--json",
                                                "--cache-dir", str(tmp_path / "ls-cache"), env=env).stdout.splitlines()]
    web = {s["0020000D"]["Value"][0]: s for s in index}
    assert sorted(web) == sorted(r["StudyInstanceUID"] for r in rows)
    for row in rows:
        study = web[row["StudyInstanceUID"]]
        assert row["ModalitiesInStudy"] == study["00080061"].get("Value"), row
        assert row["Series"] == study["00201206"]["Value"][0]
        assert row["Instances"] == study["00201208"]["Value"][0]


def test_aeskulap_shows_a_series_opened_from_patients(tmp_path: Path, mount_factory: Callable[..., Mount]) -> None:
    """A real desktop viewer (Debian's aeskulap, under Xvfb) opens a series through a readable
    path and renders it: the selected viewport (aeskulap frames it in orange) holds an image."""
    import subprocess
    import time

    from tests.screenshot import box_of, grab, mid_grey_share
    from tests.servers import require_tools

    require_tools("Xvfb", "aeskulap", "xwd")
    mount = mount_factory("demo")
    series = next((mount.path / "patients").glob("DEMO MR*/*/001 MR *"))
    files = sorted(series.iterdir())
    assert len(files) == 8
    display = f":{90 + os.getpid() % 100}"
    xvfb = subprocess.Popen(["Xvfb", display, "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    viewer = None
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(["xwd", "-root", "-silent", "-display", display], capture_output=True,
                             timeout=10).returncode != 0:
            assert time.monotonic() < deadline, "Xvfb did not start"
            time.sleep(0.2)
        viewer = subprocess.Popen(["aeskulap", *map(str, files)], env={**os.environ, "DISPLAY": display},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        share = 0.0
        while time.monotonic() < deadline:
            _, _, rows = grab(display)
            box = box_of(rows, (0, 165, 255))  # orange, as BGR
            if box is not None:
                share = mid_grey_share(rows, (box[0] + 3, box[1] + 3, box[2] - 3, box[3] - 3))
                if share > 0.05:
                    break
            time.sleep(1)
        assert share > 0.05, f"no image in aeskulap's viewport (mid-grey share {share:.3f})"
        assert viewer.poll() is None  # still running: it did not crash on our files
    finally:
        for process in (viewer, xvfb):
            if process is not None:
                process.kill()
                process.wait(timeout=10)


def test_a_mount_query_narrows_every_view(mount_factory: Callable[..., Mount]) -> None:
    mount = mount_factory("demo", "--query", "PatientName=Doe*")
    patients = sorted(os.listdir(mount.path / "patients"))
    assert patients == ["Doe Archibald (77654033)", "Doe Peter (98890234)"]
    studies = os.listdir(mount.path / "studies")
    in_dates = [p for p in names_below(mount.path / "dates") if p.count("/") == 2]
    assert len(in_dates) == len(studies) == 6  # the Doe studies of the demo
