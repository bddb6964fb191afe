"""Unit tests of the DICOMweb server: its pure parts (Accept negotiation, QIDO parameters, frame
files), and the app itself over the demo files, in process (httpx's ASGI transport, no server)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from dicomfs import frames
from dicomfs.archive import ArchiveOptions, open_archive
from dicomfs.errors import (
    CacheError,
    DicomfsError,
    IntegrityError,
    NotFound,
    ProtocolError,
    SourceError,
    SourceUnavailable,
    WaitTimeout,
)
from dicomfs.server.accept import NotAcceptable, accepts_json, frame_form, instance_form, parse_accept
from dicomfs.server.app import _failure
from dicomfs.server.qido import BadRequest, parse_request
from dicomfs.server.run import app_for
from dicomfs.sources import SourceOptions, parse_source
from dicomfs.sources.base import Credentials
from dicomfs.webfiles import ALL
from tests.reference import parts, reference_frames, source_files

JLS = "1.2.840.10008.1.2.4.80"
ELE = frames.EXPLICIT_VR_LITTLE_ENDIAN


def test_accept_is_parsed_with_quotes_q_values_and_several_headers() -> None:
    ranges = parse_accept(['multipart/related; type="application/dicom"; transfer-syntax=*;q=0.5, '
                           'application/dicom+json', 'image/jls; q=0'])
    assert [r.type for r in ranges] == ["application/dicom+json", "multipart/related"]
    assert ranges[1].params == {"type": "application/dicom", "transfer-syntax": "*"} and ranges[1].q == 0.5
    assert [r.type for r in parse_accept([])] == ["*/*"]
    assert [r.type for r in parse_accept(["garbage, text/html"])] == ["text/html"]
    # a comma inside quotes does not split a range
    [one] = parse_accept(['multipart/related; type="a,b"'])
    assert one.params["type"] == "a,b"


def test_json_is_accepted_by_name_wildcards_or_no_header() -> None:
    assert accepts_json(parse_accept([]))
    assert accepts_json(parse_accept(["application/dicom+json"]))
    assert accepts_json(parse_accept(["application/*"]))
    assert not accepts_json(parse_accept(["multipart/related; type=application/dicom"]))


def test_instances_go_as_stored_or_not_at_all() -> None:
    stored = {JLS}
    assert instance_form(parse_accept([]), stored, 3) is True
    assert instance_form(parse_accept(['multipart/related; type="application/dicom"; transfer-syntax=*']), stored, 3)
    assert instance_form(parse_accept([f'multipart/related; type="application/dicom"; transfer-syntax={JLS}']),
                         stored, 3)
    assert instance_form(parse_accept(["application/dicom"]), stored, 1) is False  # one instance, single part
    with pytest.raises(NotAcceptable, match="does not transcode"):
        instance_form(parse_accept([f'multipart/related; type="application/dicom"; transfer-syntax={ELE}']),
                      stored, 3)
    with pytest.raises(NotAcceptable):
        instance_form(parse_accept(["application/dicom+json"]), stored, 1)


def test_frames_negotiate_type_and_transfer_syntax() -> None:
    # OHIF asks for octet-stream with any syntax: compressed frames go, named by their part header
    ohif = parse_accept(["multipart/related; type=application/octet-stream; transfer-syntax=*"])
    assert frame_form(ohif, "image/jls", JLS, 2) is True
    # no syntax named: octet-stream means explicit VR little endian
    plain = parse_accept(['multipart/related; type="application/octet-stream"'])
    assert frame_form(plain, frames.OCTET_STREAM, ELE, 1) is True
    with pytest.raises(NotAcceptable, match="image/jls"):
        frame_form(plain, "image/jls", JLS, 1)
    assert frame_form(parse_accept(["multipart/related; type=image/jls"]), "image/jls", JLS, 1) is True
    # a single part when asked for the frame's own type, for one frame only
    assert frame_form(parse_accept(["image/jls"]), "image/jls", JLS, 1) is False
    with pytest.raises(NotAcceptable):
        frame_form(parse_accept(["image/jls"]), "image/jls", JLS, 2)
    with pytest.raises(NotAcceptable):
        frame_form(parse_accept([f"multipart/related; type=image/jls; transfer-syntax={ELE}"]), "image/jls", JLS, 1)
    assert frame_form(parse_accept([]), "image/jls", JLS, 4) is True


def test_qido_parameters() -> None:
    request = parse_request([("PatientName", "Doe*"), ("00080020", "20200101-20201231"), ("limit", "25"),
                             ("offset", "50"), ("includefield", "00081030,PatientAge"), ("fuzzymatching", "false")])
    assert [(t.keyword, t.value) for t in request.query.terms] == [("PatientName", "Doe*"),
                                                                  ("StudyDate", "20200101-20201231")]
    assert (request.limit, request.offset) == (25, 50)
    assert request.include == ("00081030", "00101010")
    assert parse_request([("includefield", "all")]).include == ALL
    fuzzy = parse_request([("PatientName", "jan"), ("fuzzymatching", "true")]).query.terms[0]
    assert fuzzy.matches({"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]}})
    assert not fuzzy.matches({"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Ann"}]}})
    assert fuzzy.qido("study") is None  # checked here, never sent to the archive
    # a browser's cache buster (jQuery's `_=<time>`) is not a query term
    busted = parse_request([("PatientID", "a"), ("_", "1764000000000")])
    assert [(t.keyword, t.value) for t in busted.query.terms] == [("PatientID", "a")]


@pytest.mark.parametrize(("params", "reason"), [
    ([("limit", "-1")], "limit must be a whole number"),
    ([("limit", "0")], "limit must be between"),
    ([("offset", "99999999999999")], "offset must be a whole number"),
    ([("limit", "1e9")], "whole number"),
    ([("NoSuchKeyword", "x")], "unknown DICOM keyword"),
    ([("FFFF0000", "x")], "unknown attribute tag"),
    ([("../etc", "x")], "unknown query parameter"),
    ([("PatientID", "a"), ("PatientID", "b")], "given twice"),
    ([("StudyDate", "yesterday-today")], "invalid date"),
    ([("fuzzymatching", "maybe")], "fuzzymatching must be"),
    ([("includefield", "NotAKeyword")], "unknown includefield"),
])
def test_bad_qido_parameters_are_one_line_reasons(params: list[tuple[str, str]], reason: str) -> None:
    with pytest.raises(BadRequest, match=reason) as caught:
        parse_request(params)
    assert "\n" not in str(caught.value)


def test_frame_files_split_back_into_their_parts() -> None:
    frame = b"\x00\x01--" + frames.BOUNDARY.encode() + b"\r\n\r\n"
    content_type, view = frames.split_frame_file(frames.frame_file(frame, JLS))
    assert content_type == f"image/jls;transfer-syntax={JLS}" and bytes(view) == frame
    with pytest.raises(ProtocolError):
        frames.split_frame_file(b"--other\r\n\r\nxyz")


# --- the app over the demo files ----------------------------------------------------------------------
ANY_FRAME = "multipart/related; type=application/octet-stream; transfer-syntax=*"


@asynccontextmanager
async def demo_client(demo_dir: Path, cache: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app serving the demo files (as ``dicomfs serve <folder>`` does)."""
    options = ArchiveOptions(parse_source(str(demo_dir)), cache, Credentials(), SourceOptions(), 1 << 30)
    # the app types its ASGI scope and messages as dict, httpx as MutableMapping
    async with open_archive(options) as archive, httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app_for(archive)),  # type: ignore[arg-type]
            base_url="http://dicomfs/dicomweb",
            timeout=60) as client:
        yield client


def tags(objects: list[dict[str, Any]], key: str, tag: str) -> dict[str, list[Any]]:
    """The values of ``tag`` in each of the QIDO objects, by their ``key`` UID."""
    return {o[key]["Value"][0]: list(o.get(tag, {}).get("Value") or []) for o in objects}


def study_uids(response: httpx.Response) -> set[str]:
    assert response.status_code == 200, response.text
    return set(tags(response.json(), "0020000D", "0020000D"))


async def test_derived_study_attributes_match_as_the_study_objects_show_them(demo_dir: Path,
                                                                             tmp_path: Path) -> None:
    async with demo_client(demo_dir, tmp_path / "cache") as http:
        shown = (await http.get("/studies")).json()
        modalities = tags(shown, "0020000D", "00080061")
        with_ct = {uid for uid, found in modalities.items() if "CT" in found}
        with_mr_or_ct = {uid for uid, found in modalities.items() if {"MR", "CT"} & set(found)}
        assert with_ct and with_mr_or_ct > with_ct
        assert study_uids(await http.get("/studies", params={"ModalitiesInStudy": "CT"})) == with_ct
        assert study_uids(await http.get("/studies", params={"00080061": "CT"})) == with_ct
        assert study_uids(await http.get("/studies", params={"Modality": "CT"})) == with_ct
        for listed in ("MR\\CT", "MR,CT", "PT\\MR\\CT"):  # any of the values (OHIF sends commas)
            assert study_uids(await http.get("/studies", params={"ModalitiesInStudy": listed})) == with_mr_or_ct
        assert study_uids(await http.get("/studies", params={"ModalitiesInStudy": "PT"})) == set()
        for tag in ("00201206", "00201208"):  # NumberOfStudyRelatedSeries / Instances
            counts = tags(shown, "0020000D", tag)
            some = min(counts.values())
            assert study_uids(await http.get("/studies", params={tag: str(some[0])})) == {
                uid for uid, count in counts.items() if count == some}, tag
        # and a series' instance count, in a study
        listing = (await http.get(f"/studies/{min(with_ct)}/series")).json()
        series = tags(listing, "0020000E", "00201209")
        some = min(series.values())
        found = (await http.get(f"/studies/{min(with_ct)}/series",
                                params={"NumberOfSeriesRelatedInstances": str(some[0])})).json()
        assert set(tags(found, "0020000E", "0020000E")) == {uid for uid, count in series.items() if count == some}


async def test_frames_without_a_list_are_every_frame_as_the_pixel_datas_bulk_data_uri_says(
        demo_dir: Path, tmp_path: Path) -> None:
    files = source_files(demo_dir)
    multi = next(sop for sop, path in sorted(files.items())
                 if int(pydicom.dcmread(path, stop_before_pixels=True).get("NumberOfFrames") or 1) > 2)
    single = next(sop for sop, path in sorted(files.items())
                  if "Rows" in (ds := pydicom.dcmread(path, stop_before_pixels=True))
                  and int(ds.get("NumberOfFrames") or 1) == 1)
    async with demo_client(demo_dir, tmp_path / "cache") as http:
        for sop in (multi, single):
            ds = pydicom.dcmread(files[sop], stop_before_pixels=True)
            study, instance = ds.StudyInstanceUID, f"series/{ds.SeriesInstanceUID}/instances/{sop}"
            [meta] = (await http.get(f"/studies/{study}/{instance}/metadata")).json()
            uri = meta["7FE00010"]["BulkDataURI"]
            assert uri == f"{instance}/frames"  # relative to the study
            syntax, expected = reference_frames(files[sop])
            every = await http.get(f"/studies/{study}/{uri}", headers={"Accept": ANY_FRAME})
            assert every.status_code == 200, every.text
            assert [data for _, data in parts(every)] == expected  # the source's bytes, as pydicom cuts them
            assert all(t.endswith(f";transfer-syntax={syntax}") for t, _ in parts(every))
            listed = f"/studies/{study}/{uri}/{','.join(str(n) for n in range(1, len(expected) + 1))}"
            for accept in (ANY_FRAME, None, "application/octet-stream", "multipart/related; type=image/jls"):
                headers = {"Accept": accept} if accept else {}
                one, other = (await http.get(f"/studies/{study}/{uri}", headers=headers),
                              await http.get(listed, headers=headers))
                assert (one.status_code, one.headers.get("content-type"), one.content) == (
                    other.status_code, other.headers.get("content-type"), other.content), (sop, accept)
            head = await http.head(f"/studies/{study}/{uri}", headers={"Accept": ANY_FRAME})
            assert head.status_code == 200 and head.content == b""
            assert head.headers["etag"] == every.headers["etag"]


async def test_the_static_trees_own_file_names_are_not_found(demo_dir: Path, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    ds = pydicom.dcmread(next(iter(sorted(source_files(demo_dir).values()))), stop_before_pixels=True)
    study, series = f"studies/{ds.StudyInstanceUID}", f"studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    instance = f"{series}/instances/{ds.SOPInstanceUID}"
    names = ["studies/index.json.gz", f"{study}/index.json.gz", f"{study}/series/index.json.gz",
             f"{series}/instances/index.json.gz", f"{series}/metadata.gz", f"{series}/series-singleton.json.gz",
             f"{instance}/metadata.gz", f"{instance}/frames/1.mht", "studies/index.json.gz/series",
             "studies/index.json.gz/metadata", f"{series}/instances/index.json.gz/metadata"]
    caplog.set_level(logging.WARNING)
    async with demo_client(demo_dir, tmp_path / "cache") as http:
        for name in names:
            for method in ("GET", "HEAD"):
                response = await http.request(method, f"/{name}")
                assert response.status_code == 404, (method, name, response.status_code)
                if method == "GET":
                    assert response.text.startswith("not found: ") and response.text.count("\n") == 1, name
        assert (await http.get("/studies")).status_code == 200  # it goes on serving
        assert (await http.get(f"/{instance}/metadata")).status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback logged


async def test_metadata_is_json_and_says_so_to_a_client_that_wants_xml(demo_dir: Path, tmp_path: Path) -> None:
    """WADO-RS metadata has one form here, DICOM JSON: a request that accepts only another (the
    XML form of PS3.18) is a 406 with one line, not JSON it did not ask for."""
    ds = pydicom.dcmread(next(iter(sorted(source_files(demo_dir).values()))), stop_before_pixels=True)
    series = f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    urls = [f"/studies/{ds.StudyInstanceUID}/metadata", f"{series}/metadata",
            f"{series}/instances/{ds.SOPInstanceUID}/metadata"]
    async with demo_client(demo_dir, tmp_path / "cache") as http:
        for url in urls:
            for accept, status in ((None, 200), ("application/dicom+json", 200), ("application/json", 200),
                                   ("*/*", 200), ("application/*", 200),
                                   ("multipart/related; type=\"application/dicom+xml\"", 406),
                                   ("application/dicom+xml", 406), ("text/html", 406)):
                response = await http.get(url, headers={"Accept": accept} if accept else {})
                assert response.status_code == status, (url, accept, response.text[:200])
                if status == 406:
                    assert response.text.count("\n") == 1 and "application/dicom+json" in response.text
                else:
                    assert response.headers["content-type"].startswith("application/dicom+json")


@pytest.mark.parametrize("error, status, said", [
    (SourceError("cannot open /srv/dicom/private/ct/1.dcm: Permission denied"), 502, "the archive failed to deliver"),
    (IntegrityError("/srv/dicom/x.dcm changed size since it was indexed"), 502, "failed a check"),
    (SourceUnavailable("cannot reach https://pacs.internal:8443/dicom-web: timed out"), 503, "unavailable"),
    (CacheError("cannot use the cache directory /home/alice/.cache/dicomfs/x: No space"), 507, "cache"),
    (WaitTimeout("gave up after 300 s"), 504, "in time"),
])
def test_a_failure_tells_the_client_its_kind_and_the_log_its_details(
        error: DicomfsError, status: int, said: str, caplog: pytest.LogCaptureFixture) -> None:
    """Server-side failures name local paths, archive URLs and cache folders: the log gets them,
    the client of a DICOMweb server does not."""
    with caplog.at_level(logging.WARNING, logger="dicomfs.server.app"):
        reply = _failure(error)
    assert isinstance(reply.body, bytes)
    body = reply.body.decode()
    assert reply.status == status and said in body
    assert "/" not in body and "server's log" in body
    assert str(error) in caplog.text


def test_a_client_error_is_told_its_reason() -> None:
    reply = _failure(NotFound("series 1.2.3 is not in study 1.2"))
    assert reply.status == 404 and reply.body == b"not found: series 1.2.3 is not in study 1.2\n"
