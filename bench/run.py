"""dicomfs benchmark: one run, every figure a ratio to a baseline measured in the same run.

    .venv/bin/python -m bench.run [--instances 160] [--series 2] [--repeat 3] [--diagnose]

Builds a synthetic study (``--instances`` secondary captures of ~0.5 MB each, spread over
``--series`` series), uploads it to a fresh loopback Orthanc, then repeats, interleaved:

1. cold ``cp -r`` of the study through a fresh dicomfs mount (empty cache) vs one ``curl``
   WADO-RS retrieve of the whole study (stored bytes, ``transfer-syntax=*``) to /dev/null;
2. the same cold ``cp -r`` through ``rclone mount`` of Orthanc's WebDAV ``/webdav/by-uids``
   (``--vfs-cache-mode full``, empty cache) — and checks that rclone's copy is byte-identical;
3. warm re-read (``cat`` of every file) through a remounted dicomfs whose cache holds the study vs
   the same files through ``bench/passthrough.py`` — once after ``drop_caches`` and once with
   the backing files in the page cache;
4. the peak VmRSS/VmHWM of every dicomfs daemon, sampled throughout.

Prints a table, writes the raw figures to ``bench/results/`` and the report block of
``docs/benchmarks.md`` (between the ``bench:begin``/``bench:end`` markers; the text around them
is left alone). ``--diagnose`` adds the download stages without FUSE (``bench/diagnose.py``) and
py-spy profiles of the daemon. Everything it starts is stopped and unmounted, also on error,
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pydicom
from pydicom.uid import generate_uid

from bench import diagnose, report
from bench.mounts import (
    DicomfsMount,
    Mount,
    PassthroughMount,
    RcloneMount,
    memory_kib,
    run_timed,
    stop_on_sigterm,
)
from tests.factory import make_instance
from tests.servers import OrthancServer, require_tools

PIXEL_BYTES = 512 * 1024
STORED_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
COMMAND_TIMEOUT = 600.0
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"


# --- the study ------------------------------------------------------------------------------
@dataclass
class Study:
    uid: str
    files: dict[str, tuple[int, str]] = field(default_factory=dict)  # "<series>/<sop>.dcm" -> (size, sha256)

    @property
    def total_bytes(self) -> int:
        return sum(size for size, _ in self.files.values())


def build_study(instances: int, series_count: int, folder: Path, server: OrthancServer,
                pixel_bytes: int = PIXEL_BYTES) -> Study:
    """Make the instances, keep a copy under ``folder/<study>/...``, upload them in batches."""
    study = Study(generate_uid())
    series = [generate_uid() for _ in range(series_count)]
    batch: list[bytes] = []
    for number in range(instances):
        blob = make_instance(study.uid, series[number % series_count], pixel_bytes=pixel_bytes,
                             number=number + 1)
        sop = pydicom.dcmread(io.BytesIO(blob), stop_before_pixels=True).SOPInstanceUID
        relative = f"{series[number % series_count]}/{sop}.dcm"
        (folder / study.uid / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / study.uid / relative).write_bytes(blob)
        study.files[relative] = (len(blob), hashlib.sha256(blob).hexdigest())
        batch.append(blob)
        if len(batch) == 32:
            server.upload(batch)
            batch = []
    if batch:
        server.upload(batch)
    return study


def verify_copy(copy: Path, study: Study, original: Path) -> dict[str, object]:
    """Compare a copied study folder with what was uploaded (kept in ``original``): every .dcm file."""
    found = {str(p.relative_to(copy)): p for p in copy.rglob("*") if p.is_file()}
    missing = [name for name in study.files if name not in found]
    wrong_size, wrong_bytes = [], []
    for name, (size, digest) in study.files.items():
        path = found.get(name)
        if path is None:
            continue
        if path.stat().st_size != size:
            wrong_size.append(f"{name}: {path.stat().st_size} bytes, uploaded {size}")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            wrong_bytes.append((name, first_difference(path.read_bytes(), (original / name).read_bytes())))
    extra = sorted(name for name in found if name not in study.files)
    identical = len(study.files) - len(missing) - len(wrong_size) - len(wrong_bytes)
    return {"identical": identical, "expected": len(study.files), "missing": len(missing),
            "wrong_size": wrong_size, "wrong_bytes": len(wrong_bytes),
            "first_difference_at": sorted({offset for _, offset in wrong_bytes}),
            "wrong_bytes_examples": [name for name, _ in wrong_bytes[:3]],
            "extra_files": extra[:10], "extra_count": len(extra)}


def first_difference(got: bytes, want: bytes) -> int:
    return next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))


# --- measuring ------------------------------------------------------------------------------
def timed(argv: list[str]) -> float:
    elapsed, status, _ = run_timed(argv, timeout=COMMAND_TIMEOUT)
    if status != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} ... exited with status {status}")
    return elapsed


def curl_study(server: OrthancServer, study: Study) -> float:
    """One WADO-RS retrieve of the whole study, stored bytes, to /dev/null."""
    argv = ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{size_download}", "-H",
            f"Accept: {STORED_ACCEPT}", f"{server.dicomweb}/studies/{study.uid}"]
    elapsed, status, out = run_timed(argv, capture=True, timeout=COMMAND_TIMEOUT)
    if status != 0 or int(out or 0) < study.total_bytes:
        raise RuntimeError(f"curl failed (status {status}) or got {out} bytes, less than the study's "
                           f"{study.total_bytes}")
    return elapsed


def read_all(folder: Path) -> float:
    """``cat`` every file below ``folder`` to /dev/null."""
    return timed(["find", str(folder), "-type", "f", "-exec", "cat", "{}", "+"])


def passthrough_copy(folder: Path, base: Path, alongside: list[str] | None = None) -> tuple[float, int]:
    """The floor of a copy through FUSE: ``cp -r`` of ``folder`` through ``bench/passthrough.py``
    (a pyfuse3 mount of its parent) into ``base``, every byte already in the page cache; the
    copy's wall time and status (the copy is removed after). With ``alongside`` (a command), that
    command runs at the same time, started with the copy: the wall time is then until both have
    ended, and the status the first that is not 0."""
    read_all(folder)
    mount = PassthroughMount(folder.parent, base / "pass", base / "pass.log")
    mount.start()
    other: subprocess.Popen[bytes] | None = None
    try:
        started = time.perf_counter()
        if alongside:
            other = subprocess.Popen(alongside, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        wall, status, _ = run_timed(["cp", "-r", str(mount.path / folder.name), str(base / "copy")],
                                    timeout=COMMAND_TIMEOUT)
        if other is not None:
            other_status = other.wait(timeout=COMMAND_TIMEOUT)
            wall = time.perf_counter() - started
            status = status or other_status
    finally:
        if other is not None and other.poll() is None:
            other.kill()
            other.wait()
        mount.stop()
    shutil.rmtree(base / "copy", ignore_errors=True)
    return wall, status


def list_all(folder: Path) -> float:
    """``ls -R``: directory listings only (no stat, so no instance sizes, so no downloads)."""
    return timed(["ls", "-R", str(folder)])


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


class RssSampler:
    """Polls VmRSS/VmHWM of the daemon being watched every 10 ms, in a thread."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.peak_rss_kib = 0
        self.peak_hwm_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.sample()

    def sample(self) -> None:
        pid = self.pid
        if pid is not None:
            memory = memory_kib(pid)
            self.peak_rss_kib = max(self.peak_rss_kib, memory.get("VmRSS", 0))
            self.peak_hwm_kib = max(self.peak_hwm_kib, memory.get("VmHWM", 0))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --- one run --------------------------------------------------------------------------------
class Bench:
    """The measurements of one run; ``work`` is on disk (caches, mounts), ``scratch`` on tmpfs (copies)."""

    def __init__(self, work: Path, scratch: Path, server: OrthancServer, study: Study, files: Path,
                 sampler: RssSampler) -> None:
        self.work, self.scratch, self.server, self.study, self.files = work, scratch, server, study, files
        self.sampler = sampler
        self.samples: dict[str, list[float]] = {}
        self.checks: dict[str, dict[str, object]] = {}
        self.can_drop = drop_caches()

    def record(self, name: str, value: float) -> None:
        self.samples.setdefault(name, []).append(value)

    @contextlib.contextmanager
    def mounted(self, mount: Mount, label: str) -> Iterator[None]:
        """Mount, watch the daemon's memory if it is dicomfs, and always unmount (also on Ctrl-C)."""
        watched = isinstance(mount, DicomfsMount)
        try:
            self.record(f"{label}_mount_s", mount.start())
            if watched:
                self.sampler.pid = mount.pid
            yield
        finally:
            if watched:
                self.sampler.sample()
                self.sampler.pid = None
            mount.stop()

    def dicomfs(self, name: str, cache: Path) -> DicomfsMount:
        return DicomfsMount(f"{self.server.dicomweb}", self.work / name, cache, self.work / "dicomfs.log")

    def scratch_dir(self, name: str) -> Path:
        """A path for a copy, on tmpfs (so writing the copy costs no disk I/O); empty."""
        path = self.scratch / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    def work_dir(self, name: str) -> Path:
        """A path for a cache, on disk like a real cache; empty."""
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    def repetition(self, number: int) -> None:
        self.record("curl_s", curl_study(self.server, self.study))
        cache = self.work_dir(f"cache-{number}")
        self.cold_dicomfs(number, cache)
        self.cold_rclone(number)
        self.cold_listing(number)
        self.local_copy()
        self.warm(number, cache)
        shutil.rmtree(cache, ignore_errors=True)

    def cold_dicomfs(self, number: int, cache: Path) -> None:
        out = self.scratch_dir("dicomfs-copy")
        with self.mounted(self.dicomfs("mnt-dicomfs", cache), "dicomfs_cold"):
            source = self.work / "mnt-dicomfs/studies" / self.study.uid
            self.record("dicomfs_cold_s", timed(["cp", "-r", str(source), str(out)]))
        self.checks[f"dicomfs-{number}"] = verify_copy(out, self.study, self.files / self.study.uid)
        shutil.rmtree(out)

    def cold_rclone(self, number: int) -> None:
        out = self.scratch_dir("rclone-copy")
        rclone = RcloneMount(f"{self.server.url}/webdav/by-uids", self.work / "mnt-rclone",
                             self.work_dir(f"rclone-cache-{number}"), self.work / "rclone.log")
        with self.mounted(rclone, "rclone"):
            self.record("rclone_cold_s", timed(["cp", "-r", str(self.work / "mnt-rclone" / self.study.uid), str(out)]))
        self.checks[f"rclone-{number}"] = verify_copy(out, self.study, self.files / self.study.uid)
        shutil.rmtree(out)
        shutil.rmtree(rclone.cache_dir, ignore_errors=True)

    def cold_listing(self, number: int) -> None:
        """For the diagnosis: what the QIDO listings alone cost a cold mount."""
        cache = self.work_dir(f"cache-listing-{number}")
        with self.mounted(self.dicomfs("mnt-listing", cache), "dicomfs_listing"):
            self.record("dicomfs_cold_ls_s", list_all(self.work / "mnt-listing/studies" / self.study.uid))
        shutil.rmtree(cache, ignore_errors=True)

    def local_copy(self) -> None:
        """For scale: ``cp -r`` of the same files from the page cache to tmpfs, no FUSE at all."""
        read_all(self.files)
        out = self.scratch_dir("local-copy")
        self.record("local_cp_s", timed(["cp", "-r", str(self.files / self.study.uid), str(out)]))
        shutil.rmtree(out)

    def warm(self, number: int, cache: Path) -> None:
        """Re-read through fresh mounts: dicomfs on the cache just filled vs the passthrough."""
        sides: list[tuple[str, Callable[[], Mount], str]] = [
            ("dicomfs", lambda: self.dicomfs("mnt-warm", cache), "mnt-warm/studies/" + self.study.uid),
            ("passthrough", lambda: PassthroughMount(self.files, self.work / "mnt-pass", self.work / "passthrough.log"),
             "mnt-pass/" + self.study.uid)]
        if number % 2:
            sides.reverse()  # alternate who goes first
        for dropped in (True, False) if self.can_drop else (False,):
            if not dropped:
                read_all(cache)  # the backing files of both sides into the page cache
                read_all(self.files)
            for side, make, folder in sides:
                if dropped:
                    drop_caches()
                with self.mounted(make(), f"{side}_warm"):
                    key = "dropped" if dropped else "hot"
                    self.record(f"{side}_warm_{key}_s", read_all(self.work / folder))


# --- profiling (optional) -------------------------------------------------------------------
def py_spy() -> str | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return spy if os.path.exists(spy) else None


def profile_daemon(bench: Bench, spy: str, cache: Path, name: str, command: list[str]) -> dict[str, object]:
    """py-spy record of a fresh dicomfs daemon on ``cache`` while ``command`` runs in its mount.

    ``command`` may use ``{mnt}`` for the study's folder in the mount.
    """
    raw = RESULTS / f"profile-{name}.txt"
    mount = bench.dicomfs("mnt-profile", cache)
    with bench.mounted(mount, "profile"):
        assert mount.pid is not None
        with py_spy_record(spy, mount.pid, raw):
            folder = str(bench.work / "mnt-profile/studies" / bench.study.uid)
            elapsed = timed([arg.replace("{mnt}", folder) for arg in command])
    return {"seconds_under_profiler": elapsed, "raw": str(raw.relative_to(ROOT)), **report.summarize_profile(raw)}


@contextlib.contextmanager
def py_spy_record(spy: str, pid: int, raw: Path) -> Iterator[None]:
    """``py-spy record`` of ``pid`` (1 kHz, every thread, raw stacks into ``raw``) around the block."""
    recorder = subprocess.Popen([spy, "record", "-p", str(pid), "-r", "1000", "-f", "raw", "-o", str(raw),
                                 "--nonblocking", "--threads"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # py-spy attaches
        yield
        time.sleep(0.2)
        recorder.send_signal(signal.SIGINT)
        recorder.wait(timeout=60)
    finally:
        if recorder.poll() is None:
            recorder.kill()
            recorder.wait(timeout=10)


def profile(bench: Bench) -> dict[str, dict[str, object]] | None:
    """Profiles of one extra cold ``cp -r`` and of the warm re-read that follows; None without py-spy."""
    spy = py_spy()
    if spy is None:
        return None
    cache = bench.work_dir("cache-profile")
    out = bench.scratch_dir("profile-copy")
    profiles = {
        "cold cp -r": profile_daemon(bench, spy, cache, "cold-cp", ["cp", "-r", "{mnt}", str(out)]),
        "warm re-read (page cache of the blobs hot)": profile_daemon(
            bench, spy, cache, "warm-cat", ["find", "{mnt}", "-type", "f", "-exec", "cat", "{}", "+"]),
    }
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return profiles


# --- main -----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=160, help="instances in the study (default 160)")
    parser.add_argument("--series", type=int, default=2, help="series they are spread over (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; medians are reported (default 3)")
    parser.add_argument("--diagnose", action="store_true",
                        help="also time the download stages without FUSE (bench/diagnose.py) and py-spy "
                             "record one extra cold cp -r (if py-spy is installed)")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped and unmounted", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    require_tools("curl", "cp", "find", "cat", "rclone", "fusermount3")
    stop_on_sigterm()
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = report.machine_facts()
    with contextlib.ExitStack() as cleanup:
        work = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="dicomfs-bench-")))
        scratch_root = "/dev/shm" if os.path.isdir("/dev/shm") else None
        scratch = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="dicomfs-bench-", dir=scratch_root)))
        server = OrthancServer(work / "orthanc")
        cleanup.callback(server.stop)
        server.start()
        print(f"building {args.instances} instances in {args.series} series ...", flush=True)
        files = work / "files"
        study = build_study(args.instances, args.series, files, server)
        machine["orthanc"] = report.orthanc_version(server)
        sampler = cleanup.enter_context(RssSampler())
        bench = Bench(work, scratch, server, study, files, sampler)
        load_before = os.getloadavg()
        for number in range(args.repeat):
            print(f"repetition {number + 1}/{args.repeat} ...", flush=True)
            bench.repetition(number)
            if args.diagnose:
                for stage, seconds in diagnose.measure(server.dicomweb, study.uid, work / "cache-diagnose").items():
                    bench.record(f"diagnose_{stage}", seconds)
        profiles = profile(bench) if args.diagnose else None
        load_after = os.getloadavg()
    results = {
        "machine": machine, "load_before": load_before, "load_after": load_after,
        "instances": args.instances, "series": args.series, "repeat": args.repeat,
        "study_bytes": study.total_bytes, "samples": bench.samples, "checks": bench.checks,
        "drop_caches": bench.can_drop, "peak_rss_kib": sampler.peak_rss_kib,
        "peak_hwm_kib": sampler.peak_hwm_kib, "profiles": profiles,
    }
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2))
    rows = report.rows(results)
    print(report.text_table(rows))
    if not args.no_doc:
        report.write_doc(DOC, results, rows)
        print(f"wrote {DOC.relative_to(ROOT)} and {(RESULTS / 'latest.json').relative_to(ROOT)}")
    return 0 if all(row.passed is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
