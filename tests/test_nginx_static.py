"""nginx with docs/nginx/dicomweb.conf serves a static DICOMweb tree to real DICOMweb clients.

The tree is written here by hand (gzip'd DICOM JSON, hand-made ``.mht`` frame bodies, raw bulk
data), in the layout of specs/static-dicomweb.md, and read back through the Debian nginx with the
documented server block (tests/nginx.py) by ``dicomweb_client`` and by plain HTTP. Nothing is
mocked and nothing is skipped: without nginx these tests fail.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient

from dicomfs import frames
from tests.nginx import DOCUMENTED_CONFIG, serve_static_tree

pytestmark = pytest.mark.mount  # real servers, processes or mounts (see conftest)

BOUNDARY = "dicomfs-frame-3c9e1f0b7a5d4e28"
FRAME_CONTENT_TYPE = f'multipart/related; type="application/octet-stream"; boundary={BOUNDARY}'
EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG_LS = "1.2.840.10008.1.2.4.80"
TIMEOUT = 10.0

STUDY = "1.2.826.0.1.3680043.8.498.10"
OTHER_STUDY = "1.2.826.0.1.3680043.8.498.20"
SERIES = "1.2.826.0.1.3680043.8.498.10.1"
NATIVE = "1.2.826.0.1.3680043.8.498.10.1.1"  # one native frame
JLS = "1.2.826.0.1.3680043.8.498.10.1.2"  # two JPEG-LS frames
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def ui(*values: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": list(values)}


def cs(*values: str) -> dict[str, Any]:
    return {"vr": "CS", "Value": list(values)}


def us(value: int) -> dict[str, Any]:
    return {"vr": "US", "Value": [value]}


def integer(value: int) -> dict[str, Any]:
    return {"vr": "IS", "Value": [value]}


def study_object(uid: str, patient: str, patient_id: str) -> dict[str, dict[str, Any]]:
    return {"00080020": {"vr": "DA", "Value": ["20240102"]}, "00080061": cs("MR"),
            "00081030": {"vr": "LO", "Value": [f"study {uid[-2:]}"]},
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": patient}]},
            "00100020": {"vr": "LO", "Value": [patient_id]}, "0020000D": ui(uid),
            "00201206": integer(1), "00201208": integer(2)}


def instance_metadata(sop: str, syntax: str, number_of_frames: int, bulk: str) -> dict[str, dict[str, Any]]:
    return {"00080016": ui(MR_STORAGE), "00080018": ui(sop), "00080060": cs("MR"),
            "00083002": ui(syntax), "0020000D": ui(STUDY), "0020000E": ui(SERIES),
            "00200013": integer(1 if sop == NATIVE else 2), "00280002": us(1), "00280004": cs("MONOCHROME2"),
            "00280008": integer(number_of_frames), "00280010": us(8), "00280011": us(8), "00280100": us(16),
            "00281050": {"vr": "DS", "Value": [40]},
            "00282000": {"vr": "OB", "BulkDataURI": bulk},
            "7FE00010": {"vr": "OW" if syntax == EXPLICIT_LE else "OB",
                         "BulkDataURI": f"series/{SERIES}/instances/{sop}/frames"}}


def frame_file(frame: bytes, media_type: str, syntax: str) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Type: {media_type};transfer-syntax={syntax}\r\n\r\n".encode()
            + frame + f"\r\n--{BOUNDARY}--\r\n".encode())


@dataclass
class Tree:
    root: Path  # the "mount point": the tree is root/dicomweb
    studies: list[dict[str, dict[str, Any]]]
    series: list[dict[str, dict[str, Any]]]
    instances: list[dict[str, dict[str, Any]]]
    metadata: list[dict[str, dict[str, Any]]]  # the series metadata: every instance's full DICOM JSON
    frames: dict[tuple[str, int], bytes]  # (sop, n) -> frame bytes
    bulk: dict[str, bytes]  # URL path below dicomweb/ -> bytes

    def file(self, relative: str) -> bytes:
        return (self.root / "dicomweb" / relative).read_bytes()


def write_gz(path: Path, document: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(json.dumps(document).encode(), mtime=0))


def build_tree(root: Path) -> Tree:
    rng = random.Random(1729)
    # Frame bytes that contain what a careless multipart parser trips over: CRLFs, a blank line,
    # a dash-dash, and a boundary-like string that is not the boundary.
    trap = b"\r\n\r\n--dicomfs-frame\r\n"
    native = rng.randbytes(60) + trap + rng.randbytes(128 - 60 - len(trap))  # 8 x 8 x 16 bits
    jls = [b"\xff\xd8\xff\xf7" + rng.randbytes(300) + b"\r\n--\r\n\r\n" + rng.randbytes(50) + b"\xff\xd9",
           b"\xff\xd8\xff\xf7" + rng.randbytes(411) + b"\xff\xd9"]
    assert len(native) == 128 and BOUNDARY.encode() not in native + b"".join(jls)
    bulk = {f"studies/{STUDY}/bulkdata/{SERIES}/{NATIVE}/00282000": rng.randbytes(5000),
            f"studies/{STUDY}/bulkdata/{SERIES}/{JLS}/0040A730.0.00282000": rng.randbytes(777)}
    bulk_uris = [path.split(f"studies/{STUDY}/", 1)[1] for path in bulk]

    studies = [study_object(STUDY, "Doe^Jane", "P1"), study_object(OTHER_STUDY, "Roe^Richard", "P2")]
    series = [{"00080060": cs("MR"), "0008103E": {"vr": "LO", "Value": ["axial"]}, "0020000E": ui(SERIES),
               "00200011": integer(3), "00201209": integer(2)}]
    instances = [{"00080016": ui(MR_STORAGE), "00080018": ui(sop), "00200013": integer(number),
                  "00280008": integer(count)} for sop, number, count in ((NATIVE, 1, 1), (JLS, 2, 2))]
    metadata = [instance_metadata(NATIVE, EXPLICIT_LE, 1, bulk_uris[0]),
                instance_metadata(JLS, JPEG_LS, 2, bulk_uris[1])]

    web = root / "dicomweb"
    study_dir = web / "studies" / STUDY
    series_dir = study_dir / "series" / SERIES
    write_gz(web / "studies" / "index.json.gz", studies)
    write_gz(study_dir / "index.json.gz", studies[:1])
    write_gz(web / "studies" / OTHER_STUDY / "index.json.gz", studies[1:])
    write_gz(study_dir / "series" / "index.json.gz", series)
    write_gz(series_dir / "metadata.gz", metadata)
    write_gz(series_dir / "series-singleton.json.gz", series)
    write_gz(series_dir / "instances" / "index.json.gz", instances)
    frame_bytes = {(NATIVE, 1): native, (JLS, 1): jls[0], (JLS, 2): jls[1]}
    for (sop, number), frame in frame_bytes.items():
        media_type, syntax = ("application/octet-stream", EXPLICIT_LE) if sop == NATIVE else ("image/jls", JPEG_LS)
        path = series_dir / "instances" / sop / "frames" / f"{number}.mht"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(frame_file(frame, media_type, syntax))
    for sop, document in zip((NATIVE, JLS), metadata, strict=False):
        write_gz(series_dir / "instances" / sop / "metadata.gz", [document])
    for relative, data in bulk.items():
        (web / relative).parent.mkdir(parents=True, exist_ok=True)
        (web / relative).write_bytes(data)
    # The mount's P10 tree next to dicomweb/: must not be served.
    (root / "studies" / STUDY).mkdir(parents=True)
    (root / "studies" / STUDY / "secret.dcm").write_bytes(b"DICM")

    # Readable by the nginx workers' user (www-data when the tests run as root), as a dicomfs
    # mount is with --allow-other.
    for directory, _, names in os.walk(root):
        os.chmod(directory, 0o755)
        for name in names:
            os.chmod(os.path.join(directory, name), 0o644)
    return Tree(root, studies, series, instances, metadata, frame_bytes, bulk)


@pytest.fixture(scope="module")
def tree() -> Iterator[Tree]:
    # Not below pytest's tmp_path: /tmp/pytest-of-root is 0700, closed to the workers' user.
    root = Path(tempfile.mkdtemp(prefix="dicomfs-static-tree-"))
    try:
        yield build_tree(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def base_url(tree: Tree) -> Iterator[str]:
    with serve_static_tree(tree.root) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> DICOMwebClient:
    return DICOMwebClient(url=base_url, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def web(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url + "/", timeout=TIMEOUT) as http:
        yield http


def raw_get(web: httpx.Client, path: str, **headers: str) -> tuple[httpx.Response, bytes]:
    """The response and its body exactly as sent (not decoded)."""
    with web.stream("GET", path, headers=headers) as response:
        return response, b"".join(response.iter_raw())


# --- the config and the writer agree ---------------------------------------------------------

def test_documented_content_type_is_the_one_dicomfs_writes_frames_with() -> None:
    assert frames.BOUNDARY == BOUNDARY
    assert frames.CONTENT_TYPE == FRAME_CONTENT_TYPE
    assert f"'{FRAME_CONTENT_TYPE}'  mht;" in DOCUMENTED_CONFIG.read_text()


# --- dicomweb-client ---------------------------------------------------------------------------

def test_search_for_studies_returns_the_index(client: DICOMwebClient, tree: Tree) -> None:
    assert client.search_for_studies() == tree.studies


def test_search_for_studies_ignores_query_parameters(client: DICOMwebClient, tree: Tree) -> None:
    found = client.search_for_studies(limit=1, offset=1, fuzzymatching=True, fields=["StudyDescription"],
                                      search_filters={"PatientID": "P2", "StudyDate": "19990101-"})
    assert found == tree.studies  # the static host returns everything; clients filter


def test_search_for_series_and_instances(client: DICOMwebClient, tree: Tree) -> None:
    assert client.search_for_series(STUDY) == tree.series
    assert client.search_for_series(STUDY, search_filters={"Modality": "CT"}, limit=5) == tree.series
    assert client.search_for_instances(STUDY, SERIES) == tree.instances
    assert client.search_for_instances(STUDY, SERIES, offset=10) == tree.instances


def test_retrieve_metadata(client: DICOMwebClient, tree: Tree) -> None:
    assert client.retrieve_series_metadata(STUDY, SERIES) == tree.metadata
    assert client.retrieve_instance_metadata(STUDY, SERIES, NATIVE) == tree.metadata[0]
    assert client.retrieve_instance_metadata(STUDY, SERIES, JLS) == tree.metadata[1]


def test_retrieve_native_frame(client: DICOMwebClient, tree: Tree) -> None:
    assert client.retrieve_instance_frames(STUDY, SERIES, NATIVE, [1]) == [tree.frames[NATIVE, 1]]
    octet = client.retrieve_instance_frames(STUDY, SERIES, NATIVE, [1],
                                            media_types=(("application/octet-stream", EXPLICIT_LE),))
    assert octet == [tree.frames[NATIVE, 1]]


def test_retrieve_compressed_frames(client: DICOMwebClient, tree: Tree) -> None:
    for number in (1, 2):
        expected = [tree.frames[JLS, number]]
        assert client.retrieve_instance_frames(STUDY, SERIES, JLS, [number]) == expected
        assert client.retrieve_instance_frames(STUDY, SERIES, JLS, [number],
                                               media_types=(("image/jls", JPEG_LS),)) == expected
        assert client.retrieve_instance_frames(STUDY, SERIES, JLS, [number],
                                               media_types=("image/jls",)) == expected
        assert list(client.iter_instance_frames(STUDY, SERIES, JLS, [number])) == expected


def test_dicomweb_client_cannot_read_single_part_bulk_data(client: DICOMwebClient, base_url: str,
                                                           tree: Tree) -> None:
    """dicomweb-client (Python) only accepts bulk data as multipart/related, and a static host
    serves the raw bytes (as OHIF's JavaScript client accepts them): pinned here, so that the
    day the Python client learns single part, this test says so and docs/serving.md is updated."""
    uri = f"{base_url}/studies/{STUDY}/{tree.metadata[0]['00282000']['BulkDataURI']}"
    with pytest.raises(ValueError, match="multipart/related"):
        client.retrieve_bulkdata(uri)


# --- plain HTTP: headers and bytes --------------------------------------------------------------

def test_json_is_the_gzip_file_as_is(web: httpx.Client, tree: Tree) -> None:
    cases = {"studies": "studies/index.json.gz",
             f"studies/{STUDY}": f"studies/{STUDY}/index.json.gz",
             f"studies/{STUDY}/series?limit=1&offset=0": f"studies/{STUDY}/series/index.json.gz",
             f"studies/{STUDY}/series/{SERIES}/metadata": f"studies/{STUDY}/series/{SERIES}/metadata.gz",
             f"studies/{STUDY}/series/{SERIES}/instances/": f"studies/{STUDY}/series/{SERIES}/instances/index.json.gz",
             f"studies/{STUDY}/series/{SERIES}/instances/{JLS}/metadata?includefield=all":
                 f"studies/{STUDY}/series/{SERIES}/instances/{JLS}/metadata.gz"}
    for url, file in cases.items():
        response, body = raw_get(web, url, **{"Accept-Encoding": "gzip"})
        assert response.status_code == 200, url
        assert response.headers["content-encoding"] == "gzip", url
        assert response.headers["content-type"] == "application/dicom+json", url
        assert body == tree.file(file), url  # not compressed a second time
        assert int(response.headers["content-length"]) == len(body)
    decoded = web.get("studies", headers={"Accept-Encoding": "gzip"})
    assert decoded.json() == tree.studies


def test_list_files_revalidate_and_instance_files_are_cacheable(web: httpx.Client) -> None:
    listing = web.get(f"studies/{STUDY}/series/{SERIES}/metadata")
    assert listing.headers["cache-control"] == "no-cache"
    assert "etag" not in listing.headers
    again = web.get(f"studies/{STUDY}/series/{SERIES}/metadata",
                    headers={"If-Modified-Since": listing.headers["last-modified"]})
    assert again.status_code == 200  # never a 304 from an mtime that does not track the content

    frame = web.get(f"studies/{STUDY}/series/{SERIES}/instances/{NATIVE}/frames/1")
    assert "cache-control" not in frame.headers
    assert frame.headers["etag"]
    revalidated = web.get(f"studies/{STUDY}/series/{SERIES}/instances/{NATIVE}/frames/1",
                          headers={"If-None-Match": frame.headers["etag"]})
    assert revalidated.status_code == 304
    assert revalidated.headers["access-control-allow-origin"] == "*"


def test_frames_are_multipart_with_the_fixed_boundary(web: httpx.Client, tree: Tree) -> None:
    for (sop, number) in tree.frames:
        path = f"studies/{STUDY}/series/{SERIES}/instances/{sop}/frames/{number}"
        response, body = raw_get(web, path + "?accept=image/jls", **{"Accept-Encoding": "gzip"})
        assert response.status_code == 200, path
        assert response.headers["content-type"] == FRAME_CONTENT_TYPE, path
        assert "content-encoding" not in response.headers, path
        assert body == tree.file(path + ".mht"), path


def test_bulk_data_is_served_as_is(web: httpx.Client, tree: Tree) -> None:
    for path, data in tree.bulk.items():
        response, body = raw_get(web, path + "?offset=3", **{"Accept-Encoding": "gzip"})
        assert response.status_code == 200, path
        assert response.headers["content-type"] == "application/octet-stream", path
        assert "content-encoding" not in response.headers, path
        assert body == data, path


def test_range_requests(web: httpx.Client, tree: Tree) -> None:
    path = f"studies/{STUDY}/series/{SERIES}/instances/{JLS}/frames/1"
    whole = tree.file(path + ".mht")
    response = web.get(path, headers={"Range": "bytes=10-99"})
    assert response.status_code == 206
    assert response.headers["content-range"] == f"bytes 10-99/{len(whole)}"
    assert response.content == whole[10:100]
    assert response.headers["access-control-allow-origin"] == "*"

    bulk_path, data = next(iter(tree.bulk.items()))
    tail = web.get(bulk_path, headers={"Range": "bytes=-100"})
    assert tail.status_code == 206
    assert tail.headers["content-range"] == f"bytes {len(data) - 100}-{len(data) - 1}/{len(data)}"
    assert tail.content == data[-100:]


def test_head_gives_the_exact_size(web: httpx.Client, tree: Tree) -> None:
    path = f"studies/{STUDY}/series/{SERIES}/instances/{NATIVE}/metadata"
    response = web.head(path)
    assert response.status_code == 200
    assert int(response.headers["content-length"]) == len(tree.file(path + ".gz"))
    assert response.headers["content-encoding"] == "gzip"


def test_cors_on_success_error_and_preflight(web: httpx.Client) -> None:
    origin = {"Origin": "https://viewer.example.org"}
    ok = web.get("studies", headers=origin)
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "*"

    missing = web.get(f"studies/{STUDY}/series/9.9.9/metadata", headers=origin)
    assert missing.status_code == 404
    assert missing.headers["access-control-allow-origin"] == "*"
    assert "content-encoding" not in missing.headers  # the HTML error page is not gzip

    preflight = web.request("OPTIONS", f"studies/{STUDY}/series/{SERIES}/instances/{JLS}/frames/1",
                            headers={**origin, "Access-Control-Request-Method": "GET",
                                     "Access-Control-Request-Headers": "accept, authorization, range"})
    assert preflight.status_code == 204
    assert preflight.content == b""
    assert preflight.headers["access-control-allow-origin"] == "*"
    methods = {m.strip() for m in preflight.headers["access-control-allow-methods"].split(",")}
    assert {"GET", "HEAD", "OPTIONS"} <= methods
    allowed = {h.strip().lower() for h in preflight.headers["access-control-allow-headers"].split(",")}
    assert {"accept", "authorization", "range", "content-type"} <= allowed


def test_only_the_dicomweb_tree_is_served(web: httpx.Client, base_url: str, tree: Tree) -> None:
    assert (tree.root / "studies" / STUDY / "secret.dcm").exists()
    root = base_url.removesuffix("/dicomweb")
    for url in (f"{root}/studies/{STUDY}/secret.dcm", f"{root}/dicomweb/../studies/{STUDY}/secret.dcm",
                f"{root}/", f"{base_url}/", f"{base_url}/studies/{STUDY}/series/{SERIES}/instances/{JLS}/frames"):
        response = web.get(url)
        assert response.status_code == 404, url
        assert response.headers["access-control-allow-origin"] == "*", url
    assert web.post("studies", content=b"{}").status_code == 405
