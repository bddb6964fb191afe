"""Unit tests of query parsing and matching (dicomfs.query) and of the progress line."""

from __future__ import annotations

import io
from typing import Any

import pydicom
import pytest

from dicomfs.errors import UsageError
from dicomfs.progress import Progress
from dicomfs.query import parse_query


def attrs(**keywords: object) -> dict[str, Any]:
    ds = pydicom.Dataset()
    for keyword, value in keywords.items():
        setattr(ds, keyword, value)
    return ds.to_json_dict()


def matches(term: str, **keywords: object) -> bool | None:
    (parsed,) = parse_query([term]).terms
    return parsed.matches(attrs(**keywords))


def test_levels_tags_and_vrs() -> None:
    query = parse_query(["PatientName=Doe*", "Modality=CT", "InstanceNumber=3"])
    assert [(t.level, t.tag, t.vr) for t in query.terms] == [
        ("study", "00100010", "PN"), ("series", "00080060", "CS"), ("instance", "00200013", "IS")]


@pytest.mark.parametrize("term, value, expected", [
    ("PatientName=Doe^John", "Doe^John", True),
    ("PatientName=doe^john", "Doe^John", True),  # person names match without regard to case
    ("PatientName=Doe*", "Doe^John", True),
    ("PatientName=Do?^J*", "Doe^John", True),
    ("PatientName=Doe", "Doe^John", False),  # no wildcard: the whole value
    ("PatientName=O'Brien^Mary Ann", "O'Brien^Mary Ann", True),
    ("PatientName=Müller^Jürgen", "Müller^Jürgen", True),
    ("PatientName=M?ller*", "Müller^Jürgen", True),  # ? is one character, not one byte
    ("PatientName=*", "", True),
])
def test_person_names(term: str, value: str, expected: bool) -> None:
    assert matches(term, PatientName=value) is expected


@pytest.mark.parametrize("term, expected", [
    ("StudyDate=20200101-20201231", True),
    ("StudyDate=20200615", True),
    ("StudyDate=20200616-", False),
    ("StudyDate=-20200614", False),
    ("StudyDate=-20200615", True),
    ("StudyDate=2021*", False),
])
def test_date_ranges(term: str, expected: bool) -> None:
    assert matches(term, StudyDate="20200615") is expected


def test_a_date_time_with_a_utc_offset_is_not_a_range() -> None:
    (offset,) = parse_query(["AcquisitionDateTime=20200101120000-0500"]).terms
    assert not offset.is_range
    assert offset.matches(attrs(AcquisitionDateTime="20200101120000-0500")) is True
    (span,) = parse_query(["AcquisitionDateTime=20200101-20200201"]).terms
    assert span.is_range and span.matches(attrs(AcquisitionDateTime="20200115093000")) is True


def test_numbers_multi_values_absent_and_case_of_codes() -> None:
    assert matches("SeriesNumber=3", SeriesNumber=3) is True
    assert matches("SeriesNumber=03", SeriesNumber=3) is True
    assert matches("ModalitiesInStudy=MR", ModalitiesInStudy=["CT", "MR"]) is True
    assert matches("Modality=ct", Modality="CT") is False  # code strings are case sensitive
    assert matches("StudyDescription=x") is None  # not there: the caller looks elsewhere
    assert matches("StudyInstanceUID=1.2.3\\1.2.4", StudyInstanceUID="1.2.4") is True
    assert matches("StudyInstanceUID=1.2.3,1.2.5", StudyInstanceUID="1.2.4") is False


def test_lists_match_when_any_of_their_values_does() -> None:
    # PS3.4 C.2.2.2: a backslash list; QIDO-RS's comma list where a value cannot hold a comma
    for term in ("ModalitiesInStudy=MR\\CT", "ModalitiesInStudy=MR,CT", "ModalitiesInStudy=PT\\C?"):
        assert matches(term, ModalitiesInStudy=["CT", "SR"]) is True, term
    assert matches("ModalitiesInStudy=MR\\PT", ModalitiesInStudy=["CT", "SR"]) is False
    assert matches("Modality=MR,CT", Modality="CT") is True
    assert matches("PatientName=Roe*\\doe^john", PatientName="Doe^John") is True
    assert matches("StudyDate=20190101\\20200101-20201231", StudyDate="20200615") is True
    # a comma belongs to a text value, and a backslash to a value of the VRs that allow one
    assert matches("StudyDescription=Head, Neck", StudyDescription="Head, Neck") is True
    assert matches("StudyDescription=Head,Neck", StudyDescription="Neck") is False
    assert matches("PatientComments=a\\b", PatientComments="a\\b") is True  # LT: one value
    assert matches("PatientComments=a\\b", PatientComments="a") is False


def test_qido_form_keeps_what_servers_read_literally() -> None:
    def sent(term: str, level: str = "study") -> tuple[str, str, bool] | None:
        return parse_query([term]).terms[0].qido(level)

    assert sent("PatientName=Doe*") == ("PatientName", "Doe*", True)
    assert sent("PatientName=Doe^J*") == ("PatientName", "Doe*J*", False)  # urllib3 would encode the ^
    assert sent("StudyDate=20200101-20201231") == ("StudyDate", "20200101-20201231", True)
    assert sent("PatientName=O'Brien^Mary Ann") == ("PatientName", "O*Brien*Mary*Ann", False)
    assert sent("PatientName=Müller^Jürgen") == ("PatientName", "M*ller*J*rgen", False)
    assert sent("Modality=CT") == ("ModalitiesInStudy", "CT", True)
    assert sent("PatientName=*") is None
    assert sent("PatientName=  ") is None
    assert sent("PatientName=Ö*") is None  # nothing a URL can carry: checked by dicomfs instead
    assert sent("StudyInstanceUID=1.2.3\\1.2.4") == ("StudyInstanceUID", "1.2.3,1.2.4", True)
    assert sent("StudyDate=2020*") is None  # DICOM allows no wildcards on dates: checked locally
    assert sent("NumberOfStudyRelatedSeries=2") is None  # computed by servers, not matched
    assert sent("ModalitiesInStudy=MR\\CT") is None  # a list not of UIDs: checked locally
    assert sent("ModalitiesInStudy=MR,CT") is None


def test_lists_go_to_c_find_backslash_separated() -> None:
    from dicomfs.sources.dimse.query import study_matching

    terms = parse_query(["ModalitiesInStudy=MR,CT", "PatientID=A\\B", "StudyDescription=Head, Neck"]).terms
    assert study_matching(terms) == {"ModalitiesInStudy": "MR\\CT", "PatientID": "A\\B",
                                     "StudyDescription": "Head, Neck"}


@pytest.mark.parametrize("bad, message", [
    (["PatientName"], "not KEY=VALUE"),
    (["=x"], "not KEY=VALUE"),
    (["PatientNmae=x"], "unknown DICOM keyword"),
    (["StudyDate=2020-01-01"], "invalid date '2020-01-01'"),
    (["StudyDate=2024-01"], "invalid date '2024-01' for StudyDate"),  # a month, ISO-style: matched nothing
    (["StudyDate=2024"], "invalid date"),
    (["PatientBirthDate=1970.01.01"], "invalid date"),
    (["StudyDate=20240101\\2024"], "invalid date '2024' for StudyDate"),
    (["StudyDate=20241231-20240101"], "ends before it starts"),
    (["StudyDate=20241399"], "invalid date '20241399'"),
    (["StudyDate=20230229-"], "invalid date"),  # not a leap year
    (["StudyDate=00000000"], "invalid date"),
    (["StudyTime=25"], "invalid time '25' for StudyTime"),  # no such hour: matched nothing
    (["StudyTime=1261"], "invalid time"),
    (["SeriesTime=12.5"], "invalid time"),  # a fraction needs the seconds
    (["StudyTime=12a-13"], "invalid time"),
    (["StudyTime=1"], "invalid time"),
    (["StudyTime=1300-1200"], "ends before it starts"),
    (["StudyTime=1100-10"], "ends before it starts"),
    (["ReferencedSeriesSequence=1"], "sequence"),
])
def test_bad_terms_are_one_line_usage_errors(bad: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        parse_query(bad)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("good", ["StudyDate=20240115", "StudyDate=20240101-20241231", "StudyDate=20240101-",
                                  "StudyDate=-20241231", "StudyDate=2024*", "StudyDate=",
                                  "StudyDate=20240101\\20240102", "StudyDate=20240101-20240101", "StudyDate=20240229"])
def test_dates_in_the_forms_dicom_gives_are_taken(good: str) -> None:
    assert len(parse_query([good]).terms) == 1


@pytest.mark.parametrize("good", ["StudyTime=1200", "StudyTime=12", "StudyTime=120000.123456", "StudyTime=12:00:00",
                                  "StudyTime=1200-1300", "StudyTime=-1300", "StudyTime=1200-", "StudyTime=12*",
                                  "SeriesTime=235960", "StudyTime=12:00-13:00", "StudyTime=", "StudyTime=1030-10"])
def test_times_in_the_forms_dicom_gives_are_taken(good: str) -> None:
    assert len(parse_query([good]).terms) == 1


def test_a_time_range_matches_by_its_ends() -> None:
    [term] = parse_query(["StudyTime=1200-1300"]).terms
    times = ("115959", "123000.5", "130000", "140000")
    assert [term.matches({"00080030": {"vr": "TM", "Value": [v]}}) for v in times] == [False, True, True, False]


def test_a_reversed_date_range_from_a_qido_client_matches_nothing() -> None:
    query = parse_query(["StudyDate=20991231-20240101"], reversed_ranges=True)
    assert query.terms[0].matches({"00080020": {"vr": "DA", "Value": ["20240601"]}}) is False
    with pytest.raises(UsageError, match="invalid date"):  # still a date, though
        parse_query(["StudyDate=20991399-20240101"], reversed_ranges=True)


def test_progress_line_by_bytes_and_by_series() -> None:
    stream = io.StringIO()
    progress = Progress(stream, total_series=4, total_bytes=1000)
    progress.update(250, 1, force=True)
    assert " 25%" in progress.line(progress.started + 1, bar_width=0)
    unknown = Progress(stream, total_series=4, total_bytes=None)
    unknown.update(10_000, 3, force=True)
    line = unknown.line(unknown.started + 1, bar_width=8)
    assert line.startswith("[######--]  75%") and "series 3/4" in line
    unknown.update(10_000, 4)
    unknown.close()
    assert stream.getvalue().strip().splitlines()[-1].endswith("series 4/4")


def test_the_built_in_keys_agree_with_the_dicom_dictionary() -> None:
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    from dicomfs.query import COMMON_KEYS

    for keyword, (tag, vr) in COMMON_KEYS.items():
        number = tag_for_keyword(keyword)
        assert number is not None, keyword
        assert (f"{number:08X}", dictionary_VR(number)) == (tag, vr), keyword
