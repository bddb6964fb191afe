"""Writing cached instances out as plain files: ``DIR/<St>/<Se>/<SOP>.dcm`` or one zip per study
(and, for ``export``, any rendered file).

Owns atomic output (a hidden temporary file in the target folder, fsync, rename), skipping files
that already hold identical bytes, nothing being written outside the output folder (names are
validated UIDs or archive keys), and output modes from the user's umask (``OutputDir``: the
process itself runs with umask 077 for the sake of its cache). Reads instances through the blob
store, so it works for every source. Blocking file work runs in worker threads.
"""

from __future__ import annotations

import os
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from dicomfs.cache import BlobStore, InstanceHandle
from dicomfs.errors import CacheError, DicomfsError, OutputError, UsageError
from dicomfs.records import InstanceRecord, SeriesRecord
from dicomfs.uids import is_key

COPY_CHUNK = 8 << 20


@dataclass
class Written:
    files: int = 0
    skipped: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class OutputDir:
    """An output folder, and the modes of the files and folders written into it: what the user's
    ``umask`` gives, as for any file they create."""

    path: Path
    umask: int = 0o022

    @property
    def file_mode(self) -> int:
        return 0o666 & ~self.umask

    def mkdir(self, folder: Path) -> None:
        """``folder`` (inside the output) and its missing parents, with the user's mode. Blocking."""
        missing = []
        probe = folder
        while not probe.exists() and probe != probe.parent:
            missing.append(probe)
            probe = probe.parent
        folder.mkdir(parents=True, exist_ok=True)
        for created in missing:
            os.chmod(created, 0o777 & ~self.umask)


def check_output_dir(path: Path, umask: int = 0o022) -> OutputDir:
    path = path.expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"output {path} exists and is not a directory")
    out = OutputDir(path.absolute(), umask)
    try:
        out.mkdir(path)
    except OSError as exc:
        raise UsageError(f"cannot create output folder {path}: {exc.strerror}") from None
    return OutputDir(path.resolve(), umask)


async def write_series_files(blobs: BlobStore, series: SeriesRecord, instances: list[InstanceRecord],
                             out: OutputDir, written: Written) -> None:
    """``<out>/<St>/<Se>/<SOP>.dcm`` for every instance; identical existing files are kept."""
    _check_names(series, instances)
    folder = out.path / series.study_uid / series.uid
    try:
        await trio.to_thread.run_sync(out.mkdir, folder)
    except OSError as exc:
        raise OutputError(f"cannot create {folder}: {exc.strerror}") from None
    for instance in instances:
        handle = await blobs.open_instance(series, instance)
        try:
            wrote = await trio.to_thread.run_sync(_write_file, handle, folder / f"{instance.key}.dcm",
                                                  out.file_mode)
        finally:
            handle.close()
        if wrote:
            written.files += 1
            written.bytes += handle.length
        else:
            written.skipped += 1


async def write_study_zip(blobs: BlobStore, study_uid: str, members: list[tuple[SeriesRecord, list[InstanceRecord]]],
                          out: OutputDir, written: Written) -> None:
    """``<out>/<St>.zip`` holding ``<Se>/<SOP>.dcm`` (stored, not deflated: DICOM pixel data is
    mostly compressed already), written to a temporary name and renamed when complete."""
    for series, instances in members:
        _check_names(series, instances)
    target = out.path / f"{study_uid}.zip"
    total = 0
    with _temporary_for(target) as tmp:
        archive = await trio.to_thread.run_sync(lambda: zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True))
        try:
            for series, instances in members:
                for instance in instances:
                    handle = await blobs.open_instance(series, instance)
                    try:
                        name = f"{series.uid}/{instance.key}.dcm"
                        await trio.to_thread.run_sync(_zip_member, archive, name, handle)
                        total += handle.length
                    finally:
                        handle.close()
        finally:
            await trio.to_thread.run_sync(archive.close)
        await trio.to_thread.run_sync(_fsync_and_rename, tmp, target, out.file_mode)
    written.files += 1
    written.bytes += total


def write_bytes(target: Path, data: bytes, mode: int) -> bool:
    """Write ``data`` to ``target`` (with ``mode``) atomically (not fsync'ed: callers sync once at
    the end); False if it already held these bytes. Blocking."""
    try:
        if target.stat().st_size == len(data) and target.read_bytes() == data:
            return False
    except OSError:
        pass
    with _temporary_for(target) as tmp:
        tmp.write_bytes(data)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    return True


def _check_names(series: SeriesRecord, instances: list[InstanceRecord]) -> None:
    for name in (series.study_uid, series.uid, *(i.key for i in instances)):
        if not is_key(name):
            raise DicomfsError(f"refusing to write a file named {name[:80]!r}")


def _chunks(handle: InstanceHandle) -> list[tuple[int, int]]:
    return [(pos, min(COPY_CHUNK, handle.length - pos)) for pos in range(0, handle.length, COPY_CHUNK)]


def _same_bytes(handle: InstanceHandle, path: Path) -> bool:
    try:
        if path.stat().st_size != handle.length:
            return False
        with open(path, "rb") as existing:
            for pos, size in _chunks(handle):
                if existing.read(size) != os.pread(handle.fd, size, handle.offset + pos):
                    return False
        return True
    except OSError:
        return False


def _write_file(handle: InstanceHandle, target: Path, mode: int) -> bool:
    """Write one instance atomically (with ``mode``); False if ``target`` already held the same bytes."""
    if _same_bytes(handle, target):
        return False
    with _temporary_for(target) as tmp:
        with open(tmp, "wb") as out:
            for pos, size in _chunks(handle):
                data = os.pread(handle.fd, size, handle.offset + pos)
                if len(data) != size:
                    raise CacheError(f"cached bytes of {target.name} are shorter than recorded")
                out.write(data)
        _fsync_and_rename(tmp, target, mode)
    return True


@contextmanager
def _temporary_for(target: Path) -> Iterator[Path]:
    """A hidden temporary name beside ``target``, deleted unless it was renamed into place; an
    OSError on the way becomes a one-line OutputError."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _zip_member(archive: zipfile.ZipFile, name: str, handle: InstanceHandle) -> None:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = handle.length
    with archive.open(info, "w", force_zip64=handle.length > 0x7FFFFFFF) as member:
        for pos, size in _chunks(handle):
            member.write(os.pread(handle.fd, size, handle.offset + pos))


def _fsync_and_rename(tmp: Path, target: Path, mode: int) -> None:
    with open(tmp, "rb") as done:
        os.fsync(done.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, target)
