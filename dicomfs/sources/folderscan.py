"""Reading the headers of a folder's files: one at a time, or in worker processes.

Owns what a file's index entry is (``parse_file``: the UIDs and the listing attributes, read with
pydicom up to the pixel data), reading many of them (``parse_files``), and running any such job
over many files (``map_files``: a folder series' metadata too). A first scan is
pydicom's CPU (1.5-2 ms a file: 30,000 files took a minute), which threads cannot share under the
GIL: from ``PARALLEL_FROM`` files on, chunks of files go to a pool of processes (``spawn``: the
daemon has threads by then, which ``fork`` would copy mid-flight), one per core, and their log
lines come back with their results. Ends at the next file, or chunk, once ``stop`` is set. Must
not walk the folder or keep the index: ``folder`` does.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

from dicomfs.dicomread import quiet_pydicom, read_dataset
from dicomfs.errors import SourceError
from dicomfs.localfile import open_regular
from dicomfs.tasks import StopSignal
from dicomfs.uids import instance_key, is_uid

log = logging.getLogger(__name__)

STUDY_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
              "StudyDescription", "AccessionNumber", "StudyID", "ReferringPhysicianName",
              "StudyInstanceUID")
SERIES_TAGS = ("Modality", "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime",
               "SeriesInstanceUID")
INSTANCE_TAGS = ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns",
                 "NumberOfFrames")
PARALLEL_FROM = 1000  # files to parse before a pool of processes pays for its start (~0.5 s)
METADATA_PARALLEL_FROM = 200  # files of a series whose metadata is read in processes (~7 ms each)
MAX_PROCESSES = 8
CHUNK = 64  # files a process parses per task: what is left to do when a scan is stopped

R = TypeVar("R")
Entry = dict[str, Any] | None  # a file's index entry; None: not a usable Part 10 file
Parsed = tuple[str, Entry | SourceError]  # (path, entry or why it could not be opened)


def parse_file(path: str) -> Entry:
    """Index entry of one file, or None if it is not a usable Part 10 file; SourceError if it
    cannot be opened. Blocking."""
    fd = open_regular(path)
    try:
        with os.fdopen(fd, "rb") as file:
            ds = read_dataset(file, stop_before_pixels=True, specific_tags=STUDY_TAGS + SERIES_TAGS + INSTANCE_TAGS)
    except Exception as exc:  # pydicom raises many kinds of errors for non-DICOM files
        log.debug("not indexed (unreadable as DICOM): %s: %s", path, exc)
        return None
    meta = getattr(ds, "file_meta", None)
    sop = instance_key(str(ds.get("SOPInstanceUID", "")), str(getattr(meta, "MediaStorageSOPInstanceUID", "")))
    study = str(ds.get("StudyInstanceUID", ""))
    series = str(ds.get("SeriesInstanceUID", ""))
    if meta is None or "TransferSyntaxUID" not in meta:
        log.debug("not indexed (no file meta information): %s", path)
        return None
    if not (is_uid(study) and is_uid(series) and sop is not None):
        log.warning("not indexed (missing or invalid UIDs): %s", path)
        return None

    def attrs(keywords: tuple[str, ...]) -> dict[str, Any]:
        # (each element's own JSON, not a pydicom Dataset built of them and its to_json_dict: the
        # same keys in the same order, with less work per file of a first scan)
        out: dict[str, Any] = {}
        try:
            for keyword in keywords:
                tag = _tag_of(keyword)
                if tag in ds:
                    out[f"{tag:08X}"] = ds[tag].to_json_dict(None, 1024)
        except Exception:
            return {}
        return out

    return {
        "study": study, "series": series, "sop": sop,
        "study_attrs": attrs(STUDY_TAGS), "series_attrs": attrs(SERIES_TAGS),
        "instance_attrs": attrs(INSTANCE_TAGS),
    }


def file_metadata(path: str) -> dict[str, Any]:
    """The DICOM JSON of the file at ``path`` (``instancemeta.metadata``), as a job of ``map_files``."""
    from dicomfs import instancemeta

    return instancemeta.metadata(Path(path))


@functools.cache
def _tag_of(keyword: str) -> int:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return tag


def parse_files(paths: list[str], stop: StopSignal, parallel_from: int | None = None) -> Iterator[Parsed]:
    """Each path's entry (or the SourceError of a file that cannot be opened), in the order of
    ``paths``; in worker processes from ``parallel_from`` paths on (default ``PARALLEL_FROM``).
    Blocking; ends at the next file, or chunk of files, once ``stop`` is set (what was yielded by
    then is the caller's)."""
    return map_files(parse_file, paths, stop, PARALLEL_FROM if parallel_from is None else parallel_from)


def map_files(job: Callable[[str], R], paths: list[str], stop: StopSignal,
              parallel_from: int) -> Iterator[tuple[str, R | SourceError]]:
    """``job(path)`` of each path (a module-level function: it is sent to the worker processes by
    name), or the SourceError it raised, in the order of ``paths``; in worker processes from
    ``parallel_from`` paths on. Blocking; ends at the next file, or chunk, once ``stop`` is set."""
    processes = min(os.cpu_count() or 1, MAX_PROCESSES)
    done = 0
    if len(paths) >= parallel_from and processes > 1:
        try:
            for result in _in_processes(job, paths, stop, processes):
                done += 1
                yield result
            return
        except BrokenProcessPool as exc:  # (a process killed: the rest one by one, here)
            stop.check()  # (a SIGTERM to the whole service, say)
            log.warning("reading files in worker processes failed (%s); going on in one", exc)
    for path in paths[done:]:
        stop.check()
        yield path, _run_or_error(job, path)


def _run_or_error(job: Callable[[str], R], path: str) -> R | SourceError:
    try:
        return job(path)
    except SourceError as exc:
        return exc


def _in_processes(job: Callable[[str], R], paths: list[str], stop: StopSignal,
                  processes: int) -> Iterator[tuple[str, R | SourceError]]:
    chunks = [paths[start:start + CHUNK] for start in range(0, len(paths), CHUNK)]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context, initializer=_ignore_interrupts) as pool:
        try:
            futures = [pool.submit(_run_chunk, job, chunk, log.getEffectiveLevel()) for chunk in chunks]
            for future in futures:
                while True:
                    try:
                        results, records = future.result(timeout=0.1)
                        break
                    except concurrent.futures.TimeoutError:
                        stop.check()
                for level, message in records:
                    log.log(level, "%s", message)
                yield from results
                stop.check()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # (stopped: the chunks running end, no more start)


def _ignore_interrupts() -> None:
    """A worker process leaves Ctrl-C (which a terminal sends to every process of the command) to
    the daemon, which stops the scan and the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelno, record.getMessage()))


def _run_chunk(job: Callable[[str], R], paths: list[str],
               level: int) -> tuple[list[tuple[str, R | SourceError]], list[tuple[int, str]]]:
    """In a worker process: ``job`` of each path, and the log lines it made (at the daemon's level,
    pydicom's as quiet as the daemon keeps them)."""
    root = logging.getLogger()
    if not any(isinstance(handler, _Collect) for handler in root.handlers):  # (the process's first chunk)
        root.handlers[:] = [_Collect()]
        root.setLevel(level)
        quiet_pydicom(level <= logging.DEBUG)
    collect = next(handler for handler in root.handlers if isinstance(handler, _Collect))
    collect.records = []
    return [(path, _run_or_error(job, path)) for path in paths], collect.records
