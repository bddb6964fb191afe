"""Validation of identifiers that come from an archive before they become file names.

Owns the rule for what a study/series/instance name may look like. Must not do I/O.
"""

from __future__ import annotations

import re

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
# Hashed keys of de-identified stores: URL-safe base64 / hex alphabets, no dots or slashes.
_HASHED_KEY = re.compile(r"[A-Za-z0-9_\-]+")
MAX_UID_LENGTH = 64
MAX_KEY_LENGTH = 128

# Names that desktops, file managers and shells probe for in every directory.
_PROBE_NAMES = frozenset(
    {
        ".hidden", "autorun.inf", ".xdg-volume-info", ".DS_Store", "desktop.ini", "Thumbs.db",
        ".directory", ".localized", ".git", ".svn", ".hg", ".metadata_never_index",
        ".Spotlight-V100", ".fseventsd", ".ql_diskcache", "folder.jpg", "Folder.jpg",
    }
)


def is_uid(value: str) -> bool:
    """True for a syntactically valid DICOM UID: digits and dots, at most 64 characters."""
    return 0 < len(value) <= MAX_UID_LENGTH and _UID.fullmatch(value) is not None


def is_key(value: str) -> bool:
    """True for a name that may be used as a path component: a UID or a hashed key."""
    if is_uid(value):
        return True
    return 0 < len(value) <= MAX_KEY_LENGTH and _HASHED_KEY.fullmatch(value) is not None


def instance_key(dataset_uid: str | None, header_uid: str | None) -> str | None:
    """The UID an instance is known by: the SOPInstanceUID of its data set (what archives index
    and list), else the one in its file meta information; None if neither is a valid UID. Real
    files disagree (pydicom's ``rtdose.dcm`` does), so there must be one rule, and this is it."""
    for uid in (dataset_uid, header_uid):
        if uid and is_uid(uid):
            return uid
    return None


def is_probe_name(name: str) -> bool:
    """True for names that operating systems probe for and that never exist in an archive."""
    return (
        name in _PROBE_NAMES or name.startswith((".Trash", "._", ".goutputstream"))
    )
