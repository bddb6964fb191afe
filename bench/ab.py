"""A/B: this checkout's dicomfs against an earlier commit, side by side in one run.

For a change on the hot path: both versions mount the same loopback Orthanc (the study of
``bench.run``: 2 series x 80 instances x 0.5 MB), alternately (A B, B A, ...), and each repetition
measures a cold ``cp -r`` of the study to tmpfs, the daemon's CPU time (from ``/proc/<pid>/stat``:
at start-up, and during the copy) and its peak memory (VmHWM). The earlier commit is checked out
with ``git worktree`` into a temporary folder and run from there (the daemon imports the ``dicomfs``
of its working directory, which is checked before anything runs), with this checkout's virtualenv.

    .venv/bin/python -m bench.ab --base d14ba0e --repeat 7

Prints medians and ranges; writes nothing into the repository. Every copied file is checked
against the uploaded bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.mounts import ROOT, cpu_seconds, run_timed
from tests.factory import make_instance
from tests.servers import OrthancServer

STUDY = "1.2.826.0.1.3680043.8.498.900"
TIMEOUT = 300


def module_of(checkout: Path) -> str:
    """Which dicomfs a daemon started in ``checkout`` imports."""
    return subprocess.run([sys.executable, "-c", "import dicomfs; print(dicomfs.__file__)"], cwd=checkout,
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()


def daemon_figures(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) and VmHWM in MiB of a running process."""
    cpu = cpu_seconds(pid)
    hwm = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM"))
    return cpu, int(hwm.split()[1]) / 1024


def one_copy(checkout: Path, source: str, work: Path,
             expected: dict[str, str]) -> tuple[float, float, float, float]:
    """Mount, copy, unmount: (copy seconds, daemon CPU at start-up, daemon CPU of the copy, VmHWM)."""
    mnt, cache, out = work / "mnt", work / f"cache-{time.monotonic_ns()}", Path("/dev/shm") / f"ab-{os.getpid()}"
    mnt.mkdir(exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "dicomfs", "mount", source, str(mnt), "--cache-dir", str(cache)],
                   cwd=checkout, check=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    try:
        from dicomfs.mount import pidfile_for

        pid = int(pidfile_for(mnt).read_text())
        cpu_mounted, _ = daemon_figures(pid)
        elapsed, status, _ = run_timed(["cp", "-r", str(mnt / "studies" / STUDY), str(out)], timeout=TIMEOUT)
        if status != 0:
            raise AssertionError(f"{checkout}: cp -r failed with status {status}")
        cpu, hwm = daemon_figures(pid)
        copied = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*.dcm")}
        if copied != expected:
            raise AssertionError(f"{checkout}: the copy differs from the upload")
    finally:
        subprocess.run([sys.executable, "-m", "dicomfs", "umount", str(mnt)], cwd=checkout, timeout=TIMEOUT)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    return elapsed, cpu_mounted, cpu - cpu_mounted, hwm


@contextmanager
def versions_of(base: str, work: Path) -> Iterator[dict[str, Path]]:
    """``{"base (<base>)": a git worktree of it in ``work``, "this checkout": ROOT}``, each checked
    to import its own dicomfs when a process starts there; the worktree removed afterwards."""
    folder = work / "base"
    subprocess.run(["git", "worktree", "add", "--detach", str(folder), base], cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    try:
        versions = {f"base ({base})": folder, "this checkout": ROOT}
        for name, checkout in versions.items():
            loaded = module_of(checkout)
            if not loaded.startswith(str(checkout)):
                raise SystemExit(f"{name} would import {loaded}, not its own dicomfs")
        yield versions
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(folder)], cwd=ROOT, capture_output=True,
                       timeout=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the earlier commit to compare with")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dicomfs-ab-"))
    try:
        with versions_of(args.base, work) as versions:
            compare(versions, work, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def compare(versions: dict[str, Path], work: Path, repeat: int) -> None:
    """Cold copies by each version, alternating, ``repeat`` times; medians printed."""
    files = {f"{STUDY}.{s}.{n}.dcm": make_instance(STUDY, f"{STUDY}.{s}", f"{STUDY}.{s}.{n}",
                                                   pixel_bytes=512 * 1024, number=n)
             for s in (1, 2) for n in range(1, 81)}
    expected = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    gib = sum(map(len, files.values())) / 2**30
    samples: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in versions}
    with OrthancServer(work / "orthanc") as server:
        server.upload(list(files.values()))
        for rep in range(repeat):
            order = list(versions) if rep % 2 == 0 else list(versions)[::-1]
            for name in order:
                samples[name].append(one_copy(versions[name], server.dicomweb, work, expected))
            print(f"repetition {rep + 1}/{repeat} done", flush=True)
    for name, runs in samples.items():
        times, startups, copies, hwms = zip(*runs, strict=False)
        print(f"{name}: cold cp -r median {statistics.median(times):.3f} s ({min(times):.3f}-{max(times):.3f}); "
              f"daemon CPU: start-up {statistics.median(startups):.2f} s, copy {statistics.median(copies):.2f} s "
              f"({statistics.median(copies) / gib:.2f} s per GiB; {min(copies):.2f}-{max(copies):.2f}); "
              f"VmHWM median {statistics.median(hwms):.0f} MiB ({min(hwms):.0f}-{max(hwms):.0f})")
    first, second = (samples[name] for name in versions)
    ratio = statistics.median(run[0] for run in second) / statistics.median(run[0] for run in first)
    print(f"cold copy time, this checkout / base: {ratio:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
