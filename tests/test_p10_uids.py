"""Unit tests of the Part 10 meta reader and of UID / name validation."""

from __future__ import annotations

import pytest

from dicomfs.errors import ProtocolError
from dicomfs.p10 import NeedMoreData, parse_file_meta
from dicomfs.uids import is_key, is_probe_name, is_uid
from tests.factory import make_instance


def test_meta_is_read_from_a_prefix_and_needs_the_whole_group() -> None:
    data = make_instance("1.2.3", "1.2.3.4", "1.2.3.4.5")
    meta = parse_file_meta(data)
    assert meta.sop_instance_uid == "1.2.3.4.5"
    assert meta.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    for cut in range(meta.end):
        with pytest.raises(NeedMoreData):
            parse_file_meta(data[:cut])
    assert parse_file_meta(data[: meta.end + 8]).sop_instance_uid == "1.2.3.4.5"


def test_non_dicom_bytes_are_rejected() -> None:
    with pytest.raises(ProtocolError):
        parse_file_meta(b"\0" * 128 + b"JUNK" + b"\0" * 100)


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.2", "2.25.12345678901234567890", "1"])
def test_valid_uids(uid: str) -> None:
    assert is_uid(uid) and is_key(uid)


@pytest.mark.parametrize("bad", ["", "1..2", ".1", "1.", "1.2/3", "../1", "1.2\x003", "1" * 65,
                                 "1.2.3 ", "a.b"])
def test_invalid_uids(bad: str) -> None:
    assert not is_uid(bad)


@pytest.mark.parametrize("bad", ["..", ".", "a/b", "a\x00", "x" * 300, "", "../etc"])
def test_keys_cannot_name_other_paths(bad: str) -> None:
    assert not is_key(bad)


@pytest.mark.parametrize("name", [".Trash", ".Trash-1000", ".hidden", "autorun.inf", ".xdg-volume-info",
                                  ".DS_Store", "._foo", "desktop.ini", "Thumbs.db"])
def test_probe_names(name: str) -> None:
    assert is_probe_name(name)
