"""Unit tests of the IDC index (``dicomfs.sources.idc.index``): the real idc-index-data release's
schema, query translation, and broken index files. Mounts are in tests/test_mount_idc.py."""

from __future__ import annotations

import logging
from pathlib import Path

import duckdb
import pytest

from dicomfs.errors import UsageError
from dicomfs.query import parse_query
from dicomfs.sources.idc.index import INDEX_KEYS, REQUIRED, IdcIndex, _where, default_index


def test_the_installed_index_release_has_every_column_dicomfs_reads() -> None:
    """Installed by the test command (the idc extra): a release that renames a column fails here."""
    path = default_index()
    described = duckdb.sql(f"DESCRIBE SELECT * FROM read_parquet('{path}')")
    assert described is not None  # None only for a statement that returns no rows
    columns = {row[0] for row in described.fetchall()}
    assert set(REQUIRED) <= columns, set(REQUIRED) - columns
    assert set(INDEX_KEYS) <= columns
    index = IdcIndex(path)
    try:
        assert index.release.startswith("idc-index-data ")
        studies, unchecked = index.studies(parse_query(["collection_id=rider_pilot"], INDEX_KEYS).terms)
        assert unchecked == [] and 0 < len(studies) < 1000
        assert all(s.attrs["collection_id"]["Value"] == ["rider_pilot"] for s in studies)
        series = index.series([studies[0].uid])[studies[0].uid]
        assert series and all(location.prefix.endswith("/") for _, location in series)
    finally:
        index.close()


def test_terms_become_sql_where_exact_and_the_rest_is_left_to_check() -> None:
    query = parse_query(["collection_id=nlst", "PatientID=A_1*", "StudyInstanceUID=1.2\\1.3",
                         "StudyDate=20200101-20201231", "PatientName=Doe*"], INDEX_KEYS)
    where, parameters, unchecked = _where(query.terms)
    assert where == ("WHERE collection_id = ? AND PatientID LIKE ? ESCAPE '\\' AND StudyInstanceUID IN (?, ?)")
    assert parameters == ["nlst", "A\\_1%", "1.2", "1.3"]
    assert [t.keyword for t in unchecked] == ["StudyDate", "PatientName"]


def test_a_broken_or_foreign_index_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is not a file"):
        IdcIndex(tmp_path / "missing.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UsageError, match="not readable parquet") as caught:
        IdcIndex(tmp_path / "junk.parquet")
    assert "\n" not in str(caught.value)
    duckdb.sql(f"COPY (SELECT 'x' AS collection_id, 'y' AS PatientID) TO '{tmp_path / 'old.parquet'}' "
               "(FORMAT PARQUET)")
    with pytest.raises(UsageError, match="lacks the columns StudyInstanceUID"):
        IdcIndex(tmp_path / "old.parquet")


def test_names_come_from_the_head_values_kept() -> None:
    from dicomfs.sources.idc.source import INSTANCE_NUMBER, SOP_CLASS_UID, head_attrs

    ct = "1.2.840.10008.5.1.4.1.1.2"
    assert head_attrs({INSTANCE_NUMBER: b" 12 ", SOP_CLASS_UID: ct.encode() + b"\0"}) == {
        "00200013": {"vr": "IS", "Value": [12]}, "00080016": {"vr": "UI", "Value": [ct]}}
    assert head_attrs({INSTANCE_NUMBER: b"+7"})["00200013"]["Value"] == [7]
    # several values, not a number, a malformed class UID, nothing: left out, never an error
    assert head_attrs({INSTANCE_NUMBER: b"1\\2", SOP_CLASS_UID: b"1.2..3"}) == {}
    assert head_attrs({INSTANCE_NUMBER: b"x", SOP_CLASS_UID: b""}) == {}
    assert head_attrs({}) == {}


def test_index_rows_that_cannot_be_served_are_left_out_with_a_log_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tests.idc_bucket import IdcBucket

    good = {"collection_id": "c", "PatientID": "P", "StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.1",
            "Modality": "CT", "instanceCount": 1, "aws_bucket": "idc-open-data", "crdc_series_uuid": "abc-1",
            "series_size_MB": 1.0}
    rows = [good, {**good, "StudyInstanceUID": "not a uid", "SeriesInstanceUID": "1.2.4.1"},
            {**good, "SeriesInstanceUID": "1.2.3..2"}, {**good, "SeriesInstanceUID": "1.2.3.3",
                                                        "crdc_series_uuid": "../../etc"}]
    path = IdcBucket(handle=None).write_index(tmp_path / "idc_index.parquet", rows)  # type: ignore[arg-type]
    index = IdcIndex(path)
    try:
        with caplog.at_level(logging.WARNING):
            studies, _ = index.studies()
            series = index.series(["1.2.3"])["1.2.3"]
            assert index.series_location("1.2.3.3") is None
        assert [s.uid for s in studies] == ["1.2.3"]
        assert [record.uid for record, _ in series] == ["1.2.3.1"]
        lines = [r.getMessage() for r in caplog.records]
        assert any("StudyInstanceUID is malformed" in line and "not a uid" in line for line in lines), lines
        assert any("'1.2.3..2'" in line and "malformed SeriesInstanceUID" in line for line in lines), lines
        assert sum("'1.2.3.3'" in line and "series UUID" in line for line in lines) == 2, lines
    finally:
        index.close()


def test_series_terms_narrow_the_studies_and_leave_their_attributes_whole(tmp_path: Path) -> None:
    """``--query Modality=CT`` (a series-level term) leaves out, in the index's own query, the
    studies none of whose series match (the IDC index has a row per series), and a study kept
    still shows every series' modality and count; a list matches any of its values."""
    from tests.idc_bucket import IdcBucket

    row = {"collection_id": "c", "PatientID": "P", "instanceCount": 1, "aws_bucket": "idc-open-data",
           "series_size_MB": 1.0}
    rows = [{**row, "StudyInstanceUID": "1.2.1", "SeriesInstanceUID": "1.2.1.1", "Modality": "CT",
             "crdc_series_uuid": "a-1"},
            {**row, "StudyInstanceUID": "1.2.1", "SeriesInstanceUID": "1.2.1.2", "Modality": "MR",
             "crdc_series_uuid": "a-2"},
            {**row, "StudyInstanceUID": "1.2.2", "SeriesInstanceUID": "1.2.2.1", "Modality": "MR",
             "crdc_series_uuid": "b-1"},
            {**row, "StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.1", "Modality": "SEG",
             "crdc_series_uuid": "c-1"}]
    index = IdcIndex(IdcBucket(handle=None).write_index(tmp_path / "idc_index.parquet", rows))  # type: ignore[arg-type]
    try:
        studies, _ = index.studies((), parse_query(["Modality=CT"], INDEX_KEYS).terms)
        assert [s.uid for s in studies] == ["1.2.1"]
        assert studies[0].attrs["00080061"]["Value"] == ["CT", "MR"]  # every series of the study
        assert studies[0].attrs["00201206"]["Value"] == [2]
        studies, _ = index.studies((), parse_query(["Modality=CT\\SEG"], INDEX_KEYS).terms)
        assert [s.uid for s in studies] == ["1.2.1", "1.2.3"]
        studies, _ = index.studies(parse_query(["StudyInstanceUID=1.2.2"], INDEX_KEYS).terms,
                                   parse_query(["Modality=CT"], INDEX_KEYS).terms)
        assert studies == []
    finally:
        index.close()
