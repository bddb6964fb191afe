"""``dicomfs prefetch``, ``ls``, ``cache`` and ``mount --query`` against a real Orthanc.

Bytes are checked against the files uploaded to Orthanc (sha256), transfers are counted by a
proxy in front of it, and every run is a real ``dicomfs`` process.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.factory import make_instance
from tests.faultproxy import FaultProxy, Rule
from tests.fsutil import hashes, listdir, p10_hashes
from tests.mounting import Mount, dicomfs
from tests.servers import CountingProxy, OrthancServer, free_port, wait_until

pytestmark = pytest.mark.mount  # real servers, processes or mounts (see conftest)

PATIENTS = [("Doe^John", "20200615"), ("O'Brien^Mary Ann", "20210101"), ("Müller^Jürgen", "20191231")]
PREFETCH_TIMEOUT = 300


@dataclass
class Archive:
    server: OrthancServer
    files: dict[str, bytes]  # "<study>/<series>/<sop>.dcm" -> bytes as uploaded
    folder: Path  # the same files on disk, for the folder source

    @property
    def expected(self) -> dict[str, str]:
        return {rel: hashlib.sha256(data).hexdigest() for rel, data in self.files.items()}

    def studies(self) -> set[str]:
        return {rel.split("/")[0] for rel in self.files}

    def series(self) -> set[str]:
        return {rel.split("/")[1] for rel in self.files}

    def datasets(self) -> Iterator[pydicom.Dataset]:
        for data in self.files.values():
            yield pydicom.dcmread(pydicom.filebase.DicomBytesIO(data), stop_before_pixels=True)


def build_archive(workdir: Path, demo_dir: Path) -> tuple[dict[str, bytes], Path]:
    """The demo files plus three patients with awkward names, two series of 4 x 100 kB each."""
    files: dict[str, bytes] = {}
    for path in sorted(demo_dir.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        files[f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"] = path.read_bytes()
    for patient, date in PATIENTS:
        study = generate_uid()
        for number, modality in enumerate(("CT", "SR"), start=1):
            series = generate_uid()
            for instance in range(1, 5):
                sop = generate_uid()
                files[f"{study}/{series}/{sop}.dcm"] = make_instance(
                    study, series, sop, pixel_bytes=100_000, number=instance, patient=patient, study_date=date,
                    modality=modality, series_number=number)
    folder = workdir / "files"
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return files, folder


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Iterator[Archive]:
    workdir = tmp_path_factory.mktemp("prefetch-archive")
    files, folder = build_archive(workdir, demo_dir)
    with OrthancServer(workdir / "orthanc") as server:
        server.upload(list(files.values()))
        yield Archive(server, files, folder)


def prefetch(source: str, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return dicomfs("prefetch", source, "--cache-dir", str(cache), *args, timeout=PREFETCH_TIMEOUT)


@dataclass
class PlanNumbers:
    studies: int
    series: int
    instances: int
    total_bytes: int | None
    cached_series: int
    cached_bytes: int


def plan_numbers(output: str) -> PlanNumbers:
    plan = re.search(r"plan: (\d+) studies, (\d+) series, (\d+) instances, (?:.*\((\d+) bytes\)|size unknown)", output)
    cached = re.search(r"already cached: (\d+) series, .*\((\d+) bytes\)", output)
    assert plan and cached, output
    return PlanNumbers(int(plan[1]), int(plan[2]), int(plan[3]), int(plan[4]) if plan[4] else None,
                       int(cached[1]), int(cached[2]))


def fetched(output: str) -> tuple[int, int]:
    match = re.search(r"fetched (\d+) series, .*?\((\d+) bytes\)", output)
    assert match, output
    return int(match[1]), int(match[2])


def cached_series(cache: Path) -> int:
    result = dicomfs("cache", "stats", "--cache-dir", str(cache), check=True)
    match = re.search(r": (\d+) series, (\d+) instances", result.stdout)
    assert match, result.stdout
    return int(match[1])


def test_prefetch_all_then_serve_everything_offline(tmp_path: Path, demo_dir: Path, demo_expected: dict[str, str],
                                                     mount_factory: Callable[..., Mount]) -> None:
    cache = tmp_path / "cache"
    total = sum(p.stat().st_size for p in demo_dir.rglob("*.dcm"))
    with OrthancServer(tmp_path / "orthanc") as server:
        server.upload(sorted(demo_dir.rglob("*.dcm")))
        dry = prefetch(server.dicomweb, cache, "--all", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        before = plan_numbers(dry.stdout)
        assert (before.studies, before.series, before.instances) == (9, 20, 54)
        assert before.total_bytes is None and before.cached_series == 0  # DICOMweb reports no sizes

        run = prefetch(server.dicomweb, cache, "--all")
        assert run.returncode == 0, run.stderr
        assert fetched(run.stdout) == (20, total)  # the bytes stored are exactly the uploaded files
        assert "prefetched 9 studies, 20 series, 54 instances" in run.stdout and "0 failed" in run.stdout

        after = plan_numbers(prefetch(server.dicomweb, cache, "--all", "--dry-run").stdout)
        assert (after.studies, after.series, after.instances) == (before.studies, before.series, before.instances)
        assert after.total_bytes == after.cached_bytes == total and after.cached_series == 20

    # The archive is gone: the same cache still lists and serves every prefetched study.
    mount = mount_factory(server.dicomweb, cache="cache")
    assert p10_hashes(mount.path) == demo_expected
    assert mount.log.count("archive unreachable") == 1
    listing = dicomfs("ls", server.dicomweb, "--cache-dir", str(cache), "--json", check=True)
    assert len(listing.stdout.splitlines()) == 9


def test_resume_after_kill_9_refetches_only_what_was_missing(archive: Archive, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    total_series = len(archive.series())
    with CountingProxy(archive.server.port) as proxy:
        proxy.throttle = 0.01
        process = subprocess.Popen([sys.executable, "-m", "dicomfs", "prefetch", proxy.dicomweb, "--all",
                                    "--cache-dir", str(cache), "--jobs", "1"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: proxy.counts["wado-series"] >= 8 or process.poll() is not None, 120,
                       "several series to be fetched")
        finally:
            process.kill()
            process.wait(timeout=30)
        assert process.returncode == -signal.SIGKILL, "the prefetch finished before it could be killed"
        done = cached_series(cache)
        assert 0 < done < total_series

        proxy.throttle = 0
        before = proxy.counts["wado-series"]
        rerun = prefetch(proxy.dicomweb, cache, "--all")
        assert rerun.returncode == 0, rerun.stderr
        assert proxy.counts["wado-series"] - before == total_series - done  # complete series are kept
        assert fetched(rerun.stdout)[0] == total_series - done
        assert f"{done} series already cached" in rerun.stdout

    assert not list((cache / "work").glob("*/*.part"))
    verify = dicomfs("cache", "verify", "--cache-dir", str(cache))
    assert verify.returncode == 0 and ": 0 bad" in verify.stdout, verify.stdout + verify.stderr
    assert f"checked {total_series} blobs" in verify.stdout
    out = tmp_path / "out"
    prefetch(archive.server.dicomweb, cache, "--all", "--to", str(out))
    assert {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in out.rglob("*.dcm")} == archive.expected


def test_ctrl_c_stops_cleanly_and_keeps_complete_series(archive: Archive, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with CountingProxy(archive.server.port) as proxy:
        proxy.throttle = 0.01
        process = subprocess.Popen([sys.executable, "-m", "dicomfs", "prefetch", proxy.dicomweb, "--all",
                                    "--cache-dir", str(cache), "--jobs", "2"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: proxy.counts["wado-series"] >= 6 or process.poll() is not None, 120,
                       "several series to be fetched")
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=60)
        finally:
            process.kill()
            process.wait(timeout=30)
    assert process.returncode == 130, stderr
    assert "interrupted: complete series are kept" in stderr
    assert not list((cache / "work").iterdir())  # its work folder (partial downloads) is gone
    done = cached_series(cache)
    assert 0 < done < len(archive.series())
    verify = dicomfs("cache", "verify", "--cache-dir", str(cache))
    assert verify.returncode == 0 and f"checked {done} blobs" in verify.stdout


def test_a_failing_series_is_reported_and_the_rest_complete(archive: Archive, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    broken = sorted(archive.series())[0]
    with CountingProxy(archive.server.port) as proxy:
        proxy.fail_when = lambda path: f"/series/{broken}" in path and "/instances" not in path
        run = prefetch(proxy.dicomweb, cache, "--all")
        assert run.returncode == 1
        assert "; 1 failed" in run.stdout
        failures = [line for line in run.stderr.splitlines() if line.startswith("failed: ")]
        assert len(failures) == 1 and f"series {broken}" in failures[0] and "HTTP 500" in failures[0]
        assert cached_series(cache) == len(archive.series()) - 1

        proxy.fail_when = None
        again = prefetch(proxy.dicomweb, cache, "--all")
        assert again.returncode == 0 and fetched(again.stdout)[0] == 1


def test_to_and_zip_write_the_archive_files(archive: Archive, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    chosen = sorted(archive.studies())[:2]
    expected = {rel: digest for rel, digest in archive.expected.items() if rel.split("/")[0] in chosen}
    out = tmp_path / "out"
    run = prefetch(archive.server.dicomweb, cache, *chosen, "--to", str(out))
    assert run.returncode == 0, run.stderr
    written = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*")
               if p.is_file()}
    assert written == expected  # nothing else either: no temporary files left behind
    assert f"wrote {len(expected)} files, 0 identical ones kept" in run.stdout

    victim = out / sorted(expected)[0]
    victim.write_bytes(b"damaged")
    again = prefetch(archive.server.dicomweb, cache, *chosen, "--to", str(out))
    assert f"wrote 1 files, {len(expected) - 1} identical ones kept" in again.stdout
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == expected[sorted(expected)[0]]

    zips = tmp_path / "zips"
    run = prefetch(archive.server.dicomweb, cache, *chosen, "--to", str(zips), "--zip")
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in zips.iterdir()) == sorted(f"{uid}.zip" for uid in chosen)
    from_zips = {}
    for study in chosen:
        with zipfile.ZipFile(zips / f"{study}.zip") as zipped:
            assert zipped.testzip() is None
            for name in zipped.namelist():
                from_zips[f"{study}/{name}"] = hashlib.sha256(zipped.read(name)).hexdigest()
    assert from_zips == expected


@pytest.mark.parametrize("counted", [True, False])
def test_an_archive_that_cuts_its_instance_search_short_still_gets_every_instance_written(
        tmp_path: Path, counted: bool) -> None:
    """Orthanc with LimitFindInstances answers the search for a series' instances with 3 of its
    5, says nothing of it (no Warning) and has nothing at a further offset; its retrieve holds all
    5. ``prefetch --to`` writes all five, byte for byte, and says on stderr what it found. (It
    wrote 3 and reported success.) Where the series search counts the series' instances, the
    listing is completed from the series' metadata; where it does not (a proxy takes the count out
    of Orthanc's answer), what the retrieve held beyond the listing is written."""
    study, series = "1.2.826.0.1.3680043.8.498.74", "1.2.826.0.1.3680043.8.498.74.1"
    files = {f"{study}/{series}/{series}.{k}.dcm": make_instance(study, series, f"{series}.{k}", pixel_bytes=1000,
                                                                 number=k) for k in range(1, 6)}
    expected = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    with OrthancServer(tmp_path / "orthanc", extra={"LimitFindInstances": 2}) as server, \
            FaultProxy(server.port) as proxy:
        server.upload(list(files.values()))
        if not counted:
            rows = json.loads(urllib.request.urlopen(f"{server.dicomweb}/studies/{study}/series", timeout=30).read())
            assert rows and all("00201209" in row for row in rows)  # (Orthanc counts them)
            for row in rows:
                del row["00201209"]
            proxy.add(Rule(lambda path: path.split("?")[0].endswith(f"/{study}/series"), "body",
                           body=json.dumps(rows).encode()))
        out = tmp_path / "out"
        run = prefetch(proxy.dicomweb, tmp_path / "cache", study, "--to", str(out))
        assert run.returncode == 0, run.stderr
        written = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*")
                   if p.is_file()}
        assert written == expected, sorted(written)
        said = ("named 3 of the 5 it counts; 2 more from its metadata" if counted
                else "its retrieve held 2 instances its listing did not name")
        assert said in run.stderr, run.stderr
        assert "wrote 5 files" in run.stdout
        assert proxy.faults["body"] == (0 if counted else 1)


def ls_uids(source: str, cache: Path, *args: str) -> list[str]:
    result = dicomfs("ls", source, "--cache-dir", str(cache), "--json", *args, check=True)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    key = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID", "instance": "SOPInstanceUID"}
    return sorted(row[key[row["level"]]] for row in rows)


@pytest.mark.parametrize("query, wanted", [
    (["PatientName=Müller*"], lambda ds: str(ds.PatientName).startswith("Müller")),
    (["PatientName=O'Brien^Mary Ann"], lambda ds: str(ds.PatientName) == "O'Brien^Mary Ann"),
    (["PatientName=doe^j*"], lambda ds: str(ds.PatientName).lower().startswith("doe^j")),
    (["PatientName=*Mary A?n"], lambda ds: str(ds.PatientName) == "O'Brien^Mary Ann"),
    (["StudyDate=20191201-20200701"], lambda ds: "20191201" <= ds.StudyDate <= "20200701"),
    (["StudyDate=20030505", "Modality=MR"], lambda ds: ds.StudyDate == "20030505" and ds.get("Modality") == "MR"),
    (["PatientName=Nobody*"], lambda ds: False),
    (["PatientName=Ö*"], lambda ds: str(ds.PatientName).startswith("Ö")),  # nothing QIDO can carry
    (["StudyDate=2020*"], lambda ds: ds.StudyDate.startswith("2020")),  # no wildcards on dates in QIDO
])
def test_ls_finds_studies_by_name_date_and_modality(archive: Archive, tmp_path: Path, query: list[str],
                                                    wanted: Callable[[pydicom.Dataset], bool]) -> None:
    expected = sorted({ds.StudyInstanceUID for ds in archive.datasets() if wanted(ds)})
    terms = [arg for term in query for arg in ("--query", term)]
    assert ls_uids(archive.server.dicomweb, tmp_path / "web", *terms) == expected  # QIDO on Orthanc
    assert ls_uids(str(archive.folder), tmp_path / "folder", *terms) == expected  # filtered by dicomfs


def test_ls_levels_and_table(archive: Archive, tmp_path: Path) -> None:
    ct_series = sorted({ds.SeriesInstanceUID for ds in archive.datasets() if ds.get("Modality") == "CT"})
    assert ls_uids(archive.server.dicomweb, tmp_path / "c", "--level", "series", "--query", "Modality=CT") == ct_series
    muller = [ds for ds in archive.datasets() if str(ds.PatientName).startswith("Müller")]
    firsts = sorted(ds.SOPInstanceUID for ds in muller if ds.get("InstanceNumber") == 1)
    assert ls_uids(archive.server.dicomweb, tmp_path / "c", "--level", "instance", "--query", "PatientName=Müller*",
                   "--query", "InstanceNumber=1") == firsts
    table = dicomfs("ls", archive.server.dicomweb, "--cache-dir", str(tmp_path / "c"), "--query",
                    "PatientName=Müller*", check=True).stdout.splitlines()
    assert table[0].split()[:3] == ["StudyInstanceUID", "PatientName", "PatientID"]
    assert len(table) == 2 and "Müller^Jürgen" in table[1] and muller[0].StudyInstanceUID in table[1]
    assert table[1].split()[-2:] == ["2", "8"]  # series and instances


def test_mount_query_shows_only_matching_studies(archive: Archive, mount_factory: Callable[..., Mount]) -> None:
    wanted = sorted({ds.StudyInstanceUID for ds in archive.datasets() if str(ds.PatientName).startswith("Müller")})
    mount = mount_factory(archive.server.dicomweb, "--query", "PatientName=Müller*")
    assert listdir(mount.path / "studies") == wanted
    got = hashes(mount.path / "studies")
    assert {f"{rel}": d for rel, d in got.items()} == {
        rel: d for rel, d in archive.expected.items() if rel.split("/")[0] in wanted}


def test_prefetch_into_the_cache_of_a_running_mount(archive: Archive, mount_factory: Callable[..., Mount]) -> None:
    mount = mount_factory(archive.server.dicomweb)
    run = prefetch(archive.server.dicomweb, mount.cache_dir, "--all")
    assert run.returncode == 0, run.stderr
    assert hashes(mount.path / "studies") == archive.expected
    verify = dicomfs("cache", "verify", "--cache-dir", str(mount.cache_dir))
    assert verify.returncode == 0 and ": 0 bad" in verify.stdout
    clear = dicomfs("cache", "clear", "--cache-dir", str(mount.cache_dir))
    assert clear.returncode == 1 and "in use" in clear.stderr  # a running mount keeps its cache


def test_a_prefetch_waits_for_the_mount_downloading_the_same_series(archive: Archive, tmp_path: Path,
                                                                       mount_factory: Callable[..., Mount]) -> None:
    study = next(ds.StudyInstanceUID for ds in archive.datasets() if str(ds.PatientName) == "Doe^John")
    series = sorted({rel.split("/")[1] for rel in archive.files if rel.startswith(study)})
    first = next(rel for rel in sorted(archive.files) if rel.startswith(f"{study}/{series[0]}/"))
    with CountingProxy(archive.server.port) as proxy:
        proxy.throttle = 0.5  # 4 x 100 kB: the mount's download of the series takes seconds
        mount = mount_factory(proxy.dicomweb)
        reader = subprocess.Popen([sys.executable, "-c", f"open({str(mount.path / 'studies' / first)!r}, 'rb').read()"])
        try:
            wait_until(lambda: any(f"/series/{series[0]}" in p and "/instances" not in p and "/metadata" not in p
                                   for p in proxy.paths), 60, "the mount to start the series download")
            run = prefetch(proxy.dicomweb, mount.cache_dir, study)
            assert run.returncode == 0, run.stderr
            assert reader.wait(timeout=120) == 0
        finally:
            reader.kill()
        retrieves = [p for p in proxy.paths if f"/series/{series[0]}" in p.split("?")[0]
                     and proxy.kind(p) == "wado-series"]
        assert len(retrieves) == 1, retrieves  # the prefetch waited for the mount's download
        assert fetched(run.stdout)[0] == len(series) - 1
    assert hashes(mount.path / "studies" / study) == {
        rel[len(study) + 1:]: d for rel, d in archive.expected.items() if rel.startswith(study)}


def test_progress_bar_on_a_terminal(archive: Archive, tmp_path: Path) -> None:
    main, child = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "dicomfs", "prefetch", archive.server.dicomweb, "--all",
                                "--cache-dir", str(tmp_path / "cache")],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=child)
    os.close(child)
    screen = b""
    deadline = time.monotonic() + PREFETCH_TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the terminal closed: the prefetch is done
                break
            if not chunk:
                break
            screen += chunk
        elif process.poll() is not None:
            break
    os.close(main)
    stdout = process.communicate(timeout=60)[0].decode()
    assert process.returncode == 0, screen.decode(errors="replace")
    frames = [f for f in screen.decode().replace("\n", "\r").split("\r") if f.strip()]
    assert frames and all(f.startswith("[") for f in frames), frames
    assert re.match(r"\[#+\] 100%", frames[-1]) and f"series {len(archive.series())}/" in frames[-1]
    assert "prefetched " in stdout


def test_a_corrupt_blob_is_found_dropped_and_fetched_again(archive: Archive, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    study = sorted(archive.studies())[0]
    assert prefetch(archive.server.dicomweb, cache, study).returncode == 0
    blob = max((p for p in (cache / "blobs").rglob("*") if p.is_file() and p.suffix != ".db"
                and not p.name.startswith("cache.db")), key=lambda p: p.stat().st_size)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    verify = dicomfs("cache", "verify", "--cache-dir", str(cache))
    assert verify.returncode == 1 and ": 1 bad" in verify.stdout and "CRC32C" in verify.stderr
    again = prefetch(archive.server.dicomweb, cache, study, "--to", str(tmp_path / "out"))
    assert fetched(again.stdout)[0] == 1
    out = tmp_path / "out"
    assert {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*.dcm")} == {
        rel: d for rel, d in archive.expected.items() if rel.startswith(study)}
    # A blob file that vanished (a power cut before the rename reached the disk) is found too.
    other = sorted(archive.studies())[1]
    assert prefetch(archive.server.dicomweb, cache, other).returncode == 0
    victim = max((p for p in (cache / "blobs").rglob("*.val")), key=lambda p: p.stat().st_mtime)
    victim.unlink()
    stray = cache / "blobs" / "ab" / "cd" / "stray.val"  # and a file no entry refers to
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"left by a crash")
    verify = dicomfs("cache", "verify", "--cache-dir", str(cache))
    assert verify.returncode == 1 and "its file is missing" in verify.stderr
    assert "1 unreferenced blob files deleted" in verify.stdout and not stray.exists()
    assert fetched(prefetch(archive.server.dicomweb, cache, other).stdout)[0] == 1
    assert dicomfs("cache", "clear", "--cache-dir", str(cache)).returncode == 0
    assert cached_series(cache) == 0


def test_bad_input_gets_one_line_and_a_status(archive: Archive, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    web = archive.server.dicomweb
    for args, status, message in [
        ((web,), 2, "say which studies"),
        ((web, "--all", "--query", "PatientNmae=x"), 2, "unknown DICOM keyword"),
        ((web, "--all", "--zip"), 2, "--zip needs --to"),
        ((web, "../../etc"), 2, "is not a study UID"),
        ((web, "--all", "--jobs", "0"), 2, "--jobs"),
        ((f"http://127.0.0.1:{free_port()}/dicom-web", "--all"), 1, "cannot reach"),
    ]:
        result = prefetch(args[0], cache, *args[1:])
        assert result.returncode == status and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    unreachable = f"http://127.0.0.1:{free_port()}/dicom-web"
    for args in (("ls", unreachable, "--json"), ("prefetch", unreachable, "--all")):
        result = dicomfs(*args, "--cache-dir", str(tmp_path / "typo"))
        assert result.returncode == 1 and "cannot reach" in result.stderr, result.stderr
        assert not (tmp_path / "typo").exists()  # no cache left behind for an archive never reached
    known = sorted(archive.studies())[0]
    result = prefetch(web, cache, "1.2.3.999", known)
    assert result.returncode == 1
    assert "failed: study 1.2.3.999: not found in the archive" in result.stderr
    assert "prefetched 1 studies" in result.stdout and "; 1 failed" in result.stdout
    result = dicomfs("cache", "stats", "--cache-dir", str(tmp_path / "nothing-here"))
    assert result.returncode == 2 and "not a dicomfs cache" in result.stderr

    # The archive failing a search is one line too, for ls and prefetch alike.
    with CountingProxy(archive.server.port) as proxy:
        proxy.fail_when = lambda path: path.split("?")[0].endswith("/studies") and "PatientName" in path
        for command in (("ls",), ("prefetch",)):
            result = dicomfs(*command, proxy.dicomweb, "--cache-dir", str(tmp_path / "c2"),
                             "--query", "PatientName=X*", timeout=PREFETCH_TIMEOUT)
            assert result.returncode == 1 and "HTTP 500" in result.stderr, result.stderr
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr

    # An output folder that cannot take the files: one line, exit 1, no temporary files left.
    out = tmp_path / "zips"
    (out / f"{known}.zip").mkdir(parents=True)
    result = prefetch(web, cache, known, "--to", str(out), "--zip")
    assert result.returncode == 1 and f"cannot write {out / known}.zip" in result.stderr, result.stderr
    assert [p.name for p in out.iterdir()] == [f"{known}.zip"]


def test_the_cache_limit_is_kept_and_a_selection_too_large_for_it_is_reported(archive: Archive,
                                                                                tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    study = sorted(archive.studies())[0]
    assert prefetch(archive.server.dicomweb, cache, study, "--cache-size", "300M").returncode == 0
    stats = dicomfs("cache", "stats", "--cache-dir", str(cache), check=True).stdout
    assert "limit 300.0 MiB" in stats
    assert prefetch(archive.server.dicomweb, cache, study).returncode == 0  # no --cache-size: kept
    assert "limit 300.0 MiB" in dicomfs("cache", "stats", "--cache-dir", str(cache), check=True).stdout

    small = tmp_path / "small"
    run = prefetch(archive.server.dicomweb, small, "--all", "--cache-size", "1M")
    assert run.returncode == 1
    assert "evicted again at once" in run.stderr and "raise --cache-size" in run.stderr
    rerun = prefetch(archive.server.dicomweb, small, "--all", "--cache-size", "1G")
    assert rerun.returncode == 0, rerun.stderr


def test_two_prefetches_at_once_share_the_work(archive: Archive, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    argv = [sys.executable, "-m", "dicomfs", "prefetch", archive.server.dicomweb, "--all", "--cache-dir", str(cache)]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outputs = [p.communicate(timeout=PREFETCH_TIMEOUT) for p in (first, second)]
    assert first.returncode == second.returncode == 0, outputs
    total = len(archive.series())
    # Each series is counted by the one that cached it (both may have fetched it).
    assert sum(fetched(out)[0] for out, _ in outputs) == total
    verify = dicomfs("cache", "verify", "--cache-dir", str(cache))
    assert verify.returncode == 0 and f"checked {total} blobs" in verify.stdout


@pytest.mark.parametrize("form", ["table", "--json"])
@pytest.mark.parametrize("reader", ["head -n 2", "true"])
def test_ls_into_a_pipe_that_closes_early_ends_quietly(tmp_path: Path, reader: str, form: str) -> None:
    """``true`` closes the pipe before dicomfs writes a byte; ``head`` after two lines. JSON lines
    are printed while the archive is open (a batch at a time): the same quiet end."""
    flag = "--json" if form == "--json" else ""
    command = (f"{sys.executable} -m dicomfs ls demo --level instance {flag} --cache-dir {tmp_path / 'cache'} "
               f"| {reader}")
    result = subprocess.run(["bash", "-c", command + "; echo ${PIPESTATUS[0]} >&2"], capture_output=True,
                            text=True, timeout=PREFETCH_TIMEOUT, stdin=subprocess.DEVNULL)
    if reader.startswith("head"):
        assert len(result.stdout.splitlines()) == 2
        assert result.stdout.startswith('{"level": "instance"' if flag else "SeriesInstanceUID")
    assert result.stderr.strip() in ("0", "141"), result.stderr  # dicomfs said nothing else
