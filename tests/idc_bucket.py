"""An IDC-layout bucket (one object per instance, named by a UUID, under a prefix per series UUID)
in an S3 server, and a small index parquet in idc-index's schema describing it (written by duckdb)."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from tests.servers import S3BucketHandle

COLUMNS = [  # (name, duckdb type): the real index's columns, in its order
    ("collection_id", "VARCHAR"), ("analysis_result_id", "VARCHAR"), ("PatientID", "VARCHAR"),
    ("SeriesInstanceUID", "VARCHAR"), ("StudyInstanceUID", "VARCHAR"), ("source_DOI", "VARCHAR"),
    ("PatientAge", "VARCHAR"), ("PatientSex", "VARCHAR"), ("StudyDate", "VARCHAR"), ("StudyDescription", "VARCHAR"),
    ("BodyPartExamined", "VARCHAR"), ("Modality", "VARCHAR"), ("SOPClassUID", "VARCHAR"),
    ("sop_class_name", "VARCHAR"), ("TransferSyntaxUID", "VARCHAR"), ("transfer_syntax_name", "VARCHAR"),
    ("PhotometricInterpretation", "VARCHAR"), ("PixelRepresentation", "VARCHAR"), ("Manufacturer", "VARCHAR"),
    ("ManufacturerModelName", "VARCHAR"), ("SeriesDate", "VARCHAR"), ("SeriesDescription", "VARCHAR"),
    ("SeriesNumber", "VARCHAR"), ("instanceCount", "BIGINT"), ("license_short_name", "VARCHAR"),
    ("series_init_idc_version", "BIGINT"), ("series_revised_idc_version", "BIGINT"), ("aws_bucket", "VARCHAR"),
    ("crdc_series_uuid", "VARCHAR"), ("series_aws_url", "VARCHAR"), ("series_size_MB", "DOUBLE"),
]


@dataclass
class IdcBucket:
    handle: S3BucketHandle
    expected: dict[str, str] = field(default_factory=dict)  # studies/<St>/<Se>/<SOP>.dcm -> sha256
    objects: dict[str, int] = field(default_factory=dict)  # object key -> size
    series_prefix: dict[str, str] = field(default_factory=dict)  # SeriesInstanceUID -> "<uuid>/"
    object_of: dict[str, str] = field(default_factory=dict)  # studies/<St>/<Se>/<SOP>.dcm -> object key
    rows: list[dict[str, object]] = field(default_factory=list)

    def add_series(self, collection: str, files: list[bytes], *, extra_objects: dict[str, bytes] | None = None) -> str:
        """One series of ``files`` (all of one series) as IDC stores it; returns its prefix."""
        series_uuid = str(uuid.uuid4())
        first = pydicom.dcmread(pydicom.filebase.DicomBytesIO(files[0]), stop_before_pixels=True)
        objects = {}
        for data in files:
            ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data), stop_before_pixels=True)
            key = f"{series_uuid}/{uuid.uuid4()}.dcm"
            objects[key] = data
            path = f"studies/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
            self.expected[path] = hashlib.sha256(data).hexdigest()
            self.object_of[path] = key
        objects.update({f"{series_uuid}/{name}": data for name, data in (extra_objects or {}).items()})
        self.handle.upload(objects)
        self.objects.update({k: len(v) for k, v in objects.items()})
        self.series_prefix[str(first.SeriesInstanceUID)] = f"{series_uuid}/"
        date = str(first.get("StudyDate", ""))
        self.rows.append({
            "collection_id": collection, "PatientID": str(first.get("PatientID", "")),
            "SeriesInstanceUID": str(first.SeriesInstanceUID), "StudyInstanceUID": str(first.StudyInstanceUID),
            "PatientSex": str(first.get("PatientSex", "")) or None,
            "StudyDate": f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 else None,
            "StudyDescription": str(first.get("StudyDescription", "")) or None,
            "Modality": str(first.get("Modality", "OT")),
            "SeriesNumber": str(first.get("SeriesNumber", "")) or None,
            "SeriesDescription": str(first.get("SeriesDescription", "")) or None,
            "instanceCount": len(files), "license_short_name": "CC BY 4.0" if collection != "restricted" else
            "CC BY-NC 4.0", "aws_bucket": self.handle.name, "crdc_series_uuid": series_uuid,
            "series_aws_url": f"s3://{self.handle.name}/{series_uuid}/*",
            "series_size_MB": sum(map(len, files)) / 1e6,
        })
        return f"{series_uuid}/"

    def write_index(self, path: Path, extra_rows: list[dict[str, object]] = ()) -> Path:  # type: ignore[assignment]
        import duckdb

        db = duckdb.connect()
        db.execute(f"CREATE TABLE idx ({', '.join(f'{name} {kind}' for name, kind in COLUMNS)})")
        names = [name for name, _ in COLUMNS]
        for row in [*self.rows, *extra_rows]:
            db.execute(f"INSERT INTO idx VALUES ({', '.join('?' * len(names))})", [row.get(n) for n in names])
        db.execute(f"COPY idx TO '{path}' (FORMAT PARQUET)")
        db.close()
        return path
