"""Unit tests of the readable views: names, templates, collisions, one file in every view.

Operations are called directly (no FUSE) over a scripted archive whose listings carry the
attributes a DICOMweb server's would; the real mounts are in test_mount_views.py.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path

import pytest

from dicomfs.cache import BlobStore
from dicomfs.catalog import Catalog
from dicomfs.errors import UsageError
from dicomfs.records import DicomJson, InstanceRecord, SeriesRecord, StudyRecord
from dicomfs.views import ViewOptions, names
from dicomfs.views.template import parse
from tests.factory import make_instance
from tests.test_operations import Mounted, ScriptedArchive, operations

# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("char", ["/", "\\", "\x00", "\x01", "\x1f", "\x7f", "\x85", "<", ">", ":", '"', "|",
                                  "?", "*"])
def test_every_forbidden_character_becomes_an_underscore(char: str) -> None:
    assert names.safe(f"a{char}b") == "a_b"


def test_leading_dots_and_trailing_dots_and_spaces_are_dropped() -> None:
    assert names.safe("..hidden") == "hidden"
    assert names.safe("name. . ") == "name"
    assert names.safe("...") == names.UNNAMED
    assert names.safe("") == names.UNNAMED


def test_a_long_name_is_cut_to_255_bytes_on_a_character_boundary() -> None:
    long = "Ü" * 200  # two bytes each
    cut = names.safe(long)
    assert len(cut.encode()) <= 255 and cut == "Ü" * 127
    with_ext = names.safe("a" + "€" * 100, keep=".dcm")  # three bytes each
    assert with_ext.endswith(".dcm") and len(with_ext.encode()) <= 255
    with_ext.encode().decode()  # still valid UTF-8
    assert names.with_suffix(names.safe("€" * 100, keep=".dcm"), "1.2.3", ".dcm").endswith("].dcm")
    assert len(names.with_suffix(names.safe("€" * 100, keep=".dcm"), "1.2.3", ".dcm").encode()) <= 255


def test_ascii_folding_keeps_letters_readable() -> None:
    assert names.safe("MÜLLER^Zoë Straße Øre", ascii_only=True) == "MULLER^Zoe Strasse Ore"
    assert names.safe("山田", ascii_only=True) == "__"
    assert names.safe("MÜLLER") == "MÜLLER"  # kept without --ascii-names


def test_values_read_as_people_read_them() -> None:
    assert names.person_name({"Alphabetic": "Doe^John^^Dr"}) == "Doe John Dr"
    assert names.date("20240301") == "2024-03-01"
    assert names.number(2, 3) == "002" and names.number("17", 5) == "00017" and names.number(1234, 3) == "1234"


def _render(template: str, study: DicomJson, series: DicomJson | None = None, instance: DicomJson | None = None,
            key: str = "1.2.3.4") -> list[str]:
    by_level = (study, series or {}, instance or {})
    parsed = parse(template)
    return [c.render(by_level, key=key, extension=".dcm" if i == parsed.depth - 1 else "")
            for i, c in enumerate(parsed.components)]


def test_placeholders_for_missing_values_and_the_uid_for_a_missing_instance_number() -> None:
    assert _render("{PatientName} ({PatientID})/{StudyDate} {StudyDescription}/"
                   "{SeriesNumber} {Modality} {SeriesDescription}/{InstanceNumber}.dcm", {}) == [
        "unnamed (no ID)", "no date unnamed", "no number unnamed unnamed", "1.2.3.4.dcm"]


def test_awkward_values_make_safe_names() -> None:
    study = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "O'Brien^Seán"}]},
             "00100020": {"vr": "LO", "Value": ["a/b"]},
             "00081030": {"vr": "LO", "Value": ["Chest/Abdomen: \"contrast\"?"]},
             "00080020": {"vr": "DA", "Value": ["20240301"]}}
    assert _render("{PatientName} ({PatientID})/{YYYY}/{YYYY-MM}/{StudyDate} {StudyDescription}/"
                   "{InstanceNumber}.dcm", study, instance={"00200013": {"vr": "IS", "Value": [7]}}) == [
        "O'Brien Seán (a_b)", "2024", "2024-03", "2024-03-01 Chest_Abdomen_ _contrast__", "00007.dcm"]


# --- templates -----------------------------------------------------------------------------


@pytest.mark.parametrize(("template", "complaint"), [
    ("", "empty"),
    ("{PatientName}//{InstanceNumber}.dcm", "empty"),
    ("{PatientName}/{InstanceNumber}", "must end in .dcm"),
    ("{Nope}/{InstanceNumber}.dcm", "unknown keyword {Nope}"),
    ("{PatientName/{InstanceNumber}.dcm", "unmatched"),
    ("{SeriesNumber}/{InstanceNumber}.dcm", "first level must use study"),
    ("{PatientName}/{InstanceNumber}/{SOPInstanceUID}.dcm", "only the file name may use instance"),
    ("{PatientName}/{SeriesNumber}.dcm", "must use an instance attribute"),
    ("{PatientName}/../{InstanceNumber}.dcm", "is not a folder name"),
    ("{PatientName}/fixed/{InstanceNumber}.dcm", "uses no {Keyword}"),
])
def test_a_bad_template_is_a_one_line_usage_error(template: str, complaint: str) -> None:
    with pytest.raises(UsageError) as raised:
        ViewOptions.parse(None, [f"mine={template}"], False)
    assert complaint in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize(("views", "custom", "complaint"), [
    ("studies,nope", [], "unknown view 'nope'"),
    ("studies", ["studies={PatientID}/{InstanceNumber}.dcm"], "already a view"),
    ("", [], "at least one view"),
    (None, ["a/b={PatientID}/{InstanceNumber}.dcm"], "cannot be a folder name"),
    (None, ["{PatientID}/{InstanceNumber}.dcm"], "NAME=TEMPLATE"),
])
def test_bad_view_choices_are_usage_errors(views: str | None, custom: list[str], complaint: str) -> None:
    with pytest.raises(UsageError, match=complaint):
        ViewOptions.parse(views, custom, False)


# --- views over a scripted archive ---------------------------------------------------------


def _pn(value: str) -> DicomJson:
    return {"vr": "PN", "Value": [{"Alphabetic": value}]}


def _v(vr: str, value: object) -> DicomJson:
    return {"vr": vr, "Value": [value]}


class ListedArchive(ScriptedArchive):
    """Listings with attributes, as a DICOMweb server gives them, in an order that can be shuffled."""

    def __init__(self, studies: dict[str, DicomJson], series: dict[str, DicomJson],
                 instances: dict[str, tuple[str, DicomJson, bytes]], seed: int | None = None) -> None:
        blobs: dict[str, dict[str, bytes]] = {key: {} for key in series}
        for sop, (series_key, _, data) in instances.items():
            blobs[series_key][sop] = data
        super().__init__(blobs)
        self.study_attrs, self.series_attrs, self.instance_attrs = studies, series, instances
        self.order = random.Random(seed) if seed is not None else None

    def _ordered(self, items: list) -> list:  # type: ignore[type-arg]
        if self.order is not None:
            self.order.shuffle(items)
        return items

    async def list_studies(self) -> list[StudyRecord]:
        self.listings["studies"] += 1
        return self._ordered([StudyRecord(uid, attrs) for uid, attrs in self.study_attrs.items()])

    async def list_series(self, study_uid: str) -> list[SeriesRecord]:
        self.listings["series"] += 1
        return self._ordered([SeriesRecord(study_uid, key.split("/")[1], attrs) for key, attrs
                              in self.series_attrs.items() if key.startswith(study_uid + "/")])

    async def list_instances(self, series: SeriesRecord) -> list[InstanceRecord]:
        self.listings["instances"] += 1
        return self._ordered([InstanceRecord(series.study_uid, series.uid, sop, attrs=attrs) for sop, (key, attrs, _)
                              in self.instance_attrs.items() if key == series.key])


def _archive(seed: int | None = None) -> ListedArchive:
    """Two patients whose names read the same once made safe, one study each; the first study
    has two series with the same number, modality and description."""
    studies = {
        "1.1": {"00100010": _pn("Doe^John"), "00100020": _v("LO", "A/1"), "00080020": _v("DA", "20240301"),
                "00081030": _v("LO", "CT Chest/Abdomen")},
        "1.2": {"00100010": _pn("Doe^John"), "00100020": _v("LO", "A_1"), "00080020": _v("DA", "20240302"),
                "00081030": _v("LO", "MR")},
    }
    series = {
        "1.1/1.1.1": {"00080060": _v("CS", "CT"), "00200011": _v("IS", 2), "0008103E": _v("LO", "Axial")},
        "1.1/1.1.2": {"00080060": _v("CS", "CT"), "00200011": _v("IS", 2), "0008103E": _v("LO", "Axial")},
        "1.2/1.2.1": {"00080060": _v("CS", "MR"), "00200011": _v("IS", 1)},
    }
    instances: dict[str, tuple[str, DicomJson, bytes]] = {}
    for key in series:
        study, uid = key.split("/")
        for n in (1, 2):
            sop = f"{uid}.{n}"
            instances[sop] = (key, {"00200013": _v("IS", n)}, make_instance(study, uid, sop, number=n))
    return ListedArchive(studies, series, instances, seed)


async def _walk(fs: Mounted, path: str) -> dict[str, tuple[int, int, int]]:
    """Every file below ``path``: relative path -> (inode, links, size)."""
    out: dict[str, tuple[int, int, int]] = {}
    for name, attr in (await fs.listdir(path)).items():
        child = f"{path}/{name}"
        if attr.st_mode & 0o040000:
            out.update({f"{name}/{k}": v for k, v in (await _walk(fs, child)).items()})
        else:
            out[name] = (attr.st_ino, attr.st_nlink, attr.st_size)
    return out


Files = Mapping[str, tuple[int, int, int] | bytes]  # a view's (inode, links, size), or "_bytes": the bytes read


async def _views_of(archive: ListedArchive, cache: Path, options: ViewOptions | None = None) -> dict[str, Files]:
    blobs = BlobStore(cache, 1 << 30, archive)  # type: ignore[arg-type]
    catalog = Catalog(archive, None)  # type: ignore[arg-type]
    import trio

    async with trio.open_nursery() as nursery:
        await nursery.start(blobs.run)
        fs = Mounted(operations(catalog, blobs, views=options))
        found: dict[str, Files] = {view: await _walk(fs, view) for view in await fs.listdir("")}
        found["_bytes"] = {p: await fs.read(f"patients/{p}") for p in found["patients"]}
        nursery.cancel_scope.cancel()
    blobs.close()
    return found


async def test_colliding_names_get_suffixes_that_do_not_depend_on_listing_order(tmp_path: Path) -> None:
    first = await _views_of(_archive(seed=1), tmp_path / "a")
    again = await _views_of(_archive(seed=7), tmp_path / "b")  # the archive lists in another order
    assert sorted(first["patients"]) == sorted(again["patients"])
    patients = sorted({p.split("/")[0] for p in first["patients"]})
    assert len(patients) == 2 and all(p.startswith("Doe John (A_1) [") for p in patients)
    series = sorted({p.split("/")[2] for p in first["patients"] if p.split("/")[1].startswith("2024-03-01")})
    assert len(series) == 2 and all(s.startswith("002 CT Axial [") for s in series)
    assert sorted({p.split("/")[2] for p in first["patients"] if "2024-03-02" in p}) == ["001 MR unnamed"]


async def test_an_instance_is_one_file_in_every_view(tmp_path: Path) -> None:
    archive = _archive()
    found = await _views_of(archive, tmp_path)
    assert list(found)[:4] == ["studies", "patients", "dates", "dicomweb"]
    studies, patients, dates = found["studies"], found["patients"], found["dates"]
    assert len(studies) == len(patients) == len(dates) == 6
    assert {v[0] for v in studies.values()} == {v[0] for v in patients.values()} == {v[0] for v in dates.values()}
    assert {v[1] for v in patients.values()} == {3}  # st_nlink: studies, patients, dates
    by_inode = {inode: path for path, (inode, _, _) in studies.items()}
    for path, (inode, _, _) in patients.items():
        sop = by_inode[inode].split("/")[-1][: -len(".dcm")]
        assert found["_bytes"][path] == archive.instance_attrs[sop][2]


async def test_listing_every_view_downloads_nothing(tmp_path: Path) -> None:
    archive = _archive()
    blobs = BlobStore(tmp_path, 1 << 30, archive)  # type: ignore[arg-type]
    catalog = Catalog(archive, None)  # type: ignore[arg-type]
    import trio

    async with trio.open_nursery() as nursery:
        await nursery.start(blobs.run)
        fs = Mounted(operations(catalog, blobs))
        for view in ("studies", "patients", "dates"):
            await _walk(fs, view)
        nursery.cancel_scope.cancel()
    blobs.close()
    assert not archive.calls  # no series was fetched


async def test_views_chosen_and_custom_views(tmp_path: Path) -> None:
    options = ViewOptions.parse("patients", ["by-date={StudyDate}/{SeriesNumber}/{InstanceNumber}.dcm"], True)
    found = await _views_of(_archive(), tmp_path, options)
    assert [v for v in found if not v.startswith("_")] == ["patients", "by-date"]
    by_date = sorted(found["by-date"])
    assert [p for p in by_date if p.startswith("2024-03-02/")] == ["2024-03-02/001/00001.dcm",
                                                                    "2024-03-02/001/00002.dcm"]
    first_day = sorted({p.split("/")[1] for p in by_date if p.startswith("2024-03-01/")})
    assert len(first_day) == 2 and all(f.startswith("002 [") for f in first_day)
    assert {v[1] for v in found["patients"].values()} == {2}  # two views show instances


async def test_probe_names_are_enoent_in_every_view_without_asking_the_archive(tmp_path: Path) -> None:
    import errno

    import pyfuse3
    import trio

    archive = _archive()
    blobs = BlobStore(tmp_path, 1 << 30, archive)  # type: ignore[arg-type]
    catalog = Catalog(archive, None)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(blobs.run)
        fs = Mounted(operations(catalog, blobs))
        for folder in ("", "studies", "patients", "dates", "dicomweb", "dicomweb/studies"):
            parent = await fs.resolve(folder)
            for probe in (".Trash-0", "desktop.ini", "._x", ".DS_Store"):
                with pytest.raises(pyfuse3.FUSEError) as raised:
                    await fs.ops.lookup(parent, probe.encode())
                assert raised.value.errno == errno.ENOENT
        nursery.cancel_scope.cancel()
    blobs.close()
    assert not archive.listings and not archive.calls  # nothing was listed, nothing fetched
