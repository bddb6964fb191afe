"""Local folder source: a directory tree of DICOM Part 10 files, indexed once.

Owns the scan of the folder and its persistent index (one JSON file in the source's work dir,
written atomically), revalidated on every start by size and mtime so that only new or changed
files are parsed again (by ``folderscan``, in worker processes when there are many). Files are
served in place: nothing is copied into the blob cache. Must not write inside the source folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import trio

from dicomfs.errors import NotFound, SourceError
from dicomfs.localfile import open_regular
from dicomfs.mounttable import dicomfs_mount_points
from dicomfs.records import DicomJson, InstanceRecord, SeriesRecord, StudyRecord
from dicomfs.sources import folderscan
from dicomfs.sources.base import SeriesSink
from dicomfs.sources.folderscan import file_metadata, map_files, parse_files
from dicomfs.tasks import Stopped, StopSignal, run_stoppable

log = logging.getLogger(__name__)

INDEX_VERSION = 3  # 2: instances keyed by their data set's SOPInstanceUID first (uids.instance_key); 3: files
# that could not be read are no longer in it (before, kept as not DICOM, and so hidden once readable)
READ_CHUNK = 1 << 20


def _read_metadata(paths: dict[str, Path | None], stop: StopSignal) -> dict[str, DicomJson]:
    """Each file's DICOM JSON; large values become bulk data and are not read (except in
    implicit-VR files, where resolving ambiguous VRs reads every value but the pixel data); in
    worker processes for a large series (``folderscan.map_files``). Blocking; ends at the next
    file, or chunk of files, once ``stop`` is set."""
    keys: dict[str, str] = {}
    for key, path in paths.items():
        if path is None:
            raise NotFound(f"instance {key} vanished")
        keys[str(path)] = key
    out: dict[str, DicomJson] = {}
    for name, meta in map_files(file_metadata, list(keys), stop, folderscan.METADATA_PARALLEL_FROM):
        if isinstance(meta, SourceError):
            raise meta
        out[keys[name]] = meta
    return out


class _WalkStopped(Stopped):
    """``build_index`` was stopped; ``files``: the entries of the files walked by then."""

    def __init__(self, files: dict[str, Any]) -> None:
        super().__init__("stopped")
        self.files = files


def build_index(root: Path, previous: dict[str, Any], stop: StopSignal | None = None) -> dict[str, Any]:
    """Walk ``root`` (not into dicomfs mounts below it); reuse entries whose size and mtime are
    unchanged. What cannot be read (a folder or file of another user's, a path too long) is left
    out of the index, so that it is tried again next time, and counted in one warning; SourceError
    if ``root`` itself cannot be read (missing, not a folder, not ours). Blocking; once ``stop`` is
    set, ends at the next file with ``_WalkStopped`` (a scan of 30,000 files takes minutes, and
    Ctrl-C or SIGTERM waited for it all)."""
    stop = stop or StopSignal()  # (none: a walk nothing stops)
    files: dict[str, Any] = {}
    to_parse: dict[str, tuple[str, os.stat_result]] = {}  # rel -> (path, stat), in the walk's order
    reused = 0
    unreadable: list[str] = []

    def refused(exc: OSError) -> None:
        if exc.filename is not None and os.path.abspath(exc.filename) == os.path.abspath(root):
            raise SourceError(f"cannot read the source folder {root}: {exc.strerror}")
        unreadable.append(f"{exc.filename}: {exc.strerror}")

    def stopped() -> _WalkStopped:
        return _WalkStopped({rel: entry for rel, entry in files.items() if entry is not None})

    mounts = dicomfs_mount_points()  # (a mount of dicomfs below the folder: its files again, through itself)
    for dirpath, dirnames, filenames in os.walk(root, onerror=refused):
        dirnames[:] = sorted(name for name in dirnames if os.path.join(dirpath, name) not in mounts)
        for name in sorted(filenames):
            if stop.is_set():
                raise stopped()
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue  # gone since it was listed (or a dangling link)
            except OSError as exc:
                unreadable.append(f"{path}: {exc.strerror}")
                continue
            if not os.path.isfile(path):
                continue
            rel = os.path.relpath(path, root)
            old = previous.get(rel)
            if old is not None and old["size"] == st.st_size and old["mtime_ns"] == st.st_mtime_ns:
                files[rel] = old
                reused += 1
                continue
            files[rel] = None  # (its place in the walk's order, filled below)
            to_parse[rel] = (path, st)
    rels = {path: rel for rel, (path, _) in to_parse.items()}
    parsed = 0
    try:
        for path, entry in parse_files(list(rels), stop):
            rel = rels[path]
            if isinstance(entry, SourceError):
                unreadable.append(str(entry))
                del files[rel]
                continue
            parsed += 1
            st = to_parse[rel][1]
            files[rel] = {**(entry or {"skip": True}), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    except Stopped:
        raise stopped() from None
    log.info("indexed %s: %d files parsed, %d unchanged", root, parsed, reused)
    if unreadable:
        log.warning("%s: %d files or folders could not be read and are not shown (first: %s)", root,
                    len(unreadable), unreadable[0])
    return files


class FolderSource:
    """Serves the Part 10 files below one folder, grouped by their UIDs."""

    serves_files_in_place = True

    def __init__(self, root: Path, work_dir: Path) -> None:
        self.root = root
        self.description = str(root)
        self._index_path = work_dir / "folder-index.json"
        self._studies: dict[str, StudyRecord] = {}
        self._series: dict[str, dict[str, SeriesRecord]] = defaultdict(dict)
        self._instances: dict[tuple[str, str], list[InstanceRecord]] = defaultdict(list)
        self._paths: dict[tuple[str, str, str], Path] = {}
        self._loaded = False

    async def check(self) -> None:
        await self._load()

    def stored_progress(self) -> bool:
        return self._index_path.exists()

    async def aclose(self) -> None:
        pass

    async def _load(self) -> None:
        if self._loaded:
            return
        files = await run_stoppable(self._refresh_index)  # (build_index: the folder's own errors)
        self._group(files)
        self._loaded = True

    def _refresh_index(self, stop: StopSignal) -> dict[str, Any]:
        previous: dict[str, Any] = {}
        try:
            stored = json.loads(self._index_path.read_text())
            if stored.get("version") == INDEX_VERSION and stored.get("root") == str(self.root):
                previous = stored["files"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass
        try:
            files = build_index(self.root, previous, stop)
        except _WalkStopped as stopped:
            # What was parsed is kept: the next start goes on from there (an entry is used only
            # for a file the walk finds again, of the same size and mtime).
            kept = {**previous, **stopped.files}
            if kept != previous:
                self._store_index(kept)
            log.info("indexing %s stopped after %d files; they are kept for the next start", self.root,
                     len(stopped.files))
            raise
        if files != previous:
            self._store_index(files)
        return files

    def _store_index(self, files: dict[str, Any]) -> None:
        tmp = self._index_path.with_suffix(".tmp")
        self._index_path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as out:
            json.dump({"version": INDEX_VERSION, "root": str(self.root), "files": files}, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self._index_path)

    def _group(self, files: dict[str, Any]) -> None:
        for rel, entry in files.items():
            if entry.get("skip"):
                continue
            study, series, sop = entry["study"], entry["series"], entry["sop"]
            kept = self._paths.get((study, series, sop))
            if kept is not None:
                log.warning("duplicate SOPInstanceUID %s in %s: %s is served (the first found)", sop, rel,
                            kept.relative_to(self.root))
                continue
            self._paths[(study, series, sop)] = self.root / rel
            self._studies.setdefault(study, StudyRecord(study, entry["study_attrs"]))
            self._series[study].setdefault(series, SeriesRecord(study, series, entry["series_attrs"]))
            self._instances[(study, series)].append(
                InstanceRecord(study, series, sop, size=entry["size"], mtime_ns=entry["mtime_ns"],
                               attrs=entry["instance_attrs"])
            )

    async def list_studies(self) -> list[StudyRecord]:
        await self._load()
        return list(self._studies.values())

    async def list_series(self, study_uid: str) -> list[SeriesRecord]:
        await self._load()
        return list(self._series.get(study_uid, {}).values())

    async def list_instances(self, series: SeriesRecord) -> list[InstanceRecord]:
        await self._load()
        return list(self._instances.get((series.study_uid, series.uid), []))

    async def series_metadata(self, series: SeriesRecord) -> dict[str, DicomJson]:
        paths = {i.key: self.local_file(i) for i in await self.list_instances(series)}
        return await run_stoppable(lambda stop: _read_metadata(paths, stop))

    def local_file(self, instance: InstanceRecord) -> Path | None:
        return self._paths.get((instance.study_uid, instance.series_uid, instance.key))

    async def fetch_series(self, series: SeriesRecord, sink: SeriesSink) -> None:
        for instance in await self.list_instances(series):
            path = self.local_file(instance)
            if path is None:
                raise NotFound(f"instance {instance.key} vanished from {self.root}")
            if not sink.wants(instance.key):
                continue
            writer = await sink.begin(instance.key, instance.size)
            fd = await trio.to_thread.run_sync(open_regular, path)
            with os.fdopen(fd, "rb") as source_file:
                while chunk := await trio.to_thread.run_sync(source_file.read, READ_CHUNK):
                    await writer.write(chunk)
            await writer.finish()
