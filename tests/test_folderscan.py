"""Unit tests of ``dicomfs.sources.folderscan``: the index entries of a folder's files are the same
whether they are read one by one or in worker processes, in the same order, with the same log
lines; a stopped scan ends and leaves no process behind."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pydicom.data
import pytest

from dicomfs.errors import SourceError
from dicomfs.sources import folderscan
from dicomfs.sources.folder import build_index
from dicomfs.tasks import Stopped, StopSignal
from tests.factory import make_instance

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.43", "1.2.826.0.1.3680043.8.498.43.1"


def a_folder(root: Path) -> list[str]:
    """DICOM files of many kinds (pydicom's own), files that are not DICOM, one without usable
    UIDs (a warning), and a fifo (not a regular file: a SourceError); their paths, sorted."""
    root.mkdir()
    bundled = Path(pydicom.data.__file__).parent / "test_files"  # (not get_testdata_files: it tries to download)
    for number, name in enumerate(sorted(bundled.glob("*.dcm"))):
        shutil.copy(name, root / f"{number:03d}-{name.name}")
    (root / "notes.txt").write_text("not DICOM")
    (root / "empty.dcm").write_bytes(b"")
    (root / "no-uids.dcm").write_bytes(make_instance("not a uid", SERIES))
    os.mkfifo(root / "fifo.dcm")
    return sorted(str(path) for path in root.iterdir())


def assert_same(paths: list[str], one: list[tuple[str, Any]], processes: list[tuple[str, Any]]) -> None:
    """The results of one thread and of processes: the paths in order, each the same result or
    the same SourceError."""
    assert [path for path, _ in processes] == paths == [path for path, _ in one]
    for (path, mine), (_, theirs) in zip(one, processes, strict=True):
        if isinstance(mine, SourceError):
            assert isinstance(theirs, SourceError) and str(theirs) == str(mine), path
        else:
            assert theirs == mine, path


def test_processes_give_what_one_thread_gives(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    paths = a_folder(tmp_path / "folder")
    caplog.set_level(logging.WARNING, logger="dicomfs")

    def logged() -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("dicomfs")]

    caplog.clear()
    one = list(folderscan.parse_files(paths, StopSignal(), parallel_from=len(paths) + 1))
    one_log = logged()
    caplog.clear()
    processes = list(folderscan.parse_files(paths, StopSignal(), parallel_from=1))
    assert logged() == one_log
    assert_same(paths, one, processes)
    entries = [entry for _, entry in one]
    assert sum(isinstance(e, dict) for e in entries) > 50  # (pydicom's files: mostly usable)
    assert any(e is None for e in entries) and any(isinstance(e, SourceError) for e in entries)
    assert (logging.WARNING, f"not indexed (missing or invalid UIDs): {tmp_path / 'folder' / 'no-uids.dcm'}") \
        in one_log


def test_a_stopped_scan_in_processes_ends_and_leaves_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    template = make_instance(STUDY, SERIES, f"{SERIES}.{0:05d}")
    for n in range(600):
        sop = f"{SERIES}.{n:05d}".encode()
        (folder / f"{n:05d}.dcm").write_bytes(template.replace(f"{SERIES}.{0:05d}".encode(), sop))
    monkeypatch.setattr(folderscan, "PARALLEL_FROM", 1)
    monkeypatch.setattr(folderscan, "CHUNK", 8)
    stop = StopSignal()
    seen: list[str] = []
    results = folderscan.parse_files(sorted(str(p) for p in folder.iterdir()), stop)
    with pytest.raises(Stopped):
        for path, _ in results:
            seen.append(path)
            if len(seen) == 40:
                threading.Timer(0.0, stop.set).start()
    assert 40 <= len(seen) < 600
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]


def test_build_index_keeps_the_walks_order_and_the_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The index is the same, key for key and in the same order, by one thread and by processes."""
    a_folder(tmp_path / "folder")
    monkeypatch.setattr(folderscan, "PARALLEL_FROM", 10**9)
    one = build_index(tmp_path / "folder", {})
    monkeypatch.setattr(folderscan, "PARALLEL_FROM", 1)
    processes = build_index(tmp_path / "folder", {})
    assert list(processes.items()) == list(one.items())
    assert "fifo.dcm" not in one and one["notes.txt"]["skip"] is True


def test_a_series_metadata_in_processes_is_the_same(tmp_path: Path) -> None:
    """``file_metadata`` over many files (a folder series' metadata) gives the same DICOM JSON in
    worker processes as in one thread, and a file that is not DICOM is the same SourceError."""
    paths = [p for p in a_folder(tmp_path / "folder") if not p.endswith("fifo.dcm")]
    one = list(folderscan.map_files(folderscan.file_metadata, paths, StopSignal(), parallel_from=len(paths) + 1))
    processes = list(folderscan.map_files(folderscan.file_metadata, paths, StopSignal(), parallel_from=1))
    assert_same(paths, one, processes)
    assert sum(isinstance(meta, dict) and "00080018" in meta for _, meta in one) > 50
    assert isinstance(dict(one)[str(tmp_path / "folder" / "notes.txt")], SourceError)
