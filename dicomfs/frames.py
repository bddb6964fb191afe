"""Frames of one DICOM instance, and the static DICOMweb frame file that carries one of them.

Owns two things: where the frames of an instance begin and end inside its Part 10 bytes
(encapsulated fragments and offset tables, native frame lengths, big endian byte order), and the
exact bytes and size of ``instances/<sop>/frames/<n>.mht``: a one-part ``multipart/related`` body
with a fixed boundary, so a static HTTP server can announce it with one constant Content-Type.
Also whether an archive's claim of where the frames lie (COD's offset table, or one made from the
instance's own offset table read up to its first frame: ``own_frame_table``) holds, judged from
the bytes around it (``check_frame_table``, ``frame_in_item``), so a frame can be read alone.
No trio, and no I/O but reads of the file object ``locate_in_file`` or ``own_frame_table`` is
handed (an instance too large to hold, parsed one frame at a time; an object read by ranges).
``cut_frames`` and ``locate_in_file`` parse with
pydicom and block; callers run them in a worker thread. pydicom is imported when a frame is
first cut, not with this module: the mount and ``serve`` import it on start, and pydicom with
what it pulls in (numpy, requests) took 0.25 s of that. Must not decode, transcode or otherwise
touch pixel values beyond byte order.
"""

from __future__ import annotations

import functools
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from io import BytesIO
from struct import unpack_from
from typing import TYPE_CHECKING, Any

from dicomfs.dicomread import (
    DEFLATED,
    PIXEL_TAGS,
    Readable,
    import_pydicom,
    read_dataset,
    stored_transfer_syntax,
    value_left_in_file,
)
from dicomfs.errors import DicomfsError, ProtocolError
from dicomfs.records import FrameTable
from dicomfs.uids import is_uid

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# A static server sends CONTENT_TYPE for every ``.mht`` file; the boundary must therefore be one
# fixed string. It is long and random enough not to occur in image data by accident.
BOUNDARY = "dicomfs-frame-3c9e1f0b7a5d4e28"
CONTENT_TYPE = 'multipart/related; type="application/octet-stream"; boundary=' + BOUNDARY

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_NATIVE = frozenset(
    {
        IMPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_BIG_ENDIAN,
        DEFLATED,
    }
)

OCTET_STREAM = "application/octet-stream"
_JPEG = "1.2.840.10008.1.2.4."


def _media_types() -> dict[str, str]:
    """PS3.18 Table 8.7.3-5 (plus the retired JPEG processes, which are JPEG bitstreams too)."""
    types: dict[str, str] = {}
    for process in [*range(50, 67), 70]:
        types[f"{_JPEG}{process}"] = "image/jpeg"
    types |= {_JPEG + "80": "image/jls", _JPEG + "81": "image/jls"}
    types |= {_JPEG + "90": "image/jp2", _JPEG + "91": "image/jp2"}
    types |= {_JPEG + "92": "image/jpx", _JPEG + "93": "image/jpx"}
    types |= {f"{_JPEG}{n}": "image/jphc" for n in (201, 202, 203)}
    types |= {f"{_JPEG}{n}": "image/jxl" for n in (110, 111, 112)}
    for n in (100, 101):
        types[f"{_JPEG}{n}"] = types[f"{_JPEG}{n}.1"] = "video/mpeg"
    for n in (102, 103, 104, 105, 106):
        types[f"{_JPEG}{n}"] = types[f"{_JPEG}{n}.1"] = "video/mp4"
    types |= {_JPEG + "107": "video/H265", _JPEG + "108": "video/H265"}
    types["1.2.840.10008.1.2.5"] = "image/dicom-rle"
    return types


_MEDIA_TYPES = _media_types()

_EXTENDED_OFFSET_TABLE = 0x7FE00001
_EXTENDED_OFFSET_TABLE_LENGTHS = 0x7FE00002
_ITEM_TAG = b"\xfe\xff\x00\xe0"
Pieces = tuple[tuple[int, int], ...]  # (offset in the Part 10 file, length) of a frame's parts
MAX_FRAME_COUNT = 1_000_000  # frames of one instance (a slide level at 40x: a few hundred thousand tiles)
MAX_FRAGMENTS = 4 * MAX_FRAME_COUNT  # of one instance's encapsulated pixel data
ReadAt = Callable[[int, int], bytes]  # (offset, length) -> at most that many bytes from there
_CLOSE_DELIMITER = f"\r\n--{BOUNDARY}--\r\n".encode("ascii")
_PART_START = f"--{BOUNDARY}\r\nContent-Type: ".encode("ascii")


@dataclass(frozen=True)
class Frames:
    """The frames of one instance, frame 1 first, and the transfer syntax they are encoded in.

    ``transfer_syntax`` is the stored syntax for encapsulated data and Explicit VR Little Endian
    for every native one (the frames have been brought to little endian byte order).
    """

    transfer_syntax: str
    frames: list[bytes]


def is_native(transfer_syntax: str) -> bool:
    """True for the uncompressed syntaxes: implicit LE, explicit LE, explicit BE, deflated LE."""
    return transfer_syntax in _NATIVE


def media_type(transfer_syntax: str) -> str:
    """The PS3.18 media type of one frame in ``transfer_syntax`` (octet-stream if unknown)."""
    return _MEDIA_TYPES.get(transfer_syntax, OCTET_STREAM)


@functools.lru_cache(maxsize=64)
def _part_header(transfer_syntax: str) -> bytes:
    if not is_uid(transfer_syntax):
        raise ProtocolError(f"invalid transfer syntax UID {transfer_syntax[:70]!r}")
    content_type = f"{media_type(transfer_syntax)};transfer-syntax={transfer_syntax}"
    return _PART_START + f"{content_type}\r\n\r\n".encode("ascii")


def frame_file(frame: bytes | memoryview, transfer_syntax: str) -> bytes:
    """The whole ``frames/<n>.mht`` file: ``frame`` as the one part of a multipart body."""
    return b"".join((_part_header(transfer_syntax), frame, _CLOSE_DELIMITER))


def split_frame_file(data: bytes) -> tuple[str, memoryview]:
    """The inverse of ``frame_file``: the part's Content-Type and a view of the frame's bytes."""
    head_end = data.find(b"\r\n\r\n")
    if not data.startswith(_PART_START) or head_end < 0 or not data.endswith(_CLOSE_DELIMITER):
        raise ProtocolError("not a frame file of dicomfs")
    content_type = data[len(_PART_START):head_end].decode("ascii")
    return content_type, memoryview(data)[head_end + 4:len(data) - len(_CLOSE_DELIMITER)]


def frame_file_size(frame_length: int, transfer_syntax: str) -> int:
    """``len(frame_file(frame, transfer_syntax))`` for a frame of ``frame_length`` bytes."""
    if frame_length < 0:
        raise ValueError("a frame length cannot be negative")
    return len(_part_header(transfer_syntax)) + frame_length + len(_CLOSE_DELIMITER)


def _frame_length(rows: int, columns: int, samples: int, bits: int, photometric: str) -> int | None:
    """Bytes in one native frame, or None when that is not a whole number (packed bits)."""
    frame_bits = rows * columns * samples * bits
    if frame_bits % 8:
        return None
    length = frame_bits // 8
    if photometric == "YBR_FULL_422":  # PS3.3 C.7.6.3.1.2: two samples of chroma per two pixels
        length = length // 3 * 2
    return length


_MAX_DIMENSION = 1 << 16  # Rows, Columns (US), samples and bits are 16-bit values in DICOM


def _json_int(attrs: Mapping[str, Any], key: str) -> int | None:
    element = attrs.get(key)
    # (``dict`` first: the ABC check alone was a fifth of a 1,500-instance series' canonical form)
    values = element.get("Value") if isinstance(element, dict) or isinstance(element, Mapping) else None
    if not isinstance(values, list) or not values:
        return None
    value = values[0]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_DIMENSION:
        return None
    return value


def native_frame_length(attrs: Mapping[str, Any]) -> int | None:
    """The byte length of one native frame described by DICOM JSON attributes, or None.

    None when Rows, Columns, SamplesPerPixel (default 1) or BitsAllocated is missing or invalid,
    or when a frame is not a whole number of bytes.
    """
    samples = _json_int(attrs, "00280002") if "00280002" in attrs else 1
    rows, columns = _json_int(attrs, "00280010"), _json_int(attrs, "00280011")
    bits = _json_int(attrs, "00280100")
    if rows is None or columns is None or samples is None or bits is None:
        return None
    photometric = attrs.get("00280004")
    values = (photometric.get("Value") if isinstance(photometric, dict) or isinstance(photometric, Mapping)
              else None)
    name = values[0] if isinstance(values, list) and values else ""
    return _frame_length(rows, columns, samples, bits, name if isinstance(name, str) else "")


def _describe(exc: BaseException) -> str:
    """One short line about a foreign exception, for the message of a ProtocolError."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _positive(value: Any, name: str) -> int:
    if value is None:
        raise ProtocolError(f"DICOM instance without {name}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or isinstance(value, float):
        raise ProtocolError(f"invalid {name} {str(value)[:40]!r}")
    return number


def cut_frames(p10: bytes | bytearray) -> Frames:
    """Cut the frames of the instance in ``p10`` (a whole Part 10 file).

    Raises ProtocolError for anything that is not an instance with well-formed pixel data.
    """
    import_pydicom()
    from pydicom.errors import InvalidDicomError

    try:
        dataset = read_dataset(BytesIO(p10))
    except InvalidDicomError as exc:
        raise ProtocolError("not a DICOM Part 10 file (no DICM prefix)") from exc
    except Exception as exc:  # pydicom raises many types for malformed input
        raise ProtocolError(f"not a readable DICOM Part 10 file: {_describe(exc)}") from exc
    try:
        return _cut(dataset)
    except ProtocolError:
        raise
    except Exception as exc:  # values are converted lazily, so they fail late
        raise ProtocolError(f"malformed DICOM data set: {_describe(exc)}") from exc


def _cut(dataset: Dataset) -> Frames:
    transfer_syntax = _transfer_syntax(str(dataset.file_meta.get("TransferSyntaxUID") or ""))
    tag = _pixel_tag(dataset)
    element = dataset[tag]
    if not element.value:
        raise ProtocolError("DICOM instance with an empty pixel data element")
    count = _number_of_frames(dataset)
    if _encapsulated(element.is_undefined_length, transfer_syntax, tag):
        return Frames(transfer_syntax, _cut_encapsulated(dataset, element.value, count))
    big_endian = transfer_syntax == EXPLICIT_VR_BIG_ENDIAN
    frames = _cut_native(dataset, element.value, element.VR if big_endian else None, count)
    return Frames(EXPLICIT_VR_LITTLE_ENDIAN, frames)


def _transfer_syntax(value: str) -> str:
    if not is_uid(value):
        raise ProtocolError("DICOM file without a valid transfer syntax UID")
    return value


def _pixel_tag(dataset: Dataset) -> int:
    tag = next((tag for tag in PIXEL_TAGS if tag in dataset), None)
    if tag is None:
        raise ProtocolError("DICOM instance without pixel data")
    return tag


def _encapsulated(undefined_length: bool, transfer_syntax: str, tag: int) -> bool:
    """Whether pixel data is encapsulated; raises if that does not fit the transfer syntax."""
    if undefined_length:
        if is_native(transfer_syntax) or tag != PIXEL_TAGS[0]:
            raise ProtocolError("encapsulated pixel data in a native transfer syntax")
        return True
    if not is_native(transfer_syntax):
        raise ProtocolError(f"pixel data not encapsulated in transfer syntax {transfer_syntax}")
    return False


def _number_of_frames(dataset: Dataset) -> int:
    value = dataset.get("NumberOfFrames")
    if value is None or value == "":
        return 1
    count = _positive(value, "NumberOfFrames")
    if count > MAX_FRAME_COUNT:  # (frames of a byte each: 30 MB of pixel data made 30 million objects)
        raise ProtocolError(f"NumberOfFrames {count} is more than dicomfs serves ({MAX_FRAME_COUNT:,})")
    return count


def _cut_encapsulated(dataset: Dataset, value: bytes, count: int) -> list[bytes]:
    from pydicom.encaps import generate_frames

    table, table_lengths = dataset.get(_EXTENDED_OFFSET_TABLE), dataset.get(_EXTENDED_OFFSET_TABLE_LENGTHS)
    offsets = _extended_offsets(table.value if table is not None else None,
                                table_lengths.value if table_lengths is not None else None,
                                lambda offset, size: value[offset:offset + size], count)
    try:
        frames = list(generate_frames(value, number_of_frames=count, extended_offsets=offsets))
    except Exception as exc:
        raise ProtocolError(f"malformed encapsulated pixel data: {_describe(exc)}") from exc
    _check_frames(offsets, [len(frame) for frame in frames], count)
    return frames


def _check_frames(offsets: tuple[bytes, bytes] | None, lengths: list[int], count: int) -> None:
    """The frames pydicom assembled (their ``lengths``) are the ``count`` the data set announces,
    each as long as its extended offset table says (when there is one)."""
    if len(lengths) != count:
        raise ProtocolError(f"encapsulated pixel data holds {len(lengths)} frames, not {count}")
    if offsets is not None:
        table_lengths = unpack_from(f"<{count}Q", offsets[1])
        if any(length != table_length for length, table_length in zip(lengths, table_lengths, strict=True)):
            raise ProtocolError("a frame of the extended offset table runs past the pixel data")


def _extended_offsets(table_value: bytes | None, lengths_value: bytes | None, read: ReadAt,
                      count: int) -> tuple[bytes, bytes] | None:
    """The raw Extended Offset Table and its lengths when present, after checking them against
    the encapsulated value (``read``: its bytes at an offset from where it starts)."""
    if not table_value and not lengths_value:
        return None
    if not table_value or not lengths_value:
        raise ProtocolError("extended offset table without its lengths, or lengths without it")
    if len(table_value) != 8 * count or len(lengths_value) != 8 * count:
        raise ProtocolError(f"extended offset table does not have {count} entries")
    head = read(0, 8)
    if len(head) < 8 or head[:4] != _ITEM_TAG:
        raise ProtocolError("encapsulated pixel data does not start with an item")
    first_fragment = 8 + unpack_from("<I", head, 4)[0]  # after the basic offset table
    for offset, length in zip(unpack_from(f"<{count}Q", table_value), unpack_from(f"<{count}Q", lengths_value),
                              strict=True):
        item = read(first_fragment + offset, 8)
        if item[:4] != _ITEM_TAG or len(item) < 8:
            raise ProtocolError("extended offset table points outside the fragments")
        if length > unpack_from("<I", item, 4)[0]:
            raise ProtocolError("a frame of the extended offset table runs past its fragment")
    return bytes(table_value), bytes(lengths_value)


def _cut_native(
    dataset: Dataset, value: bytes, big_endian_vr: str | None, count: int
) -> list[bytes]:
    """Native frames in little endian order; ``big_endian_vr`` is the VR of big endian data."""
    length = _native_length(dataset)
    needed = _native_needed(length, count, len(value))
    bits = _positive(dataset.get("BitsAllocated"), "BitsAllocated")
    # Anything beyond `needed` is padding (one byte for odd lengths, more from some writers);
    # pydicom ignores it too.
    if big_endian_vr is not None:
        value = _to_little_endian(value, needed, big_endian_vr, bits)
    return [bytes(value[start : start + length]) for start in range(0, needed, length)]


def _native_length(dataset: Dataset) -> int:
    """Bytes in one native frame of ``dataset``'s pixel data."""
    rows = _positive(dataset.get("Rows"), "Rows")
    columns = _positive(dataset.get("Columns"), "Columns")
    samples_value = dataset.get("SamplesPerPixel")
    samples = 1 if samples_value is None else _positive(samples_value, "SamplesPerPixel")
    bits = _positive(dataset.get("BitsAllocated"), "BitsAllocated")
    photometric = str(dataset.get("PhotometricInterpretation") or "").strip()
    length = _frame_length(rows, columns, samples, bits, photometric)
    if length is None:
        raise ProtocolError(f"a frame of {rows}x{columns} {bits}-bit pixels is not whole bytes")
    return length


def _native_needed(length: int, count: int, stored: int) -> int:
    """Bytes ``count`` native frames take, checked against the ``stored`` value's length."""
    needed = length * count
    if stored < needed:
        raise ProtocolError(f"native pixel data is {stored} bytes, {count} frame(s) need {needed}")
    return needed


def _to_little_endian(value: bytes, needed: int, vr: str, bits: int) -> bytes:
    """The first ``needed`` bytes of big endian pixel data in little endian byte order.

    OB is a byte stream and is never swapped. OW is a stream of 16-bit words, so 1- and 8-bit
    data in OW has its byte pairs swapped (as pydicom does for 8-bit data); wider values (and
    OF/OD float data) are swapped at their own width.
    """
    if vr == "OB":
        return value[:needed]
    if vr in ("OF", "OD"):
        width = 4 if vr == "OF" else 8
    elif bits <= 8:
        width = 2
    elif bits in (16, 32, 64):
        width = bits // 8
    else:
        raise ProtocolError(f"cannot convert {bits}-bit big endian pixel data")
    span = needed + (-needed) % width
    source = bytes(value[:span]).ljust(span, b"\0")
    swapped = bytearray(span)
    for i in range(width):
        swapped[i::width] = source[width - 1 - i :: width]
    return bytes(swapped[:needed])


_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0"


def locate_in_bytes(p10: bytes | bytearray) -> Located | None:
    """``locate_in_file`` of an instance held in memory (one ``cut_frames`` has cut): None also
    where it refuses what ``cut_frames`` took (more fragments than it walks), served from the cut."""
    try:
        return locate_in_file(BytesIO(p10), lambda offset, size: bytes(p10[offset:offset + size]))
    except ProtocolError:
        return None


class FrameRanges:
    """Where each frame of an instance lies in its Part 10 file, compactly: the fragments' offsets
    and lengths in two arrays and, per frame, the index of its first fragment (frame k+1 is
    fragments ``first[k]`` up to ``first[k + 1]``): 24 bytes a frame, where a list of tuples took
    ~170 (a slide level holds hundreds of thousands of tiles). ``ranges[k]`` is frame k+1's
    (offset, length) pieces."""

    __slots__ = ("_offsets", "_lengths", "_first")

    def __init__(self, offsets: array[int], lengths: array[int], first: array[int]) -> None:
        self._offsets, self._lengths, self._first = offsets, lengths, first

    def __len__(self) -> int:
        return len(self._first) - 1

    def __getitem__(self, index: int) -> Pieces:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start, end = self._first[index], self._first[index + 1]
        return tuple(zip(self._offsets[start:end], self._lengths[start:end], strict=True))

    def __iter__(self) -> Iterator[Pieces]:
        return (self[index] for index in range(len(self)))

    @property
    def fragments(self) -> int:
        """Fragments recorded (at least one a frame): what the ranges take, 16 bytes each."""
        return len(self._offsets)

    def frame_length(self, index: int) -> int:
        """Bytes in frame ``index + 1``."""
        return sum(self._lengths[self._first[index]:self._first[index + 1]])


@dataclass(frozen=True)
class Located:
    """Where each frame of an instance lies in its Part 10 file, and the syntax they are served in."""

    transfer_syntax: str
    pieces: FrameRanges


_STREAM_DEFER = 64 << 10  # values larger than this are left in the file while the data set is read
_SERVED_AS_STORED = frozenset(_NATIVE - {EXPLICIT_VR_BIG_ENDIAN, DEFLATED})


def locate_in_file(fp: Readable, read_at: ReadAt) -> Located | None:
    """Where each frame of the Part 10 file ``fp`` (seekable, at its start; ``read_at``: its
    bytes at an offset, for reads here and there that a buffered stream would each fill a buffer
    for) lies, found with no more than one frame's bytes in memory (and where each fragment
    lies, 16 bytes each): a 2 GB slide need not be read into memory to serve one tile. None when
    the frames are not stored as served (big endian or deflated data: those are cut whole,
    ``cut_frames``). Raises ProtocolError as ``cut_frames`` does. Encapsulated frames are the
    ones pydicom assembles, each compared byte for byte with the ranges found for it; native
    frames are consecutive runs of the value, as ``cut_frames`` slices them. Blocking."""
    import_pydicom()
    from pydicom.dataelem import RawDataElement
    from pydicom.errors import InvalidDicomError

    syntax = stored_transfer_syntax(fp)
    if syntax is None or (syntax not in _SERVED_AS_STORED and is_native(syntax)):
        return None  # (before pydicom reads the data set: a deflated one it would inflate whole)
    try:
        dataset = read_dataset(fp, defer_size=_STREAM_DEFER)
        syntax = _transfer_syntax(str(dataset.file_meta.get("TransferSyntaxUID") or ""))
        tag = _pixel_tag(dataset)
        raw = dataset.get_item(tag, keep_deferred=True)
        count = _number_of_frames(dataset)
    except InvalidDicomError as exc:
        raise ProtocolError("not a DICOM Part 10 file (no DICM prefix)") from exc
    except (DicomfsError, OSError):
        raise  # (ours, the file shorter than its index, a disk that fails: not the archive's data)
    except Exception as exc:  # pydicom raises many types for malformed input
        raise ProtocolError(f"not a readable DICOM Part 10 file: {_describe(exc)}") from exc
    if not isinstance(raw, RawDataElement) or raw.value_tell is None:
        return None
    if raw.length == 0:
        raise ProtocolError("DICOM instance with an empty pixel data element")
    size = fp.seek(0, 2)
    if _encapsulated(raw.length == 0xFFFFFFFF, syntax, tag):
        pieces = _locate_fragments(fp, read_at, dataset, raw.value_tell, size, count)
        return Located(syntax, pieces) if pieces is not None else None
    length = _native_length(dataset)
    needed = _native_needed(length, count, min(raw.length, size - raw.value_tell))  # (as pydicom reads a cut file)
    start = raw.value_tell
    return Located(EXPLICIT_VR_LITTLE_ENDIAN, FrameRanges(array("Q", range(start, start + needed, length)),
                                                          array("Q", [length]) * count, array("Q", range(count + 1))))



ITEM_HEADER = 8  # an item's tag and length
_PIXEL_HEADERS = tuple(b"\xe0\x7f\x10\x00" + vr + b"\x00\x00\xff\xff\xff\xff" for vr in (b"OB", b"OW"))


def check_frame_table(prefix: bytes, delimiter: bytes, table: FrameTable) -> str:
    """Whether an encapsulated instance's frames are where an archive says (``table``), one item
    each, judged from the instance's bytes up to the first frame (``prefix``: its data set, the
    pixel data's header, the offset table and the first item's header) and the 8 bytes after the
    last (``delimiter``); the syntax the frames are served in if so. Raises ProtocolError saying
    what does not hold: the caller then cuts the instance whole.

    The instance's own offset table must place every frame where ``table`` does: a basic offset
    table (where each frame's first item starts, PS3.5 A.4) or an extended one (where each frame
    lies: pydicom reads those ranges as they are). Without either, only a walk of every item from
    the first finds the frames (pydicom's rule), and no table of an archive's can stand in for that
    walk: refused. Then the first frame must be the first item after the basic offset table, each
    the next one after the previous, and the pixel data (the data set with it: nothing may follow
    that pydicom would read) must end after the last. Each frame's item header, and the one after
    it, are checked when it is read (``frame_in_item``). A file whose basic offset table points
    elsewhere than its items start (malformed) gets the frames its table says here, where a cut of
    the whole instance follows pydicom's walk. Blocking (pydicom)."""
    import_pydicom()
    count, first = len(table.offsets), table.offsets[0] if table.offsets else 0
    if not 1 <= count <= MAX_FRAME_COUNT or len(table.lengths) != count or len(prefix) != first:
        raise ProtocolError("the offset table is empty, too long, or not the length of its lengths")
    if not all(0 <= length < 0xFFFFFFFF for length in table.lengths):
        raise ProtocolError("a frame of the offset table is longer than an item can be")
    syntax = stored_transfer_syntax(BytesIO(prefix))
    if syntax is None or is_native(syntax):
        raise ProtocolError(f"frames in transfer syntax {syntax} are not encapsulated")
    source = BytesIO(prefix)
    declared, eot = _before_pixels(source)
    if declared != count:
        raise ProtocolError(f"the offset table lists {count} frames, NumberOfFrames is {declared}")
    at = source.tell()  # (pydicom stopped at the pixel data's tag)
    found = _first_item(prefix[at:at + 20], at)
    if found is None:
        raise ProtocolError("no encapsulated pixel data with an offset table where the data set ends")
    table_length, first_item = found
    if first_item + ITEM_HEADER != first or prefix[first_item:first_item + 4] != _ITEM_TAG \
            or unpack_from("<I", prefix, first_item + 4)[0] != table.lengths[0]:
        raise ProtocolError("the first frame is not the first item after the basic offset table")
    relative = [offset - first for offset in table.offsets]
    for index in range(count - 1):
        if table.offsets[index + 1] != table.offsets[index] + table.lengths[index] + ITEM_HEADER:
            raise ProtocolError(f"frame {index + 2} does not follow frame {index + 1} as the next item")
    end = table.offsets[-1] + table.lengths[-1]
    if end + ITEM_HEADER != table.size or delimiter != _SEQUENCE_DELIMITER + bytes(4):
        raise ProtocolError("the last frame is not followed by the end of the pixel data and of the file")
    if table_length and (table_length != 4 * count or list(unpack_from(f"<{count}I", prefix, at + 20)) != relative):
        raise ProtocolError("the basic offset table places the frames elsewhere")
    if not table_length and eot[0] is None and eot[1] is None:
        raise ProtocolError("the instance has no offset table of its own (its frames are found by walking its items)")
    if eot[0] is not None or eot[1] is not None:
        if eot[0] is None or eot[1] is None or len(eot[0]) != 8 * count or len(eot[1]) != 8 * count \
                or list(unpack_from(f"<{count}Q", eot[0])) != relative \
                or list(unpack_from(f"<{count}Q", eot[1])) != list(table.lengths):
            raise ProtocolError("the extended offset table places the frames elsewhere")
    return _transfer_syntax(syntax)



def own_frame_table(fp: Readable, size: int) -> FrameTable | None:
    """Where the encapsulated frames of the Part 10 file ``fp`` (at its start; ``size`` bytes)
    lie by its own offset table, read up to the first frame (an IDC object, read by ranges): the
    extended offset table's ranges, or, from a basic one, each frame taken as the one item from
    where it starts to where the next does (the last: to the sequence delimiter the file must end
    with). A claim as an archive's table is, for ``check_frame_table`` to check; None without an
    offset table (or frames not encapsulated). Raises ProtocolError for a file whose data set
    cannot be read, and what ``fp`` raises. Blocking (pydicom)."""
    import_pydicom()
    syntax = stored_transfer_syntax(fp)
    if syntax is None or is_native(syntax):
        return None
    count, eot = _before_pixels(fp)
    at = fp.tell()
    found = _first_item(fp.read(20), at)
    if found is None:
        return None
    table_length, first_item = found
    if eot[0] is not None and eot[1] is not None and len(eot[0]) == len(eot[1]) == 8 * count:
        offsets = [first_item + ITEM_HEADER + offset for offset in unpack_from(f"<{count}Q", eot[0])]
        return FrameTable(tuple(offsets), unpack_from(f"<{count}Q", eot[1]), size)
    if table_length != 4 * count or first_item + ITEM_HEADER > size:
        return None
    starts = list(unpack_from(f"<{count}I", fp.read(table_length)))
    ends = [*starts[1:], size - ITEM_HEADER - first_item]  # (where the next frame's item starts; the delimiter)
    lengths = tuple(end - start - ITEM_HEADER for start, end in zip(starts, ends, strict=True))
    if min(lengths) < 0:
        return None
    return FrameTable(tuple(first_item + ITEM_HEADER + start for start in starts), lengths, size)


def _first_item(head: bytes, at: int) -> tuple[int, int] | None:
    """The basic offset table's length and where the first fragment's item starts, from the 20
    bytes at ``at`` where a data set's pixel data begins; None if they are not encapsulated pixel
    data (explicit VR little endian, undefined length) opening with an offset table item."""
    if head[:12] not in _PIXEL_HEADERS or head[12:16] != _ITEM_TAG:
        return None
    table_length = unpack_from("<I", head, 16)[0]
    return table_length, at + 20 + table_length

def frame_in_item(data: bytes, length: int, next_length: int | None) -> memoryview:
    """The frame in ``data``, the bytes of an instance from 8 before a frame ``check_frame_table``
    accepted to 8 after it: its item's header must say ``length``, and what follows must be the
    next frame's item header (``next_length``) or, after the last (None), the sequence delimiter.
    Raises ProtocolError otherwise (the archive's table does not describe these bytes)."""
    if len(data) != length + 2 * ITEM_HEADER or data[:4] != _ITEM_TAG or unpack_from("<I", data, 4)[0] != length:
        raise ProtocolError("a frame's bytes are not the item the offset table says")
    after = data[-ITEM_HEADER:]
    expected = _SEQUENCE_DELIMITER + bytes(4) if next_length is None else _ITEM_TAG + next_length.to_bytes(4, "little")
    if after != expected:
        raise ProtocolError("a frame's item is not followed by the next frame's, or the end of the pixel data")
    return memoryview(data)[ITEM_HEADER:-ITEM_HEADER]



def _before_pixels(fp: Readable) -> tuple[int, tuple[bytes | None, bytes | None]]:
    """NumberOfFrames and the extended offset table (offsets, lengths) of the data set of the
    Part 10 file ``fp``, read up to its pixel data (``fp`` is left at the pixel data's tag)."""
    try:
        dataset = read_dataset(fp, stop_before_pixels=True)
        return _number_of_frames(dataset), (_value(dataset, _EXTENDED_OFFSET_TABLE, _no_reads),
                                            _value(dataset, _EXTENDED_OFFSET_TABLE_LENGTHS, _no_reads))
    except DicomfsError:
        raise
    except Exception as exc:  # pydicom raises many types for malformed input
        raise ProtocolError(f"the instance's data set is not readable: {_describe(exc)}") from exc

def _no_reads(offset: int, length: int) -> bytes:
    raise ProtocolError("a value of the data set was left unread")


def _locate_fragments(fp: Readable, read_at: ReadAt, dataset: Dataset, start: int, size: int,
                      count: int) -> FrameRanges | None:
    """The ranges of each encapsulated frame: the items walked from ``start``, grouped into the
    frames pydicom assembles (``cut_frames``'s rules: offset tables, one fragment per frame...),
    or, with an extended offset table, the range it gives each frame."""
    from pydicom.encaps import generate_frames

    fragments = _fragments(read_at, start, size)
    if fragments is None:
        raise ProtocolError("malformed encapsulated pixel data: no offset table, an item that runs past the file or "
                            f"is not an item, or more than {MAX_FRAGMENTS:,} fragments")
    offsets = _extended_offsets(_value(dataset, _EXTENDED_OFFSET_TABLE, read_at),
                                _value(dataset, _EXTENDED_OFFSET_TABLE_LENGTHS, read_at),
                                lambda offset, length: read_at(start + offset, length), count)
    if offsets is not None:
        # One range a frame, where the table says (PS3.3 C.7.6.3.1.8), in its order, which need not
        # be the stored one: from the item tag after the basic offset table, past each item's header.
        first_item = start + 8 + unpack_from("<I", read_at(start, 8), 4)[0]
        fragments = (array("Q", (first_item + offset + 8 for offset in unpack_from(f"<{count}Q", offsets[0]))),
                     array("Q", unpack_from(f"<{count}Q", offsets[1])))
    fp.seek(start)
    try:
        located = _match(generate_frames(fp, number_of_frames=count, extended_offsets=offsets), *fragments, read_at)
    except (DicomfsError, OSError):
        raise
    except Exception as exc:
        raise ProtocolError(f"malformed encapsulated pixel data: {_describe(exc)}") from exc
    if located is None:
        return None
    _check_frames(offsets, [located.frame_length(index) for index in range(len(located))], count)
    return located


def _value(dataset: Dataset, tag: int, read_at: ReadAt) -> bytes | None:
    """A top-level element's value, read from the file if it was left there (deferred)."""
    raw = dataset.get_item(tag, keep_deferred=True)
    if raw is None:
        return None
    left = value_left_in_file(raw, read_at)
    return left if left is not None else bytes(raw.value or b"")


def _fragments(read: ReadAt, start: int, size: int) -> tuple[array[int], array[int]] | None:
    """Where the value of each fragment of encapsulated pixel data from ``start`` lies (its
    offset, its length), walked to the sequence delimiter (or the file's end), the basic offset
    table not among them; None if there is no offset table, anything there is not an item or runs
    past the file, or there are more than ``MAX_FRAGMENTS``."""
    offsets, lengths = array("Q"), array("Q")
    position = start
    table = True
    while position + 8 <= size:
        head = read(position, 8)
        if len(head) < 8:
            return None
        tag, length = head[:4], unpack_from("<I", head, 4)[0]
        if tag == _SEQUENCE_DELIMITER:
            break
        if tag != _ITEM_TAG or position + 8 + length > size or len(offsets) >= MAX_FRAGMENTS:
            return None
        if not table:
            offsets.append(position + 8)
            lengths.append(length)
        table = False
        position += 8 + length
    return None if table else (offsets, lengths)


def _match(frames: Iterable[bytes], offsets: array[int], lengths: array[int], read: Callable[[int, int], Any]) \
        -> FrameRanges | None:
    """The fragments (in stored order) each frame is made of, each compared byte for byte with
    the frame; None if they do not make up the frames exactly."""
    first = array("Q", [0])
    index = 0
    for frame in frames:
        covered = 0
        while covered < len(frame) and index < len(offsets):
            offset, length = offsets[index], lengths[index]
            if read(offset, length) != frame[covered:covered + length]:
                return None
            covered += length
            index += 1
        if covered != len(frame):
            return None
        first.append(index)
    return FrameRanges(offsets, lengths, first)
