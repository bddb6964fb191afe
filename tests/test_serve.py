"""``dicomfs serve``: a real server process read by the real dicomweb-client and by raw HTTP, against
the source files (hashes, pydicom's frames), Orthanc's own answers and dicomfs's own ``ls``."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from tests.cod_bucket import BUCKET, Bucket, mount_env
from tests.factory import make_instance, write_slide
from tests.mounting import dicomfs
from tests.reference import KEY_TAGS, parts, reference_frames, source_files, value
from tests.servers import DicomfsServe, OrthancServer, free_port, peak_rss_mb, wait_until

pytestmark = pytest.mark.mount

STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ANY_FRAME = "multipart/related; type=application/octet-stream; transfer-syntax=*"


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., DicomfsServe]]:
    servers: list[DicomfsServe] = []

    def make(source: str, *extra: str, env: dict[str, str] | None = None) -> DicomfsServe:
        server = DicomfsServe(source, tmp_path / f"serve{len(servers)}", *extra, env=env)
        servers.append(server)
        return server.start()

    yield make
    for server in reversed(servers):
        server.stop()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def by_series(demo_expected: dict[str, str]) -> dict[tuple[str, str], dict[str, str]]:
    """(study, series) -> {sop: sha256} of the demo's source files."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    for rel, digest in demo_expected.items():
        _, study, series, name = rel.split("/")
        out.setdefault((study, series), {})[name.removesuffix(".dcm")] = digest
    return out


def ls_uids(source: str, cache: Path, level: str, *query: str) -> set[str]:
    """dicomfs's own ``ls`` of the same archive: the UIDs it finds at ``level``."""
    args = [a for q in query for a in ("--query", q)]
    out = dicomfs("ls", source, "--cache-dir", str(cache), "--json", "--level", level, *args).stdout
    key = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID", "instance": "SOPInstanceUID"}[level]
    return {json.loads(line)[key] for line in out.splitlines()}


def uids(objects: list[dict[str, Any]], tag: str) -> set[str]:
    return {value(o[tag])[0] for o in objects}


# --- the demo: searches, retrieves, frames, metadata --------------------------------------------
def test_demo_searches_equal_dicomfs_ls(serve: Callable[..., DicomfsServe], demo_expected: dict[str, str],
                                        tmp_path: Path) -> None:
    server = serve("demo")
    client = DICOMwebClient(server.root)
    studies = {rel.split("/")[1] for rel in demo_expected}
    assert uids(client.search_for_studies(), "0020000D") == studies
    for query in (["PatientName=Doe*"], ["StudyDate=20030101-20031231"], ["PatientName=doe^peter"],
                  ["Modality=CT"], ["PatientID=98890234", "StudyDescription=Brain*"], ["PatientName=Nobody"]):
        filters = dict(q.split("=", 1) for q in query)
        theirs = ls_uids("demo", tmp_path / "ls-cache", "study", *query)
        assert uids(client.search_for_studies(search_filters=filters), "0020000D") == theirs, query
    # ModalitiesInStudy (what OHIF's modality filter sends), which a folder's listings never carry:
    # matched on the studies' own 00080061, by ls alike; a list matches any of its values
    with_ct = ls_uids("demo", tmp_path / "ls-cache", "study", "Modality=CT")
    assert with_ct and ls_uids("demo", tmp_path / "ls-cache", "study", "ModalitiesInStudy=CT") == with_ct
    assert uids(client.search_for_studies(search_filters={"ModalitiesInStudy": "CT"}), "0020000D") == with_ct
    objects = client.search_for_studies()
    assert {o["0020000D"]["Value"][0] for o in objects if "CT" in o["00080061"].get("Value", [])} == with_ct
    with_mr_or_ct = ls_uids("demo", tmp_path / "ls-cache", "study", "ModalitiesInStudy=MR\\CT")
    assert with_mr_or_ct > with_ct
    assert uids(client.search_for_studies(search_filters={"ModalitiesInStudy": "MR\\CT"}), "0020000D") == with_mr_or_ct
    # series and instances, in a study and everywhere
    series = ls_uids("demo", tmp_path / "ls-cache", "series", "Modality=MR")
    assert uids(client.search_for_series(search_filters={"Modality": "MR"}), "0020000E") == series
    study = sorted(studies)[0]
    in_study = {rel.split("/")[2] for rel in demo_expected if rel.split("/")[1] == study}
    assert uids(client.search_for_series(study), "0020000E") == in_study
    instances = {rel.split("/")[3].removesuffix(".dcm") for rel in demo_expected if rel.split("/")[1] == study}
    assert uids(client.search_for_instances(study), "00080018") == instances
    assert uids(client.search_for_instances(), "00080018") == {
        rel.split("/")[3].removesuffix(".dcm") for rel in demo_expected}
    # paging: pages in order add up to the whole, without repeats
    everything = [value(s["0020000D"])[0] for s in client.search_for_studies()]
    paged = [value(s["0020000D"])[0] for offset in range(0, len(everything), 3)
             for s in client.search_for_studies(limit=3, offset=offset)]
    assert paged == everything
    # includefield=all: every attribute the catalog holds (for a folder, the QIDO ones)
    plain = client.search_for_series(study)[0]
    assert set(client.search_for_series(study, fields=["all"])[0]) >= set(plain)
    # fuzzy matching: a name component's start, any case
    fuzzy = client.search_for_studies(search_filters={"PatientName": "arch"}, fuzzymatching=True)
    assert uids(fuzzy, "0020000D") == ls_uids("demo", tmp_path / "ls-cache", "study", "PatientName=*Archibald*")
    assert uids(client.search_for_studies(search_filters={"PatientName": "arch"}), "0020000D") == set()


def test_demo_retrieves_are_the_source_bytes(serve: Callable[..., DicomfsServe],
                                             demo_expected: dict[str, str]) -> None:
    server = serve("demo")
    expected = by_series(demo_expected)
    with httpx.Client(base_url=server.root, timeout=60) as http:
        for (study, series), instances in expected.items():
            got = parts(http.get(f"/studies/{study}/series/{series}", headers={"Accept": STORED}))
            assert sorted(sha(data) for _, data in got) == sorted(instances.values()), series
            assert all(t.startswith("application/dicom; transfer-syntax=1.2.840.10008.") for t, _ in got)
            sop, digest = next(iter(instances.items()))
            one = http.get(f"/studies/{study}/series/{series}/instances/{sop}", headers={"Accept": STORED})
            assert [sha(data) for _, data in parts(one)] == [digest]
            single = http.get(f"/studies/{study}/series/{series}/instances/{sop}",
                              headers={"Accept": "application/dicom"})
            assert single.headers["content-type"] == "application/dicom" and sha(single.content) == digest
        study = next(iter(expected))[0]
        whole = parts(http.get(f"/studies/{study}", headers={"Accept": STORED}))
        assert sorted(sha(d) for _, d in whole) == sorted(
            digest for (st, _), instances in expected.items() if st == study for digest in instances.values())
    # and through the Python client, parsed
    client = DICOMwebClient(server.root)
    (study, series), instances = next(iter(expected.items()))
    datasets = client.retrieve_series(study, series)
    assert {str(ds.SOPInstanceUID) for ds in datasets} == set(instances)


def test_demo_frames_are_pydicoms(serve: Callable[..., DicomfsServe], demo_dir: Path) -> None:
    server = serve("demo")
    client = DICOMwebClient(server.root)
    checked = multi = 0
    for sop, path in sorted(source_files(demo_dir).items()):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if "PixelData" not in pydicom.dcmread(path):
            continue
        syntax, expected = reference_frames(path)
        study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        for number, frame in enumerate(expected, 1):
            got = client.retrieve_instance_frames(study, series, sop, frame_numbers=[number],
                                                  media_types=(("application/octet-stream", "*"),))
            assert got == [frame], (path.name, number)
            checked += 1
        if len(expected) > 1:  # a comma list: one part per frame, in the order asked
            order = list(range(len(expected), 0, -1))
            got = client.retrieve_instance_frames(study, series, sop, frame_numbers=order,
                                                  media_types=(("application/octet-stream", "*"),))
            assert got == [expected[n - 1] for n in order], path.name
            # the pixel data's BulkDataURI (relative to the study): every frame
            meta = client.retrieve_instance_metadata(study, series, sop)
            every = httpx.get(f"{server.root}/studies/{study}/{meta['7FE00010']['BulkDataURI']}",
                              headers={"Accept": ANY_FRAME}, timeout=60)
            assert [data for _, data in parts(every)] == expected, path.name
            multi += 1
        response = httpx.get(f"{server.root}/studies/{study}/series/{series}/instances/{sop}/frames/1",
                             headers={"Accept": ANY_FRAME})
        [(content_type, _)] = parts(response)
        assert content_type.endswith(f";transfer-syntax={syntax}"), content_type
    assert checked >= 20 and multi >= 1


def test_a_large_instance_is_served_without_holding_it_in_memory(serve: Callable[..., DicomfsServe],
                                                                 tmp_path: Path) -> None:
    """A 2 GB slide's tile costs a pass over the slide, not the slide in memory three times over
    (its bytes, pydicom's copy, the frames): frames (alone, last, a comma list), the instance's
    metadata and its bulk data from two ~190 MB instances, encapsulated and native, while the
    server's peak RSS grows by less than half of one of them."""
    folder = tmp_path / "slides"
    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    sops = {write_slide(folder / "jpeg.dcm", study, series, encapsulated=True, frames=3000, frame_bytes=65536,
                        number=1): folder / "jpeg.dcm",
            write_slide(folder / "native.dcm", study, series, encapsulated=False, frames=760,
                        frame_bytes=512 * 512, number=2): folder / "native.dcm"}
    smallest = min(path.stat().st_size for path in sops.values())
    assert smallest > 180 << 20
    server = serve(str(folder))
    assert server.process is not None
    pid = server.process.pid
    client = DICOMwebClient(server.root)
    assert {v["00080018"]["Value"][0] for v in client.search_for_instances(study, series)} == set(sops)
    before = peak_rss_mb(pid)
    for sop, path in sops.items():
        ds = pydicom.dcmread(path)
        _, expected = reference_frames(path)
        meta = client.retrieve_instance_metadata(study, series, sop)
        assert int(meta["00280008"]["Value"][0]) == len(expected)
        for numbers in ([1], [len(expected)], [len(expected) // 2, 2, len(expected) - 1]):
            got = client.retrieve_instance_frames(study, series, sop, frame_numbers=numbers,
                                                  media_types=(("application/octet-stream", "*"),))
            assert got == [expected[n - 1] for n in numbers], (path.name, numbers)
        uri = meta["00480105"]["Value"][0]["00282000"]["BulkDataURI"]
        icc = httpx.get(f"{server.root}/studies/{study}/{uri}", headers={"Accept": "application/octet-stream"},
                        timeout=60)
        assert icc.status_code == 200 and icc.content == ds.OpticalPathSequence[0].ICCProfile
        del ds, expected
    grown = peak_rss_mb(pid) - before
    assert grown < smallest / 2 / (1 << 20), f"peak RSS grew by {grown:.0f} MB serving {smallest >> 20} MB instances"


# --- Orthanc and a COD bucket -----------------------------------------------------------------------
def test_orthanc_through_serve(serve: Callable[..., DicomfsServe], orthanc: OrthancServer,
                               demo_expected: dict[str, str], tmp_path: Path) -> None:
    server = serve(orthanc.dicomweb)
    ours, theirs = DICOMwebClient(server.root), DICOMwebClient(orthanc.dicomweb)
    # (dicomweb-client percent-encodes "*", which Orthanc reads literally: wildcards only against ls)
    for filters in ({}, {"PatientID": "98890234"}, {"StudyDate": "20010101-20031231"}, {"PatientName": "Doe*"}):
        found = uids(ours.search_for_studies(search_filters=filters), "0020000D")
        assert found == ls_uids(orthanc.dicomweb, tmp_path / "ls", "study", *(f"{k}={v}" for k, v in filters.items()))
        assert found
        if "*" not in str(filters):
            assert found == uids(theirs.search_for_studies(search_filters=filters), "0020000D")
    expected = by_series(demo_expected)
    for (study, series), instances in expected.items():
        mine = {value(m["00080018"])[0]: m for m in ours.retrieve_series_metadata(study, series)}
        reference = {value(m["00080018"])[0]: m for m in theirs.retrieve_series_metadata(study, series)}
        assert set(mine) == set(reference) == set(instances)
        for sop, meta in mine.items():
            for tag in KEY_TAGS:
                assert value(meta.get(tag)) == value(reference[sop].get(tag)), (sop, tag)
        got = parts(httpx.get(f"{server.root}/studies/{study}/series/{series}", headers={"Accept": STORED},
                              timeout=60))
        assert sorted(sha(d) for _, d in got) == sorted(instances.values())  # Orthanc keeps what was uploaded


def test_cod_bucket_through_serve(serve: Callable[..., DicomfsServe], bucket: Bucket,
                                  demo_expected: dict[str, str], demo_dir: Path) -> None:
    server = serve(f"gs://{BUCKET}/v2/dicomweb", env=mount_env(bucket))
    client = DICOMwebClient(server.root)
    expected = by_series(demo_expected)
    assert uids(client.search_for_studies(), "0020000D") == {study for study, _ in expected}
    for (study, series), instances in expected.items():
        got = parts(httpx.get(f"{server.root}/studies/{study}/series/{series}", headers={"Accept": STORED},
                              timeout=120))
        assert sorted(sha(d) for _, d in got) == sorted(instances.values()), series
    # a frame cut from the tar, as pydicom cuts it from the source file
    sop, path = next((sop, p) for sop, p in sorted(source_files(demo_dir).items()) if "Rows" in
                     pydicom.dcmread(p, stop_before_pixels=True))
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    _, frames = reference_frames(path)
    assert client.retrieve_instance_frames(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), sop, [1],
                                           media_types=(("application/octet-stream", "*"),)) == frames[:1]


# --- HTTP, done properly ----------------------------------------------------------------------------
def first_frame_url(server: DicomfsServe, demo_dir: Path) -> str:
    for path in sorted(demo_dir.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if "Rows" in ds and int(ds.get("NumberOfFrames") or 1) == 1:
            return (f"{server.root}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
                    f"{ds.SOPInstanceUID}/frames/1")
    raise AssertionError("no single-frame image in the demo")


def test_http_semantics(serve: Callable[..., DicomfsServe], demo_dir: Path) -> None:
    server = serve("demo", "--cors-origin", "http://viewer.example")
    frame_url = first_frame_url(server, demo_dir)
    with httpx.Client(timeout=60) as http:
        whole = http.get(frame_url, headers={"Accept": ANY_FRAME})
        assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
        assert "immutable" in whole.headers["cache-control"]
        # Range: one range cut from the body, the end clamped; beyond the end 416
        size = len(whole.content)
        cut = http.get(frame_url, headers={"Accept": ANY_FRAME, "Range": "bytes=10-99"})
        assert cut.status_code == 206 and cut.content == whole.content[10:100]
        assert cut.headers["content-range"] == f"bytes 10-99/{size}"
        tail = http.get(frame_url, headers={"Accept": ANY_FRAME, "Range": "bytes=-20"})
        assert tail.status_code == 206 and tail.content == whole.content[-20:]
        beyond = http.get(frame_url, headers={"Accept": ANY_FRAME, "Range": f"bytes={size}-"})
        assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{size}"
        # ETag and If-None-Match
        etag = whole.headers["etag"]
        again = http.get(frame_url, headers={"Accept": ANY_FRAME, "If-None-Match": etag})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
        # gzip: the stored gzip bytes as they are when accepted, decoded otherwise
        zipped = http.get(f"{server.root}/studies", headers={"Accept-Encoding": "gzip"})
        assert zipped.headers["content-encoding"] == "gzip" and "no-cache" in zipped.headers["cache-control"]
        raw = http.get(f"{server.root}/studies", headers={"Accept-Encoding": "identity"})
        assert "content-encoding" not in raw.headers
        assert json.loads(raw.content) == json.loads(zipped.content)  # (httpx decoded the gzip one)
        assert raw.headers["etag"] != zipped.headers["etag"]
        conn = http_request(server.port, "GET", "/dicomweb/studies", {"Accept-Encoding": "gzip"})
        assert json.loads(gzip.decompress(conn[2])) == json.loads(raw.content)
        # HEAD: the headers of GET, no body
        head = http.head(frame_url, headers={"Accept": ANY_FRAME})
        assert head.status_code == 200 and head.content == b"" and head.headers["etag"] == etag
        # CORS: a preflight for the configured origin; nothing for others
        preflight = http.options(frame_url, headers={"Origin": "http://viewer.example",
                                                     "Access-Control-Request-Method": "GET",
                                                     "Access-Control-Request-Headers": "accept, range"})
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "http://viewer.example"
        assert "GET" in preflight.headers["access-control-allow-methods"]
        assert preflight.headers["access-control-allow-headers"] == "accept, range"
        simple = http.get(f"{server.root}/studies", headers={"Origin": "http://viewer.example"})
        assert simple.headers["access-control-allow-origin"] == "http://viewer.example"
        other = http.get(f"{server.root}/studies", headers={"Origin": "http://elsewhere.example"})
        assert "access-control-allow-origin" not in other.headers


def http_request(port: int, method: str, path: str, headers: dict[str, str] | None = None,
                 body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """A raw HTTP request (no client-side normalisation of the path or the encoding)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, text in (headers or {}).items():
            conn.putheader(name, text)
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_bad_requests_are_4xx_and_the_server_keeps_serving(serve: Callable[..., DicomfsServe],
                                                           demo_expected: dict[str, str]) -> None:
    server = serve("demo")
    rel = next(iter(demo_expected))
    _, study, series, name = rel.split("/")
    unknown = "1.2.3.4.5.6.7.8.9"
    cases = [
        ("GET", f"/dicomweb/studies/{unknown}/series", {}, 404),
        ("GET", f"/dicomweb/studies/{study}/series/{unknown}/metadata", {}, 404),
        ("GET", f"/dicomweb/studies/{study}/series/{series}/instances/{unknown}/frames/1", {}, 404),
        ("GET", f"/dicomweb/studies/{study}/series/{series}/instances/{name[:-4]}/frames/0", {}, 404),
        ("GET", f"/dicomweb/studies/{study}/series/{series}/instances/{name[:-4]}/frames/99999", {}, 404),
        ("GET", "/dicomweb/studies/index.json.gz", {}, 404),  # the static tree's own files: no URLs here
        ("GET", f"/dicomweb/studies/{study}/series/index.json.gz", {}, 404),
        ("GET", f"/dicomweb/studies/{study}/series/{series}/instances/index.json.gz", {}, 404),
        ("HEAD", "/dicomweb/studies/index.json.gz", {}, 404),
        ("GET", "/dicomweb/studies?NoSuchKeyword=1", {}, 400),
        ("GET", "/dicomweb/studies?StudyDate=soon-later", {}, 400),
        ("GET", "/dicomweb/studies?StudyDate=2024-01", {}, 400),
        ("GET", "/dicomweb/studies?StudyDate=20991231-20240101", {}, 200),  # (OHIF's, for a future start): []
        ("GET", "/dicomweb/studies?limit=-5", {}, 400),
        ("GET", "/dicomweb/studies?limit=99999999999999999999", {}, 400),
        ("GET", "/dicomweb/studies?offset=abc", {}, 400),
        ("GET", "/dicomweb/../../etc/passwd", {}, 404),
        ("GET", "/dicomweb/studies/..%2F..%2Fetc%2Fpasswd", {}, 404),
        ("GET", "/etc/passwd", {}, 404),
        ("GET", "/", {}, 404),
        ("GET", "/dicomweb/studies", {"Accept": "text/html"}, 406),
        ("GET", f"/dicomweb/studies/{study}/series/{series}",
         {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'}, 406),
        ("POST", "/dicomweb/studies", {"Content-Type": "application/dicom"}, 405),
        ("DELETE", f"/dicomweb/studies/{study}", {}, 405),
        ("PUT", f"/dicomweb/studies/{study}", {}, 405),
        ("GET", "/dicomweb/studies", {"X-Huge": "x" * 65536}, 431),
    ]
    for method, path, headers, status in cases:
        got, response_headers, body = http_request(server.port, method, path, headers,
                                                   b"x" if method == "POST" else None)
        assert got == status, (method, path[:80], got, body[:200])
        if got >= 400 and got != 431 and method != "HEAD":  # (hypercorn refuses an oversized head itself)
            assert body.count(b"\n") == 1 and len(body) < 600, body  # one line that says why
        if got == 405:
            assert response_headers["allow"] == "GET, HEAD, OPTIONS"
    # it still answers
    assert httpx.get(f"{server.root}/studies", timeout=30).status_code == 200
    assert server.process is not None and server.process.poll() is None


def test_command_errors_are_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "dicomfs", "serve", "demo", "--port", str(port),
                                 "--cache-dir", str(tmp_path / "c")], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [
            f"dicomfs: error: cannot listen on 127.0.0.1:{port}: Address already in use"], result.stderr
    for args, message in (([ "--viewer", str(tmp_path)], "no index.html there"),
                          (["--cors-origin", "not an origin"], "is not an origin"),
                          (["--port", "70000"], "invalid port")):
        result = subprocess.run([sys.executable, "-m", "dicomfs", "serve", "demo", "--port", str(free_port()),
                                 "--cache-dir", str(tmp_path / "c"), *args], capture_output=True, text=True,
                                timeout=120)
        last = result.stderr.strip().splitlines()[-1]  # (argparse prints its usage above)
        assert result.returncode == 2 and message in last and "Traceback" not in result.stderr, (args, result.stderr)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_request_bodies_are_read_and_their_connections_closed(serve: Callable[..., DicomfsServe]) -> None:
    """Nothing here takes a body, but one must still be read: hypercorn hands it over through a
    queue of a few pieces, and a connection whose body nobody read was never closed (a STOW-RS
    attempt left one behind each time)."""
    server = serve("demo")
    assert server.process is not None
    assert http_request(server.port, "GET", "/dicomweb/studies")[0] == 200  # (what a first request opens)
    before = open_fds(server.process.pid)
    body = b"x" * (4 << 20)
    for _ in range(20):
        status, _, _ = http_request(server.port, "POST", "/dicomweb/studies",
                                    {"Content-Type": "application/dicom", "Content-Length": str(len(body))}, body)
        assert status == 405
    status, _, _ = http_request(server.port, "GET", "/dicomweb/studies", {"Content-Length": str(len(body))}, body)
    assert status == 200  # (a GET with a body)

    def pieces() -> Iterator[bytes]:  # (a streamed body: no Content-Length)
        for _ in range(64):
            yield b"x" * (64 << 10)

    with httpx.Client(http1=False, http2=True, timeout=60) as h2:  # HTTP/2 with prior knowledge
        for _ in range(5):
            answer = h2.post(f"{server.root}/studies", content=pieces())
            assert answer.http_version == "HTTP/2" and answer.status_code == 405
    wait_until(lambda: open_fds(server.process.pid) <= before + 2, 30,  # type: ignore[union-attr]
               "the server to close the connections")  # (hypercorn closes one 5 s after its client did)


def test_a_client_that_stops_reading_is_disconnected(serve: Callable[..., DicomfsServe], tmp_path: Path) -> None:
    """A client that takes none of a large answer's bytes holds its request only for
    ``--send-timeout``; meanwhile the server answers others, and SIGTERM ends it (before, the
    stalled send held the server's shutdown for good)."""
    folder = tmp_path / "big"
    folder.mkdir()
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    (folder / "big.dcm").write_bytes(make_instance(study, series, sop, pixel_bytes=48 << 20))
    server = serve(str(folder), "--send-timeout", "2")
    assert server.process is not None
    with socket.socket() as stalled:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (a small window, filled at once)
        stalled.settimeout(30)
        stalled.connect(("127.0.0.1", server.port))
        stalled.sendall(f"GET /dicomweb/studies/{study}/series/{series}/instances/{sop} HTTP/1.1\r\n"
                        f"Host: 127.0.0.1\r\nAccept: {STORED}\r\n\r\n".encode())
        assert stalled.recv(1) == b"H"  # the answer began; from here on nothing is read
        assert httpx.get(f"{server.root}/studies", timeout=30).status_code == 200  # others are answered
        time.sleep(1)
        server.process.terminate()
        assert server.process.wait(timeout=60) == 0
    wait_until(lambda: "stopping" in server.log, 10, "the stop to be logged")


def test_serve_stops_on_sigterm(serve: Callable[..., DicomfsServe]) -> None:
    server = serve("demo")
    assert server.process is not None
    server.process.terminate()
    assert server.process.wait(timeout=30) == 0
    wait_until(lambda: "stopping" in server.log, 10, "the stop to be logged")


# --- the viewer's files -------------------------------------------------------------------------------
def test_viewer_files_and_their_config(serve: Callable[..., DicomfsServe], tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text("<!doctype html><title>viewer</title>")
    (dist / "assets" / "app.js").write_text("console.log(1)")
    (dist / "escape").symlink_to("/etc")
    server = serve("demo", "--viewer", str(dist))
    base = f"http://127.0.0.1:{server.port}"
    with httpx.Client(timeout=30) as http:
        assert http.get(f"{base}/").text.startswith("<!doctype html>")
        script = http.get(f"{base}/assets/app.js")
        assert script.text == "console.log(1)" and script.headers["content-type"] == "text/javascript"
        config = http.get(f"{base}/app-config.js")
        assert "window.config" in config.text and "'/dicomweb'" in config.text
        assert "omitQuotationForMultipartRequest: true" in config.text
        route = http.get(f"{base}/viewer?StudyInstanceUIDs=1.2.3")  # the app's own route
        assert route.status_code == 200 and route.text.startswith("<!doctype html>")
        assert http.get(f"{base}/assets/missing.js").status_code == 404
        assert http.get(f"{base}/studies").status_code == 200  # an app route, not DICOMweb
    for path in ("/escape/passwd", "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/assets/../../secret.js"):
        status, _, body = http_request(server.port, "GET", path)
        assert status == 404 and b"root:" not in body, path
