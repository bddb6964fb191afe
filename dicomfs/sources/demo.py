"""The built-in demo archive: DICOM test files from the pydicom wheel, with fresh, deterministic UIDs.

Owns the choice of files, how they are grouped into studies and series, and the rewriting of
their UIDs (so files that share a SOPInstanceUID in the wheel do not collapse). The demo is a
folder source over the generated files; ``build_demo_archive`` is also used by the tests to
upload the very same files to a real archive. Must not touch the network.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from dicomfs.sources.folder import FolderSource

log = logging.getLogger(__name__)

DEMO_VERSION = "2"


@dataclass(frozen=True)
class DemoGroup:
    """Files that become one study (or, with ``keep_grouping``, keep their own studies)."""

    label: str
    patient: str
    study_date: str
    series: dict[str, tuple[str, ...]]  # series label -> test file names


DEMO_GROUPS = (
    DemoGroup("mr", "DEMO^MR VARIANTS", "20190312", {
        "mr-syntaxes": ("MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
                        "MR_small_expb.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                        "MR_small_jpeg_ls_lossless.dcm", "MR_small_padded.dcm"),
    }),
    DemoGroup("ct", "DEMO^CT AND SC", "20200704", {
        "ct": ("CT_small.dcm", "JPEG2000.dcm", "JPEG-lossy.dcm", "JPGExtended.dcm",
               "JPEGLSNearLossless_16.dcm"),
        "sc": ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm", "SC_rgb_small_odd.dcm", "image_dfl.dcm",
               "SC_rgb_jls_lossy_line.dcm"),
    }),
    DemoGroup("multiframe", "DEMO^MULTIFRAME", "20211130", {
        "us-jpeg": ("examples_ybr_color.dcm",),
        "rtdose": ("rtdose.dcm",),
        "sc-rle": ("SC_rgb_rle_2frame.dcm", "SC_rgb_rle_16bit_2frame.dcm"),
        "j2k": ("examples_jpeg2k.dcm",),
    }),
)
# Folders of the wheel's DICOMDIR test set: real multi-study patients, grouping kept as is.
DICOMDIR_FOLDERS = ("77654033", "98892001", "98892003")


def _test_files_dir() -> Path:
    import pydicom.data

    return Path(pydicom.data.__file__).parent / "test_files"


_DEMO_NAMESPACE = uuid.UUID("5a0c3a6e-4f7e-4d8e-9a55-6d1c0f5e2b11")


def _new_uid(*parts: str) -> str:
    """A deterministic UID in the 2.25 (UUID-derived) arc."""
    return f"2.25.{uuid.uuid5(_DEMO_NAMESPACE, '/'.join(parts)).int}"


def _rewrite(src: Path, dst: Path, study_key: str, series_key: str, instance_key: str,
             overrides: dict[str, str]) -> None:
    import pydicom
    from pydicom.uid import UID

    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID = _new_uid("study", study_key)
    ds.SeriesInstanceUID = _new_uid("series", study_key, series_key)
    sop = UID(_new_uid("instance", instance_key))
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    for keyword, value in overrides.items():
        setattr(ds, keyword, value)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)


def build_demo_archive(target: Path) -> Path:
    """Write the demo archive below ``target`` (once; a version marker makes it idempotent)."""
    marker = target / ".dicomfs-demo-version"
    if marker.exists() and marker.read_text() == DEMO_VERSION:
        return target
    tmp = target.with_name(target.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    files = _test_files_dir()
    count = 0
    for group in DEMO_GROUPS:
        for series_label, names in group.series.items():
            for number, name in enumerate(names, start=1):
                overrides = {
                    "PatientName": group.patient, "PatientID": f"DEMO-{group.label.upper()}",
                    "StudyDate": group.study_date, "StudyTime": "101500",
                    "StudyDescription": f"dicomfs demo: {group.label}",
                    "SeriesDescription": series_label, "InstanceNumber": str(number),
                }
                _rewrite(files / name, tmp / group.label / series_label / name,
                         group.label, series_label, f"{group.label}/{series_label}/{name}", overrides)
                count += 1
    for folder in DICOMDIR_FOLDERS:
        for path in sorted((files / "dicomdirtests" / folder).rglob("*")):
            if not path.is_file():
                continue
            import pydicom

            original = pydicom.dcmread(path, stop_before_pixels=True)
            rel = path.relative_to(files / "dicomdirtests")
            _rewrite(path, tmp / "dicomdir" / rel.parent / (rel.name + ".dcm"),
                     str(original.StudyInstanceUID), str(original.SeriesInstanceUID),
                     str(rel), {})
            count += 1
    # Stable mtimes: a rebuilt demo looks the same to rsync.
    for path in tmp.rglob("*.dcm"):
        os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    (tmp / ".dicomfs-demo-version").write_text(DEMO_VERSION)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    log.info("built the demo archive: %d instances in %s", count, target)
    return target


def open_demo_source(work_dir: Path) -> FolderSource:
    return FolderSource(build_demo_archive(work_dir / "demo-archive"), work_dir)
