"""DIMSE benchmark: dicomfs on a DIMSE PACS against dcmtk's ``getscu``, side by side in one run.

    .venv/bin/python -m bench.dimse [--instances 160] [--series 2] [--studies 2] [--repeat 5] [--link 1gbit]

Builds ``--studies`` synthetic studies (``--instances`` secondary captures of ~0.5 MB each,
spread over ``--series`` series), uploads them to a fresh Orthanc (the Debian package) with its
DICOM port open to our AE title and left as Orthanc ships (no ``TCP_NODELAY`` in its environment:
a PACS as users find it), then repeats, interleaved and in rotating order:

1. cold ``cp -r`` of the first study through a fresh mount (empty cache; C-GET per series), and
   the daemon's CPU time during the copy; baseline: ``getscu`` retrieving the same study at STUDY
   level into a folder, with ``TCP_NODELAY=1`` (dcmtk's switch; without it dcmtk's own sockets
   wait on delayed ACKs);
2. ``dicomfs prefetch --all`` (every study) into an empty cache, and its CPU time; baseline: one
   ``getscu`` per study, all at once;
3. for information: the cold copy with ``--retrieve move`` (C-MOVE to dicomfs's storage SCP), and
   ``getscu`` without ``TCP_NODELAY``;
4. the floor of any client built on pynetdicom (which the DIMSE issue asks for): a minimal one,
   ``bench/pynetdicom_get.py``, doing what ``getscu`` does (one STUDY-level C-GET into a folder):
   its retrieve alone (association to release, as a mount's retrieve worker has Python started
   and pynetdicom imported before the copy) against ``getscu`` of the study, and one whole process
   per study, all at once, against the same ``getscu`` runs.

Everything writes to the same disk. Every figure is a ratio to its baseline in the same run
(medians; the spread of per-repetition ratios beside). After the first repetition every output is
checked against the uploads: a DIMSE PACS sends its own encoding of an instance, so what is
compared is the data set (everything after the file meta group), byte for byte, by sha256.

``--link RATE`` runs the whole benchmark (Orthanc, mounts, clients) inside a network namespace
whose loopback has an Ethernet MTU and a ``tbf`` qdisc at RATE (``bench.link``). Writes
``bench/results/dimse-latest.json`` and the block between ``bench-dimse:begin`` and
``bench-dimse:end`` in ``docs/benchmarks.md`` (on a link: ``dimse-link-latest.json`` and the
``bench-dimse-link`` block).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import link, report  # noqa: E402
from bench.mounts import DicomfsMount, cpu_seconds, run_timed, stop_on_sigterm  # noqa: E402
from bench.run import Study, build_study  # noqa: E402
from dicomfs.p10 import parse_file_meta  # noqa: E402
from tests.servers import OrthancServer, free_port, require_tools  # noqa: E402

TIMEOUT = 1800.0
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"

def markers(on_link: bool) -> tuple[str, str]:
    """The block in docs/benchmarks.md: one for plain loopback, one for an emulated link."""
    name = "bench-dimse-link" if on_link else "bench-dimse"
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


AE = "DICOMFS"
NODELAY = {"TCP_NODELAY": "1"}
TARGETS = {"copy": 1.3, "prefetch": 1.1}


def dataset_digest(data: bytes) -> str:
    """sha256 of an instance's data set: the bytes after its file meta group."""
    return hashlib.sha256(data[parse_file_meta(data).end:]).hexdigest()


def expected_digests(studies: list[Study], originals: Path) -> dict[str, str]:
    """"<study>/<series>/<sop>.dcm" -> the data set digest of the uploaded file."""
    return {f"{s.uid}/{name}": dataset_digest((originals / s.uid / name).read_bytes())
            for s in studies for name in s.files}


def digests_below(folder: Path) -> list[str]:
    return [dataset_digest(p.read_bytes()) for p in folder.rglob("*") if p.is_file()]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def getscu(server: OrthancServer, study: str, out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    return ["getscu", "-S", "-aet", AE, "-aec", server.aet, "-k", "QueryRetrieveLevel=STUDY", "-k",
            f"StudyInstanceUID={study}", "-od", str(out), "127.0.0.1", str(server.dicom_port)]


def run_parallel(argvs: list[list[str]], env: dict[str, str]) -> tuple[float, list[int]]:
    """Start every command at once; (seconds until the last has ended, their exit statuses).
    The parent blocks in ``wait``; a watchdog kills what is still running after TIMEOUT."""
    started = time.perf_counter()
    processes = [subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, env={**os.environ, **env}) for argv in argvs]

    def kill_all() -> None:
        for p in processes:
            p.kill()

    watchdog = threading.Timer(TIMEOUT, kill_all)
    watchdog.start()
    try:
        statuses = [p.wait() for p in processes]
    finally:
        watchdog.cancel()
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    return time.perf_counter() - started, statuses


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, server: OrthancServer, move_port: int,
                 studies: list[Study]) -> None:
        self.args = args
        self.work = work
        self.server = server
        self.move_port = move_port
        self.studies = studies
        self.source = f"dimse://{server.aet}@127.0.0.1:{server.dicom_port}"
        self.samples: dict[str, list[float]] = {}
        self.checks: dict[str, str] = {}
        self.expected = expected_digests(studies, work / "files")
        self.first = studies[0]
        self.sop_classes = sorted({parse_file_meta(p.read_bytes()[:65536]).sop_class_uid
                                   for p in (work / "files").rglob("*.dcm")})

    def record(self, name: str, value: float) -> None:
        self.samples.setdefault(name, []).append(value)

    def check(self, name: str, digests: list[str], expected: list[str]) -> None:
        if name in self.checks:
            return
        same = sorted(digests) == sorted(expected)
        self.checks[name] = (f"{len(digests)} files, data sets {'identical to' if same else '**differ from**'} "
                             f"the {len(expected)} uploaded")

    def expected_of(self, studies: list[Study]) -> list[str]:
        uids = {s.uid for s in studies}
        return [d for rel, d in self.expected.items() if rel.split("/")[0] in uids]

    # --- the measurements -------------------------------------------------------------------
    def copy(self, name: str, *mount_args: str) -> None:
        """Cold ``cp -r`` of the first study through a fresh mount; the daemon's CPU of the copy."""
        tag = f"{name}-{time.monotonic_ns()}"
        mount = DicomfsMount(self.source, self.work / f"mnt-{tag}", self.work / f"cache-{tag}",
                             self.work / f"{name}.log", args=("--move-port", str(self.move_port), *mount_args))
        out = self.work / f"out-{tag}"
        mount.start()
        try:
            before = cpu_seconds(mount.pid)
            seconds, status, _ = run_timed(["cp", "-r", str(mount.path / "studies" / self.first.uid), str(out)],
                                           timeout=TIMEOUT)
            cpu = cpu_seconds(mount.pid) - before
        finally:
            mount.stop()
        if status != 0:
            raise RuntimeError(f"cp -r through the mount ({name}) exited with {status}; see {mount.log_file}")
        self.record(f"{name}_s", seconds)
        self.record(f"{name}_cpu_s", cpu)
        self.check(name, digests_below(out), self.expected_of([self.first]))
        shutil.rmtree(out)
        shutil.rmtree(mount.cache_dir, ignore_errors=True)

    def getscu_one(self, name: str, env: dict[str, str]) -> None:
        out = self.work / f"out-{name}-{time.monotonic_ns()}"
        cpu = children_cpu()
        seconds, statuses = run_parallel([getscu(self.server, self.first.uid, out)], env)
        if statuses != [0]:
            raise RuntimeError(f"getscu exited with {statuses[0]}")
        self.record(f"{name}_s", seconds)
        self.record(f"{name}_cpu_s", children_cpu() - cpu)
        self.check(name, digests_below(out), self.expected_of([self.first]))
        shutil.rmtree(out)

    def prefetch(self) -> None:
        cache = self.work / f"prefetch-cache-{time.monotonic_ns()}"
        cpu = children_cpu()
        seconds, status, _ = run_timed([sys.executable, "-m", "dicomfs", "prefetch", self.source, "--all",
                                        "--cache-dir", str(cache)], timeout=TIMEOUT, cwd=ROOT)
        if status != 0:
            raise RuntimeError(f"dicomfs prefetch exited with {status}")
        self.record("prefetch_s", seconds)
        self.record("prefetch_cpu_s", children_cpu() - cpu)
        if "prefetch" not in self.checks:
            out = self.work / "prefetch-files"
            run_timed([sys.executable, "-m", "dicomfs", "prefetch", self.source, "--all", "--cache-dir", str(cache),
                       "--to", str(out)], timeout=TIMEOUT, cwd=ROOT)
            self.check("prefetch", digests_below(out), self.expected_of(self.studies))
            shutil.rmtree(out)
        shutil.rmtree(cache)

    def pynetdicom_floor(self) -> None:
        """``bench/pynetdicom_get.py`` of the first study (its retrieve alone), then one per study
        at once (whole processes)."""
        script = [sys.executable, str(ROOT / "bench" / "pynetdicom_get.py"), AE, self.server.aet, "127.0.0.1",
                  str(self.server.dicom_port)]
        out = self.work / f"out-pynetdicom-{time.monotonic_ns()}"
        _, status, said = run_timed([*script, self.first.uid, str(out), *self.sop_classes], capture=True,
                                    timeout=TIMEOUT)
        if status != 0:
            raise RuntimeError(f"bench/pynetdicom_get.py exited with {status}")
        self.record("pynetdicom_get_s", float(said.split()[-1]))
        self.check("pynetdicom_get", digests_below(out), self.expected_of([self.first]))
        seconds, statuses = run_parallel([[*script, s.uid, str(out / "all" / s.uid), *self.sop_classes]
                                          for s in self.studies], {})
        if any(statuses):
            raise RuntimeError(f"bench/pynetdicom_get.py exited with {statuses}")
        self.record("pynetdicom_all_s", seconds)
        shutil.rmtree(out)

    def getscu_all(self) -> None:
        out = self.work / f"out-getscu-all-{time.monotonic_ns()}"
        cpu = children_cpu()
        seconds, statuses = run_parallel([getscu(self.server, s.uid, out / s.uid) for s in self.studies], NODELAY)
        if any(statuses):
            raise RuntimeError(f"getscu exited with {statuses}")
        self.record("getscu_all_s", seconds)
        self.record("getscu_all_cpu_s", children_cpu() - cpu)
        self.check("getscu_all", digests_below(out), self.expected_of(self.studies))
        shutil.rmtree(out)

    def repetition(self, number: int) -> None:
        steps: list[tuple[str, Callable[[], None]]] = [
            ("copy", lambda: self.copy("copy")), ("getscu", lambda: self.getscu_one("getscu", NODELAY)),
            ("prefetch", self.prefetch), ("getscu_all", self.getscu_all),
            ("copy_move", lambda: self.copy("copy_move", "--retrieve", "move")),
            ("getscu_nagle", lambda: self.getscu_one("getscu_nagle", {})), ("pynetdicom", self.pynetdicom_floor)]
        shift = number % len(steps)
        order = steps[shift:] + steps[:shift]
        print(f"repetition {number + 1}/{self.args.repeat}: {', '.join(name for name, _ in order)}", flush=True)
        for _, step in order:
            step()


def measure(args: argparse.Namespace) -> dict[str, object]:
    require_tools("getscu", "cp")
    with contextlib.ExitStack() as cleanup:
        work = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="dicomfs-bench-dimse-")))
        move_port = free_port()
        modalities = {AE: {"AET": AE, "Host": "127.0.0.1", "Port": move_port, "AllowEcho": True,
                           "AllowFind": True, "AllowGet": True, "AllowMove": True, "AllowStore": True}}
        server = OrthancServer(work / "orthanc", modalities=modalities)
        cleanup.callback(server.stop)
        server.start()
        studies = []
        for number in range(args.studies):
            print(f"building study {number + 1}/{args.studies}: {args.instances} instances ...", flush=True)
            studies.append(build_study(args.instances, args.series, work / "files", server))
        bench = Bench(args, work, server, move_port, studies)
        load_before = os.getloadavg()
        for repetition in range(args.repeat):
            bench.repetition(repetition)
        load_after = os.getloadavg()
        orthanc = report.orthanc_version(server)
    return {"machine": {**report.machine_facts(), "orthanc": orthanc, "load_before": load_before,
                        "load_after": load_after},
            "link": link.describe(args.link), "studies": args.studies, "instances_per_study": args.instances,
            "series_per_study": args.series, "repeat": args.repeat,
            "study_bytes": studies[0].total_bytes, "total_bytes": sum(s.total_bytes for s in studies),
            "samples": bench.samples, "checks": bench.checks}


# --- the report -------------------------------------------------------------------------------
def median(results: dict[str, object], name: str) -> float:
    samples = cast(dict[str, list[float]], results["samples"])
    return statistics.median(samples[name])


def ratio_text(results: dict[str, object], ours: str, theirs: str) -> tuple[float, str]:
    samples = cast(dict[str, list[float]], results["samples"])
    ratio = median(results, ours) / median(results, theirs)
    spread = [a / b for a, b in zip(samples[ours], samples[theirs], strict=False)]
    return ratio, f"{ratio:.2f}× ({min(spread):.2f}–{max(spread):.2f})"


def rows(results: dict[str, object]) -> list[tuple[str, str, str, str, bool | None]]:
    study, total = cast(int, results["study_bytes"]), cast(int, results["total_bytes"])

    def times(ours: str, theirs: str, size: int) -> str:
        a, b = median(results, ours), median(results, theirs)
        return f"{a:.2f} s vs {b:.2f} s ({size / a / 1e6:.0f} vs {size / b / 1e6:.0f} MB/s)"

    out: list[tuple[str, str, str, str, bool | None]] = []
    for label, ours, theirs, size, target in (
            ("cold `cp -r` of a study through the mount (C-GET) vs `getscu` of the study", "copy_s", "getscu_s",
             study, TARGETS["copy"]),
            ("`dicomfs prefetch --all` vs one `getscu` per study, in parallel", "prefetch_s", "getscu_all_s",
             total, TARGETS["prefetch"]),
            ("cold `cp -r` with `--retrieve move` (C-MOVE) vs `getscu` (information)", "copy_move_s", "getscu_s",
             study, None),
            ("`getscu` without `TCP_NODELAY=1` vs with it (information)", "getscu_nagle_s", "getscu_s", study, None),
            ("the floor of a pynetdicom client: `bench/pynetdicom_get.py`'s STUDY-level C-GET of the study, the "
             "retrieve alone (no Python start, no import) vs `getscu`", "pynetdicom_get_s", "getscu_s", study, None),
            ("the floor of a pynetdicom client: one whole `bench/pynetdicom_get.py` per study, in parallel, vs the "
             "`getscu` runs", "pynetdicom_all_s", "getscu_all_s", total, None)):
        ratio, text = ratio_text(results, ours, theirs)
        out.append((label, times(ours, theirs, size), text, f"≤ {target}×" if target else "—",
                    None if target is None else ratio <= target))
    return out


def cpu_rows(results: dict[str, object]) -> list[str]:
    study, total = cast(int, results["study_bytes"]), cast(int, results["total_bytes"])
    lines = []
    for label, name, size in (("dicomfs daemon, cold `cp -r` (C-GET)", "copy_cpu_s", study),
                              ("dicomfs daemon, cold `cp -r` (C-MOVE)", "copy_move_cpu_s", study),
                              ("`getscu`, one study", "getscu_cpu_s", study),
                              ("`dicomfs prefetch --all` (the whole command)", "prefetch_cpu_s", total),
                              ("`getscu`, every study in parallel", "getscu_all_cpu_s", total)):
        seconds = median(results, name)
        lines.append(f"| {label} | {seconds:.2f} s | {seconds / (size / 1e9):.1f} s/GB |")
    return lines


def render(results: dict[str, object]) -> str:
    machine = cast(dict[str, object], results["machine"])
    checks = cast(dict[str, str], results["checks"])
    samples = cast(dict[str, list[float]], results["samples"])
    begin, end = markers(link.INSIDE in os.environ)
    lines = [begin, "", f"Run of `python -m bench.dimse --studies {results['studies']} --instances "
             f"{results['instances_per_study']} --series {results['series_per_study']} --repeat {results['repeat']}"
             + (f" --link {os.environ[link.INSIDE]}`" if link.INSIDE in os.environ else "`")
             + f" on {machine.get('date', '?')}, dicomfs {machine.get('dicomfs_commit', '?')}, "
             f"{machine.get('cpu', '?')} ({machine.get('nproc', '?')} CPUs), Orthanc {machine.get('orthanc', '?')} "
             f"(its environment as shipped), {results['link']}: {results['studies']} studies of "
             f"{cast(int, results['study_bytes']) / 1e6:.0f} MB ({results['instances_per_study']} instances in "
             f"{results['series_per_study']} series). Load average {machine['load_before']} before, "
             f"{machine['load_after']} after. Medians; spread of the per-repetition ratios in brackets.", "",
             "| dicomfs vs | time (throughput) | ratio | target | met |", "| --- | --- | --- | --- | --- |"]
    for label, times, ratio, target, met in rows(results):
        lines.append(f"| {label} | {times} | {ratio} | {target} | "
                     f"{'—' if met is None else 'yes' if met else '**no**'} |")
    lines += ["", "CPU time (user + system, medians):", "", "| process | CPU | per GB moved |", "| --- | --- | --- |",
              *cpu_rows(results), "",
              "Raw seconds per repetition: " + "; ".join(
                  f"{name[:-2]} {', '.join(f'{v:.2f}' for v in values)}" for name, values in samples.items()
                  if name.endswith("_s") and not name.endswith("_cpu_s")), "",
              "Outputs checked after the first repetition (data set bytes, sha256): " + "; ".join(
                  f"{name}: {text}" for name, text in checks.items()) + ".", "", end]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=2)
    parser.add_argument("--instances", type=int, default=160, help="instances per study (default 160)")
    parser.add_argument("--series", type=int, default=2, help="series per study (default 2)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--link", metavar="RATE", help="run on an emulated link of this rate (tc syntax: 1gbit)")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    status = link.reexec("bench.dimse", args.link)
    if status is not None:
        return status
    stop_on_sigterm()
    try:
        results = measure(args)
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped", file=sys.stderr)
        return 130
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw = RESULTS / ("dimse-link-latest.json" if args.link else "dimse-latest.json")
    raw.write_text(json.dumps(results, indent=2))
    block = render(results)
    print(block)
    if not args.no_doc:
        report.replace_block(DOC, block, *markers(bool(args.link)))
    return 0 if all(met is not False for *_, met in rows(results)) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
