"""The DICOM JSON model (PS3.18 Annex F) exactly as static DICOMweb files carry it.

Owns the one canonical form every metadata file is written in, whatever produced the input (a
pydicom data set, a DICOMweb server's metadata, a COD index entry): 8-hex-digit keys in
ascending order, no group lengths, no group 0002 (its transfer syntax becomes
AvailableTransferSyntaxUID), ``vr`` plus at most one of ``Value`` / ``BulkDataURI`` /
``InlineBinary``, InlineBinary only on binary VRs, multi-values split, PN as objects, no
NaN/Infinity. Every BulkDataURI is replaced by the URI a callback gives for the element's tag
path (an archive's own bulk URIs mean nothing on a static server). Also owns the QIDO objects of
the three levels and the deterministic encoding (compact JSON, gzip with no timestamp), so equal
input always gives equal bytes and a size never changes. Must not do I/O beyond reading the
file object ``bulk_value`` is handed.
"""

from __future__ import annotations

import functools
import gzip
import logging
import math
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import orjson

from dicomfs.dicomread import (
    DEFLATED,
    PIXEL_TAGS,
    Readable,
    import_pydicom,
    left_in_file,
    read_dataset,
    stored_transfer_syntax,
    value_left_in_file,
)
from dicomfs.errors import DicomfsError
from dicomfs.records import DicomJson

if TYPE_CHECKING:
    from pydicom import Dataset

log = logging.getLogger(__name__)

BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
NUMBER_VRS = frozenset({"IS", "DS", "FL", "FD", "SL", "SS", "SV", "UL", "US", "UV"})
# Strings of these VRs may hold several values separated by a backslash.
SPLIT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UC", "UI"})
# String VRs whose values need nothing but the split at backslashes.
_PLAIN_STRING_VRS = frozenset({"AE", "AS", "AT", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI",
                               "UR", "UT"})
PIXEL_KEYS = frozenset(f"{tag:08X}" for tag in PIXEL_TAGS)  # (as DICOM JSON spells them)
_FLOAT_PIXEL_VRS = {"7FE00008": "OF", "7FE00009": "OD"}  # FloatPixelData, DoubleFloatPixelData
TRANSFER_SYNTAX = "00020010"
AVAILABLE_TRANSFER_SYNTAX = "00083002"
_INT64 = 1 << 63
_INT53 = 1 << 53  # larger whole floats stay floats: not every JSON reader holds them as integers
BULK_THRESHOLD = 1024  # binary values of this many bytes or more become bulk data files
BULK_DEFER = 1 << 20  # bytes of a value beyond which reading one bulk data value leaves it in the file
# gzip level of every rendered listing and metadata file: the mount's dicomweb/ tree, ``serve`` and
# ``export`` (one level, so that an export is the mount's tree byte for byte). 1, not 6: a file is
# rendered when it is first asked for, and a viewer waits for that. A 1,500-instance series'
# metadata (1.7 MB of JSON) compresses in 3.3 ms to 70 KB at 1, in 8.2 ms to 57 KB at 6; the 13 KB
# more take 5 ms to send at 20 Mbit/s, what level 6 costs in CPU, and nothing on a LAN.
GZIP_LEVEL = 1
_TAG = re.compile(r"^[0-9A-F]{8}$")

TagPath = tuple[str, ...]  # ("0040A730", "0", "00282000"): tags and item indexes, outermost first
BulkUri = Callable[[TagPath], str]


def normalise(obj: Any, bulk_uri: BulkUri, *, transfer_syntax: str | None = None) -> DicomJson:
    """One instance's DICOM JSON in canonical form (see the module docstring).

    ``transfer_syntax`` (or the object's own (0002,0010)) becomes AvailableTransferSyntaxUID.
    Elements that cannot be expressed correctly are dropped with a log line, never passed on.
    """
    if not isinstance(obj, dict):
        raise ValueError("DICOM JSON of an instance must be an object")
    ts = transfer_syntax or _first_string(obj.get(TRANSFER_SYNTAX))
    out = _dataset(obj, (), bulk_uri)  # in tag order
    if ts and AVAILABLE_TRANSFER_SYNTAX not in out:
        out[AVAILABLE_TRANSFER_SYNTAX] = {"vr": "UI", "Value": [ts]}
        return dict(sorted(out.items()))
    return out


def dataset_json(ds: Dataset) -> DicomJson:
    """A pydicom data set as DICOM JSON, ready for ``normalise``: the transfer syntax of its file
    meta as (0002,0010), binary values of ``BULK_THRESHOLD`` bytes or more and the pixel data
    marked as bulk data (their URIs are set by ``normalise``)."""
    out = _dataset_json(ds, ())
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if ts:
        out[TRANSFER_SYNTAX] = {"vr": "UI", "Value": [str(ts)]}
    return out


def _dataset_json(ds: Dataset, path: TagPath) -> DicomJson:
    """pydicom's own JSON for each element, bulk values marked (their URI is set later)."""
    import_pydicom()
    from pydicom.dataelem import DataElement, RawDataElement

    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if not path and (syntax is None or syntax.is_implicit_VR):
        _correct_ambiguous_vrs(ds)
    out: DicomJson = {}
    # (keep_deferred: pydicom's ``elements()`` reads every value it left in the file, a 2 GB
    # slide's pixel data to write "BulkDataURI")
    for raw in [ds.get_item(key, keep_deferred=True) for key in sorted(ds.keys())]:
        tag = f"{int(raw.tag):08X}"
        if tag[4:] == "0000" or tag.startswith("0002"):
            continue
        vr = str(raw.VR)
        if tag in PIXEL_KEYS and not path:
            if vr not in BINARY_VRS:  # (implicit VR; PS3.5 A.1, A.4: encapsulated data is OB, native OW)
                undefined = raw.length == 0xFFFFFFFF if isinstance(raw, RawDataElement) else raw.is_undefined_length
                vr = _FLOAT_PIXEL_VRS.get(tag) or ("OB" if undefined else "OW")
            out[tag] = {"vr": vr, "BulkDataURI": ""}
            continue
        if left_in_file(raw) and vr in BINARY_VRS and vr != "UN" and raw.length >= BULK_THRESHOLD:
            # left in the file: bulk data, not read to say so (UN is read: pydicom gives a known
            # tag its own VR back, a sequence or text)
            out[tag] = {"vr": vr, "BulkDataURI": ""}
            continue
        try:
            element: DataElement = ds[raw.tag]
            vr = str(element.VR)
            if vr == "SQ":
                items = [_dataset_json(item, (*path, tag, str(i))) for i, item in enumerate(element.value)]
                out[tag] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
            elif vr in BINARY_VRS and element.value is not None and len(element.value) >= BULK_THRESHOLD:
                out[tag] = {"vr": vr, "BulkDataURI": ""}
            else:
                out[tag] = element.to_json_dict(None, 1 << 62)
        except (DicomfsError, OSError):
            raise  # (a value left in the file that could not be read back: not the element's fault)
        except Exception as exc:
            log.warning("element %s cannot be written as DICOM JSON (%s): left out", tag, exc)
    return out


def _correct_ambiguous_vrs(ds: Dataset) -> None:
    """pydicom's VRs for an implicit VR data set's ambiguous elements ("US or SS"...), found from
    the data set. Its pixel data is set aside meanwhile: pydicom reads every value it left in the
    file to do this, and implicit VR pixel data is OW whatever it holds (PS3.5 A.1)."""
    from pydicom.filewriter import correct_ambiguous_vr

    pixels = {tag: ds.get_item(tag, keep_deferred=True) for tag in PIXEL_TAGS if tag in ds}
    for tag in pixels:
        del ds[tag]
    try:
        correct_ambiguous_vr(ds, True)
    except Exception as exc:  # an implicit-VR file whose ambiguous VRs cannot be resolved
        log.debug("ambiguous VRs left as they are: %s", exc)
    finally:
        for tag, raw in pixels.items():
            ds[tag] = raw


@functools.lru_cache(maxsize=1 << 16)
def _canonical_tag(key: str) -> str | None:
    """The tag as 8 uppercase hex digits, or None if it is not one or is not to be written
    (group lengths, group 0002)."""
    tag = str(key).upper()
    if not _TAG.match(tag) or tag[4:] == "0000" or tag.startswith("0002"):
        return None
    return tag


def _dataset(obj: dict[str, Any], path: TagPath, bulk_uri: BulkUri) -> DicomJson:
    out: DicomJson = {}
    previous = ""
    in_order = True
    for key, element in obj.items():
        tag = _canonical_tag(key)
        if tag is None:
            continue
        if type(element) is dict and len(element) == 2:  # the common case, inline: one plain value
            values = element.get("Value")
            if type(values) is list and len(values) == 1:
                single, vr = values[0], element.get("vr")
                kind = type(single)
                if ((kind is str and vr in _PLAIN_STRING_VRS and "\\" not in single)
                        or (kind is int and vr in NUMBER_VRS and -_INT64 <= single < _INT64)
                        or (kind is dict and vr == "PN")):
                    out[tag] = element
                    in_order = in_order and tag > previous
                    previous = tag
                    continue
        if not isinstance(element, dict) or not isinstance(element.get("vr"), str):
            log.warning("element %s has no VR: left out", tag)
            continue
        fixed = _element(element, path, tag, bulk_uri)
        if fixed is not None:
            out[tag] = fixed
            in_order = in_order and tag > previous
            previous = tag
    return out if in_order else dict(sorted(out.items()))


def _element(element: dict[str, Any], path: TagPath, tag: str, bulk_uri: BulkUri) -> dict[str, Any] | None:
    vr = element["vr"]
    values = element.get("Value")
    if values is not None and type(values) is list and values and len(element) == 2:
        # fast paths: most elements are already canonical and are passed on as they are
        if vr in _PLAIN_STRING_VRS:
            if all(type(v) is str and "\\" not in v for v in values):
                return element
        elif vr in NUMBER_VRS:
            if all((type(v) is int and -_INT64 <= v < _INT64)
                   or (type(v) is float and math.isfinite(v) and not v.is_integer()) for v in values):
                return element
        elif vr == "PN":
            if all(type(v) is dict for v in values):
                return element
    if "BulkDataURI" in element:
        return {"vr": vr, "BulkDataURI": bulk_uri((*path, tag))}
    if "InlineBinary" in element:
        value = element["InlineBinary"]
        if vr not in BINARY_VRS or not isinstance(value, str):
            log.warning("element %s: InlineBinary on VR %s: left out", tag, vr)
            return None
        return {"vr": vr, "InlineBinary": value}
    if values is None or values == []:
        return {"vr": vr}
    if not isinstance(values, list):
        values = [values]
    if vr == "SQ":
        items = [_dataset(item, (*path, tag, str(i)), bulk_uri) if isinstance(item, dict) else {}
                 for i, item in enumerate(values)]
        return {"vr": "SQ", "Value": items}
    if vr in BINARY_VRS:
        log.warning("element %s: a Value on binary VR %s: left out", tag, vr)
        return None
    fixed: list[Any] = []
    for value in values:
        if isinstance(value, str) and "\\" in value and vr in SPLIT_VRS:
            fixed.extend(_scalar(vr, part) for part in value.split("\\"))
        else:
            fixed.append(_scalar(vr, value))
    return {"vr": vr, "Value": fixed}


def _scalar(vr: str, value: Any) -> Any:
    if vr == "PN":
        if isinstance(value, str):
            return {"Alphabetic": value} if value else None
        return value if isinstance(value, dict) else None
    if vr in NUMBER_VRS:
        if isinstance(value, str):
            try:
                value = float(value) if vr in ("DS", "FL", "FD") else int(value)
            except ValueError:
                return None
        if isinstance(value, float):
            if not math.isfinite(value):
                return None  # JSON has no NaN: an empty value is the honest rendering
            return int(value) if value.is_integer() and vr in ("IS", "DS") and abs(value) < _INT53 else value
        if isinstance(value, int) and not isinstance(value, bool):
            return value if -_INT64 <= value < _INT64 else float(value)  # JSON readers stop at 64 bits
        return None
    return value


def _first_string(element: Any) -> str | None:
    if isinstance(element, dict):
        values = element.get("Value")
        if isinstance(values, list) and values and isinstance(values[0], str):
            return values[0]
    return None


# --- QIDO objects -----------------------------------------------------------------------------
STUDY_TAGS = ("00080005", "00080020", "00080030", "00080050", "00080056", "00080061", "00080090",
              "00081030", "00100010", "00100020", "00100030", "00100040", "0020000D", "00200010",
              "00201206", "00201208")
SERIES_TAGS = ("00080005", "00080021", "00080031", "00080060", "0008103E", "0020000D", "0020000E",
               "00200011", "00201209")
INSTANCE_TAGS = ("00080005", "00080016", "00080018", "0020000D", "0020000E", "00200013", "00280008",
                 "00280010", "00280011", "00083002")


def qido_object(tags: Iterable[str], *sources: DicomJson, computed: DicomJson | None = None) -> DicomJson:
    """A QIDO-RS result object: ``tags`` taken from the first of ``sources`` that has each,
    ``computed`` values (counts) where no source has them, canonical form."""
    out: DicomJson = {}
    for tag in tags:
        for attrs in sources:
            element = attrs.get(tag)
            if isinstance(element, dict) and "BulkDataURI" not in element and "InlineBinary" not in element:
                out[tag] = element
                break
        else:
            if computed and tag in computed:
                out[tag] = computed[tag]
    return normalise(out, _no_bulk)


def _no_bulk(path: TagPath) -> str:
    raise ValueError(f"a QIDO attribute {'/'.join(path)} holds bulk data")


def count(value: int) -> dict[str, Any]:
    return {"vr": "IS", "Value": [value]}


def strings(vr: str, values: Iterable[str]) -> dict[str, Any]:
    listed = list(values)
    return {"vr": vr, "Value": listed} if listed else {"vr": vr}


# --- bytes ------------------------------------------------------------------------------------
def encode(document: Any) -> bytes:
    """Compact UTF-8 JSON (orjson: ten times the speed of the standard library here). Documents
    are canonical (``normalise``), so they hold no NaN or Infinity."""
    return orjson.dumps(document)


def gzipped(data: bytes) -> bytes:
    """gzip with no timestamp or name: the same input gives the same bytes on every call."""
    return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)


def bulk_value(fp: Readable, tags: str, read_at: Callable[[int, int], bytes]) -> bytes:
    """The value of the element at tag path ``tags`` ("0040A730.0.00282000") in the Part 10 file
    ``fp``, as stored (binary or not: archives mark text and numbers as bulk data too). Values
    larger than ``BULK_DEFER`` are left in the file while it is parsed (pixel data: a slide's),
    and the one asked for is then read with ``read_at`` (offset, length). Raises ProtocolError if
    it is not there. Blocking."""
    import_pydicom()
    from pydicom.dataelem import RawDataElement

    from dicomfs.errors import DicomfsError, ProtocolError

    parts = tags.split(".")
    try:
        syntax = stored_transfer_syntax(fp)  # (None: a meta group too long to tell; maybe deflated)
        node: Any = read_dataset(fp, defer_size=BULK_DEFER if syntax not in (None, DEFLATED) else None)
        for index, part in enumerate(parts[:-1]):
            node = node[int(part)] if index % 2 else node[int(part, 16)].value
        element = node.get_item(int(parts[-1], 16), keep_deferred=True)
    except (DicomfsError, OSError):
        raise  # (the file shorter than its index, a disk that fails: not the archive's data)
    except Exception as exc:
        raise ProtocolError(f"bulk data {tags} is not in the instance: {exc}") from None
    if element is None:
        raise ProtocolError(f"bulk data {tags} is not in the instance")
    left = value_left_in_file(element, read_at)
    value = element.value if left is None else left
    if isinstance(element, RawDataElement) or isinstance(value, bytes | bytearray):
        return bytes(value or b"")
    raise ProtocolError(f"bulk data {tags} has no stored bytes")
