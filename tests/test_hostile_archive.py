"""A real mount of a hostile DICOMweb archive: bad UIDs, malformed JSON, broken multipart.

The archive is a small HTTP server on loopback that answers with crafted bodies (no real archive
can be made to misbehave on purpose). Every bad answer must end as a logged error and an EIO
or a skipped entry; the daemon keeps serving and writes nothing outside its cache.
"""

from __future__ import annotations

import errno
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.factory import make_instance, multipart
from tests.fsutil import listdir, read_errno, sh
from tests.mounting import Mount

pytestmark = pytest.mark.mount  # real servers, processes or mounts (see conftest)

GOOD = make_instance("1.2.3", "1.2.3.1", "1.2.3.1.1")
EVIL_UID = "1.2.7.1.1/../../../../evil"


def uid_rows(tag: str, uids: list[object]) -> bytes:
    return json.dumps([{tag: {"vr": "UI", "Value": [u]}} for u in uids]).encode()


def evil_instance() -> bytes:
    """A well-formed file whose meta SOPInstanceUID is a path."""
    return make_instance("1.2.7", "1.2.7.1", EVIL_UID)


def oversized_part() -> bytes:
    """One part whose body is 100 bytes longer than its Content-Length says."""
    body = make_instance("1.2.5", "1.2.5.1", "1.2.5.1.1")
    return (b"--dicomfs-test-boundary\r\nContent-Type: application/dicom\r\n"
            + f"Content-Length: {len(body) - 100}\r\n\r\n".encode() + body
            + b"\r\n--dicomfs-test-boundary--\r\n")


MULTIPART = "multipart/related; type=\"application/dicom\"; boundary=dicomfs-test-boundary"
JSON = "application/dicom+json"
TRUNCATED = multipart([make_instance("1.2.4", "1.2.4.1", "1.2.4.1.1"),
                       make_instance("1.2.4", "1.2.4.1", "1.2.4.1.2")])[:-900]

ROUTES: dict[str, tuple[str, bytes]] = {
    "/dicom-web/studies": (JSON, uid_rows("0020000D", [
        "1.2.3", "1.2.4", "1.2.5", "1.2.6", "1.2.7", "1.2/3", "..", "../../etc", "1.2\u00003", "9" * 300,
        None, 42])),
    "/dicom-web/studies/1.2.3/series": (JSON, uid_rows("0020000E", ["1.2.3.1", "../x"])),
    "/dicom-web/studies/1.2.3/series/1.2.3.1/instances": (JSON, uid_rows(
        "00080018", ["1.2.3.1.1", "1.2.3.1.2/../../x", "." * 70])),
    "/dicom-web/studies/1.2.3/series/1.2.3.1": (MULTIPART, multipart([GOOD], lengths=False)),
    # a truncated multipart body
    "/dicom-web/studies/1.2.4/series": (JSON, uid_rows("0020000E", ["1.2.4.1"])),
    "/dicom-web/studies/1.2.4/series/1.2.4.1/instances": (JSON, uid_rows("00080018", ["1.2.4.1.1", "1.2.4.1.2"])),
    "/dicom-web/studies/1.2.4/series/1.2.4.1": (MULTIPART, TRUNCATED),
    # a part larger than its Content-Length
    "/dicom-web/studies/1.2.5/series": (JSON, uid_rows("0020000E", ["1.2.5.1"])),
    "/dicom-web/studies/1.2.5/series/1.2.5.1/instances": (JSON, uid_rows("00080018", ["1.2.5.1.1"])),
    "/dicom-web/studies/1.2.5/series/1.2.5.1": (MULTIPART, oversized_part()),
    # malformed JSON
    "/dicom-web/studies/1.2.6/series": (JSON, b'{["not json'),
    # a retrieve whose only part names itself with a path
    "/dicom-web/studies/1.2.7/series": (JSON, uid_rows("0020000E", ["1.2.7.1"])),
    "/dicom-web/studies/1.2.7/series/1.2.7.1/instances": (JSON, uid_rows("00080018", ["1.2.7.1.9"])),
    "/dicom-web/studies/1.2.7/series/1.2.7.1": (MULTIPART, multipart([evil_instance()])),
}


@pytest.fixture
def hostile_archive() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            offset = self.path.partition("offset=")[2].split("&")[0]
            if path not in ROUTES or (offset not in ("", "0") and ROUTES[path][0] == JSON):
                content_type, body = JSON, b"[]"
            else:
                content_type, body = ROUTES[path]
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    server.shutdown()
    server.server_close()


def snapshot(root: Path, skip: set[str]) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in root.rglob("*") if p.parts[len(root.parts)] not in skip}


def test_hostile_answers_are_contained(hostile_archive: str, tmp_path: Path,
                                       mount_factory: Callable[..., Mount]) -> None:
    (tmp_path / "bystander").write_text("must stay as it is")
    before = snapshot(tmp_path, {"mnt", "cache"})
    mount = mount_factory(hostile_archive)
    studies = mount.path / "studies"
    assert listdir(studies) == ["1.2.3", "1.2.4", "1.2.5", "1.2.6", "1.2.7"]
    assert listdir(studies / "1.2.3") == ["1.2.3.1"]
    assert listdir(studies / "1.2.3" / "1.2.3.1") == ["1.2.3.1.1.dcm"]
    assert sh("ls", str(studies / "1.2.6"), check=False).returncode != 0  # malformed JSON: EIO
    assert read_errno(studies / "1.2.4" / "1.2.4.1" / "1.2.4.1.2.dcm") == errno.EIO  # truncated
    assert read_errno(studies / "1.2.5" / "1.2.5.1" / "1.2.5.1.1.dcm") == errno.EIO  # oversized part
    assert read_errno(studies / "1.2.7" / "1.2.7.1" / "1.2.7.1.9.dcm") == errno.EIO  # evil name
    assert mount.alive()
    assert (studies / "1.2.3" / "1.2.3.1" / "1.2.3.1.1.dcm").read_bytes() == GOOD
    log = mount.log
    for expected in ("invalid UID", "malformed JSON", "truncated",
                     "longer than its Content-Length", "invalid SOPInstanceUID"):
        assert expected in log, expected
    mount.stop()
    assert snapshot(tmp_path, {"mnt", "cache"}) == before
    for path in (tmp_path / "cache").rglob("*"):
        assert ".." not in path.name and "evil" not in str(path) and "\0" not in path.name
    assert not Path("/evil").exists() and not (tmp_path / "evil").exists()
