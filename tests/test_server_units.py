"""Unit tests of the DICOMweb server's pure parts: Accept negotiation, QIDO parameters, frame files."""

from __future__ import annotations

import pytest

from dicomfs import frames
from dicomfs.server.accept import NotAcceptable, accepts_json, frame_form, instance_form, parse_accept
from dicomfs.server.qido import BadRequest, parse_request
from dicomfs.webfiles import ALL

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


@pytest.mark.parametrize(("params", "reason"), [
    ([("limit", "-1")], "limit must be a whole number"),
    ([("limit", "0")], "limit must be between"),
    ([("offset", "99999999999999")], "offset must be a whole number"),
    ([("limit", "1e9")], "whole number"),
    ([("NoSuchKeyword", "x")], "unknown DICOM keyword"),
    ([("FFFF0000", "x")], "unknown attribute tag"),
    ([("../etc", "x")], "unknown query parameter"),
    ([("PatientID", "a"), ("PatientID", "b")], "given twice"),
    ([("StudyDate", "yesterday-today")], "invalid range"),
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
    with pytest.raises(frames.ProtocolError):
        frames.split_frame_file(b"--other\r\n\r\nxyz")
