"""Real mounts of a DIMSE PACS: Orthanc (the Debian package) with its DICOM port, our AE title
registered, C-GET allowed, or refused so that ``--retrieve auto`` falls back to C-MOVE.

A DIMSE archive sends its own encoding of an instance, so files are compared with the uploads
element by element (pixel data included, the trailing padding Orthanc drops left out) and in their
transfer syntax; retrieves are counted on the SCP's side, in Orthanc's own log.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.uid import UID

from tests.factory import make_instance
from tests.faultproxy import TcpProxy
from tests.fsutil import listdir, read_errno, sh
from tests.mounting import Mount, dicomfs, pid_alive
from tests.reference import parts, reference_frames, value
from tests.servers import DicomfsServe, OrthancServer, connections_to, free_port, wait_until

pytestmark = pytest.mark.mount  # real servers, processes or mounts (see conftest)

MULLER = "1.2.826.0.1.3680043.8.498.60"  # a study whose patient is MÜLLER^HANS
DATED = "1.2.826.0.1.3680043.8.498.61"  # a study of 2024-01-15
LARGE = "1.2.826.0.1.3680043.8.498.62"  # one series of 1,500 instances
SLOW = "1.2.826.0.1.3680043.8.498.63"  # one series behind a slow link
LOSSLESS = "1.2.826.0.1.3680043.8.498.64"  # a study of one JPEG Lossless (process 14, SV1) instance
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
PADDING = 0xFFFCFFFC


def modalities(move_port: int, allow_get: bool = True) -> dict[str, dict[str, object]]:
    return {"DICOMFS": {"AET": "DICOMFS", "Host": "127.0.0.1", "Port": move_port, "AllowEcho": True,
                        "AllowFind": True, "AllowGet": allow_get, "AllowMove": True, "AllowStore": True}}


@dataclass
class Pacs:
    server: OrthancServer
    move_port: int
    files: dict[str, bytes]  # "<St>/<Se>/<SOP>.dcm" -> the uploaded file

    @property
    def source(self) -> str:
        return self.server.dimse

    def retrieves(self) -> int:
        return self.server.requests("Get") + self.server.requests("Move")

    def of(self, study: str) -> dict[str, bytes]:
        return {rel: data for rel, data in self.files.items() if rel.startswith(study + "/")}


def rel_of(data: bytes) -> str:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"


def archive_files(demo_dir: Path) -> dict[str, bytes]:
    files = [p.read_bytes() for p in sorted(demo_dir.rglob("*.dcm"))]
    files += [make_instance(MULLER, f"{MULLER}.1", f"{MULLER}.1.{n}", number=n, patient="MÜLLER^HANS",
                            study_date="20230505")
              for n in range(1, 4)]
    files += [make_instance(DATED, f"{DATED}.1", f"{DATED}.1.{n}", number=n, study_date="20240115",
                            patient="DATED^PATIENT") for n in range(1, 3)]
    files.append(jpeg_lossless())
    return {rel_of(data): data for data in files}


def jpeg_lossless() -> bytes:
    """pydicom's bundled JPEG Lossless instance (the one syntax of that family the demo lacks),
    under UIDs of its own."""
    path = get_testdata_file("SC_rgb_jpeg_gdcm.dcm")
    assert isinstance(path, str)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == JPEG_LOSSLESS_SV1
    ds.StudyInstanceUID, ds.SeriesInstanceUID = LOSSLESS, f"{LOSSLESS}.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(f"{LOSSLESS}.1.1")
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def start_pacs(workdir: Path, files: dict[str, bytes], allow_get: bool = True, **extra: object) -> Pacs:
    move_port = free_port()
    server = OrthancServer(workdir, modalities=modalities(move_port, allow_get), verbose=True,
                           extra=dict(extra)).start()
    server.upload(list(files.values()))
    return Pacs(server, move_port, dict(files))


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Iterator[Pacs]:
    found = start_pacs(tmp_path_factory.mktemp("pacs"), archive_files(demo_dir))
    try:
        yield found
    finally:
        found.server.stop()


def without_padding(ds: pydicom.Dataset) -> dict[int, object]:
    return {int(e.tag): e.value for e in ds if int(e.tag) != PADDING}


def same_instance(copy: bytes, original: bytes) -> bool:
    """The same instance: transfer syntax, every element and its value, pixel data included."""
    ours, theirs = pydicom.dcmread(io.BytesIO(copy)), pydicom.dcmread(io.BytesIO(original))
    return (ours.file_meta.TransferSyntaxUID == theirs.file_meta.TransferSyntaxUID
            and without_padding(ours) == without_padding(theirs))


def mount_of(pacs: Pacs, mount_factory: Callable[..., Mount], *extra: str, **kwargs: object) -> Mount:
    return mount_factory(pacs.source, "--move-port", str(pacs.move_port), *extra, **kwargs)


def copy_tree(mount: Mount, out: Path) -> dict[str, bytes]:
    """``cp -r`` of the mount's studies folder: "<St>/<Se>/<SOP>.dcm" -> the copied bytes."""
    sh("cp", "-r", str(mount.path / "studies"), str(out), timeout=600)
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*.dcm")}


def test_the_tree_is_the_archive_and_every_file_its_stored_instance(
        pacs: Pacs, mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    mount = mount_of(pacs, mount_factory)
    found = sh("find", str(mount.path / "studies"), "-type", "f", timeout=300).stdout.split()
    assert sorted(str(Path(p).relative_to(mount.path / "studies")) for p in found) == sorted(pacs.files)
    copied = copy_tree(mount, tmp_path / "copy")
    assert copied.keys() == pacs.files.keys()
    different = [rel for rel, data in copied.items() if not same_instance(data, pacs.files[rel])]
    assert different == []  # all syntaxes: uncompressed, implicit, big endian, deflate, JPEG, RLE, ...
    syntaxes = {str(pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True).file_meta.TransferSyntaxUID)
                for d in copied.values()}
    assert len(syntaxes) >= 10  # as stored: nothing was transcoded
    assert JPEG_LOSSLESS_SV1 in syntaxes
    for path in sorted((tmp_path / "copy").rglob("*.dcm")):
        dump = subprocess.run(["dcmdump", "-q", str(path)], capture_output=True, timeout=60)
        assert dump.returncode == 0, path
    first = sh("rsync", "-a", "--stats", f"{mount.path}/studies/", f"{tmp_path / 'rsync'}/", timeout=600).stdout
    assert f"Number of regular files transferred: {len(pacs.files)}" in first
    again = sh("rsync", "-a", "--stats", f"{mount.path}/studies/", f"{tmp_path / 'rsync'}/", timeout=600).stdout
    assert "Number of regular files transferred: 0" in again
    mount.stop()
    assert dicomfs("cache", "verify", "--cache-dir", str(mount.cache_dir)).returncode == 0


def test_listing_retrieves_nothing_and_concurrent_readers_share_one_retrieve(
        pacs: Pacs, mount_factory: Callable[..., Mount]) -> None:
    mount = mount_of(pacs, mount_factory, "--readahead", "series")  # (retrieves counted: none ahead)
    before = pacs.retrieves()
    studies = listdir(mount.path / "studies")
    assert set(studies) == {rel.split("/")[0] for rel in pacs.files}
    for study in studies:
        for series in listdir(mount.path / "studies" / study):
            listdir(mount.path / "studies" / study / series)  # names only: no size asked for
    assert pacs.retrieves() == before
    series = max({rel.rsplit("/", 1)[0] for rel in pacs.files},
                 key=lambda s: sum(rel.startswith(s + "/") for rel in pacs.files))
    members = sorted(rel for rel in pacs.files if rel.startswith(series + "/"))
    readers = [subprocess.Popen(["cat", str(mount.path / "studies" / rel)], stdout=subprocess.PIPE)
               for rel in (members[0], members[-1])]
    outputs = [reader.communicate(timeout=120)[0] for reader in readers]
    ends = (members[0], members[-1])
    assert all(same_instance(out, pacs.files[rel]) for out, rel in zip(outputs, ends, strict=True))
    assert pacs.retrieves() == before + 1
    # the listings' associations are kept open a while (at most --max-associations), then released
    assert 1 <= connections_to(pacs.server.dicom_port) <= 2
    wait_until(lambda: connections_to(pacs.server.dicom_port) == 0, 60, "the idle association to be released")


def test_the_static_dicomweb_tree_has_metadata_from_the_retrieved_instances(
        pacs: Pacs, mount_factory: Callable[..., Mount]) -> None:
    mount = mount_of(pacs, mount_factory)
    series = next(rel for rel in pacs.files if rel.startswith(MULLER + "/")).split("/")[1]
    path = mount.path / "dicomweb" / "studies" / MULLER / "series" / series / "metadata.gz"
    metadata = json.loads(gzip.decompress(path.read_bytes()))
    assert sorted(m["00080018"]["Value"][0] for m in metadata) == sorted(
        rel.split("/")[2][:-4] for rel in pacs.of(MULLER))
    assert metadata[0]["00100010"]["Value"][0]["Alphabetic"] == "MÜLLER^HANS"
    index = json.loads(gzip.decompress((mount.path / "dicomweb" / "studies" / "index.json.gz").read_bytes()))
    assert MULLER in {s["0020000D"]["Value"][0] for s in index}


def test_ls_queries_go_to_the_pacs(pacs: Pacs, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    rows = dicomfs("ls", pacs.source, "--cache-dir", cache, "--query", "PatientName=MÜLLER*", "--level", "series",
                   check=True).stdout.splitlines()
    assert len(rows) == 2 and MULLER in rows[1]
    rows = dicomfs("ls", pacs.source, "--cache-dir", cache, "--query", "PatientName=müller*", "--json",
                   check=True).stdout.splitlines()
    assert [json.loads(r)["StudyInstanceUID"] for r in rows] == [MULLER]  # checked again here: any case
    rows = dicomfs("ls", pacs.source, "--cache-dir", cache, "--query", "StudyDate=20240101-20240131",
                   check=True).stdout.splitlines()
    assert len(rows) == 2 and DATED in rows[1]
    both = f"StudyInstanceUID={MULLER},{DATED}"
    rows = dicomfs("ls", pacs.source, "--cache-dir", cache, "--query", both, check=True).stdout.splitlines()
    assert sorted(r.split()[0] for r in rows[1:]) == sorted([MULLER, DATED])
    rows = dicomfs("ls", pacs.source, "--cache-dir", cache, "--query", "PatientName=DATED^PAT?ENT",
                   check=True).stdout.splitlines()
    assert len(rows) == 2 and DATED in rows[1]


def test_refusals_are_one_line_that_says_what_to_change(pacs: Pacs, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    result = dicomfs("ls", pacs.source, "--cache-dir", cache, "--ae-title", "STRANGER")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "rejected the association" in result.stderr and "our AE title 'STRANGER'" in result.stderr
    wrong = pacs.source.replace("ORTHANC@", "NOTORTHANC@")
    result = dicomfs("ls", wrong, "--cache-dir", cache)
    assert result.returncode == 1 and "is not called 'NOTORTHANC'" in result.stderr, result.stderr
    result = dicomfs("ls", f"dimse://ORTHANC@127.0.0.1:{free_port()}", "--cache-dir", cache)
    assert result.returncode == 1 and "cannot reach" in result.stderr and result.stderr.count("\n") == 1
    (tmp_path / "mnt").mkdir()
    result = dicomfs("mount", pacs.source, str(tmp_path / "mnt"), "--cache-dir", cache, "--ae-title", "STRANGER")
    assert result.returncode == 1 and "our AE title 'STRANGER'" in result.stderr


@pytest.fixture
def own_pacs(tmp_path: Path, demo_dir: Path) -> Iterator[Pacs]:
    files = {rel: data for rel, data in archive_files(demo_dir).items() if rel.startswith((MULLER, DATED))}
    found = start_pacs(tmp_path / "pacs", files)
    try:
        yield found
    finally:
        found.server.stop()


def test_an_archive_that_stops_and_comes_back(own_pacs: Pacs, mount_factory: Callable[..., Mount],
                                              tmp_path: Path) -> None:
    # prefetch one study, then the PACS goes away
    run = dicomfs("prefetch", own_pacs.source, "--cache-dir", str(tmp_path / "cache"), "--query",
                  "StudyDate=20240101-20240131", "--jobs", "4", timeout=300)
    assert run.returncode == 0 and "fetched 1 series" in run.stdout, run.stdout + run.stderr
    mount = mount_of(own_pacs, mount_factory)
    assert listdir(mount.path / "studies") == sorted([MULLER, DATED])
    own_pacs.server.stop()
    muller = next(iter(own_pacs.of(MULLER)))
    assert read_errno(mount.path / "studies" / muller) == 5  # not cached: EIO, at once
    dated = own_pacs.of(DATED)
    copied = {rel: (mount.path / "studies" / rel).read_bytes() for rel in dated}  # prefetched: served
    assert all(same_instance(copied[rel], data) for rel, data in dated.items())
    assert mount.alive()
    mount.stop()
    offline = mount_of(own_pacs, mount_factory, name="mnt2")  # an offline start on the stored catalog
    assert all(same_instance((offline.path / "studies" / rel).read_bytes(), data) for rel, data in dated.items())
    own_pacs.server.start()
    wait_until(lambda: read_errno(offline.path / "studies" / muller) == 0, 60, "the PACS to be found back")
    assert same_instance((offline.path / "studies" / muller).read_bytes(), own_pacs.files[muller])


def test_c_get_refused_falls_back_to_c_move(tmp_path: Path, demo_dir: Path,
                                           mount_factory: Callable[..., Mount]) -> None:
    files = {rel: data for rel, data in archive_files(demo_dir).items() if rel.startswith((MULLER, DATED))}
    pacs = start_pacs(tmp_path / "pacs", files, allow_get=False)
    try:
        strict = mount_of(pacs, mount_factory, "--retrieve", "get", name="strict", cache="strict-cache")
        muller = sorted(pacs.of(MULLER))
        assert read_errno(strict.path / "studies" / muller[0]) == 5
        strict.stop()
        mount = mount_of(pacs, mount_factory)
        copied = {rel: (mount.path / "studies" / rel).read_bytes() for rel in sorted(pacs.files)}
        assert all(same_instance(copied[rel], data) for rel, data in pacs.files.items())
        assert mount.log.count("using C-MOVE") == 1
        assert pacs.server.requests("Move") == 2  # one per series, after one refused C-GET
        # Each move ran in a retrieve worker that listened on the move port only while it ran: once
        # both are over (their series committed), the port is free again with the mount still up,
        # and another dicomfs moves through it too.
        wait_until(lambda: mount.log.count(" cached: ") == 2, 60, "both moves to end")
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("", pacs.move_port))  # EADDRINUSE while anything listens on it
        # (a prefetch runs its series side by side: their moves take turns on the one port)
        out = tmp_path / "prefetched"
        result = dicomfs("prefetch", pacs.source, "--all", "--retrieve", "move", "--cache-dir",
                         str(tmp_path / "beside"), "--move-port", str(pacs.move_port), "--to", str(out))
        assert result.returncode == 0, result.stderr
        prefetched = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*.dcm")}
        assert sorted(prefetched) == sorted(pacs.files)
        assert all(same_instance(prefetched[rel], data) for rel, data in pacs.files.items())
        assert pacs.server.requests("Move") == 4
    finally:
        pacs.server.stop()


def certificate(folder: Path, name: str, *extra: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``name`` and its key (openssl)."""
    cert, key = folder / f"{name}.pem", folder / f"{name}-key.pem"
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
       "-days", "2", "-subj", f"/CN={name}", *extra)
    return cert, key


def start_tls_pacs(tmp_path: Path, demo_dir: Path, trusted: list[Path],
                   clients_need_certificates: bool) -> tuple[Pacs, Path, dict[str, bytes]]:
    """A PACS on DICOM TLS with the study DATED: the PACS, its certificate, its files. It trusts
    the client certificates ``trusted``."""
    cert, key = certificate(tmp_path, "127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1")
    bundle = tmp_path / "trusted.pem"
    bundle.write_bytes(b"".join(p.read_bytes() for p in (cert, *trusted)))
    files = {rel: data for rel, data in archive_files(demo_dir).items() if rel.startswith(DATED)}
    pacs = start_pacs(tmp_path / "pacs", files, DicomTlsEnabled=True, DicomTlsCertificate=str(cert),
                      DicomTlsPrivateKey=str(key), DicomTlsTrustedCertificates=str(bundle),
                      DicomTlsRemoteCertificateRequired=clients_need_certificates)
    return pacs, cert, files


def test_dicom_tls(tmp_path: Path, demo_dir: Path) -> None:
    pacs, cert, files = start_tls_pacs(tmp_path, demo_dir, [], clients_need_certificates=False)
    try:
        source = pacs.source.replace("dimse://", "dimse+tls://")
        result = dicomfs("ls", source, "--cache-dir", str(tmp_path / "c1"))
        assert result.returncode == 1 and result.stderr.count("\n") == 1
        assert "TLS certificate is not trusted" in result.stderr and "--tls-ca" in result.stderr
        result = dicomfs("prefetch", source, DATED, "--cache-dir", str(tmp_path / "c2"), "--tls-ca", str(cert))
        assert result.returncode == 0, result.stderr
        result = dicomfs("prefetch", source, DATED, "--cache-dir", str(tmp_path / "c3"), "--tls-ca", str(cert),
                         "--to", str(tmp_path / "out"))
        assert result.returncode == 0, result.stderr
        written = {str(p.relative_to(tmp_path / "out")): p.read_bytes() for p in (tmp_path / "out").rglob("*.dcm")}
        assert written.keys() == files.keys(), (result.stdout, result.stderr)
        assert all(same_instance(written[r], files[r]) for r in files)
    finally:
        pacs.server.stop()


def test_dicom_tls_with_a_client_certificate(tmp_path: Path, demo_dir: Path) -> None:
    """A PACS that requires a TLS client certificate: without one, or with one it does not trust,
    one line says which and what to give; with ours, it serves."""
    ours, our_key = certificate(tmp_path, "dicomfs")
    stranger, stranger_key = certificate(tmp_path, "stranger")
    pacs, server_cert, files = start_tls_pacs(tmp_path, demo_dir, [ours], clients_need_certificates=True)
    try:
        source = pacs.source.replace("dimse://", "dimse+tls://")
        ca = ("--tls-ca", str(server_cert))
        result = dicomfs("ls", source, "--cache-dir", str(tmp_path / "c1"), *ca)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert "requires a TLS client certificate" in result.stderr and "--tls-cert" in result.stderr
        result = dicomfs("ls", source, "--cache-dir", str(tmp_path / "c2"), *ca, "--tls-cert", str(stranger),
                         "--tls-key", str(stranger_key))
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert "does not accept our TLS client certificate" in result.stderr
        result = dicomfs("prefetch", source, DATED, "--cache-dir", str(tmp_path / "c3"), *ca, "--tls-cert", str(ours),
                         "--tls-key", str(our_key), "--to", str(tmp_path / "out"))
        assert result.returncode == 0, result.stderr
        written = {str(p.relative_to(tmp_path / "out")): p.read_bytes() for p in (tmp_path / "out").rglob("*.dcm")}
        assert written.keys() == files.keys() and all(same_instance(written[r], files[r]) for r in files)
    finally:
        pacs.server.stop()


def test_a_series_of_1500_instances(pacs: Pacs, mount_factory: Callable[..., Mount]) -> None:
    series = f"{LARGE}.1"
    files = {f"{LARGE}/{series}/{series}.{n}.dcm": make_instance(LARGE, series, f"{series}.{n}", pixel_bytes=16,
                                                                  number=n) for n in range(1, 1501)}
    pacs.server.upload(list(files.values()))
    mount = mount_of(pacs, mount_factory)
    folder = mount.path / "studies" / LARGE / series
    assert listdir(folder) == sorted(rel.split("/")[2] for rel in files)
    started = time.monotonic()
    out = mount.cache_dir.parent / "large"
    sh("cp", "-r", str(folder), str(out), timeout=600)
    print(f"cp -r of 1,500 instances: {time.monotonic() - started:.1f} s")
    copied = {f"{LARGE}/{series}/{p.name}": p.read_bytes() for p in out.iterdir()}
    assert copied.keys() == files.keys()
    assert all(same_instance(copied[rel], data) for rel, data in files.items())
    shutil.rmtree(out)


def worker_pids(daemon: int) -> set[int]:
    """The daemon's retrieve worker processes."""
    found = set()
    for children in Path(f"/proc/{daemon}/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"dicomfs.sources.dimse.worker" in command:
                found.add(int(pid))
    return found


@pytest.fixture
def slow_pacs(tmp_path: Path) -> Iterator[tuple[Pacs, TcpProxy]]:
    """One series of 24 instances x 256 KiB, behind a proxy that sends what the PACS answers at
    1 MB/s: a retrieve takes about 6 s."""
    series = f"{SLOW}.1"
    files = {f"{SLOW}/{series}/{series}.{n}.dcm": make_instance(SLOW, series, f"{series}.{n}", number=n,
                                                               pixel_bytes=256 * 1024) for n in range(1, 25)}
    pacs = start_pacs(tmp_path / "pacs", files)
    proxy = TcpProxy(pacs.server.dicom_port, rate=1_000_000)
    try:
        yield pacs, proxy
    finally:
        proxy.close()
        pacs.server.stop()


def through(proxy: TcpProxy) -> str:
    return f"dimse://ORTHANC@127.0.0.1:{proxy.port}"


def test_a_retrieve_worker_that_dies_midway_is_replaced_and_the_read_still_succeeds(
        slow_pacs: tuple[Pacs, TcpProxy], mount_factory: Callable[..., Mount]) -> None:
    pacs, proxy = slow_pacs
    mount = mount_factory(through(proxy), "--move-port", str(pacs.move_port))
    last = sorted(pacs.files)[-1]
    reader = subprocess.Popen(["cat", str(mount.path / "studies" / last)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        wait_until(lambda: proxy.connections() >= 2, 60, "the retrieve to start")  # a query's, and the C-GET's
        time.sleep(1.0)  # instances are arriving
        assert mount.pid is not None
        workers = worker_pids(mount.pid)
        assert workers
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        proxy.rate = None
        out, err = reader.communicate(timeout=120)
    finally:
        if reader.poll() is None:
            reader.kill()
    assert reader.returncode == 0, err
    assert same_instance(out, pacs.files[last])
    assert "worker process ended (killed by signal 9); resuming" in mount.log
    assert mount.alive()


def test_a_slow_pacs_is_waited_for_and_a_trickling_one_abandoned(
        slow_pacs: tuple[Pacs, TcpProxy], mount_factory: Callable[..., Mount]) -> None:
    pacs, proxy = slow_pacs
    limits = ("--move-port", str(pacs.move_port), "--timeout", "2", "--min-rate", "200k")
    last = sorted(pacs.files)[-1]
    # 1 MB/s: the worker's progress reports show a working PACS through the whole 6 s retrieve
    steady = mount_factory(through(proxy), *limits, name="steady", cache="steady-cache")
    assert same_instance((steady.path / "studies" / last).read_bytes(), pacs.files[last])
    steady.stop()
    proxy.rate = 20_000
    mount = mount_factory(through(proxy), *limits)
    started = time.monotonic()
    assert read_errno(mount.path / "studies" / last) == 5  # EIO, after the --timeout window
    print(f"abandoned after {time.monotonic() - started:.1f} s")
    assert "--min-rate" in mount.log
    # the worker that ran it was ended (its C-GET cancelled, then aborted), the association with it
    wait_until(lambda: proxy.connections() <= 1, 30, "the retrieve's association to end")  # the query's may stay
    assert mount.alive()


def test_stopping_a_mount_midway_leaves_no_worker_and_no_association(
        slow_pacs: tuple[Pacs, TcpProxy], mount_factory: Callable[..., Mount]) -> None:
    pacs, proxy = slow_pacs
    mount = mount_factory(through(proxy), "--move-port", str(pacs.move_port))
    reader = subprocess.Popen(["cat", str(mount.path / "studies" / sorted(pacs.files)[-1])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: proxy.connections() >= 2, 60, "the retrieve to start")
    assert mount.pid is not None
    workers = worker_pids(mount.pid)
    assert workers
    reader.kill()
    reader.wait(timeout=30)
    mount.stop()
    wait_until(lambda: not any(pid_alive(pid) for pid in workers), 30, "the workers to end")
    wait_until(lambda: proxy.connections() == 0, 30, "every association to end")


def test_what_the_pacs_sends_is_checked_against_its_listing(own_pacs: Pacs,
                                                             mount_factory: Callable[..., Mount]) -> None:
    """Listed but not sent: EIO for that file, the rest served. Sent but not listed: dropped, with
    a log line."""
    mount = mount_of(own_pacs, mount_factory)
    folder = mount.path / "studies" / MULLER / f"{MULLER}.1"
    names = listdir(folder)  # the listing: three instances
    gone, kept = f"{MULLER}.1.2", f"{MULLER}.1.3"
    own_pacs.server.delete_instance(gone)
    own_pacs.server.upload([make_instance(MULLER, f"{MULLER}.1", f"{MULLER}.1.9", number=9,
                                          patient="MÜLLER^HANS", study_date="20230505")])
    assert names == sorted(f"{MULLER}.1.{n}.dcm" for n in (1, 2, 3))
    kept_rel = f"{MULLER}/{MULLER}.1/{kept}.dcm"
    assert same_instance((folder / f"{kept}.dcm").read_bytes(), own_pacs.files[kept_rel])
    assert read_errno(folder / f"{gone}.dcm") == 5
    assert f"the PACS sent instance '{MULLER}.1.9', which its listing did not name: dropped" in mount.log
    assert mount.alive()


def test_readable_views_of_a_pacs_list_without_retrieving(pacs: Pacs, mount_factory: Callable[..., Mount],
                                                          tmp_path: Path) -> None:
    """patients/ and dates/ come from C-FIND alone; their files are the studies/ files (one inode
    each); ls and dicomweb/ compute the same counts and modalities."""
    before = pacs.retrieves()
    mount = mount_of(pacs, mount_factory)
    found = {view: sh("find", str(mount.path / view), "-name", "*.dcm", "-printf", "%P\\n").stdout.splitlines()
             for view in ("studies", "patients", "dates")}
    assert pacs.retrieves() == before, "listing the views retrieved instances"
    # (earlier tests of this module may have added instances to the PACS: count what it lists)
    assert len(found["studies"]) == len(found["patients"]) == len(found["dates"]) >= len(pacs.files)
    assert any(p.startswith("MÜLLER HANS (TEST-1)/2023-05-05 ") for p in found["patients"]), found["patients"]
    inodes = {view: sorted(int(i) for i in sh("find", str(mount.path / view), "-name", "*.dcm", "-printf",
                                              "%i\\n").stdout.split()) for view in ("studies", "patients")}
    assert inodes["studies"] == inodes["patients"]
    index = json.loads(gzip.decompress((mount.path / "dicomweb/studies/index.json.gz").read_bytes()))
    rows = [json.loads(line) for line in dicomfs("ls", pacs.source, "--json", "--cache-dir", str(tmp_path / "ls"),
                                                 check=True).stdout.splitlines()]
    web = {s["0020000D"]["Value"][0]: s for s in index}
    assert sorted(web) == sorted(r["StudyInstanceUID"] for r in rows)
    for row in rows:
        study = web[row["StudyInstanceUID"]]
        assert (row["ModalitiesInStudy"], row["Series"], row["Instances"]) == (
            study["00080061"].get("Value"), study["00201206"]["Value"][0], study["00201208"]["Value"][0])


def test_serve_of_a_dimse_pacs(pacs: Pacs, tmp_path: Path) -> None:
    """``dicomfs serve`` of the PACS: searches find what it holds, a series retrieve is its stored
    instances (element by element: DIMSE sends its own encoding), a frame is pydicom's."""
    with DicomfsServe(pacs.source, tmp_path / "serve", "--move-port", str(pacs.move_port)) as server:
        client = DICOMwebClient(server.root)
        # what the PACS holds now (other tests of this module store more in it), as Orthanc says
        theirs = DICOMwebClient(pacs.server.dicomweb)
        for filters in ({}, {"StudyDate": "20240101-20240131"}):
            found = {value(s["0020000D"])[0] for s in client.search_for_studies(search_filters=filters)}
            assert found == {value(s["0020000D"])[0] for s in theirs.search_for_studies(search_filters=filters)}
            assert found >= ({DATED} if filters else {rel.split("/")[0] for rel in pacs.files})
        rel, original = next((r, d) for r, d in sorted(pacs.files.items())
                             if "Rows" in pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True))
        study, series, _ = rel.split("/")
        expected = {r: d for r, d in pacs.files.items() if r.startswith(f"{study}/{series}/")}
        answer = httpx.get(f"{server.root}/studies/{study}/series/{series}", timeout=300,
                           headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        got = {rel_of(data): data for _, data in parts(answer)}
        assert got.keys() == expected.keys()
        assert all(same_instance(got[r], expected[r]) for r in got)
        ds = pydicom.dcmread(io.BytesIO(original), stop_before_pixels=True)
        reference = tmp_path / "original.dcm"
        reference.write_bytes(original)
        _, frames = reference_frames(reference)
        assert client.retrieve_instance_frames(study, series, str(ds.SOPInstanceUID), [1],
                                               media_types=(("application/octet-stream", "*"),)) == frames[:1]
