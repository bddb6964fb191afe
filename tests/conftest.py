"""Shared fixtures: the demo files, a real Orthanc holding them, mounts that always unmount; and
the rule that splits the suite: a test that starts a process (a server, a mount, a tool) must be
marked ``mount``, so that ``pytest -m "not mount"`` runs the fast unit tests alone, in seconds."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest

from dicomfs.sources.demo import build_demo_archive
from tests.cod_bucket import BIG_SERIES, BIG_STUDY, BUCKET, Bucket
from tests.cod_writer import CodSeriesFiles, series_from_files
from tests.factory import make_instance
from tests.mounting import Mount
from tests.servers import GcsEmulator, OrthancServer


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Enforces the marker: outside ``mount`` tests, starting any process fails the test."""
    if request.node.get_closest_marker("mount") is not None:
        return
    name = request.node.nodeid

    def refuse(self: object, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"{name} starts a process: mark it (or its module) with pytest.mark.mount")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_archive(tmp_path_factory.mktemp("demo") / "archive")


@pytest.fixture(scope="session")
def demo_expected(demo_dir: Path) -> dict[str, str]:
    """Relative mount path -> sha256 of the source file, for every demo instance."""
    expected = {}
    for path in sorted(demo_dir.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        expected[f"studies/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"] = sha256(path)
    return expected


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Iterator[OrthancServer]:
    """One Orthanc for the session, holding the demo files exactly as uploaded."""
    with OrthancServer(tmp_path_factory.mktemp("orthanc")) as server:
        server.upload(sorted(demo_dir.rglob("*.dcm")))
        yield server


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    mounts: list[Mount] = []

    def make(source: str, *extra: str, name: str = "mnt", cache: str = "cache",
             env: dict[str, str] | None = None, start: bool = True) -> Mount:
        mount = Mount(source, tmp_path / name, tmp_path / cache, *extra, env=env)
        mounts.append(mount)
        return mount.start() if start else mount

    yield make
    for mount in reversed(mounts):
        mount.stop()


@pytest.fixture
def served_mount(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """Mounts with ``--allow-other`` at a mount point nginx's workers (www-data) can reach: pytest's
    own temp folders are private to root."""
    mounts: list[Mount] = []
    public = Path(tempfile.mkdtemp(prefix="dicomfs-served-"))
    public.chmod(0o755)

    def make(source: str, *extra: str, env: dict[str, str] | None = None) -> Mount:
        mount = Mount(source, public / f"mnt{len(mounts)}", tmp_path / f"cache{len(mounts)}", "--allow-other",
                      *extra, env=env)
        mounts.append(mount)
        return mount.start()

    yield make
    for mount in reversed(mounts):
        mount.stop()
    shutil.rmtree(public, ignore_errors=True)


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def bucket(demo_dir: Path) -> Iterator[Bucket]:
    """One GCS emulator for the session: the demo files as COD v1, v2 and hashed-key stores, and a
    series of 100 instances."""
    files = [p.read_bytes() for p in sorted(demo_dir.rglob("*.dcm"))]
    with GcsEmulator(BUCKET) as emulator:
        store = Bucket(emulator)
        store.add("v1/dicomweb", series_from_files(files, version=1))
        store.add("v2/dicomweb", series_from_files(files, version=2, gzip_metadata=False))
        store.add("deid/dicomweb", series_from_files(files, version=2, hashed_keys=True))
        big = {f"{BIG_SERIES}.{n}": make_instance(BIG_STUDY, BIG_SERIES, f"{BIG_SERIES}.{n}",
                                                   pixel_bytes=20_000, number=n) for n in range(1, 101)}
        store.add("big/dicomweb", [CodSeriesFiles(BIG_STUDY, BIG_SERIES, big)])
        yield store
