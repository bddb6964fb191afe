"""A slow or hostile archive must never wedge a process, serve a wrong byte, or leak a patient's
name: real mounts of a real Orthanc behind ``tests.faultproxy.FaultProxy``, which stalls,
trickles, cuts, fails, and sends gzip bombs and absurdly nested JSON on purpose.

Every byte read is compared with the uploaded files (sha256); retrieves are counted at the proxy;
``cache verify`` stays clean after each case. Bounds on how long something may take are the hard
timeouts of the waits (the issue's bars: a killed reader gone in seconds, SIGTERM done in 10 s, a
copy of a study from a dead archive over in 60 s), set several times above what is expected.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import UID

from dicomfs.p10 import parse_file_meta
from tests.factory import make_instance
from tests.faultproxy import FaultProxy, Rule
from tests.fsutil import listdir, read_errno, sh
from tests.mounting import MOUNT_TIMEOUT, Mount, dicomfs, is_mounted
from tests.servers import OrthancServer, free_port, peak_rss_mb, wait_until

pytestmark = pytest.mark.mount  # real servers, processes or mounts (see conftest)

STUDY = "1.2.826.0.1.3680043.8.498.77"  # the 180-file study: 6 series of 30
MISMATCH = "1.2.826.0.1.3680043.8.498.78"  # a series holding pydicom's rtdose.dcm kind of file
GROWN = "1.2.826.0.1.3680043.8.498.79"  # a series that gains instances
SLOW = "1.2.826.0.1.3680043.8.498.80"  # one large instance, for trickles and stalls
BIG = "1.2.826.0.1.3680043.8.498.81"  # 3 series of 10 x 1 MB, for a small disk


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Archive:
    server: OrthancServer
    files: dict[str, bytes] = field(default_factory=dict)  # "<St>/<Se>/<SOP>.dcm" -> uploaded bytes

    def add(self, files: dict[str, bytes]) -> None:
        self.server.upload(list(files.values()))
        self.files.update(files)

    def series(self, study: str) -> list[str]:
        return sorted({rel.split("/")[1] for rel in self.files if rel.startswith(study + "/")})

    def of(self, study: str, series: str | None = None) -> dict[str, bytes]:
        prefix = f"{study}/{series}/" if series else f"{study}/"
        return {rel: data for rel, data in self.files.items() if rel.startswith(prefix)}


def instances(study: str, series: str, count: int, size: int, first: int = 1) -> dict[str, bytes]:
    return {f"{study}/{series}/{series}.{n}.dcm": make_instance(study, series, f"{series}.{n}", pixel_bytes=size,
                                                              number=n, patient="HARDENING^PATIENT")
            for n in range(first, first + count)}


def mismatched_instance(study: str, series: str, sop: str) -> bytes:
    """pydicom's rtdose.dcm with new UIDs, and a file meta that names another SOPInstanceUID."""
    ds = pydicom.dcmread(Path(pydicom.data.__file__).parent / "test_files" / "rtdose.dcm")
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
    ds.PatientID, ds.PatientName = "TEST-1", "HARDENING^PATIENT"  # the same patient as its series
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop + ".999")
    out = io.BytesIO()
    ds.save_as(out)  # as it is: enforce_file_format would make the file meta agree
    data = out.getvalue()
    assert parse_file_meta(data).sop_instance_uid == sop + ".999" and data[128:132] == b"DICM"
    return data


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    with OrthancServer(tmp_path_factory.mktemp("orthanc")) as server:
        store = Archive(server)
        for n in range(1, 7):
            store.add(instances(STUDY, f"{STUDY}.{n}", 30, 60_000))
        series = f"{MISMATCH}.1"
        odd = mismatched_instance(MISMATCH, series, f"{series}.5")
        store.add({f"{MISMATCH}/{series}/{series}.5.dcm": odd, **instances(MISMATCH, series, 2, 5000)})
        store.add(instances(GROWN, f"{GROWN}.1", 5, 5000))
        store.add(instances(SLOW, f"{SLOW}.1", 1, 3_000_000))
        for n in range(1, 4):
            store.add(instances(BIG, f"{BIG}.{n}", 10, 1_000_000))
        yield store


@pytest.fixture
def proxy(archive: Archive) -> Iterator[FaultProxy]:
    with FaultProxy(archive.server.port) as faulty:
        yield faulty


def retrieve_of(series: str) -> Callable[[str], bool]:
    return lambda path: path.split("?")[0].rstrip("/").endswith(f"/series/{series}")


def qido_of_series(study: str) -> Callable[[str], bool]:
    return lambda path: path.split("?")[0].rstrip("/").endswith(f"/studies/{study}/series")


def read_all(mount: Path, files: dict[str, bytes]) -> dict[str, str]:
    """sha256 of each file read through the mount (in a subprocess, with a hard timeout)."""
    out = sh("sha256sum", *[str(mount / "studies" / rel) for rel in files], timeout=120).stdout
    return {str(Path(line.split(maxsplit=1)[1]).relative_to(mount / "studies")): line.split()[0]
            for line in out.splitlines()}


def read_each(mount: Path, files: dict[str, bytes]) -> dict[str, str | int]:
    """Each file's sha256, or the errno reading it failed with (in a subprocess, hard timeout)."""
    code = ("import hashlib, sys\nfor path in sys.argv[1:]:\n    try:\n"
            "        print(hashlib.sha256(open(path, 'rb').read()).hexdigest())\n"
            "    except OSError as e:\n        print(e.errno)\n")
    out = sh(sys.executable, "-c", code, *[str(mount / "studies" / rel) for rel in files], timeout=300).stdout
    return {rel: int(line) if line.isdigit() else line for rel, line in zip(files, out.split(), strict=False)}


def expected(files: dict[str, bytes]) -> dict[str, str]:
    return {rel: digest(data) for rel, data in files.items()}


def verify_clean(cache: Path) -> str:
    result = dicomfs("cache", "verify", "--cache-dir", str(cache))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 bad, dropped" in result.stdout
    return result.stdout


# --- 1. a cached series that lacks a listed instance is repaired, once -------------------------

def test_a_mismatched_header_instance_reads_exactly_online_and_offline(
        archive: Archive, proxy: FaultProxy, mount_factory: Callable[..., Mount]) -> None:
    files = archive.of(MISMATCH)
    mount = mount_factory(proxy.dicomweb)
    assert read_all(mount.path, files) == expected(files)
    assert read_all(mount.path, files) == expected(files)
    assert proxy.retrieves() == 1
    assert "filed under its data set's UID" in mount.log
    mount.stop()
    proxy.down()  # offline: the cache alone
    offline = mount_factory(proxy.dicomweb, name="mnt2")
    assert read_all(offline.path, files) == expected(files)
    assert proxy.retrieves() == 1
    offline.stop()
    verify_clean(mount.cache_dir)


def test_a_series_that_grew_is_cached_anew_with_one_retrieve(
        archive: Archive, proxy: FaultProxy, mount_factory: Callable[..., Mount]) -> None:
    series = f"{GROWN}.1"
    mount = mount_factory(proxy.dicomweb, "--listing-ttl", "1")
    before = archive.of(GROWN)
    assert read_all(mount.path, before) == expected(before)
    assert proxy.retrieves() == 1
    archive.add(instances(GROWN, series, 3, 5000, first=6))  # the study is still arriving
    grown = archive.of(GROWN)
    assert len(grown) == 8
    wait_until(lambda: len(listdir(mount.path / "studies" / GROWN / series)) == 8, 30, "the new instances to show")
    for _ in range(3):  # reading them again and again retrieves the series once, not every time
        assert read_all(mount.path, grown) == expected(grown)
    assert proxy.retrieves() == 2
    # (the commit that logs it follows the last byte its readers got: it may come a moment later)
    wait_until(lambda: "cached anew: 8 instances (the cached copy had 5)" in mount.log, 30, "the commit")
    assert "cached by another process" not in mount.log
    mount.stop()
    verify_clean(mount.cache_dir)
    proxy.down()
    offline = mount_factory(proxy.dicomweb, name="mnt2")
    assert read_all(offline.path, grown) == expected(grown)  # the new instances were kept
    offline.stop()
    assert proxy.retrieves() == 2


# --- 2. a trickling or stalled archive wedges nothing --------------------------------------------

def slow_file(archive: Archive) -> Path:
    (rel,) = archive.of(SLOW)
    return Path("studies") / rel


def reader(path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["cat", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_a_reader_killed_while_waiting_is_gone_in_seconds(
        archive: Archive, proxy: FaultProxy, mount_factory: Callable[..., Mount]) -> None:
    proxy.add(Rule(retrieve_of(f"{SLOW}.1"), "trickle", rate=2000))  # 3 MB at 2 KB/s: 25 minutes
    mount = mount_factory(proxy.dicomweb)
    waiting = reader(mount.path / slow_file(archive))
    time.sleep(2)
    assert waiting.poll() is None  # it waits for the archive
    waiting.kill()
    waiting.wait(timeout=10)  # gone: not held in the kernel until the download ends
    assert mount.alive()
    assert "being killed" in mount.log
    assert listdir(mount.path / "studies" / STUDY) == archive.series(STUDY)  # the mount still serves


def test_a_reader_waits_no_longer_than_the_read_timeout(
        archive: Archive, proxy: FaultProxy, mount_factory: Callable[..., Mount]) -> None:
    proxy.add(Rule(retrieve_of(f"{SLOW}.1"), "trickle", rate=2000))
    mount = mount_factory(proxy.dicomweb, "--read-timeout", "3")
    assert read_errno(mount.path / slow_file(archive), timeout=30) == 5  # EIO after 3 s, not 25 minutes
    assert "--read-timeout" in mount.log and "the download goes on" in mount.log
    first = archive.of(STUDY, f"{STUDY}.1")
    assert read_all(mount.path, first) == expected(first)  # everything else keeps working


def test_sigterm_ends_the_daemon_and_the_mount_while_readers_wait(
        archive: Archive, proxy: FaultProxy, mount_factory: Callable[..., Mount]) -> None:
    proxy.add(Rule(retrieve_of(f"{SLOW}.1"), "trickle", rate=2000))
    proxy.add(Rule(retrieve_of(f"{STUDY}.2"), "stall"))
    mount = mount_factory(proxy.dicomweb)
    waiting = [reader(mount.path / slow_file(archive)),
               reader(mount.path / "studies" / next(iter(archive.of(STUDY, f"{STUDY}.2"))))]
    time.sleep(2)
    assert all(w.poll() is None for w in waiting)
    assert mount.pid is not None
    os.kill(mount.pid, signal.SIGTERM)
    wait_until(lambda: not mount.alive(), 10, "the daemon to exit on SIGTERM")
    wait_until(lambda: not is_mounted(mount.path), 10, "the mount to go")
    for w in waiting:
        assert w.wait(timeout=10) != 0  # answered with an error, not left hanging
    assert "shutting down" in mount.log


def test_a_systemd_stop_needs_no_sigkill(archive: Archive, proxy: FaultProxy, tmp_path: Path) -> None:
    from tests.test_systemd_unit import expand, unit_commands

    proxy.add(Rule(retrieve_of(f"{SLOW}.1"), "trickle", rate=2000))
    mnt = tmp_path / "mnt"
    env = {"SOURCE": proxy.dicomweb, "MOUNTPOINT": str(mnt), "DICOMFS_OPTIONS": f"--cache-dir {tmp_path / 'cache'}"}
    for command in unit_commands("ExecStartPre"):
        subprocess.run(expand(command, env)[1], capture_output=True, timeout=60)
    notify_path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(120)
        daemon = subprocess.Popen(expand(unit_commands("ExecStart")[0], env)[1],
                                  env={**os.environ, "NOTIFY_SOCKET": notify_path},
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert notify.recv(100) == b"READY=1"
            waiting = reader(mnt / slow_file(archive))
            time.sleep(2)
            assert waiting.poll() is None
            daemon.send_signal(signal.SIGTERM)  # what systemctl stop sends; SIGKILL would come after 60 s
            assert daemon.wait(timeout=10) == 0
            assert waiting.wait(timeout=10) != 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait(timeout=30)
    for command in unit_commands("ExecStopPost"):
        subprocess.run(expand(command, env)[1], capture_output=True, timeout=60)
    assert not is_mounted(mnt)


def test_a_trickle_below_the_minimum_rate_is_abandoned(
        archive: Archive, proxy: FaultProxy, mount_factory: Callable[..., Mount]) -> None:
    proxy.add(Rule(retrieve_of(f"{SLOW}.1"), "trickle", rate=5000))
    mount = mount_factory(proxy.dicomweb, "--timeout", "2", "--min-rate", "64K")
    started = time.monotonic()
    assert read_errno(mount.path / slow_file(archive), timeout=60) == 5
    assert time.monotonic() - started < 30  # (the trickle alone would take ten minutes)
    assert "less than the minimum of 64.0 KiB/s (--min-rate)" in mount.log
    assert proxy.retrieves() == 1  # abandoned, not retried


# --- 3. a dead archive fails fast, and recovers by itself ------------------------------------

def test_a_copy_from_an_archive_killed_midway_fails_within_a_minute_and_recovers(
        archive: Archive, proxy: FaultProxy, mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    series = archive.series(STUDY)
    for each in series:  # slowly enough that the copy is midway when the archive dies
        proxy.add(Rule(retrieve_of(each), "trickle", rate=400_000))
    mount = mount_factory(proxy.dicomweb)
    out = tmp_path / "copy"
    copy = subprocess.Popen(["cp", "-r", str(mount.path / "studies" / STUDY), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def copied_series() -> list[str]:  # (cp goes through the series in its own order)
        return [s for s in series if len(list((out / s).glob("*.dcm"))) == 30 and f"{s} cached" in mount.log]

    try:
        wait_until(lambda: copied_series(), 120, "the copy to get through a first series")
        proxy.down()  # the archive dies: connections reset, new ones refused
        died = time.monotonic()
        _, errors = copy.communicate(timeout=60)  # the whole copy is over within a minute
        print(f"copy ended {time.monotonic() - died:.1f} s after the archive died")
    finally:
        if copy.poll() is None:
            copy.kill()
            copy.wait(timeout=10)
    first = archive.of(STUDY, copied_series()[0])
    assert copy.returncode != 0 and "Input/output error" in errors
    assert read_all(mount.path, first) == expected(first)  # cached series keep working
    assert mount.alive()
    proxy.clear()
    proxy.up()
    probe = next(iter(archive.of(STUDY, next(s for s in series if s not in copied_series()))))
    wait_until(lambda: read_errno(mount.path / "studies" / probe) == 0, 60, "the mount to find the archive back")
    again = tmp_path / "again"
    sh("cp", "-r", str(mount.path / "studies" / STUDY), str(again), timeout=300)
    copied = {f"{STUDY}/{p.relative_to(again)}": digest(p.read_bytes()) for p in again.rglob("*.dcm")}
    assert copied == expected(archive.of(STUDY))
    mount.stop()
    verify_clean(mount.cache_dir)


def test_one_retry_policy_for_failing_answers(archive: Archive, proxy: FaultProxy,
                                              mount_factory: Callable[..., Mount]) -> None:
    overloaded, broken, fine = archive.series(STUDY)[:3]
    proxy.add(Rule(retrieve_of(overloaded), "status", times=2, status=503, retry_after="0"))
    proxy.add(Rule(retrieve_of(broken), "status", status=500))
    mount = mount_factory(proxy.dicomweb, "--readahead", "series")  # (retrieves counted: none ahead)
    files = archive.of(STUDY, overloaded)
    assert read_all(mount.path, files) == expected(files)  # 503, 503, then the answer
    assert proxy.retrieves() == 3
    assert read_errno(mount.path / "studies" / next(iter(archive.of(STUDY, broken)))) == 5
    assert proxy.retrieves() == 6  # three attempts in all, not 4 x 3
    files = archive.of(STUDY, fine)  # an error about one series does not stop the others
    assert read_all(mount.path, files) == expected(files)


def test_a_cut_transfer_is_resumed_and_a_lying_length_never_served(
        archive: Archive, proxy: FaultProxy, mount_factory: Callable[..., Mount]) -> None:
    cut, short = archive.series(STUDY)[3:5]
    proxy.add(Rule(retrieve_of(cut), "cut", times=1, after=700_000))
    proxy.add(Rule(retrieve_of(short), "short", after=300_000))
    mount = mount_factory(proxy.dicomweb, "--readahead", "series")  # (retrieves counted: none ahead)
    files = archive.of(STUDY, cut)
    assert read_all(mount.path, files) == expected(files)
    assert proxy.retrieves() == 2 and "resuming" in mount.log
    assert read_errno(mount.path / "studies" / sorted(archive.of(STUDY, short))[-1]) == 5
    assert proxy.retrieves() == 2 + 2  # the first attempt, one resume, then no progress: over
    mount.stop()
    verify_clean(mount.cache_dir)


# --- 4. compressed answers are bounded ------------------------------------------------------------

def gzip_bomb(payload_prefix: bytes, fill: bytes, size: int, suffix: bytes) -> bytes:
    """gzip of prefix + ``size`` bytes of ``fill`` + suffix, compressed as it is made (never held
    inflated)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out = [compressor.compress(payload_prefix)]
    block = fill * (1 << 20)
    for _ in range(size >> 20):
        out.append(compressor.compress(block))
    out.append(compressor.compress(suffix))
    out.append(compressor.flush())
    return b"".join(out)


def test_gzip_bombs_are_refused_within_bounded_memory(
        archive: Archive, proxy: FaultProxy, mount_factory: Callable[..., Mount]) -> None:
    target = archive.series(STUDY)[5]
    boundary = "bomb"
    part = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + b"\0" * 128 + b"DICM")
    retrieve = gzip_bomb(part, b"\0", 1 << 30, f"\r\n--{boundary}--\r\n".encode())
    listing = gzip_bomb(b"[", b" ", 1 << 30, b"]")  # valid JSON, once 1 GiB of spaces are inflated
    assert len(retrieve) < 2_000_000 and len(listing) < 2_000_000
    proxy.add(Rule(retrieve_of(target), "gzip", body=retrieve,
                   content_type=f'multipart/related; type="application/dicom"; boundary={boundary}'))
    proxy.add(Rule(qido_of_series(MISMATCH), "gzip", body=listing))
    mount = mount_factory(proxy.dicomweb)
    assert read_errno(mount.path / "studies" / next(iter(archive.of(STUDY, target)))) == 5
    assert sh("ls", str(mount.path / "studies" / MISMATCH), check=False).returncode != 0
    assert mount.alive() and mount.pid is not None
    peak = peak_rss_mb(mount.pid)
    print(f"daemon peak RSS after the bombs: {peak:.0f} MB")
    assert peak <= 200
    log = mount.log
    assert "answered in Content-Encoding 'gzip' although dicomfs asked for none: refused" in log
    assert "larger than 67108864 bytes once inflated: refused" in log
    assert "Traceback" not in log
    mount.stop()
    assert "checked 0 blobs" in verify_clean(mount.cache_dir)  # nothing of them was cached


# --- 5. absurdly nested JSON --------------------------------------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000


def test_deep_json_is_one_clear_line(archive: Archive, proxy: FaultProxy, tmp_path: Path,
                                     mount_factory: Callable[..., Mount]) -> None:
    proxy.add(Rule(lambda path: path.split("?")[0].endswith("/studies"), "body", body=DEEP))
    for command in (("ls", proxy.dicomweb), ("prefetch", proxy.dicomweb, "--all"),
                    ("mount", proxy.dicomweb, str(tmp_path / "never"))):
        (tmp_path / "never").mkdir(exist_ok=True)
        result = dicomfs(*command, "--cache-dir", str(tmp_path / "c"))
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().count("\n") == 0 and "nested too deeply" in result.stderr, result.stderr
    proxy.clear()
    proxy.add(Rule(qido_of_series(MISMATCH), "body", body=DEEP))
    mount = mount_factory(proxy.dicomweb)
    assert sh("ls", str(mount.path / "studies" / MISMATCH), check=False).returncode != 0
    assert mount.alive() and "nested too deeply" in mount.log and "Traceback" not in mount.log


# --- 6. the cache is private ----------------------------------------------------------------------

PROBE_USER = "dicomfs-probe"


@pytest.fixture
def other_user() -> Iterator[str]:
    created = subprocess.run(["id", PROBE_USER], capture_output=True).returncode != 0
    if created:
        sh("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", PROBE_USER)
    yield PROBE_USER
    if created:
        subprocess.run(["userdel", PROBE_USER], capture_output=True, timeout=60)


def modes(root: Path) -> dict[str, int]:
    found = {".": root.stat().st_mode & 0o777}
    for path in root.rglob("*"):
        if not path.is_symlink():
            found[str(path.relative_to(root))] = path.stat().st_mode & 0o777
    return found


def test_another_user_can_read_nothing_in_the_cache(archive: Archive, other_user: str,
                                                    mount_factory: Callable[..., Mount]) -> None:
    shared = Path("/tmp") / f"dicomfs-shared-{uuid.uuid4().hex[:8]}"  # a folder anyone may enter
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    try:
        cache = shared / "cache"
        mount = mount_factory(archive.server.dicomweb, cache=str(cache))  # (an absolute path stays one)
        files = archive.of(MISMATCH)
        assert read_all(mount.path, files) == expected(files)
        mount.stop()
        found = modes(cache)
        assert {m for p, m in found.items() if (cache / p).is_dir()} == {0o700}, found
        assert {m for p, m in found.items() if not (cache / p).is_dir()} == {0o600}, found
        assert (cache / "dicomfs.log").exists() and (cache / "catalog").is_dir()

        def as_other(*command: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["runuser", "-u", other_user, "--", *command], capture_output=True,
                                  text=True, timeout=60)

        assert as_other("ls", str(shared)).returncode == 0  # the probe itself works
        for target in (cache, cache / "catalog", cache / "dicomfs.log", cache / "source.json"):
            result = as_other("cat", str(target)) if not target.is_dir() else as_other("ls", str(target))
            assert result.returncode != 0 and "Permission denied" in result.stderr, target
        assert as_other("grep", "-r", "HARDENING", str(cache)).returncode == 2

        # A cache made before (by an older dicomfs) is tightened when it is next opened.
        sh("chmod", "-R", "go+rX", str(cache))
        assert cache.stat().st_mode & 0o777 == 0o755
        again = mount_factory(archive.server.dicomweb, cache=str(cache), name="mnt2")
        again.stop()
        found = modes(cache)
        assert set(found.values()) <= {0o700, 0o600}, found
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def dicomfs_unprivileged(*args: str) -> subprocess.CompletedProcess[str]:
    """``dicomfs ARGS`` as root without the capabilities that bypass file permissions
    (``setpriv``, util-linux): what another user's files refuse a user, they refuse it."""
    return subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m",
                           "dicomfs", *args], capture_output=True, text=True, timeout=MOUNT_TIMEOUT,
                          stdin=subprocess.DEVNULL)


def test_a_cache_that_is_another_users_is_one_line_for_every_command(tmp_path: Path) -> None:
    """A cache folder this user may not enter (another user's, or root's for a user): every
    command that takes ``--cache-dir`` says so in one line and exits non-zero, and changes nothing
    there."""
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    (theirs / "blobs").mkdir(mode=0o700)  # a cache made before, by its owner
    os.chown(theirs / "blobs", 65534, 65534)
    os.chown(theirs, 65534, 65534)  # nobody's
    (tmp_path / "mnt").mkdir()
    before = sorted(os.listdir(theirs))
    commands = [("ls", "demo"), ("prefetch", "demo", "--all"), ("mount", "demo", str(tmp_path / "mnt")),
                ("serve", "demo", "--port", str(free_port())),
                ("cache", "stats"), ("cache", "verify"), ("cache", "clear")]
    for command in commands:
        result = dicomfs_unprivileged(*command, "--cache-dir", str(theirs))
        assert result.returncode != 0, (command, result.stdout)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dicomfs: error:") and "Permission denied" in lines[0], \
            (command, result.stderr)
        assert not is_mounted(tmp_path / "mnt")
    assert sorted(os.listdir(theirs)) == before
    # a cache to be made in a folder of theirs: the same line, from every command that makes one
    for command in commands[:4]:
        result = dicomfs_unprivileged(*command, "--cache-dir", str(theirs / "mine"))
        assert result.returncode != 0 and "Traceback" not in result.stderr, (command, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Permission denied" in result.stderr, result.stderr
    assert sorted(os.listdir(theirs)) == before
    # and the folder holding it: ``cache stats`` of every cache under it says which one it could not
    # read, and goes on with the others (a cache of this user's, listed after theirs)
    mine = tmp_path / "zmine"
    assert dicomfs_unprivileged("ls", "demo", "--cache-dir", str(mine)).returncode == 0
    for action in ("stats", "verify"):
        result = dicomfs_unprivileged("cache", action, "--cache-dir", str(tmp_path))
        assert result.returncode == 1, result.stderr
        [line] = result.stderr.splitlines()
        assert line.startswith("dicomfs: error:") and f"{theirs}" in line and line.endswith("Permission denied")
        assert result.stdout.startswith(f"{mine}: "), result.stdout


def test_what_a_folder_source_cannot_read_is_said_not_hidden(tmp_path: Path) -> None:
    """Files and folders of another user's in a folder source: left out with one warning, and
    tried again next time (not remembered as non-DICOM); the folder itself, or one above it: one
    line and a non-zero exit, not an empty archive."""
    folder = tmp_path / "folder"
    (folder / "theirs").mkdir(parents=True)
    blobs = {name: make_instance("1.2.826.0.1.3680043.8.498.41", "1.2.826.0.1.3680043.8.498.41.1",
                                 f"1.2.826.0.1.3680043.8.498.41.1.{n}", number=n)
             for n, name in enumerate(["mine.dcm", "theirs.dcm", "theirs/inside.dcm"], 1)}
    for name, blob in blobs.items():
        (folder / name).write_bytes(blob)
    for name in ("theirs.dcm", "theirs/inside.dcm", "theirs"):
        os.chown(folder / name, 65534, 65534)
        (folder / name).chmod(0o700 if name == "theirs" else 0o600)

    def ls(source: Path) -> subprocess.CompletedProcess[str]:
        return dicomfs_unprivileged("ls", str(source), "--level", "instance", "--json", "--cache-dir",
                                    str(tmp_path / "cache"))

    result = ls(folder)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["SOPInstanceUID"] for line in result.stdout.splitlines()] == [
        "1.2.826.0.1.3680043.8.498.41.1.1"]
    assert result.stderr.startswith(f"dicomfs: {folder}: 2 files or folders could not be read and are not shown "
                                    "(first: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    index = json.loads((tmp_path / "cache" / "folder-index.json").read_text())["files"]
    assert list(index) == ["mine.dcm"]  # the others not remembered (as not DICOM): read again next time

    os.chown(folder, 65534, 65534)
    folder.chmod(0o700)
    for source, status in ((folder, 1), (folder / "theirs", 2)):
        result = ls(source)
        assert result.returncode == status
        assert result.stderr == f"dicomfs: error: cannot read the source folder {source}: Permission denied\n"
    result = dicomfs("ls", "", "--cache-dir", str(tmp_path / "cache"))
    assert result.returncode == 2
    assert result.stderr == "dicomfs: error: the source is empty (a URL, a folder, idc, or demo)\n"


def test_what_prefetch_writes_for_the_user_keeps_the_users_umask(archive: Archive, tmp_path: Path) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    command = (f"umask 022; exec {sys.executable} -m dicomfs prefetch {archive.server.dicomweb} {MISMATCH} "
               f"--cache-dir {cache} --to {out}")
    sh("sh", "-c", command, timeout=300)
    files = [p for p in out.rglob("*") if p.is_file()]
    folders = [p for p in out.rglob("*") if p.is_dir()]
    assert len(files) == 3 and folders
    assert {p.stat().st_mode & 0o777 for p in files} == {0o644}  # as the user's own files
    assert {p.stat().st_mode & 0o777 for p in folders} == {0o755}
    assert set(modes(cache).values()) <= {0o700, 0o600}  # while the cache is private


def test_allow_other_warns_that_it_shares_the_mount(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    result = dicomfs("mount", "demo", str(tmp_path / "mnt"), "--cache-dir", str(tmp_path / "cache"), "--allow-other")
    try:
        assert result.returncode == 0, result.stderr
        assert "warning: --allow-other: every user of this machine can read" in result.stderr
        assert "--allow-other: every user" in (tmp_path / "cache" / "dicomfs.log").read_text()
    finally:
        dicomfs("umount", str(tmp_path / "mnt"))


# --- 7. a small and a full disk -----------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(disk))
    try:
        yield disk
    finally:
        for log in disk.rglob("dicomfs.log"):  # kept for whoever reads a failure
            shutil.copy(log, tmp_path / "small-disk-dicomfs.log")
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=60)


def test_a_cache_on_a_small_disk_fits_and_survives_it_filling(
        archive: Archive, small_disk: Path, mount_factory: Callable[..., Mount]) -> None:
    cache = small_disk / "cache"
    mount = mount_factory(archive.server.dicomweb, cache=str(cache))
    stats = dicomfs("cache", "stats", "--cache-dir", str(cache)).stdout
    limit = stats.split("limit ")[1].split(",")[0]
    assert limit.endswith("MiB") and float(limit.split()[0]) < 16, stats  # not "at least 1 GiB"
    first, second, third = archive.series(BIG)
    assert read_all(mount.path, archive.of(BIG, first)) == expected(archive.of(BIG, first))
    # 10 MB more do not fit beside the first 10 MB: the disk fills, the first series is evicted
    assert read_all(mount.path, archive.of(BIG, second)) == expected(archive.of(BIG, second))
    assert "the disk holding the cache is full: evicted" in mount.log
    # With the second series held open by a reader, nothing can make room for the third.
    held = open(mount.path / "studies" / next(iter(archive.of(BIG, second))), "rb")
    try:
        results = read_each(mount.path, archive.of(BIG, third))
        assert 5 in results.values()  # EIO for what did not fit, the exact bytes for what did
        assert {rel: r for rel, r in results.items() if r != 5} == {
            rel: r for rel, r in expected(archive.of(BIG, third)).items() if results[rel] != 5}
        assert "evicting what is not in use did not make room" in mount.log
        assert held.read() == next(iter(archive.of(BIG, second).values()))  # its reader is unharmed
    finally:
        held.close()
    wait_until(lambda: read_errno(mount.path / "studies" / next(iter(archive.of(BIG, third)))) == 0, 90,
               "the third series once the second was let go")
    assert read_all(mount.path, archive.of(BIG, third)) == expected(archive.of(BIG, third))
    log = mount.log
    assert "Traceback" not in log and "BrokenResourceError" not in log
    mount.stop()
    verify_clean(cache)


# --- 8. unmount and signals -----------------------------------------------------------------------

def test_umount_ends_the_daemon_when_another_namespace_holds_the_mount(
        tmp_path: Path, mount_factory: Callable[..., Mount]) -> None:
    mount = mount_factory("demo")
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "300"])
    try:
        time.sleep(1)
        assert holder.poll() is None
        result = dicomfs("umount", str(mount.path), timeout=60)
        assert result.returncode == 0, result.stderr
        assert not mount.alive() and not is_mounted(mount.path)
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_sighup_reopens_the_log_and_keeps_the_mount(tmp_path: Path, mount_factory: Callable[..., Mount]) -> None:
    mount = mount_factory("demo")
    log = mount.cache_dir / "dicomfs.log"
    rotated = log.with_name("dicomfs.log.1")
    log.rename(rotated)  # what logrotate does, before it signals
    assert mount.pid is not None
    os.kill(mount.pid, signal.SIGHUP)
    wait_until(lambda: log.exists() and "log file reopened" in log.read_text(), 30, "the new log file")
    assert log.stat().st_mode & 0o777 == 0o600
    assert mount.alive() and is_mounted(mount.path)
    assert len(listdir(mount.path / "studies")) > 0
    old = rotated.read_text()
    assert "mounted" in old and "log file reopened" not in old


def test_a_stale_mount_is_named_as_such(tmp_path: Path, mount_factory: Callable[..., Mount]) -> None:
    mount = mount_factory("demo")
    assert mount.pid is not None
    os.kill(mount.pid, signal.SIGKILL)
    wait_until(lambda: not mount.alive(), 30, "the daemon to die")
    result = dicomfs("mount", "demo", str(mount.path), "--cache-dir", str(tmp_path / "cache2"))
    assert result.returncode == 2
    assert "stale mount" in result.stderr and f"dicomfs umount {mount.path}" in result.stderr, result.stderr
    assert dicomfs("umount", str(mount.path)).returncode == 0
    assert not is_mounted(mount.path)


def test_ctrl_c_while_the_command_is_still_starting_is_quiet() -> None:
    """SIGINT while the CLI's modules are being imported (the first tenth of a second of every
    command) ends it as a later Ctrl-C does: status 130, no traceback."""
    code = ("import os, runpy, signal, sys\n"
            "class Interrupt:\n"  # a real SIGINT, at the moment the CLI's import begins
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'dicomfs.cli':\n"
            "            os.kill(os.getpid(), signal.SIGINT)\n"
            "        return None\n"
            "sys.meta_path.insert(0, Interrupt())\n"
            "sys.argv = ['dicomfs', 'ls', 'demo']\n"
            "runpy.run_module('dicomfs', run_name='__main__', alter_sys=True)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == "", result.stderr


def live_processes_in_group(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` that are not zombies (an orphan's zombie waits for
    a PID 1 that may never reap it: not ours to count)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(name))
    return found


def test_ctrl_c_during_a_folder_scan_ends_it_and_keeps_what_it_read(tmp_path: Path) -> None:
    """A first scan of a large folder takes minutes (30,000 files: 99 s); Ctrl-C (or SIGTERM to a
    mount still scanning) used to wait for all of it, and then threw away the fresh cache with
    the index of what had been read. The scan now stops at the next file; the files read by then
    are kept in the index, so the next run goes on from there."""
    folder, cache = tmp_path / "folder", tmp_path / "cache"
    folder.mkdir()
    study, series = "1.2.826.0.1.3680043.8.498.42", "1.2.826.0.1.3680043.8.498.42.1"
    template = make_instance(study, series, f"{series}.{0:06d}")
    count = 4000
    for n in range(count):  # (the same instance under 4,000 SOP Instance UIDs of the same length)
        (folder / f"{n:06d}.dcm").write_bytes(template.replace(f"{series}.{0:06d}".encode(),
                                                               f"{series}.{n:06d}".encode()))
    # (a session of its own, so that Ctrl-C can go to all of its processes, as a terminal's does)
    process = subprocess.Popen([sys.executable, "-m", "dicomfs", "ls", str(folder), "--cache-dir", str(cache)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                               start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        def reading_the_folder() -> bool:  # (the scan is under way: a file of the folder is open, in it or a worker)
            pids = [str(process.pid)]
            for task in os.listdir(f"/proc/{process.pid}/task"):
                with open(f"/proc/{process.pid}/task/{task}/children") as children:
                    pids += children.read().split()
            for pid in pids:
                try:
                    if any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(str(folder) + "/")
                           for fd in os.listdir(f"/proc/{pid}/fd")):
                        return True
                except OSError:
                    continue
            return False

        wait_until(reading_the_folder, 60, "the scan to start", interval=0.002)
        time.sleep(1.0)
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=MOUNT_TIMEOUT)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == 130, err
    assert out == b"" and b"Traceback" not in err, err
    wait_until(lambda: not live_processes_in_group(process.pid), 30, "the scan's worker processes to end")
    index = json.loads((cache / "folder-index.json").read_text())["files"]
    assert 0 < len(index) < count, len(index)  # stopped part way, and what it read was kept
    result = dicomfs("ls", str(folder), "--level", "series", "--json", "--cache-dir", str(cache))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["Instances"] == count
    assert len(json.loads((cache / "folder-index.json").read_text())["files"]) == count
