"""Real mounts of a real Orthanc (Debian package): bytes, clients, request accounting, outages."""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from tests.factory import make_instance
from tests.fsutil import hashes, listdir, p10_hashes, read_errno, sh
from tests.mounting import Mount, dicomfs
from tests.servers import CountingProxy, OrthancServer, require_tools, wait_until

# Every kind of object the issue names must be among the files checked byte for byte.
pytestmark = pytest.mark.mount  # real servers, processes or mounts (see conftest)

REQUIRED_SYNTAXES = {
    "1.2.840.10008.1.2.1": "explicit little endian",
    "1.2.840.10008.1.2": "implicit little endian",
    "1.2.840.10008.1.2.2": "big endian",
    "1.2.840.10008.1.2.1.99": "deflate",
    "1.2.840.10008.1.2.4.50": "JPEG baseline",
    "1.2.840.10008.1.2.4.80": "JPEG-LS lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE",
}


def test_every_file_is_byte_identical_to_the_upload(orthanc: OrthancServer, demo_dir: Path,
                                                    demo_expected: dict[str, str],
                                                    mount_factory: Callable[..., Mount]) -> None:
    syntaxes = {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
                for p in demo_dir.rglob("*.dcm")}
    assert set(REQUIRED_SYNTAXES) <= syntaxes
    assert any(int(pydicom.dcmread(p, stop_before_pixels=True).get("NumberOfFrames", 1)) > 1
               for p in demo_dir.rglob("*.dcm"))
    mount = mount_factory(orthanc.dicomweb)
    assert p10_hashes(mount.path) == demo_expected
    # ... and again from the disk cache after a remount
    mount.stop()
    mount.start()
    assert p10_hashes(mount.path) == demo_expected


def test_dicom_tools_read_the_files(orthanc: OrthancServer, demo_expected: dict[str, str],
                                   mount_factory: Callable[..., Mount]) -> None:
    require_tools("dcmdump", "dcmftest")
    mount = mount_factory(orthanc.dicomweb)
    paths = [str(mount.path / rel) for rel in demo_expected]
    code = ("import pydicom, sys\nfor p in sys.argv[1:]:\n    ds = pydicom.dcmread(p)\n"
            "    assert p.endswith(ds.SOPInstanceUID + '.dcm'), p\n    ds.PixelData\nprint('ok')\n")
    assert sh(sys.executable, "-c", code, *paths).stdout.strip() == "ok"
    for path in paths:
        assert "(0002,0010)" in sh("dcmdump", "-M", path).stdout
    assert "yes" in sh("dcmftest", *paths).stdout


def test_cp_rsync_and_tar_round_trips(orthanc: OrthancServer, demo_expected: dict[str, str],
                                      mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    require_tools("rsync", "tar")
    mount = mount_factory(orthanc.dicomweb)
    studies = mount.path / "studies"
    sh("cp", "-r", str(studies), str(tmp_path / "copy"))
    assert {f"studies/{k}": v for k, v in hashes(tmp_path / "copy").items()} == demo_expected
    first = sh("rsync", "-a", "--stats", f"{studies}/", str(tmp_path / "rsync")).stdout
    assert f"Number of regular files transferred: {len(demo_expected)}" in first
    second = sh("rsync", "-a", "--stats", f"{studies}/", str(tmp_path / "rsync")).stdout
    assert "Number of regular files transferred: 0" in second  # sizes and mtimes are stable
    sh("tar", "-cf", str(tmp_path / "studies.tar"), "-C", str(mount.path), "studies")
    (tmp_path / "untar").mkdir()
    sh("tar", "-xf", str(tmp_path / "studies.tar"), "-C", str(tmp_path / "untar"))
    assert hashes(tmp_path / "untar") == demo_expected


def test_listing_studies_and_study_folders_fetches_no_instance_data(
        orthanc: OrthancServer, demo_expected: dict[str, str],
        mount_factory: Callable[..., Mount]) -> None:
    with CountingProxy(orthanc.port) as proxy:
        mount = mount_factory(proxy.dicomweb)
        studies = listdir(mount.path / "studies")
        assert len(studies) == len({k.split("/")[1] for k in demo_expected})
        for study in studies:
            for series in listdir(mount.path / "studies" / study):
                listdir(mount.path / "studies" / study / series)  # names only: no sizes needed
        sh("find", str(mount.path), "-name", "*.dcm")  # the dicomweb/ tree too: it reads metadata only
        assert proxy.counts["qido"] > 0
        other = [p for p in proxy.paths if CountingProxy.kind(p) == "wado-other"]
        assert proxy.counts["wado-series"] == 0 and all(p.endswith("/metadata") for p in other), other
        # `ls -l` of a series folder needs exact sizes: that costs one retrieve of that series
        study = studies[0]
        series = listdir(mount.path / "studies" / study)[0]
        sh("ls", "-l", str(mount.path / "studies" / study / series))
        assert proxy.counts["wado-series"] == 1
        assert all(p.endswith("/metadata") for p in proxy.paths if CountingProxy.kind(p) == "wado-other")


def test_concurrent_readers_cause_one_retrieval(orthanc: OrthancServer, demo_expected: dict[str, str],
                                                mount_factory: Callable[..., Mount]) -> None:
    series_sizes: dict[str, list[str]] = {}
    for rel in demo_expected:
        series_sizes.setdefault(rel.rsplit("/", 1)[0], []).append(rel)
    biggest = max(series_sizes.values(), key=len)
    assert len(biggest) >= 5
    with CountingProxy(orthanc.port) as proxy:
        proxy.throttle = 0.01
        mount = mount_factory(proxy.dicomweb, "--readahead", "series")  # (retrieves counted: none ahead)
        results: dict[str, str] = {}

        def read(rel: str) -> None:
            results[rel] = hashes(mount.path / Path(rel).parent)[Path(rel).name]

        threads = [threading.Thread(target=read, args=(rel,)) for rel in biggest + biggest[::-1]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
        assert results == {rel: demo_expected[rel] for rel in biggest}
        assert proxy.counts["wado-series"] == 1, proxy.paths


def test_archive_outage_gives_eio_and_recovers(tmp_path: Path, demo_dir: Path, demo_expected: dict[str, str],
                                               mount_factory: Callable[..., Mount]) -> None:
    server = OrthancServer(tmp_path / "orthanc").start()
    try:
        server.upload(sorted(demo_dir.rglob("*.dcm")))
        mount = mount_factory(server.dicomweb)
        files = sorted(demo_expected)
        studies = sorted({rel.split("/")[1] for rel in files})
        cached = [rel for rel in files if rel.split("/")[1] == studies[0]]
        uncached = [rel for rel in files if rel.split("/")[1] == studies[1]]
        assert all(read_errno(mount.path / rel) == 0 for rel in cached)
        listdir(mount.path / "studies" / studies[1] / uncached[0].split("/")[2])
        server.stop()
        assert read_errno(mount.path / uncached[0]) == errno.EIO
        assert mount.alive()
        # cached data and listings keep working
        assert hashes(mount.path / "studies" / studies[0]) == {
            rel.split("/", 2)[2]: demo_expected[rel] for rel in cached}
        assert listdir(mount.path / "studies") == studies
        assert "could not be fetched" in mount.log
        server.start()
        # The breaker lets one read through to test the archive once its cool-down is over.
        wait_until(lambda: read_errno(mount.path / uncached[0]) == 0, 60, "a read to find the archive back")
        assert "answers again" in mount.log
        assert p10_hashes(mount.path) == demo_expected
    finally:
        server.stop()


def test_a_series_of_1500_instances(tmp_path: Path, mount_factory: Callable[..., Mount]) -> None:
    study, series = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.1.1"
    files = {f"{series}.{n}": make_instance(study, series, f"{series}.{n}", pixel_bytes=16, number=n)
             for n in range(1, 1501)}
    server = OrthancServer(tmp_path / "orthanc").start()
    try:
        server.upload(list(files.values()))
        assert server.statistics()["CountInstances"] == 1500
        mount = mount_factory(server.dicomweb)
        folder = mount.path / "studies" / study / series
        assert listdir(folder) == sorted(f"{key}.dcm" for key in files)
        import hashlib

        expected = {f"{k}.dcm": hashlib.sha256(v).hexdigest() for k, v in files.items()}
        # GNU cp -r copies a folder's files in inode order: the order a series retrieve sends them
        # in (readdir's inode numbers: no stat, so nothing fetched before the retrieve below)
        listed = list(os.scandir(folder))
        by_inode = [entry.name for entry in sorted(listed, key=lambda entry: entry.inode())]
        sent = [f"{uid}.dcm" for uid in retrieve_order(server.dicomweb, study, series)]
        assert sorted(sent) == sorted(expected) and sent != sorted(sent)  # (not name order: a real test)
        assert by_inode == sent
        assert [entry.name for entry in listed] == sent  # readdir's order too (tar, find, os.listdir)
        assert hashes(folder) == expected
    finally:
        server.stop()


def test_a_study_whose_searches_are_cut_short_shows_every_series_and_instance(
        tmp_path: Path, mount_factory: Callable[..., Mount]) -> None:
    """Orthanc with LimitFindResults and LimitFindInstances at 2 answers the search for a study's
    series with 3 of its 4, and for a series' instances with 3 of its 5, with no Warning and
    nothing at a further offset; its searches count 4 series and 5 instances. The study folder
    shows all four series, each all five instances, and ``cp -r`` copies them byte for byte (it
    showed 3 series of 3: 11 of 20 files silently missing from every copy)."""
    study = "1.2.826.0.1.3680043.8.498.76"
    files = {f"{study}.{se}/{study}.{se}.{k}.dcm": make_instance(study, f"{study}.{se}", f"{study}.{se}.{k}",
                                                                 pixel_bytes=1000, number=k)
             for se in range(1, 5) for k in range(1, 6)}
    import hashlib

    expected = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    server = OrthancServer(tmp_path / "orthanc", extra={"LimitFindInstances": 2, "LimitFindResults": 2}).start()
    try:
        server.upload(list(files.values()))
        mount = mount_factory(server.dicomweb)
        assert listdir(mount.path / "studies" / study) == [f"{study}.{se}" for se in range(1, 5)]
        assert listdir(mount.path / "studies" / study / f"{study}.3") == [f"{study}.3.{k}.dcm" for k in range(1, 6)]
        sh("cp", "-r", str(mount.path / "studies" / study), str(tmp_path / "copy"))
        assert hashes(tmp_path / "copy") == expected
        run = dicomfs("prefetch", server.dicomweb, study, "--cache-dir", str(tmp_path / "own-cache"), "--to",
                      str(tmp_path / "out"), check=True)
        assert hashes(tmp_path / "out" / study) == expected, run.stderr
        assert "named 3 of the 4 it counts; 1 more from its metadata" in run.stderr
    finally:
        server.stop()


def retrieve_order(dicomweb: str, study: str, series: str) -> list[str]:
    """The SOP Instance UIDs of a WADO-RS series retrieve, in the order the archive sends them."""
    import io

    import httpx

    from tests.reference import parts

    response = httpx.get(f"{dicomweb}/studies/{study}/series/{series}", timeout=60,
                         headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    response.raise_for_status()
    return [pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True).SOPInstanceUID for _, body in parts(response)]


def test_basic_auth_password_stays_secret(tmp_path: Path, demo_dir: Path,
                                          mount_factory: Callable[..., Mount]) -> None:
    secret = "pw-9f8e7d6c"
    server = OrthancServer(tmp_path / "orthanc", users={"alice": secret}).start()
    try:
        server.upload(sorted(demo_dir.rglob("*.dcm"))[:3])
        mount = mount_factory(server.dicomweb, "--user", "alice", env={"DICOMFS_PASSWORD": secret})
        assert len(p10_hashes(mount.path)) == 3
        cmdline = Path(f"/proc/{mount.pid}/cmdline").read_bytes()
        assert secret.encode() not in cmdline
        assert secret not in mount.log
        wrong = mount_factory(server.dicomweb, "--user", "alice", env={"DICOMFS_PASSWORD": "nope"},
                              name="mnt2", cache="cache2", start=False)
        with pytest.raises(AssertionError, match="refused access"):
            wrong.start()
    finally:
        server.stop()


def test_killed_mid_download_leaves_nothing_that_reads_wrong(
        orthanc: OrthancServer, demo_expected: dict[str, str],
        mount_factory: Callable[..., Mount]) -> None:
    with CountingProxy(orthanc.port) as proxy:
        proxy.throttle = 0.2  # slow enough to be killed mid-series
        mount = mount_factory(proxy.dicomweb)
        rel = max(demo_expected, key=lambda r: sum(1 for k in demo_expected if k.startswith(r.rsplit("/", 1)[0])))
        thread = threading.Thread(target=read_errno, args=(mount.path / rel,), daemon=True)
        thread.start()
        from tests.servers import wait_until

        wait_until(lambda: any((mount.cache_dir / "work").glob("*/*.part")), 60, "a download to start")
        wait_until(lambda: any(p.stat().st_size > 0 for p in (mount.cache_dir / "work").glob("*/*.part")),
                   60, "bytes to arrive")
        mount.kill()
        thread.join(timeout=60)
        killed = [p for p in (mount.cache_dir / "work").iterdir() if any(p.glob("*.part"))]
        assert killed, "the killed daemon left its partial download"
        proxy.throttle = 0
        mount.start()
        assert not any(p.exists() for p in killed)  # swept when the new daemon started
        assert p10_hashes(mount.path) == demo_expected


def test_reading_a_series_fetches_the_next_series_of_its_study_ahead(
        orthanc: OrthancServer, demo_expected: dict[str, str], tmp_path: Path,
        mount_factory: Callable[..., Mount]) -> None:
    by_study: dict[str, set[str]] = {}
    for rel in demo_expected:
        by_study.setdefault(rel.split("/")[1], set()).add(rel.split("/")[2])
    study, series = max(by_study.items(), key=lambda item: len(item[1]))
    assert len(series) >= 3
    first = sorted(series)[0]
    one = next(rel for rel in sorted(demo_expected) if rel.startswith(f"studies/{study}/{first}/"))
    with CountingProxy(orthanc.port) as proxy:
        mount = mount_factory(proxy.dicomweb)
        assert hashes(mount.path / Path(one).parent)[Path(one).name] == demo_expected[one]
        # the reader is still about: the study's other series come, each once, one after another
        wait_until(lambda: proxy.counts["wado-series"] >= len(series), 60, "the study's series to be read ahead")
        retrieved = [p.split("?")[0].rstrip("/").rsplit("/", 1)[1] for p in proxy.paths
                     if CountingProxy.kind(p) == "wado-series"]
        assert sorted(retrieved) == sorted(series), retrieved
        # in the order `cp -r` takes through the study's folder (GNU cp sorts entries by inode),
        # starting after the series read, then those before it
        by_inode = sorted(series, key=lambda s: (mount.path / "studies" / study / s).stat().st_ino)
        at = by_inode.index(first)
        assert retrieved == [first, *by_inode[at + 1:], *by_inode[:at]], (retrieved, by_inode)
        sh("cp", "-r", str(mount.path / "studies" / study), str(tmp_path / "copy"))
        assert proxy.counts["wado-series"] == len(series)  # the copy was served from the cache
        copied = {f"studies/{study}/{rel}": digest for rel, digest in hashes(tmp_path / "copy").items()}
        assert copied == {rel: d for rel, d in demo_expected.items() if rel.startswith(f"studies/{study}/")}
    with CountingProxy(orthanc.port) as proxy:
        mount = mount_factory(proxy.dicomweb, "--readahead", "series", name="m2", cache="c2")
        assert hashes(mount.path / Path(one).parent)[Path(one).name] == demo_expected[one]
        time.sleep(2)  # (time for a readahead that should not happen)
        assert proxy.counts["wado-series"] == 1  # the series read, nothing ahead


def test_readahead_in_a_named_view_follows_its_folders(
        orthanc: OrthancServer, demo_expected: dict[str, str], mount_factory: Callable[..., Mount]) -> None:
    """In ``patients/`` a study's series folders have their own inodes: readahead queues the
    series in the order of those (the order ``cp -r`` of the study's folder there takes)."""
    def entries(folder: Path) -> dict[Path, int]:  # (readdir's inode numbers: no stat, no download)
        with os.scandir(folder) as found:
            return {Path(e.path): e.inode() for e in found}

    with CountingProxy(orthanc.port) as proxy:
        mount = mount_factory(proxy.dicomweb)
        series_of: dict[int, str] = {}  # inode of an instance -> its series UID, from studies/
        for study in entries(mount.path / "studies"):
            for series in entries(study):
                series_of.update((inode, series.name) for inode in entries(series).values())
        studies = [study for patient in entries(mount.path / "patients") for study in entries(patient)]
        study_dir = max(studies, key=lambda d: len(entries(d)))
        folders = {}  # series folder in patients/ -> (its inode, the series UID of its files)
        for folder, inode in entries(study_dir).items():
            uids = {series_of[i] for i in entries(folder).values()}
            assert len(uids) == 1
            folders[folder] = (inode, uids.pop())
        assert len(folders) >= 3
        first_folder = min(folders, key=lambda f: folders[f][1])  # the series whose UID is first
        first = folders[first_folder][1]
        ordered = [uid for _, uid in sorted(folders.values())]
        at = ordered.index(first)
        expected = [first, *ordered[at + 1:], *ordered[:at]]
        assert expected != sorted(expected)  # (else this would not tell the folders' order from UIDs')
        assert proxy.counts["wado-series"] == 0
        (first_folder / sorted(entries(first_folder))[0].name).read_bytes()
        wait_until(lambda: proxy.counts["wado-series"] >= len(folders), 60, "the study's series to be read ahead")
        retrieved = [p.split("?")[0].rstrip("/").rsplit("/", 1)[1] for p in proxy.paths
                     if CountingProxy.kind(p) == "wado-series"]
        assert retrieved == expected, (retrieved, ordered)
