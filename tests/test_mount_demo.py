"""Real mounts of the built-in demo and of a local folder: the tree, the bytes, the errors, the CLI."""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from tests.conftest import sha256
from tests.factory import make_instance
from tests.fsutil import listdir, p10_hashes, sh, stat_errno
from tests.mounting import Mount, dicomfs, is_mounted
from tests.servers import free_port, require_tools, wait_until

pytestmark = pytest.mark.mount  # real servers, processes or mounts (see conftest)

def test_demo_mount_serves_the_source_bytes(mount_factory: Callable[..., Mount],
                                            demo_expected: dict[str, str]) -> None:
    require_tools("fusermount3", "dcmdump")
    mount = mount_factory("demo")
    assert listdir(mount.path) == ["dates", "dicomweb", "patients", "studies"]
    assert p10_hashes(mount.path) == demo_expected
    # real DICOM readers accept every file
    code = ("import pydicom, sys\nfor p in sys.argv[1:]:\n    ds = pydicom.dcmread(p)\n"
            "    assert ds.SOPInstanceUID in p, p\nprint(len(sys.argv) - 1)\n")
    paths = [str(mount.path / rel) for rel in demo_expected]
    assert sh(sys.executable, "-c", code, *paths).stdout.strip() == str(len(paths))
    for path in paths:
        assert "TransferSyntaxUID" in sh("dcmdump", "-M", path).stdout


def test_demo_tree_is_read_only_and_ignores_probes(mount_factory: Callable[..., Mount],
                                                   demo_expected: dict[str, str]) -> None:
    mount = mount_factory("demo")
    some_file = mount.path / next(iter(demo_expected))
    study_dir = some_file.parent.parent
    for probe in (".Trash", ".Trash-0", ".hidden", "autorun.inf", ".xdg-volume-info", ".DS_Store",
                  "._x", "desktop.ini", "Thumbs.db"):
        assert stat_errno(mount.path / probe) == errno.ENOENT
        assert stat_errno(study_dir / probe) == errno.ENOENT
    assert sh("touch", str(mount.path / "studies" / "new"), check=False).returncode != 0
    result = sh(sys.executable, "-c", "open(__import__('sys').argv[1], 'r+b')", str(some_file), check=False)
    assert "Read-only file system" in result.stderr
    result = sh("mkdir", str(study_dir / "x"), check=False)
    assert "Read-only file system" in result.stderr
    mode = os.stat(some_file).st_mode
    assert mode & 0o777 == 0o444 and os.stat(study_dir).st_mode & 0o777 == 0o555
    vfs = os.statvfs(mount.path)
    assert vfs.f_bsize == 4096 and vfs.f_namemax == 255


def test_inodes_and_mtimes_survive_a_remount(mount_factory: Callable[..., Mount],
                                             demo_expected: dict[str, str]) -> None:
    mount = mount_factory("demo")

    def snapshot() -> dict[str, tuple[str, ...]]:
        out = sh("find", str(mount.path), "-printf", "%P %i %T@ %s\n").stdout
        return {line.split()[0]: tuple(line.split()[1:]) for line in out.splitlines() if line.split()}

    before = snapshot()
    assert len([k for k in before if k.endswith(".dcm")]) == len(demo_expected)
    mount.stop()
    mount.start()
    assert snapshot() == before


def test_umount_command_waits_for_the_daemon(mount_factory: Callable[..., Mount]) -> None:
    mount = mount_factory("demo")
    result = dicomfs("umount", str(mount.path))
    assert result.returncode == 0, result.stderr
    assert not is_mounted(mount.path)
    assert not mount.alive()
    # unmounting again is a clear error, not a hang
    again = dicomfs("umount", str(mount.path))
    assert again.returncode != 0 and len(again.stderr.strip().splitlines()) == 1


def test_umount_unmounts_dicomfs_mounts_only(tmp_path: Path) -> None:
    """As root, ``fusermount3 -u`` unmounts any file system: ``dicomfs umount /home`` must not."""
    other = tmp_path / "tmpfs"
    other.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(other))
    try:
        result = dicomfs("umount", str(other))
        assert result.returncode == 2 and is_mounted(other)
        assert result.stderr == f"dicomfs: error: {other} is not a dicomfs mount (it is tmpfs): not unmounted\n"
    finally:
        sh("umount", str(other))
    result = dicomfs("umount", str(other))
    assert result.returncode == 2 and result.stderr == f"dicomfs: error: {other} is not mounted\n"


def test_folder_source_is_indexed_once(mount_factory: Callable[..., Mount], demo_dir: Path,
                                       demo_expected: dict[str, str], tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    shutil.copytree(demo_dir, folder)
    (folder / "notes.txt").write_text("not DICOM")
    (folder / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    mount = mount_factory(str(folder))
    assert p10_hashes(mount.path) == demo_expected  # the two non-DICOM files are not shown
    assert "57 files parsed, 0 unchanged" in mount.log
    mount.stop()
    mount.start()
    assert p10_hashes(mount.path) == demo_expected
    assert "0 files parsed, 57 unchanged" in mount.log  # the remount reused the index
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before  # source untouched


def test_a_source_file_swapped_for_a_fifo_or_padded_with_zeros_fails_or_serves_alone(
        mount_factory: Callable[..., Mount], demo_dir: Path, demo_expected: dict[str, str], tmp_path: Path) -> None:
    """A fifo left where a file was must not hold the reader (an open of a fifo waits for a
    writer: the reader of the mount stuck in the kernel, beyond SIGKILL); a file with zero bytes
    after its data set (padded or preallocated by its writer) is served, and its metadata ends
    with its data set (pydicom read 8 bytes of zeros at a time as elements (0000,0000))."""
    folder = tmp_path / "folder"
    shutil.copytree(demo_dir, folder)
    sources = {}
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sources[f"studies/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"] = path
    names = sorted(sources)
    swapped, padded = names[0], next(n for n in names if n.split("/")[2] != names[0].split("/")[2])
    with open(sources[padded], "r+b") as file:
        file.truncate(sources[padded].stat().st_size + (24 << 20))  # 24 MiB of zeros (sparse)
    mount = mount_factory(str(folder))
    sources[swapped].unlink()
    os.mkfifo(sources[swapped])
    reader = subprocess.Popen([sys.executable, "-c", "import sys\ntry:\n    open(sys.argv[1], 'rb').read()\n"
                               "except OSError as e:\n    print(e.errno)\n", str(mount.path / swapped)],
                              stdout=subprocess.PIPE, text=True)
    try:
        out, _ = reader.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # what this guards against: release the reader, then fail
        os.close(os.open(sources[swapped], os.O_WRONLY | os.O_NONBLOCK))
        reader.kill()
        reader.wait(timeout=60)
        raise AssertionError("a read of a file swapped for a fifo waited for a writer") from None
    assert out.strip() == str(errno.EIO)
    assert "is no longer a regular file" in mount.log
    assert mount.alive()
    # The padded file: its bytes as they are, and metadata that ends with its data set.
    assert sha256(mount.path / padded) == sha256(sources[padded])
    study, series = padded.split("/")[1:3]
    metadata = json.loads(gzip.decompress((mount.path / "dicomweb" / "studies" / study / "series" / series
                                           / "metadata.gz").read_bytes()))
    assert metadata and all("00000000" not in instance for instance in metadata)
    others = {name: digest for name, digest in demo_expected.items() if name not in (swapped, padded)}
    assert {name: sha256(mount.path / name) for name in others} == others  # the rest as before


@pytest.mark.parametrize("source, message", [
    ("ftp://example.org/x", "unknown source scheme"),
    ("s3x://bucket", "unknown source scheme"),
    ("/nonexistent/folder", "neither a URL"),
    ("http://user:pw@127.0.0.1:1/dicom-web", "no credentials in the URL"),
])
def test_bad_sources_are_one_line_errors(source: str, message: str, tmp_path: Path) -> None:
    result = dicomfs("mount", source, str(tmp_path), "--cache-dir", str(tmp_path / "c"))
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert "pw" not in result.stderr
    assert not is_mounted(tmp_path)


def test_unreachable_archive_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    result = dicomfs("mount", f"http://127.0.0.1:{free_port()}/dicom-web", str(tmp_path / "mnt"),
                     "--cache-dir", str(tmp_path / "c"))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "cannot reach" in result.stderr
    assert not is_mounted(tmp_path / "mnt")


def test_bad_mount_points_and_options(mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    for args, message in [
        (("demo", str(tmp_path / "missing")), "does not exist"),
        (("demo", str(tmp_path), "--cache-size", "lots"), "invalid size"),
        (("demo", str(tmp_path), "--cache-size", "10000000T"), "invalid size '10000000T': too large"),
        (("demo", str(tmp_path), "--user", "bob"), "DICOMFS_PASSWORD"),
    ]:
        result = dicomfs("mount", *args, "--cache-dir", str(tmp_path / "c"))
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    for ttl in ("-1", "nan", "inf"):  # (0: every listing asked for again)
        result = dicomfs("mount", "demo", str(tmp_path), "--cache-dir", str(tmp_path / "c"), "--listing-ttl", ttl)
        assert result.returncode == 2 and f"invalid number of seconds '{ttl}'" in result.stderr, result.stderr
    mount = mount_factory("demo")
    result = dicomfs("mount", "demo", str(mount.path), "--cache-dir", str(tmp_path / "other"))
    assert result.returncode != 0 and "already a mount point" in result.stderr
    result = dicomfs("cache", "clear", "--cache-dir", str(mount.cache_dir))
    assert result.returncode == 1 and "in use by a running dicomfs" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_cache_log_or_folder_inside_the_mount_point_is_refused(tmp_path: Path, demo_dir: Path) -> None:
    """Each would be read or written through the mount itself: the daemon would wait for its own
    answer, for good. Refused in one line, before anything is mounted or written."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    folder_below = mountpoint / "dicom"
    shutil.copytree(demo_dir, folder_below)
    for args, message in [
        (("demo", str(mountpoint), "--cache-dir", str(mountpoint / ".cache")), "the cache folder"),
        (("demo", str(mountpoint), "--cache-dir", str(mountpoint)), "the cache folder"),
        (("demo", str(mountpoint), "--cache-dir", str(tmp_path / "c"), "--log-file", str(mountpoint / "log")),
         "the log file"),
        ((str(folder_below), str(mountpoint), "--cache-dir", str(tmp_path / "c")), "the source folder"),
        ((str(mountpoint), str(mountpoint), "--cache-dir", str(tmp_path / "c")), "the source folder"),
    ]:
        result = dicomfs("mount", *args)
        assert result.returncode != 0 and message in result.stderr and "inside the mount point" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not is_mounted(mountpoint)
    assert sorted(path.name for path in mountpoint.iterdir()) == ["dicom"]  # nothing written there
    assert not (tmp_path / "c").exists()


def test_a_cache_inside_a_folder_source_is_refused(tmp_path: Path, demo_dir: Path) -> None:
    """It would be written into the folder dicomfs must only read, and scanned with it."""
    folder = tmp_path / "folder"
    shutil.copytree(demo_dir, folder)
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    (tmp_path / "mnt").mkdir()
    for cache in (folder, folder / ".cache"):
        for command in (("ls", str(folder)), ("prefetch", str(folder), "--all"),
                        ("mount", str(folder), str(tmp_path / "mnt"))):
            result = dicomfs(*command, "--cache-dir", str(cache))
            assert result.returncode == 2, result.stderr
            assert result.stderr == (f"dicomfs: error: the cache folder {cache} is inside the source folder {folder}: "
                                     "choose one outside it (--cache-dir)\n")
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    assert not is_mounted(tmp_path / "mnt")


def test_what_pydicom_finds_odd_in_a_file_is_not_repeated_at_the_user(tmp_path: Path) -> None:
    """A name longer than its VR allows, an unknown character set: pydicom said each twice (a log
    line, and a Python warning naming its own source line) for every read of every such file."""
    folder = tmp_path / "folder"
    folder.mkdir()
    ds = pydicom.dcmread(io.BytesIO(make_instance("1.2.826.0.1.3680043.8.498.51", "1.2.826.0.1.3680043.8.498.51.1",
                                                  patient="X" * 70)))
    ds.SpecificCharacterSet = "ISO_IR 999"
    ds.save_as(folder / "odd.dcm")
    for _ in range(2):  # indexed, then from the index
        result = dicomfs("ls", str(folder), "--cache-dir", str(tmp_path / "cache"))
        assert result.returncode == 0 and "X" * 70 in result.stdout
        assert result.stderr == ""


def test_a_scan_of_a_folder_does_not_walk_into_a_dicomfs_mount_below_it(
        mount_factory: Callable[..., Mount], demo_dir: Path, demo_expected: dict[str, str], tmp_path: Path) -> None:
    """A folder mounted at a mount point inside itself is fine (it is scanned before the mount is
    made); a later scan of the folder (another command, a restart) must not index it again
    through the mount, file by file (every one a duplicate)."""
    folder = tmp_path / "folder"
    shutil.copytree(demo_dir, folder)
    (folder / "view").mkdir()
    mount = Mount(str(folder), folder / "view", tmp_path / "cache")
    mount.start()
    try:
        assert p10_hashes(mount.path) == demo_expected
        result = dicomfs("ls", str(folder), "--level", "instance", "--json", "--cache-dir", str(tmp_path / "other"))
        assert result.returncode == 0 and result.stderr == "", result.stderr
        assert len(result.stdout.splitlines()) == len(demo_expected)
    finally:
        mount.stop()


def test_systemd_mode_notifies_and_stops_cleanly(tmp_path: Path, demo_expected: dict[str, str]) -> None:
    notify_path = str(tmp_path / "notify.sock")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(120)
        daemon = subprocess.Popen(
            [sys.executable, "-m", "dicomfs", "mount", "demo", str(mountpoint), "--systemd",
             "--cache-dir", str(tmp_path / "cache")],
            env={**os.environ, "NOTIFY_SOCKET": notify_path}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            assert notify.recv(4096) == b"READY=1"
            assert is_mounted(mountpoint)
            assert len(p10_hashes(mountpoint)) == len(demo_expected)
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=60) == 0
            assert notify.recv(4096) == b"STOPPING=1"
            assert not is_mounted(mountpoint)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait(timeout=30)
            if is_mounted(mountpoint):
                sh("fusermount3", "-u", "-z", str(mountpoint), check=False)


def test_stale_mount_point_is_reported(mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    mount = mount_factory("demo")
    os.kill(mount.pid, signal.SIGKILL)  # type: ignore[arg-type]
    wait_until(lambda: not mount.alive(), 30, "the daemon to die")
    result = dicomfs("mount", "demo", str(mount.path), "--cache-dir", str(tmp_path / "c2"))
    assert result.returncode != 0
    assert "stale" in result.stderr or "already a mount point" in result.stderr
    assert dicomfs("umount", str(mount.path)).returncode == 0
    assert not is_mounted(mount.path)


def test_allow_other_and_mount_options(mount_factory: Callable[..., Mount]) -> None:
    mount = mount_factory("demo", "--allow-other")
    with open("/proc/mounts") as mounts:
        line = next(line for line in mounts if line.split()[1] == str(mount.path))
    device, _, fstype, options = line.split()[:4]
    assert device == "dicomfs" and fstype == "fuse.dicomfs"
    assert "ro" in options.split(",") and "allow_other" in options.split(",")


def test_reads_are_asked_for_in_1_mib_requests(mount_factory: Callable[..., Mount]) -> None:
    """Run as root, the mount widens its backing device's read-ahead window to the largest FUSE
    read (1 MiB; the kernel leaves it at 128 KiB), a quarter of the requests for a long read."""
    if os.geteuid() != 0:
        pytest.skip("widening the read-ahead window takes root (sysfs)")
    mount = mount_factory("demo")
    device = os.stat(mount.path).st_dev
    window = Path("/sys/class/bdi") / f"{os.major(device)}:{os.minor(device)}" / "read_ahead_kb"
    wait_until(lambda: window.read_text().strip() == "1024", 10, f"{window} to say 1024")


def test_concurrent_readers_get_their_own_bytes(mount_factory: Callable[..., Mount],
                                                demo_expected: dict[str, str]) -> None:
    """Every read reply is read into one buffer the daemon reuses (sent before the next request
    runs): many readers of different files at once must each get exactly their file's bytes."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    mount = mount_factory("demo")
    paths = sorted(demo_expected) * 3

    def digest(rel: str) -> tuple[str, str]:
        with open(mount.path / rel, "rb", buffering=0) as f:
            chunks = []
            while chunk := f.read(4096):  # small reads, interleaving with the other readers
                chunks.append(chunk)
        return rel, hashlib.sha256(b"".join(chunks)).hexdigest()

    with ThreadPoolExecutor(max_workers=16) as pool:
        for rel, got in pool.map(digest, paths, timeout=300):
            assert got == demo_expected[rel], rel
