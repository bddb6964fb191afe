"""The DICOM JSON rendering against PS3.18 Annex F rules, and pydicom round trips of real files."""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence

from dicomfs import dicomjson
from dicomfs.dicomread import read_dataset
from dicomfs.sources.bucket import Chunks

DEMO_FILES = ("MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "CT_small.dcm",
              "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm", "image_dfl.dcm", "examples_ybr_color.dcm",
              "rtdose.dcm", "SC_rgb_rle_2frame.dcm", "examples_jpeg2k.dcm", "rtplan.dcm",
              "waveform_ecg.dcm")


def recording_uri(seen: list[str]) -> dicomjson.BulkUri:
    def uri(path: dicomjson.TagPath) -> str:
        seen.append(".".join(path))
        return "bulkdata/" + ".".join(path)
    return uri


def test_annex_f_rules_on_archive_json() -> None:
    seen: list[str] = []
    raw = {
        "00100010": {"vr": "PN", "Value": ["Doe^Jane"]},
        "00080000": {"vr": "UL", "Value": [10]},  # group length
        "00020010": {"vr": "UI", "Value": ["1.2.840.10008.1.2.4.80"]},
        "00020000": {"vr": "UL", "Value": [100]},
        "00080008": {"vr": "CS", "Value": ["ORIGINAL\\PRIMARY"]},
        "00281050": {"vr": "DS", "Value": [float("nan"), "40.0", 12.5]},
        "00280010": {"vr": "US", "Value": [512]},
        "0009a010": {"vr": "LO", "InlineBinary": "AAAA"},  # InlineBinary on a text VR
        "00282000": {"vr": "OB", "BulkDataURI": "http://archive/elsewhere/bulk/00282000"},
        "7fe00010": {"vr": "OW", "BulkDataURI": {"uri": "gs://x", "head": "y"}},
        "00400275": {"vr": "SQ", "Value": [{"00400007": {"vr": "LO", "Value": ["x"]},
                                            "00000000": {"vr": "UL", "Value": [4]},
                                            "00660023": {"vr": "OF", "BulkDataURI": "b"}}]},
        "00181000": {"vr": "LO"},
        "00200013": {"vr": "IS", "Value": ["7"]},
    }
    out = dicomjson.normalise(raw, recording_uri(seen))
    keys = list(out)
    assert keys == sorted(keys) and all(len(k) == 8 and k == k.upper() for k in keys)
    assert not [k for k in keys if k.endswith("0000") or k.startswith("0002")]
    assert out["00083002"] == {"vr": "UI", "Value": ["1.2.840.10008.1.2.4.80"]}
    assert out["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]}
    assert out["00080008"]["Value"] == ["ORIGINAL", "PRIMARY"]
    assert out["00281050"]["Value"] == [None, 40, 12.5]
    assert out["00200013"]["Value"] == [7]
    assert "0009A010" not in out
    assert out["00282000"] == {"vr": "OB", "BulkDataURI": "bulkdata/00282000"}
    assert out["7FE00010"] == {"vr": "OW", "BulkDataURI": "bulkdata/7FE00010"}
    nested = out["00400275"]["Value"][0]
    assert list(nested) == ["00400007", "00660023"]
    assert nested["00660023"]["BulkDataURI"] == "bulkdata/00400275.0.00660023"
    assert out["00181000"] == {"vr": "LO"}
    assert sorted(seen) == ["00282000", "00400275.0.00660023", "7FE00010"]
    for element in out.values():  # at most one of Value / BulkDataURI / InlineBinary
        assert len({"Value", "BulkDataURI", "InlineBinary"} & set(element)) <= 1
    json.loads(dicomjson.encode(out), parse_constant=lambda name: pytest.fail(f"{name} in the output"))


def test_a_value_on_a_binary_vr_is_dropped_not_passed_on() -> None:
    out = dicomjson.normalise({"00431028": {"vr": "OB", "Value": [1, 2]}}, recording_uri([]))
    assert "00431028" not in out


def test_gzip_is_deterministic_and_carries_no_timestamp() -> None:
    data = dicomjson.encode([{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}])
    first, second = dicomjson.gzipped(data), dicomjson.gzipped(data)
    assert first == second
    assert first[4:8] == b"\0\0\0\0"  # MTIME
    assert gzip.decompress(first) == data


def test_qido_object_takes_listed_tags_and_computed_counts() -> None:
    attrs = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "A^B"}]}, "00181000": {"vr": "LO", "Value": ["x"]}}
    out = dicomjson.qido_object(dicomjson.STUDY_TAGS, attrs, computed={"00201208": dicomjson.count(3)})
    assert out == {"00100010": attrs["00100010"], "00201208": {"vr": "IS", "Value": [3]}}


def _bulk_paths(document: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, str]:
    found = {}
    for tag, element in document.items():
        if "BulkDataURI" in element:
            found[element["BulkDataURI"]] = ".".join((*prefix, tag))
        for i, item in enumerate(element.get("Value", []) if element["vr"] == "SQ" else []):
            found.update(_bulk_paths(item, (*prefix, tag, str(i))))
    return found


def _assert_same(ours: Dataset, source: Dataset, where: str) -> None:
    for element in source:
        tag = element.tag
        if tag.element == 0 or tag.group == 0x0002 or tag in (0x7FE00010, 0x7FE00008, 0x7FE00009):
            continue
        assert tag in ours, f"{where}: {element.keyword or tag} missing"
        mine = ours[tag]
        if element.VR == "SQ":
            assert len(mine.value) == len(element.value), f"{where}: {tag} item count"
            for i, (a, b) in enumerate(zip(mine.value, element.value, strict=False)):
                _assert_same(a, b, f"{where}/{tag}[{i}]")
        elif element.value in (None, "", b"") or element.value == []:
            assert mine.value in (None, "", b"") or mine.value == [], f"{where}: {tag} should be empty"
        elif element.VR in ("DS", "FL", "FD") and not isinstance(element.value, bytes):
            a = list(mine.value) if element.VM > 1 else [mine.value]
            b = list(element.value) if element.VM > 1 else [element.value]
            assert [float(x) for x in a] == pytest.approx([float(x) for x in b], rel=1e-12), f"{where}: {tag}"
        elif element.VR in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
            assert bytes(mine.value) == bytes(element.value), f"{where}: {tag} bytes differ"
        else:
            assert mine.value == element.value, \
                f"{where}: {element.keyword or tag}: {mine.value!r} != {element.value!r}"


@pytest.mark.parametrize("defer", [dicomjson.BULK_DEFER, 16], ids=["as-set", "left-in-the-file"])
@pytest.mark.parametrize("name", DEMO_FILES)
def test_pydicom_round_trip_of_a_real_file(name: str, defer: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dataset.from_json of our metadata (bulk data resolved through our bulk data values) equals
    the source file's non-pixel elements, also when every value but the smallest is left in the
    file while it is parsed and read from there when asked for."""
    monkeypatch.setattr(dicomjson, "BULK_DEFER", defer)
    file = pydicom.data.get_testdata_file(name)
    assert isinstance(file, str), name
    path = Path(file)
    p10 = path.read_bytes()
    ds = pydicom.dcmread(path, defer_size=dicomjson.BULK_THRESHOLD)
    out = dicomjson.normalise(dicomjson.dataset_json(ds), lambda p: "bulkdata/" + ".".join(p))
    if ds.file_meta.TransferSyntaxUID:
        assert out["00083002"]["Value"] == [str(ds.file_meta.TransferSyntaxUID)]
    assert list(out) == sorted(out)
    document = json.loads(dicomjson.encode(out))
    paths = _bulk_paths(document)

    def fetch(tag: str, vr: str, uri: str) -> bytes:
        return dicomjson.bulk_value(io.BytesIO(p10), paths[uri], lambda offset, size: p10[offset:offset + size])

    pixel_uris = {document[t]["BulkDataURI"] for t in ("7FE00010",) if t in document}
    for uri in pixel_uris:
        paths.pop(uri)
        document.pop("7FE00010")
    ours = Dataset.from_json(document, bulk_data_uri_handler=fetch)
    source = pydicom.dcmread(path, stop_before_pixels=True)
    _assert_same(ours, source, name)
    assert isinstance(source.get("PixelData"), type(None))


def test_large_binary_values_become_bulk_data_and_small_ones_stay_inline() -> None:
    ds = Dataset()
    ds.PatientName = "A^B"
    ds.add_new(0x00282000, "OB", b"\x01" * dicomjson.BULK_THRESHOLD)  # ICC profile
    ds.add_new(0x00091010, "OB", b"\x02" * 10)
    ds.ReferencedImageSequence = Sequence([Dataset()])
    ds.ReferencedImageSequence[0].add_new(0x00660023, "OW", b"\x03\x00" * 600)
    seen: list[str] = []
    out = dicomjson.normalise(dicomjson.dataset_json(ds), recording_uri(seen))
    assert out["00282000"] == {"vr": "OB", "BulkDataURI": "bulkdata/00282000"}
    assert out["00091010"] == {"vr": "OB", "InlineBinary": "AgICAgICAgICAg=="}
    assert seen == ["00081140.0.00660023", "00282000"]


@pytest.mark.parametrize("keys", [["00100010", "00080060", "00200013"], ["00080060", "00100010", "00200013"]])
@pytest.mark.parametrize("syntax", [None, "1.2.840.10008.1.2.1"])
def test_normalise_gives_tag_order_in_order_or_not(keys: list[str], syntax: str | None) -> None:
    """Elements come out in tag order whether they came in order (the common case, passed on
    without a sort) or not, with or without AvailableTransferSyntaxUID added, in items too."""
    values = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]},
              "00080060": {"vr": "CS", "Value": ["CT"]}, "00200013": {"vr": "IS", "Value": [3]}}
    raw: dict[str, object] = {key: values[key] for key in keys}
    raw["00400275"] = {"vr": "SQ", "Value": [{key: values[key] for key in keys}]}
    if syntax:
        raw["00020010"] = {"vr": "UI", "Value": [syntax]}
    out = dicomjson.normalise(raw, lambda path: "x")
    assert list(out) == sorted(out) == sorted({*keys, "00400275", *(["00083002"] if syntax else [])})
    item = out["00400275"]["Value"][0]
    assert list(item) == sorted(keys)


def _element_un(tag: int, value: bytes) -> bytes:
    """An explicit VR little endian element stored as UN (what a router does to tags it does not know)."""
    value += b" " * (len(value) % 2)
    return struct.pack("<HHccHI", tag >> 16, tag & 0xFFFF, b"U", b"N", 0, len(value)) + value


def _encoded(ds: Dataset, implicit: bool) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, implicit
    write_dataset(out, ds)
    return out.getvalue()


def _crafted_files() -> dict[str, bytes]:
    """Files whose values left in the file (deferred) must not change their JSON: known tags stored
    as UN (a sequence, a long text), implicit VR float and double pixel data with ambiguous VRs
    beside them."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    files: dict[str, bytes] = {}
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    meta.MediaStorageSOPInstanceUID = UID("1.2.826.0.1.3680043.8.498.44.1")
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta)
    first, inner = Dataset(), Dataset()
    first.SOPClassUID, first.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    inner.ReferencedSOPClassUID, inner.ReferencedSOPInstanceUID = "1.2.3", "1.2." + "3" * 60
    item = _encoded(inner, True)
    sequence = b"".join(b"\xfe\xff\x00\xe0" + struct.pack("<I", len(item)) + item for _ in range(12))
    files["un"] = (head.getvalue() + _encoded(first, False) + _element_un(0x00081115, sequence)
                   + _element_un(0x0040A160, b"t" * 2000))
    for kind, tag, vr, bits in (("float", 0x7FE00008, "OF", 32), ("double", 0x7FE00009, "OD", 64),
                                ("pixel", 0x7FE00010, "OW", 16)):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = UID("1.2.826.0.1.3680043.8.498.44.2")
        ds.Rows = ds.Columns = 64
        ds.SamplesPerPixel, ds.PixelRepresentation, ds.BitsAllocated = 1, 1, bits
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.add_new(0x00280106, "SS", -5)  # SmallestImagePixelValue: US or SS
        ds.add_new(0x00281201, "OW", b"\1\2" * 1024)  # RedPaletteColorLUTData: OW or US
        ds.add_new(tag, vr, bytes(64 * 64 * bits // 8))
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True, implicit_vr=True, little_endian=True)
        files[f"implicit-{kind}"] = out.getvalue()
    return files


CRAFTED = _crafted_files()


@pytest.mark.parametrize("name", [*DEMO_FILES, *CRAFTED])
def test_values_left_in_the_file_change_no_metadata(name: str) -> None:
    """A data set read with its large values left in the file (as ``instancemeta`` reads every
    header, and pydicom is kept from reading them back) gives the JSON of the same data set read
    whole: UN elements get their own VR back, float pixel data keeps OF/OD in implicit VR."""
    if name in CRAFTED:
        data = CRAFTED[name]
    else:
        file = pydicom.data.get_testdata_file(name)
        assert isinstance(file, str), name
        data = Path(file).read_bytes()
    whole = dicomjson.dataset_json(read_dataset(io.BytesIO(data)))
    assert dicomjson.dataset_json(read_dataset(io.BytesIO(data), defer_size=16)) == whole
    if name == "un":
        assert whole["00081115"]["vr"] == "SQ" and whole["0040A160"]["vr"] == "UT"
    if name.startswith("implicit-"):
        assert {key: whole[key]["vr"] for key in ("7FE00008", "7FE00009", "7FE00010") if key in whole} == \
            {"implicit-float": {"7FE00008": "OF"}, "implicit-double": {"7FE00009": "OD"},
             "implicit-pixel": {"7FE00010": "OW"}}[name]


def _range(data: bytes, offset: int, size: int) -> bytes:
    return data[offset:offset + size]


def test_bulk_data_of_a_deflated_file_with_a_long_meta_group() -> None:
    """A deflated data set's values cannot be left in the file (pydicom's offsets are the inflated
    bytes'); nor where the meta group is too long to tell the transfer syntax from the first bytes."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

    for padding in (100, 20_000):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = UID("1.2.826.0.1.3680043.8.498.44.3")
        ds.file_meta.add_new(0x00020102, "OB", b"P" * padding)  # PrivateInformation
        profile = bytes(range(256)) * (3 << 12)  # 3 MB
        ds.add_new(0x00282000, "OB", profile)  # ICCProfile
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        data = out.getvalue()
        got = dicomjson.bulk_value(io.BytesIO(data), "00282000", functools.partial(_range, data))
        assert got == profile, padding


def _bundled_files() -> list[Path]:
    import pydicom.data

    return sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm"))


class _BytesBucket:
    """A bucket of one object held in memory, as ``ObjectFile`` reads one (``stream_in_thread``)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.requests = 0

    @contextlib.contextmanager
    def stream_in_thread(self, name: str, start: int, end: int | None, stop: object) -> Iterator[Chunks]:
        self.requests += 1
        piece = self.data[start:end]
        yield Chunks(iter([piece[i:i + 7] for i in range(0, len(piece), 7)]), {})  # (7-byte chunks)


@pytest.mark.parametrize("path", _bundled_files(), ids=lambda p: p.name)
def test_a_header_read_up_to_the_pixel_data_gives_the_files_metadata(path: Path) -> None:
    """``header_metadata`` over an ``ObjectFile`` (an IDC object's header, read by ranges; blocks
    from 64 bytes, so that values cross them and the values pydicom left in the file are read
    back through it) gives what ``metadata`` gives for the whole file, but for what follows the
    pixel data, which it does not read (trailing padding), and the pixel data of a deflated data
    set (whose header it cannot see)."""
    from dicomfs import instancemeta
    from dicomfs.errors import SourceError
    from dicomfs.sources.bucket import ObjectFile
    from dicomfs.tasks import StopSignal

    try:
        whole = instancemeta.metadata(path)
    except SourceError:
        return  # (not a file the folder source reads either)
    data = path.read_bytes()
    bucket = _BytesBucket(data)
    header = instancemeta.header_metadata(ObjectFile(bucket, path.name, len(data), StopSignal(),  # type: ignore[arg-type]
                                                     first_block=64), str(path))
    # the same from first bytes read before (a listing's 16 KiB; here 100 bytes, so that the
    # header goes on past them)
    assert instancemeta.header_metadata(ObjectFile(bucket, path.name, len(data), StopSignal(),  # type: ignore[arg-type]
                                                   first_block=64, first=data[:100]), str(path)) == header
    whole.pop("FFFCFFFC", None)  # DataSetTrailingPadding, after the pixel data
    if whole.get("00020010", {}).get("Value") == ["1.2.840.10008.1.2.1.99"]:
        whole.pop("7FE00010", None)
    assert header == whole


def test_an_object_files_head_is_what_it_read_from_the_start_without_a_gap() -> None:
    """``ObjectFile(keep_head=N).head``: the blocks read one after another from byte 0 (what
    the check of an IDC object's frame table takes instead of reading them again); a block read
    after a seek past unread bytes is not part of it, until the gap is read; nor one that would
    make it longer than N. ``first``: bytes read before, not asked for again."""
    from dicomfs.sources.bucket import ObjectFile
    from dicomfs.tasks import StopSignal

    data = bytes(range(256)) * 64
    file = ObjectFile(_BytesBucket(data), "x", len(data), StopSignal(), first_block=100,  # type: ignore[arg-type]
                      keep_head=1100)
    assert file.read(50) == data[:50] and file.read(200) == data[50:250]
    assert file.head == data[:300]  # (blocks of 100, then 200 bytes)
    file.seek(5000)
    assert file.read(10) == data[5000:5010]
    assert file.head == data[:300]
    file.seek(300)
    assert file.read(10) == data[300:310]
    assert file.head == data[:1100]  # (the next block: 800 bytes)
    plain = ObjectFile(_BytesBucket(data), "x", len(data), StopSignal())  # type: ignore[arg-type]
    assert plain.read(10) == data[:10] and plain.head == b""
    # first bytes read before (a listing's): no request for them, the first one for what follows
    bucket = _BytesBucket(data)
    given = ObjectFile(bucket, "x", len(data), StopSignal(), first_block=100, keep_head=250,  # type: ignore[arg-type]
                       first=data[:100])
    assert given.read(100) == data[:100] and bucket.requests == 0 and given.head == data[:100]
    assert given.read(10) == data[100:110] and bucket.requests == 1 and given.head == data[:200]
    assert given.read(200) == data[110:310] and given.head == data[:200]  # (not beyond keep_head)


def test_a_header_that_cannot_be_read_back_is_an_error_not_a_missing_element() -> None:
    """A value pydicom left in the file whose read fails (the bucket broke off) fails the header,
    where it used to be logged and left out of metadata the catalog then kept."""
    from dicomfs import instancemeta
    from dicomfs.errors import TransferBroken
    from dicomfs.sources.bucket import ObjectFile
    from dicomfs.tasks import StopSignal

    ds = pydicom.dcmread(next(p for p in _bundled_files() if p.name == "CT_small.dcm"))
    ds.ImageComments = "x" * 3000  # (left in the file, read back)
    out = io.BytesIO()
    ds.save_as(out)
    bucket = _BytesBucket(out.getvalue())
    file = ObjectFile(bucket, "ct", len(out.getvalue()), StopSignal(), first_block=256)  # type: ignore[arg-type]
    original = bucket.stream_in_thread

    @contextlib.contextmanager
    def failing(name: str, start: int, end: int | None, stop: object) -> Iterator[Chunks]:
        if bucket.requests >= 2:
            raise TransferBroken("the bucket broke off")
        with original(name, start, end, stop) as chunks:
            yield chunks

    bucket.stream_in_thread = failing  # type: ignore[method-assign]
    with pytest.raises(TransferBroken):
        instancemeta.header_metadata(file, "ct")
