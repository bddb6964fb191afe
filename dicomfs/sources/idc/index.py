"""The Imaging Data Commons index: idc-index-data's parquet, queried in place with duckdb.

Owns which index file is used (``--idc-index FILE``, else the installed ``idc-index-data``
package's ``idc_index.parquet``), the columns dicomfs relies on (``REQUIRED``: an index release
that renames one fails at open with one line), the index columns a ``--query`` may name besides
DICOM keywords (``INDEX_KEYS``), and turning rows into study and series records. duckdb reads the
columns a query needs straight from the file (the 74 MB index never becomes Python objects as a
whole); a connection per query (the caller runs these blocking calls in worker threads). Must
not do network I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from dicomfs import dicomjson
from dicomfs.errors import UsageError
from dicomfs.records import DicomJson, SeriesRecord, StudyRecord, dicom_datetime_ns
from dicomfs.uids import is_uid

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from dicomfs.query import Term

# The columns of idc_index.parquet that dicomfs reads (checked against the real file by a test).
REQUIRED = ("collection_id", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "StudyDate", "StudyDescription",
            "PatientAge", "PatientSex", "Modality", "BodyPartExamined", "SeriesNumber", "SeriesDescription",
            "SeriesDate", "Manufacturer", "instanceCount", "license_short_name", "aws_bucket", "crdc_series_uuid",
            "series_size_MB")
# Index columns that are not DICOM attributes: a query may name them; records carry them under
# their own names (not DICOM tags), so ``ls --json`` shows them and views may use them.
INDEX_KEYS: dict[str, tuple[str, str, str]] = {  # keyword -> (attribute key, VR, level)
    "collection_id": ("collection_id", "LO", "study"),
    "license_short_name": ("license_short_name", "LO", "series"),
    "source_DOI": ("source_DOI", "LO", "series"),
    "analysis_result_id": ("analysis_result_id", "LO", "series"),
}
# DICOM attributes the index has a column for: (keyword, tag, VR, level)
_DICOM_COLUMNS = (
    ("PatientID", "00100020", "LO", "study"), ("StudyDate", "00080020", "DA", "study"),
    ("StudyDescription", "00081030", "LO", "study"), ("PatientAge", "00101010", "AS", "study"),
    ("PatientSex", "00100040", "CS", "study"), ("Modality", "00080060", "CS", "series"),
    ("BodyPartExamined", "00180015", "CS", "series"), ("SeriesNumber", "00200011", "IS", "series"),
    ("SeriesDescription", "0008103E", "LO", "series"), ("SeriesDate", "00080021", "DA", "series"),
    ("Manufacturer", "00080070", "LO", "series"), ("StudyInstanceUID", "0020000D", "UI", "study"),
    ("SeriesInstanceUID", "0020000E", "UI", "series"),
)
_STUDY_COLUMNS = [c for c in _DICOM_COLUMNS if c[3] == "study" and c[0] != "StudyInstanceUID"]
_SERIES_COLUMNS = [c for c in _DICOM_COLUMNS if c[3] == "series" and c[0] != "SeriesInstanceUID"]
_COLUMN_OF = {keyword: keyword for keyword, *_ in _DICOM_COLUMNS} | {k: k for k in INDEX_KEYS}


# StudyTable's columns after the UID: (attribute key, VR, how many values, SQL of the value)
_TABLE_COLUMNS = [(tag, vr, 1, f"any_value({keyword})") for keyword, tag, vr, _ in _STUDY_COLUMNS] + [
    ("collection_id", "LO", 1, "any_value(collection_id)"), ("00201206", "IS", 1, "count(*)"),
    ("00201208", "IS", 1, "sum(instanceCount)"),
    ("00080061", "CS", 0, "string_agg(DISTINCT Modality, '\\' ORDER BY Modality)")]


class StudyTable:
    """Study attributes column by column (equal values shared): what ``RowAttrs`` reads."""

    def __init__(self, uids: list[str], columns: dict[str, tuple[str, int, list[Any]]]) -> None:
        self.uids = uids
        self.columns = columns

    @classmethod
    def read(cls, db: Any, where: str, parameters: list[Any]) -> StudyTable:
        """The studies of the rows ``where`` selects, fetched a column at a time from a temporary
        table (no row tuples of every column at once), malformed UIDs left out."""
        values = ", ".join(f"{sql} AS c{n}" for n, (*_, sql) in enumerate(_TABLE_COLUMNS))
        db.execute(f"CREATE TEMP TABLE studies AS SELECT StudyInstanceUID AS uid, {values} FROM idx {where} "
                   "GROUP BY StudyInstanceUID ORDER BY StudyInstanceUID", parameters)
        uids = [uid for (uid,) in db.execute("SELECT uid FROM studies").fetchall()]
        keep = [isinstance(uid, str) and is_uid(uid) for uid in uids]
        if not all(keep):
            bad = [uid for uid, ok in zip(uids, keep, strict=True) if not ok]
            log.warning("the index has %d studies whose StudyInstanceUID is malformed (the first: %.80r): left out",
                        len(bad), bad[0])
        columns: dict[str, tuple[str, int, list[Any]]] = {}
        for n, (tag, vr, single, _) in enumerate(_TABLE_COLUMNS):
            shared: dict[Any, Any] = {}
            column = [shared.setdefault(v, v) for (v,) in db.execute(f"SELECT {_normalised(f'c{n}', vr)} FROM studies")
                      .fetchall()]
            columns[tag] = (vr, single, column if all(keep) else [v for v, ok in zip(column, keep, strict=False) if ok])
        return cls(uids if all(keep) else [u for u, ok in zip(uids, keep, strict=False) if ok], columns)

    def mtimes(self) -> list[int]:
        """Each study's mtime (``records.dicom_datetime_ns`` of its StudyDate, once per date)."""
        by_date: dict[Any, int] = {}
        out = []
        for date in self.columns["00080020"][2]:
            mtime = by_date.get(date)
            if mtime is None:
                mtime = by_date[date] = dicom_datetime_ns({"00080020": {"vr": "DA", "Value": [date]}} if date else {},
                                                          "00080020", "00080030")
            out.append(mtime)
        return out


def _normalised(column: str, vr: str) -> str:
    """A study column as its DICOM JSON value: '' as NULL, dates as YYYYMMDD (the index writes
    YYYY-MM-DD), counts as integers."""
    if vr == "DA":
        return f"nullif(replace({column}, '-', ''), '')"
    if vr == "IS":
        return f"CAST({column} AS BIGINT)"
    return f"nullif({column}, '')"


class RowAttrs(Mapping[str, Any]):
    """One study's DICOM JSON, made element by element when asked from its ``StudyTable`` row."""

    __slots__ = ("_row", "_table")

    def __init__(self, table: StudyTable, row: int) -> None:
        self._table = table
        self._row = row

    def __getitem__(self, key: str) -> dict[str, Any]:
        column = self._table.columns.get(key)
        value = column[2][self._row] if column is not None else None
        if column is None or value is None:
            raise KeyError(key)
        vr, single, _ = column
        return {"vr": vr, "Value": [value] if single else value.split("\\")}

    def __iter__(self) -> Iterator[str]:
        row = self._row
        return (tag for tag, (_, _, values) in self._table.columns.items() if values[row] is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


@dataclass(frozen=True)
class SeriesLocation:
    bucket: str
    prefix: str  # "<crdc_series_uuid>/"
    instances: int
    size: int  # bytes, from series_size_MB (approximate)


def default_index() -> Path:
    """The parquet of the installed idc-index-data package."""
    try:
        import idc_index_data
    except ImportError:
        raise UsageError("the IDC index is not installed: pip install 'dicomfs[idc]' (or scripts/install.sh --idc), "
                         "or give --idc-index FILE") from None
    found = idc_index_data.IDC_INDEX_PARQUET_FILEPATH
    if found is None:
        raise UsageError("the installed idc-index-data package has no idc_index.parquet: give --idc-index FILE")
    return Path(found)


class IdcIndex:
    """The index file, opened by each query anew: duckdb keeps the memory of a query (60 MB for
    the study listing of the whole index) until its connection closes."""

    def __init__(self, path: Path, *, memory_limit: str = "256MB") -> None:
        try:
            import duckdb
        except ImportError:
            raise UsageError("the IDC source needs duckdb: pip install 'dicomfs[idc]'") from None
        if not path.is_file():
            raise UsageError(f"IDC index {path} is not a file")
        self.path = path
        self._duckdb = duckdb
        self._memory_limit = memory_limit
        try:
            with self._connection() as db:
                columns = {row[0] for row in db.execute("DESCRIBE idx").fetchall()}
        except duckdb.Error as exc:
            raise UsageError(f"IDC index {path} is not readable parquet: {str(exc).splitlines()[0][:200]}") from None
        missing = [c for c in REQUIRED if c not in columns]
        if missing:
            raise UsageError(f"IDC index {path} lacks the columns {', '.join(missing)} (a new index release?)")
        self.release = _release(path)

    def close(self) -> None:
        """Nothing stays open between queries (each has its own connection)."""

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        db = self._duckdb.connect(config={"memory_limit": self._memory_limit, "threads": 2})
        try:
            quoted = str(self.path).replace("'", "''")
            db.execute(f"CREATE VIEW idx AS SELECT * FROM read_parquet('{quoted}')")
            yield db
        finally:
            db.close()

    def _rows(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._connection() as db:
            rows: list[tuple[Any, ...]] = db.execute(sql, list(parameters)).fetchall()
            return rows

    # --- studies ------------------------------------------------------------------------------
    def studies(self, terms: Sequence[Term] = (), narrowing: Sequence[Term] = ()
                ) -> tuple[list[StudyRecord], list[Term]]:
        """The studies whose rows match the terms that translate to SQL exactly, and the terms
        left for the caller to check; of those, only studies with a series (a row) that matches
        the ``narrowing`` terms that translate (their study attributes still from every row).
        Their attributes are rows of one ``StudyTable`` (the whole index is 168,000 studies: as
        DICOM JSON dicts they would take 500 MB)."""
        where, parameters, unchecked = _where(terms)
        narrow, narrow_parameters, _ = _where(narrowing)  # (the caller checks all of them on the series)
        if narrow:
            where = f"{where} AND" if where else "WHERE"
            where += f" StudyInstanceUID IN (SELECT StudyInstanceUID FROM idx {narrow})"
            parameters += narrow_parameters
        with self._connection() as db:
            table = StudyTable.read(db, where, parameters)
        return [StudyRecord.dated(uid, cast(DicomJson, RowAttrs(table, n)), mtime)
                for n, (uid, mtime) in enumerate(zip(table.uids, table.mtimes(), strict=False))], unchecked

    # --- series -------------------------------------------------------------------------------
    def series(self, study_uids: Sequence[str]) -> dict[str, list[tuple[SeriesRecord, SeriesLocation]]]:
        """The series of these studies (one scan of the index however many), by study."""
        columns = ", ".join(keyword for keyword, *_ in _SERIES_COLUMNS)
        rows = self._rows(
            f"SELECT StudyInstanceUID, SeriesInstanceUID, {columns}, license_short_name, aws_bucket, crdc_series_uuid, "
            "instanceCount, series_size_MB FROM idx WHERE StudyInstanceUID IN (SELECT unnest(?::VARCHAR[])) "
            "ORDER BY StudyInstanceUID, SeriesInstanceUID", [list(study_uids)])
        found: dict[str, list[tuple[SeriesRecord, SeriesLocation]]] = {uid: [] for uid in study_uids}
        for row in rows:
            study_uid, uid = row[0], row[1]
            license_name, bucket, uuid, count, megabytes = row[2 + len(_SERIES_COLUMNS):]
            if not isinstance(uid, str) or not is_uid(uid) or not _safe_name(bucket) or not _safe_name(uuid):
                log.warning("index row of series %.80r (study %.80r) left out: %s", uid, study_uid,
                            "a malformed SeriesInstanceUID" if not isinstance(uid, str) or not is_uid(uid)
                            else "a bucket or series UUID that cannot be part of an object's name")
                continue
            attrs = _attrs(_SERIES_COLUMNS, row[2:2 + len(_SERIES_COLUMNS)])
            if license_name:
                attrs["license_short_name"] = {"vr": "LO", "Value": [license_name]}
            attrs["00201209"] = dicomjson.count(int(count or 0))
            found[study_uid].append((SeriesRecord(study_uid, uid, attrs), SeriesLocation(
                bucket, f"{uuid}/", int(count or 0), int((megabytes or 0) * 1_000_000))))
        return found

    def series_location(self, series_uid: str) -> SeriesLocation | None:
        rows = self._rows("SELECT aws_bucket, crdc_series_uuid, instanceCount, series_size_MB FROM idx "
                          "WHERE SeriesInstanceUID = ? LIMIT 1", [series_uid])
        if not rows:
            return None
        if not _safe_name(rows[0][0]) or not _safe_name(rows[0][1]):
            log.warning("index row of series %.80r left out: a bucket or series UUID that cannot be part of an "
                        "object's name", series_uid)
            return None
        bucket, uuid, count, megabytes = rows[0]
        return SeriesLocation(bucket, f"{uuid}/", int(count or 0), int((megabytes or 0) * 1_000_000))


    # --- notes: what a user of the data must know ---------------------------------------------
    def license_text(self, collection: str) -> str | None:
        """``LICENSE.txt`` of a collection: its series' licenses (with names and URLs where the
        package's collections index gives them) and sources; None if the index has no such
        collection."""
        rows = self._rows("SELECT license_short_name, count(*), string_agg(DISTINCT source_DOI, ' ') FROM idx "
                          "WHERE collection_id = ? GROUP BY 1 ORDER BY 2 DESC, 1", [collection])
        if not rows:
            return None
        names: dict[str, tuple[str, str]] = {}
        title = collection
        companion = self.path.parent / "collections_index.parquet"
        if companion.is_file():
            try:
                with self._connection() as db:
                    for name, short, long_name, url in db.execute(
                            "SELECT collection_name, s.license.license_short_name, s.license.license_long_name, "
                            "s.license.license_url FROM (SELECT collection_name, unnest(sources) AS s "
                            "FROM read_parquet(?) WHERE collection_id = ?)", [str(companion), collection]).fetchall():
                        title = name or title
                        if short:
                            names[short] = (long_name or "", url or "")
            except self._duckdb.Error:
                pass  # a collections index of another shape: the license names alone
        lines = [f"Collection: {title} ({collection}), Imaging Data Commons", f"Index: {self.release}", "",
                 "Licenses of its series (use the data under these terms):"]
        for short, count, dois in rows:
            long_name, url = names.get(short or "", ("", ""))
            lines.append(f"  {short or 'unknown'}: {count} series" + (f" - {long_name}" if long_name else "")
                         + (f" - {url}" if url else ""))
            if dois:
                lines.append(f"    cite: {', '.join(f'https://doi.org/{d}' for d in dois.split())}")
        return "\n".join(lines) + "\n"

    def version_text(self) -> str:
        """``VERSION.txt`` at the mount root: which IDC release and index file this is."""
        lines = [f"Imaging Data Commons, {self.release}", f"index: {self.path}"]
        companion = self.path.parent / "version_metadata_index.parquet"
        if companion.is_file():
            try:
                with self._connection() as db:
                    version, stamp = db.execute("SELECT max(idc_version), max(version_timestamp) "
                                                "FROM read_parquet(?)", [str(companion)]).fetchone() or (None, None)
                if version is not None:
                    lines.insert(1, f"IDC release: v{version} ({stamp})")
            except self._duckdb.Error:
                pass
        return "\n".join(lines) + "\n"


def query_keys() -> dict[str, tuple[str, str, str]]:
    """What ``--query`` accepts for an IDC source besides DICOM keywords, and the DICOM keywords
    the index has at another level than the query model's (PatientAge: a study's column here, an
    instance's attribute there): matched there, from the index, not on instances (which would
    mean reading every object's header from the bucket)."""
    from dicomfs.query import level_of

    return {**INDEX_KEYS, **{keyword: (tag, vr, level) for keyword, tag, vr, level in _DICOM_COLUMNS
                             if level != level_of(keyword)}}


def _attrs(columns: Sequence[tuple[str, str, str, str]], values: Sequence[Any]) -> DicomJson:
    attrs: DicomJson = {}
    for (_, tag, vr, _), value in zip(columns, values, strict=False):
        if value is None or value == "":
            continue
        if vr == "DA":
            value = str(value).replace("-", "")  # the index writes dates as YYYY-MM-DD
        elif vr == "IS":
            try:
                value = int(float(value))
            except ValueError:
                continue
        attrs[tag] = {"vr": vr, "Value": [value]}
    return attrs


def _where(terms: Sequence[Term]) -> tuple[str, list[Any], list[Term]]:
    """SQL for the terms an index column answers exactly: equality, wildcards, UID lists; the
    rest (date ranges, person names, attributes the index lacks) is returned to be checked."""
    clauses: list[str] = []
    parameters: list[Any] = []
    unchecked: list[Term] = []
    for term in terms:
        column = _COLUMN_OF.get(term.keyword)
        value = term.value
        if column is None or term.is_range or term.vr in ("DA", "TM", "DT", "PN", "IS") or value.strip("*") == "":
            unchecked.append(term)
            continue
        if len(term.values) > 1:  # a list (``CT\\MR``): any of its values
            if any("*" in v or "?" in v for v in term.values):
                unchecked.append(term)
                continue
            clauses.append(f"{column} IN ({', '.join('?' * len(term.values))})")
            parameters.extend(v.strip() for v in term.values)
        elif "*" in value or "?" in value:
            escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            clauses.append(f"{column} LIKE ? ESCAPE '\\'")
            parameters.append(escaped.replace("*", "%").replace("?", "_"))
        else:
            clauses.append(f"{column} = ?")
            parameters.append(value.strip())
    return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), parameters, unchecked


def _safe_name(value: object) -> bool:
    """A bucket name or series UUID that may go into a URL: no '/', '..' or odd characters."""
    return (isinstance(value, str) and 0 < len(value) <= 100 and ".." not in value
            and all(c.isalnum() or c in "-_." for c in value))


def _release(path: Path) -> str:
    """Which IDC release the index is (the idc-index-data version names it), or 'unknown'."""
    try:
        import idc_index_data

        installed = idc_index_data.IDC_INDEX_PARQUET_FILEPATH
        if installed is not None and Path(installed).resolve() == path.resolve():
            return f"idc-index-data {idc_index_data.__version__}"
    except ImportError:
        pass
    return f"index file {path.name}"
