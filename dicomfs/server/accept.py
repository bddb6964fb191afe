"""Content negotiation for the DICOMweb server: what a request's ``Accept`` header allows.

Owns parsing ``Accept`` (media ranges with quoted parameters, ``q`` values, several headers) and
the three decisions the server makes with it: may it answer JSON, may it send instances as they
are stored (``multipart/related; type="application/dicom"``), and how may it send frames (as
stored: multipart, or one frame as a single part). dicomfs never transcodes, so a request whose
every acceptable form needs another transfer syntax gets a ``NotAcceptable`` that says what is
stored and what to ask for. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from dicomfs.errors import DicomfsError
from dicomfs.frames import EXPLICIT_VR_LITTLE_ENDIAN, OCTET_STREAM

MULTIPART = "multipart/related"
DICOM = "application/dicom"
JSON_TYPES = ("application/dicom+json", "application/json")
# PS3.18 Table 8.7.3-5: the transfer syntax a frame media type means when none is named.
DEFAULT_SYNTAX = {
    OCTET_STREAM: EXPLICIT_VR_LITTLE_ENDIAN,
    "image/jpeg": "1.2.840.10008.1.2.4.50",
    "image/jls": "1.2.840.10008.1.2.4.80",
    "image/jp2": "1.2.840.10008.1.2.4.90",
    "image/jpx": "1.2.840.10008.1.2.4.92",
    "image/dicom-rle": "1.2.840.10008.1.2.5",
    "image/jxl": "1.2.840.10008.1.2.4.110",
    "image/jphc": "1.2.840.10008.1.2.4.201",
}
MAX_RANGES = 64  # media ranges read from one request (a hostile header stays cheap)


class NotAcceptable(DicomfsError):
    """None of the forms the request accepts is one the server can send."""

    http_status = 406


@dataclass(frozen=True)
class MediaRange:
    type: str  # "multipart/related", "image/jls", "*/*" (lower case)
    params: dict[str, str] = field(default_factory=dict)  # names lower case, values unquoted
    q: float = 1.0

    def covers(self, media_type: str) -> bool:
        """Whether this range's type admits ``media_type`` (``*/*``, ``image/*`` or equal)."""
        if self.type in ("*/*", "*"):
            return True
        major, _, minor = self.type.partition("/")
        return self.type == media_type or (minor == "*" and media_type.startswith(major + "/"))


def parse_accept(headers: Iterable[str]) -> list[MediaRange]:
    """The media ranges of every ``Accept`` header, best first (q, then order); ``*/*`` if none.
    Ranges with q=0 are left out; malformed ones are skipped, as RFC 9110 lets a server do."""
    ranges: list[tuple[float, int, MediaRange]] = []
    for text in headers:
        for item in _split(text, ","):
            parsed = _media_range(item)
            if parsed is not None and parsed.q > 0:
                ranges.append((-parsed.q, len(ranges), parsed))
            if len(ranges) >= MAX_RANGES:
                break
    if not ranges:
        return [MediaRange("*/*")]
    return [r for _, _, r in sorted(ranges, key=lambda item: (item[0], item[1]))]


def accepts_json(ranges: list[MediaRange]) -> bool:
    return any(r.covers(t) for r in ranges for t in JSON_TYPES)


def instance_form(ranges: list[MediaRange], stored: set[str], count: int) -> bool:
    """How instances stored in the ``stored`` transfer syntaxes may go out as they are: True as
    ``multipart/related; type="application/dicom"``, False as one ``application/dicom`` body
    (only for one instance, when a range asks for that first). A range must name no
    ``transfer-syntax``, ``*`` or the one they are stored in. Raises NotAcceptable (with what to
    ask for) otherwise."""
    for r in ranges:
        wanted = r.params.get("transfer-syntax")
        syntax_ok = wanted is None or wanted == "*" or stored <= {wanted}
        if r.type in ("*/*", "*"):
            return True
        if r.covers(MULTIPART):
            if r.params.get("type", DICOM).lower() in (DICOM, "*/*", "application/*") and syntax_ok:
                return True
        elif count == 1 and r.covers(DICOM) and syntax_ok:
            return False
    stored_text = ", ".join(sorted(stored)) or "unknown"
    raise NotAcceptable(f"instances are sent as stored ({stored_text}); dicomfs does not transcode: accept "
                        f'multipart/related; type="{DICOM}"; transfer-syntax=*')


def frame_form(ranges: list[MediaRange], media_type: str, transfer_syntax: str, count: int) -> bool:
    """How frames of ``media_type`` in ``transfer_syntax`` may go out: True as a multipart body,
    False as one single-part body (only for one frame, when a range names the frame's own type
    first). Raises NotAcceptable when the request accepts neither as stored."""
    for r in ranges:
        if r.type in ("*/*", "*"):
            return True
        if r.covers(MULTIPART):
            if _frame_part_ok(r.params.get("type"), r.params.get("transfer-syntax"), media_type, transfer_syntax):
                return True
        elif count == 1 and r.covers(media_type) and _syntax_ok(r.params.get("transfer-syntax"), media_type,
                                                                transfer_syntax):
            return False
    raise NotAcceptable(f"frames are stored as {media_type} in transfer syntax {transfer_syntax}; dicomfs does "
                        f"not transcode: accept multipart/related; type={media_type}; transfer-syntax=*")


def _frame_part_ok(part: str | None, wanted: str | None, media_type: str, transfer_syntax: str) -> bool:
    if wanted == "*":
        return True  # any syntax: the part says which (OHIF asks type=application/octet-stream so)
    if part is not None and part.lower() not in ("*/*", media_type):
        return False
    return _syntax_ok(wanted, part.lower() if part and part != "*/*" else media_type, transfer_syntax)


def _syntax_ok(wanted: str | None, media_type: str, transfer_syntax: str) -> bool:
    if wanted is None:
        return DEFAULT_SYNTAX.get(media_type) == transfer_syntax
    return wanted in ("*", transfer_syntax)


def _media_range(text: str) -> MediaRange | None:
    pieces = _split(text, ";")
    if not pieces:
        return None
    media_type = pieces[0].strip().lower()
    if media_type != "*" and media_type.count("/") != 1:
        return None
    params: dict[str, str] = {}
    q = 1.0
    for piece in pieces[1:]:
        name, sep, value = piece.partition("=")
        name, value = name.strip().lower(), value.strip()
        if not sep or not name:
            continue
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1].replace('\\"', '"')
        if name == "q":
            try:
                q = min(max(float(value), 0.0), 1.0)
            except ValueError:
                return None
        else:
            params[name] = value
    return MediaRange(media_type, params, q)


def _split(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` outside double quotes; empty pieces dropped."""
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(char)
    out.append("".join(current))
    return [piece for piece in (p.strip() for p in out) if piece]
