"""Readable names: DICOM values turned into safe, sortable path components.

Owns how a value reads in a name (person names with spaces, dates as YYYY-MM-DD, padded numbers,
placeholders for missing values), what a name may contain (no ``/``, ``\\``, NUL, control or
Windows-forbidden characters; no leading dots, no trailing dots or spaces; at most 255 bytes of
UTF-8, cut on a character boundary; optionally folded to ASCII), and the collision suffix: a short
hash of what a name stands for, so that a name never depends on listing order. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any

MAX_NAME_BYTES = 255
UNNAMED = "unnamed"
NO_DATE = "no date"
NO_TIME = "no time"
NO_ID = "no ID"
NO_NUMBER = "no number"
SUFFIX_HEX = 6  # hex digits of a collision suffix: 16 million values within one folder

# "/" "\" NUL, C0/C1 controls and DEL, and what Windows (Samba shares) forbids: < > : " | ? *
_FORBIDDEN = re.compile(r'[/\\<>:"|?*\x00-\x1f\x7f-\x9f]')
# Letters NFKD does not take apart but that have a usual ASCII spelling.
_ASCII_SPELLING = str.maketrans({"ß": "ss", "Æ": "AE", "æ": "ae", "Ø": "O", "ø": "o", "Œ": "OE", "œ": "oe",
                                 "Đ": "D", "đ": "d", "Ł": "L", "ł": "l", "Þ": "Th", "þ": "th", "ı": "i"})


def person_name(value: Any) -> str:
    """A DICOM JSON person name as a person reads it: ``Doe^John`` -> ``Doe John``."""
    text = value.get("Alphabetic", "") if isinstance(value, dict) else str(value)
    return " ".join(text.replace("^", " ").split())


def date(value: Any) -> str | None:
    """``20240301`` -> ``2024-03-01``; anything else as it is (None when empty)."""
    text = str(value).strip()
    if len(text) >= 8 and text[:8].isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:8]}"
    return text or None


def number(value: Any, width: int) -> str | None:
    """An IS value zero-padded to ``width`` digits so that names sort as numbers do."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return f"{value:0{width}d}" if value >= 0 else str(value)
    text = str(value).strip()
    if text.isdigit():
        return text.zfill(width)
    return text or None


def safe(name: str, *, ascii_only: bool = False, keep: str = "") -> str:
    """``name`` as a path component: forbidden characters become ``_``, leading dots and trailing
    dots and spaces go, at most 255 bytes of UTF-8 together with ``keep`` (an extension, kept
    whole); an empty result is ``unnamed``."""
    if ascii_only:
        name = fold_to_ascii(name)
    if name and len(name) <= 60 and name[0] not in ". " and name[-1] not in ". " and not _FORBIDDEN.search(name):
        return name + keep  # the usual case, quickly: nothing to replace, strip or cut
    name = _FORBIDDEN.sub("_", name).lstrip(". ").rstrip(". ")
    if not name:
        name = UNNAMED
    return cut(name, MAX_NAME_BYTES - len(keep.encode())).rstrip(". ") + keep


def fold_to_ascii(text: str) -> str:
    """Letters without their accents (``MÜLLER`` -> ``MULLER``); what has no ASCII form is ``_``."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_ASCII_SPELLING))
    letters = "".join(c for c in decomposed if not unicodedata.combining(c))
    return "".join(c if c.isascii() else "_" for c in letters)


def cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8, never inside a character."""
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode(errors="ignore")


def with_suffix(name: str, identity: str, extension: str = "", width: int = SUFFIX_HEX) -> str:
    """``name`` (which ends with ``extension``) with the identity's suffix before the extension,
    still within 255 bytes."""
    stem = name[: len(name) - len(extension)] if extension and name.endswith(extension) else name
    tag = f" [{hashlib.blake2b(identity.encode(), digest_size=16).hexdigest()[:width]}]"
    return cut(stem, MAX_NAME_BYTES - len(tag.encode()) - len(extension.encode())).rstrip(". ") + tag + extension
