"""The FUSE Operations called directly (no kernel): names, sizes, errors, reads.

Two archives: the demo folder (sizes known up front) and a scripted DICOMweb-like archive whose
sizes are only known once a series has been fetched.
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, asynccontextmanager
from pathlib import Path

import pyfuse3
import pytest
import trio

from dicomfs.cache import BlobStore
from dicomfs.catalog import Catalog
from dicomfs.fs import DicomOperations
from dicomfs.records import InstanceRecord, SeriesRecord, StudyRecord
from dicomfs.search import Shown
from dicomfs.sources.demo import build_demo_archive
from dicomfs.sources.folder import FolderSource
from dicomfs.tree import ROOT_INODE, Tree
from dicomfs.views import ViewOptions, make_views
from dicomfs.views.base import path_inode
from tests.factory import make_instance
from tests.test_blobstore import ScriptedSource, wait_cached


class ScriptedArchive(ScriptedSource):
    """Listings like a DICOMweb server: no sizes until a series is fetched."""

    def __init__(self, series: dict[str, dict[str, bytes]]) -> None:
        super().__init__(series)
        self.listings: Counter[str] = Counter()

    async def check(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def list_studies(self) -> list[StudyRecord]:
        self.listings["studies"] += 1
        return [StudyRecord(k.split("/")[0], {"00080020": {"vr": "DA", "Value": ["20200101"]}})
                for k in self.series]

    async def list_series(self, study_uid: str) -> list[SeriesRecord]:
        self.listings["series"] += 1
        return [SeriesRecord(study_uid, k.split("/")[1]) for k in self.series if k.startswith(study_uid + "/")]

    async def list_instances(self, series: SeriesRecord) -> list[InstanceRecord]:
        self.listings["instances"] += 1
        return [InstanceRecord(series.study_uid, series.uid, key) for key in self.series[series.key]]


class Mounted:
    def __init__(self, ops: DicomOperations, blobs: BlobStore | None = None) -> None:
        self.ops = ops
        self.blobs = blobs

    async def resolve(self, path: str) -> int:
        inode = ROOT_INODE
        for part in [p for p in path.split("/") if p]:
            inode = (await self.ops.lookup(inode, part.encode())).st_ino
        return inode

    async def listdir(self, path: str) -> dict[str, pyfuse3.EntryAttributes]:
        fh = await self.ops.opendir(await self.resolve(path), None)
        found: dict[str, pyfuse3.EntryAttributes] = {}

        def reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
            found[name.decode()] = attr
            return True

        original = pyfuse3.readdir_reply
        pyfuse3.readdir_reply = reply  # the real one needs a kernel request
        try:
            await self.ops.readdir(fh, 0, None)  # type: ignore[arg-type]  # the patched readdir_reply needs no token
        finally:
            pyfuse3.readdir_reply = original
            await self.ops.releasedir(fh)
        return found

    async def read(self, path: str) -> bytes:
        info = await self.ops.open(await self.resolve(path), os.O_RDONLY, None)
        try:
            out = bytearray()
            while chunk := await self.ops.read(info.fh, len(out), 4096):
                out += chunk
            return bytes(out)
        finally:
            await self.ops.release(info.fh)


def operations(catalog: Catalog, blobs: BlobStore, listing_ttl: float = 60.0,
               views: ViewOptions | None = None) -> DicomOperations:
    """The mount's Operations over ``catalog`` and ``blobs``, showing every study."""
    tree = Tree(make_views(catalog, blobs, Shown(catalog), views), listing_ttl=listing_ttl)
    return DicomOperations(tree, lambda: blobs.size_limit)


@asynccontextmanager
async def mounted(source: object, cache: Path) -> AsyncIterator[Mounted]:
    blobs = BlobStore(cache, 1 << 30, source)  # type: ignore[arg-type]
    catalog = Catalog(source, cache / "catalog")  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(blobs.run)
        yield Mounted(operations(catalog, blobs), blobs)
        nursery.cancel_scope.cancel()
    catalog.close()
    blobs.close()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_archive(tmp_path_factory.mktemp("demo") / "archive")


async def test_demo_tree_matches_the_files(demo_dir: Path, tmp_path: Path) -> None:
    import pydicom

    source = FolderSource(demo_dir, tmp_path / "work")
    await source.check()
    expected: dict[str, bytes] = {}
    for path in demo_dir.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        expected[f"studies/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"] = path.read_bytes()
    async with mounted(source, tmp_path / "cache") as fs:
        seen: dict[str, bytes] = {}
        for study in await fs.listdir("studies"):
            for series in await fs.listdir(f"studies/{study}"):
                entries = await fs.listdir(f"studies/{study}/{series}")
                for name, attr in entries.items():
                    file = f"studies/{study}/{series}/{name}"
                    seen[file] = await fs.read(file)
                    assert attr.st_size == len(seen[file])  # sizes known without reading
                    assert attr.st_mode & 0o777 == 0o444
        assert seen == expected
        assert len(seen) == 54


async def test_errors_and_probe_names(demo_dir: Path, tmp_path: Path) -> None:
    source = FolderSource(demo_dir, tmp_path / "work")
    async with mounted(source, tmp_path / "cache") as fs:
        studies = await fs.listdir("studies")
        study = sorted(studies)[0]
        for name in [".Trash-0", ".hidden", "autorun.inf", ".xdg-volume-info", "._x", "desktop.ini",
                     "..", "1.2/3", "not-a-uid.dcm", "9" * 300, "1.2.3"]:
            with pytest.raises(pyfuse3.FUSEError) as info:
                await fs.ops.lookup(await fs.resolve(f"studies/{study}"), name.encode())
            assert info.value.errno == errno.ENOENT
        series = sorted(await fs.listdir(f"studies/{study}"))[0]
        instance = sorted(await fs.listdir(f"studies/{study}/{series}"))[0]
        inode = await fs.resolve(f"studies/{study}/{series}/{instance}")
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            with pytest.raises(pyfuse3.FUSEError) as info:
                await fs.ops.open(inode, flags, None)
            assert info.value.errno == errno.EROFS
        with pytest.raises(pyfuse3.FUSEError) as info:
            await fs.ops.open(await fs.resolve(f"studies/{study}"), os.O_RDONLY, None)
        assert info.value.errno == errno.EISDIR
        assert inode == (await fs.listdir(f"studies/{study}/{series}"))[instance].st_ino
        stats = await fs.ops.statfs(None)
        assert stats.f_namemax == 255 and stats.f_bsize == 4096


async def test_sizes_unknown_until_fetched_are_never_shown(tmp_path: Path) -> None:
    files = {f"1.2.3.{i}": make_instance("1.2", "1.2.3", f"1.2.3.{i}", pixel_bytes=500 + i) for i in range(4)}
    archive = ScriptedArchive({"1.2/1.2.3": files})
    async with mounted(archive, tmp_path / "cache") as fs:
        assert list(await fs.listdir("studies")) == ["1.2"]
        assert list(await fs.listdir("studies/1.2")) == ["1.2.3"]
        entries = await fs.listdir("studies/1.2/1.2.3")
        # Listing studies, a study, and a series folder fetched no instance data...
        assert archive.calls == Counter()
        # ...and entries of unknown size carry zero timeouts, so the kernel asks again.
        assert all(a.st_size == 0 and a.attr_timeout == 0 and a.entry_timeout == 0 for a in entries.values())
        # A lookup learns the exact size (this fetches the series once).
        attr = await fs.ops.lookup(await fs.resolve("studies/1.2/1.2.3"), b"1.2.3.2.dcm")
        assert attr.st_size == len(files["1.2.3.2"]) and attr.attr_timeout > 0
        assert await fs.read("studies/1.2/1.2.3/1.2.3.3.dcm") == files["1.2.3.3"]
        entries = await fs.listdir("studies/1.2/1.2.3")
        assert {n: a.st_size for n, a in entries.items()} == {f"{k}.dcm": len(v) for k, v in files.items()}
        assert archive.calls == Counter({"1.2/1.2.3": 1})
        # listings are cached
        await fs.listdir("studies/1.2")
        assert archive.listings == Counter({"studies": 1, "series": 1, "instances": 1})


async def test_archive_errors_become_eio(tmp_path: Path) -> None:
    data = make_instance("1.2", "1.2.3", "1.2.3.1")
    archive = ScriptedArchive({"1.2/1.2.3": {"1.2.3.1": data}})
    archive.lie_about_size = True
    async with mounted(archive, tmp_path / "cache") as fs:
        parent = await fs.resolve("studies/1.2/1.2.3")
        with pytest.raises(pyfuse3.FUSEError) as info:
            await fs.ops.lookup(parent, b"1.2.3.1.dcm")
        assert info.value.errno == errno.EIO
        archive.lie_about_size = False
        assert (await fs.ops.lookup(parent, b"1.2.3.1.dcm")).st_size == len(data)


async def test_instance_inodes_follow_the_listing_and_never_move(tmp_path: Path) -> None:
    """GNU ``cp -r`` copies a folder's files in inode order: a series folder's files are numbered
    in the order the archive lists them (the order its retrieve sends them), not by name; a
    number stays with its file when the listing changes, and is never given to another file."""
    listed = ["1.2.3.30", "1.2.3.4", "1.2.3.100", "1.2.3.2"]  # the archive's order, not the names'
    archive = ScriptedArchive({"1.2/1.2.3": {k: make_instance("1.2", "1.2.3", k, pixel_bytes=64) for k in listed}})
    blobs = BlobStore(tmp_path / "cache", 1 << 30, archive)  # type: ignore[arg-type]
    catalog = Catalog(archive, None, listing_ttl=0.01)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(blobs.run)
        fs = Mounted(operations(catalog, blobs))
        first = {name: attr.st_ino for name, attr in (await fs.listdir("studies/1.2/1.2.3")).items()}
        assert sorted(first, key=first.__getitem__) == [f"{k}.dcm" for k in listed]
        assert await fs.resolve("studies/1.2/1.2.3/1.2.3.100.dcm") == first["1.2.3.100.dcm"]
        # the archive now lists a new instance first and no longer the second
        series = archive.series["1.2/1.2.3"]
        archive.series["1.2/1.2.3"] = {"1.2.3.1": make_instance("1.2", "1.2.3", "1.2.3.1", pixel_bytes=64),
                                       **{k: v for k, v in series.items() if k != "1.2.3.4"}}
        await trio.sleep(0.05)  # (the listing expires)
        second = {name: attr.st_ino for name, attr in (await fs.listdir("studies/1.2/1.2.3")).items()}
        assert archive.listings["instances"] >= 2
        assert {n: i for n, i in second.items() if n in first} == {n: i for n, i in first.items() if n in second}
        assert second["1.2.3.1.dcm"] not in first.values()  # (nor the number of the file gone)
        assert await fs.read("studies/1.2/1.2.3/1.2.3.100.dcm") == series["1.2.3.100"]
        nursery.cancel_scope.cancel()


def test_instance_inodes_of_two_series_never_share_a_block(monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomfs.views import base

    monkeypatch.setattr(base, "path_inode", lambda *parts: (1 << 40) + 5)  # every series hashes alike
    inodes = base.InstanceInodes()
    study = StudyRecord("1.2")
    numbered = set()
    for uid in ("1.2.3", "1.2.4"):
        series = SeriesRecord("1.2", uid)
        keys = [f"{uid}.{n}" for n in range(3)]
        inodes.number(series, dict.fromkeys(keys))
        numbered |= {inodes.inode(study, series, InstanceRecord("1.2", uid, k)) for k in keys}
    assert len(numbered) == 6 and (1 << 40) + 5 not in numbered


def test_instances_beyond_a_series_block_keep_their_path_inodes(monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomfs.views import base

    monkeypatch.setattr(base, "SERIES_BLOCK", 4)
    inodes = base.InstanceInodes()
    study, series = StudyRecord("1.2"), SeriesRecord("1.2", "1.2.3")
    keys = [f"1.2.3.{n}" for n in range(5)]
    inodes.number(series, dict.fromkeys(keys))
    got = [inodes.inode(study, series, InstanceRecord("1.2", "1.2.3", k)) for k in keys]
    assert got[1] == got[0] + 1 and got[2] == got[0] + 2  # numbered: three fit in a block of four
    assert got[3:] == [path_inode("studies", "1.2", "1.2.3", f"{k}.dcm") for k in keys[3:]]


async def test_a_cached_instance_opens_without_a_wait(tmp_path: Path) -> None:
    """Once a series is cached, opening its files neither waits nor sets up a bounded wait (the
    deadline scope was a fifth of a warm open's cost); while its download runs, and for a blob
    gone from under the mount, an open takes the waiting path and still gets the right bytes."""
    files = {f"1.2.3.{i}": make_instance("1.2", "1.2.3", f"1.2.3.{i}", pixel_bytes=700 + i) for i in range(4)}
    archive = ScriptedArchive({"1.2/1.2.3": files})
    async with mounted(archive, tmp_path / "cache") as fs:
        bounded: Counter[str] = Counter()
        real_bounded = fs.ops.waits.bounded

        def counting(pid: int | None, what: str) -> AbstractContextManager[None]:
            bounded[what.split()[0]] += 1
            return real_bounded(pid, what)

        fs.ops.waits.bounded = counting  # type: ignore[method-assign]
        folder = "studies/1.2/1.2.3"
        await fs.listdir(folder)
        paused = trio.Event()
        releasing = trio.Event()

        async def hold(key: str) -> None:
            if key == "1.2.3.3":
                paused.set()
                await releasing.wait()

        archive.before_instance = hold
        async with trio.open_nursery() as nursery:
            got: dict[str, bytes] = {}

            async def read_first() -> None:
                got["first"] = await fs.read(f"{folder}/1.2.3.0.dcm")

            nursery.start_soon(read_first)
            with trio.fail_after(5):
                await paused.wait()
                while "first" not in got:  # (its instance came before the pause)
                    await trio.sleep(0.01)
            # opened while the series' download runs: the waiting path, bounded
            assert bounded["open"] == 1
            releasing.set()
        assert got["first"] == files["1.2.3.0"] and fs.blobs is not None
        await wait_cached(fs.blobs, SeriesRecord("1.2", "1.2.3"))
        archive.before_instance = None
        bounded.clear()
        for key, data in files.items():
            assert await fs.read(f"{folder}/{key}.dcm") == data
        assert bounded["open"] == 0  # cached: every open answered at once
        assert archive.calls == Counter({"1.2/1.2.3": 1})
        # The cached series fetched again (it lists an instance its blob lacks): while that
        # download runs, an open joins it (bounded), not the copy it replaces.
        series = SeriesRecord("1.2", "1.2.3")
        blobs = fs.blobs
        blobs.missing_recheck = 0
        paused, releasing = trio.Event(), trio.Event()
        archive.before_instance = hold
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: blobs.fetch_series(series, expect={*files, "1.2.3.9"}))
            with trio.fail_after(5):
                await paused.wait()
            assert blobs.open_now(series, InstanceRecord("1.2", "1.2.3", "1.2.3.1")) is None
            assert await fs.read(f"{folder}/1.2.3.1.dcm") == files["1.2.3.1"]
            assert bounded["open"] == 1
            releasing.set()
        archive.before_instance = None
        await wait_cached(blobs, series)
        assert archive.calls == Counter({"1.2/1.2.3": 2})
        bounded.clear()
        assert await fs.read(f"{folder}/1.2.3.2.dcm") == files["1.2.3.2"]
        assert bounded["open"] == 0  # the new copy is known too
        # The blob evicted under the mount (another process's `cache clear`): the known path is
        # gone, the open waits for the series again and reads the same bytes.
        blob_files = list((tmp_path / "cache" / "blobs").rglob("*.val"))
        assert len(blob_files) == 1
        blob_files[0].unlink()
        assert await fs.read(f"{folder}/1.2.3.1.dcm") == files["1.2.3.1"]
        assert bounded["open"] == 1 and archive.calls == Counter({"1.2/1.2.3": 3})
