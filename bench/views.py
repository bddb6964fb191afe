"""Readable views benchmark: listing ``patients/`` against listing ``studies/`` of the same archive,
both from a warm catalog.

    .venv/bin/python -m bench.views [--studies 10000] [--repeat 7]

The archive is an in-memory source of ``--studies`` studies with the attributes a QIDO-RS answer
carries (patient name and ID, date, description), once with one study per patient (as many
``patients/`` entries as studies: the worst case) and once with three; a quarter of the names are
shared by two patients, so collision suffixes are computed too. Both listings go through the
mount's Operations (``opendir`` + ``readdir`` of the folder, as ``ls`` causes), without FUSE: the
kernel's share would be the same for both and only hide the difference. The catalog is listed once
before any timing (warm, as the issue asks); each repetition builds a fresh tree over it, so the
first ``patients/`` listing of a repetition makes the view's folder from the listing (cold view),
and a second one reuses it (warm view). The order of the two sides alternates between repetitions;
each timing starts after a ``gc.collect()`` (a full collection set off by the other side's garbage
would otherwise land in either figure at random); medians. Writes ``bench/results/views-latest.json``
and the block between ``bench-views:begin`` and ``bench-views:end`` in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from bench import report  # noqa: E402
from dicomfs.cache import BlobStore  # noqa: E402
from dicomfs.catalog import Catalog  # noqa: E402
from dicomfs.records import InstanceRecord, SeriesRecord, StudyRecord  # noqa: E402
from dicomfs.sources.base import SeriesSink  # noqa: E402
from tests.test_operations import Mounted, operations  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench-views:begin -->", "<!-- bench-views:end -->"
TARGET = 1.5


class ListedSource:
    """Studies with QIDO-style attributes; series and instances are never asked for here."""

    description = "in-memory archive"
    serves_files_in_place = False

    def __init__(self, count: int, per_patient: int) -> None:
        self.studies = []
        patients = max(count // per_patient, 1)
        for n in range(count):
            patient = n // per_patient
            name = f"PATIENT^{patient % max(patients * 3 // 4, 1):05d}"  # a quarter of the names shared
            attrs = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": name}]},
                     "00100020": {"vr": "LO", "Value": [f"ID{patient:06d}"]},
                     "00080020": {"vr": "DA", "Value": [f"20{n % 25:02d}0{1 + n % 9}1{n % 10}"]},
                     "00081030": {"vr": "LO", "Value": [f"STUDY {n % 7}"]},
                     "00080061": {"vr": "CS", "Value": ["CT"]}}
            self.studies.append(StudyRecord(f"1.2.826.0.1.3680043.10.{n}", attrs))

    async def check(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def list_studies(self) -> list[StudyRecord]:
        return list(self.studies)

    async def list_series(self, study_uid: str) -> list[SeriesRecord]:
        raise AssertionError("listing patients/ must not list series")

    async def list_instances(self, series: SeriesRecord) -> list[InstanceRecord]:
        raise AssertionError("listing patients/ must not list instances")

    async def fetch_series(self, series: SeriesRecord, sink: SeriesSink) -> None:
        raise AssertionError("listing patients/ must not fetch")

    def local_file(self, instance: InstanceRecord) -> None:
        return None


async def measure(count: int, per_patient: int, repeat: int) -> dict[str, object]:
    source = ListedSource(count, per_patient)
    samples: dict[str, list[float]] = {"studies": [], "patients (cold view)": [], "patients (warm view)": []}
    entries: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as scratch:
        blobs = BlobStore(Path(scratch), 1 << 30, source)
        catalog = Catalog(source, None, listing_ttl=3600)
        async with trio.open_nursery() as nursery:
            await nursery.start(blobs.run)
            await catalog.studies()  # the warm catalog
            for rep in range(repeat):
                fs = Mounted(operations(catalog, blobs, listing_ttl=3600))

                async def timed(folder: str, fs: Mounted = fs) -> tuple[float, int]:
                    gc.collect()  # each side starts from the same heap, and pays for its own garbage
                    start = time.perf_counter()
                    listed = await fs.listdir(folder)
                    return time.perf_counter() - start, len(listed)

                order = ["studies", "patients"] if rep % 2 == 0 else ["patients", "studies"]
                for folder in order:
                    seconds, n = await timed(folder)
                    samples["studies" if folder == "studies" else "patients (cold view)"].append(seconds)
                    entries[folder] = n
                seconds, _ = await timed("patients")
                samples["patients (warm view)"].append(seconds)
            nursery.cancel_scope.cancel()
        blobs.close()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {"studies": count, "per_patient": per_patient, "repeat": repeat, "samples": samples, "medians": medians,
            "entries": entries,
            "ratio_cold": medians["patients (cold view)"] / medians["studies"],
            "ratio_warm": medians["patients (warm view)"] / medians["studies"]}


def write_folder_archive(folder: Path, count: int) -> None:
    """``count`` studies of one tiny instance each, one study per patient, as P10 files."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    folder.mkdir(parents=True)
    for n in range(count):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
        meta.MediaStorageSOPInstanceUID = UID(f"1.2.826.0.1.3680043.10.{n}.1.1")
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.{n}", f"1.2.826.0.1.3680043.10.{n}.1"
        ds.PatientName, ds.PatientID = f"PATIENT^{n % (count * 3 // 4):05d}", f"ID{n:06d}"
        ds.StudyDate, ds.StudyDescription = f"20{n % 25:02d}0101", f"STUDY {n % 7}"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "OT", 1, 1
        ds.save_as(folder / f"{n}.dcm", enforce_file_format=True)


def measure_fuse(count: int, repeat: int) -> dict[str, object]:
    """The same comparison through a real mount of a folder archive and ``ls -f`` (no stat):
    each repetition remounts (the catalog comes back from the cache's store), warms the catalog
    with one lookup in ``studies/``, then lists both folders in alternating order, and
    ``patients/`` once more."""
    import subprocess

    from tests.mounting import Mount

    samples: dict[str, list[float]] = {"studies": [], "patients (cold view)": [], "patients (warm view)": []}
    entries: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        write_folder_archive(root / "archive", count)
        mount = Mount(str(root / "archive"), root / "mnt", root / "cache", "--log-level", "WARNING",
                      "--listing-ttl", "3600")

        def timed(folder: str) -> float:
            start = time.perf_counter()
            out = subprocess.run(["ls", "-f", str(mount.path / folder)], capture_output=True, check=True,
                                 timeout=600).stdout
            seconds = time.perf_counter() - start
            entries[folder] = len([n for n in out.split(b"\n") if n and n not in (b".", b"..")])
            return seconds

        try:
            for rep in range(repeat):
                mount.start()
                os.stat(mount.path / "studies" / "1.2.826.0.1.3680043.10.0")  # the catalog, warm
                order = ["studies", "patients"] if rep % 2 == 0 else ["patients", "studies"]
                for folder in order:
                    samples["studies" if folder == "studies" else "patients (cold view)"].append(timed(folder))
                samples["patients (warm view)"].append(timed("patients"))
                mount.stop()
        finally:
            mount.stop()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {"studies": count, "per_patient": 1, "repeat": repeat, "samples": samples, "medians": medians,
            "entries": entries, "via": "FUSE",
            "ratio_cold": medians["patients (cold view)"] / medians["studies"],
            "ratio_warm": medians["patients (warm view)"] / medians["studies"]}


def render(runs: list[dict[str, object]], machine: dict[str, object]) -> str:
    first = runs[0]
    lines = [
        BEGIN,
        f"Run {machine['date']}, commit {machine['dicomfs_commit']}, {machine['nproc']} cores, "
        f"Python {machine['python']}; {first['studies']} studies, medians of {first['repeat']} interleaved "
        "repetitions; the Operations rows call the mount's Operations directly (no FUSE), the FUSE rows time "
        "`ls -f` of a real mount of a folder archive.",
        "",
        "| archive | listing, warm catalog | median | entries | ratio to `studies/` | target |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for results in runs:
        lines.extend(_rows(results))
    lines.append(END)
    return "\n".join(lines)


def _rows(results: dict[str, object]) -> list[str]:
    medians = results["medians"]
    assert isinstance(medians, dict)
    entries = results["entries"]
    assert isinstance(entries, dict)
    cold, warm = results["ratio_cold"], results["ratio_warm"]
    assert isinstance(cold, float) and isinstance(warm, float)
    verdict = "met" if cold <= TARGET else "missed"
    archive = (f"{results.get('via', 'Operations')}, {results['per_patient']} "
               f"stud{'y' if results['per_patient'] == 1 else 'ies'} per patient")
    return [
        f"| {archive} | `studies/` | {medians['studies'] * 1000:.1f} ms | {entries['studies']} | 1 | — |",
        f"| {archive} | `patients/`, first listing (view folder made) | "
        f"{medians['patients (cold view)'] * 1000:.1f} ms | {entries['patients']} | **{cold:.2f}×** "
        f"| ≤ {TARGET}× ({verdict}) |",
        f"| {archive} | `patients/`, again (view folder reused) | {medians['patients (warm view)'] * 1000:.1f} ms "
        f"| {entries['patients']} | {warm:.2f}× | — |",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    runs = [trio.run(measure, args.studies, per_patient, args.repeat) for per_patient in (1, 3)]
    runs.append(measure_fuse(args.studies, args.repeat))
    machine = report.machine_facts()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "views-latest.json").write_text(json.dumps({"machine": machine, "runs": runs}, indent=1))
    block = render(runs, machine)
    print(block)
    if not args.no_doc:
        report.replace_block(DOC, block, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
