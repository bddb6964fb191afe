"""At the wire: dicomfs against curl on loopback and on emulated 1 and 10 Gbit/s links, in one run.

    .venv/bin/python -m bench.wire [--links loopback,1gbit,10gbit] [--studies 3] [--series 4]
                                   [--instances 512] [--repeat 5] [--no-doc]

An archive of ``--studies`` studies of ``--instances`` 1 MiB secondary captures in ``--series``
series each (default 3 × 4 × 128 × 1 MiB, 1.6 GB) in an Orthanc started here. For each link, in
turn: ``loopback`` runs as is; a rate (tc syntax) re-executes this module inside a fresh network
namespace whose loopback has MTU 1500 and a ``tbf`` qdisc at that rate (``bench/link.py``; Orthanc,
the mounts, curl and the baselines all run inside it; the namespace is deleted afterwards). A rate
needs root: without it that link is reported as not run, with the reason.

Per link, ``--repeat`` interleaved repetitions (the order of the steps rotates), medians:

1. cold ``cp -r`` of one study (the next one each repetition) through a fresh mount with an
   empty cache vs one ``curl`` WADO-RS retrieve of that study (stored bytes) to /dev/null;
2. ``dicomfs prefetch`` of every study, ``--jobs 4``, empty cache vs ``curl --parallel
   --parallel-max 4`` of every series to files; and ``dicomfs prefetch`` of the one study vs the
   curl of step 1 (start-up included: the whole command);
3. the daemon's CPU (user + system) per GB of the cold copy, and the prefetch process's, beside
   curl's for the same bytes (on an emulated link the kernel's per-packet work is charged partly
   to the receiving process: curl pays it too);
4. warm re-read: ``cat`` of every file of the study through a fresh mount of the cache the cold
   copy filled vs the same files through ``bench/passthrough.py`` (a minimal pyfuse3 passthrough),
   both with their backing files in the page cache; ``WARM_PAIRS`` pairs per repetition, the side
   that goes first alternating (one pair's ratio moved by a tenth either way between runs);
5. peak RSS (VmHWM) of every daemon, and the prefetch's maximum RSS;
6. the floors, where a target is out of reach for any pyfuse3 filesystem here: ``cp -r`` of the
   study through ``bench/passthrough.py`` with every byte already local (in the page cache) — no
   wire, no cache, nothing to wait for — the same copy while ``curl`` writes the study to a file
   from the server, both started at once (the work of a cold copy, receiving and storing the bytes
   and serving them through FUSE, done by curl and the passthrough on the same cores: what the
   cold copy could take at best), the same with ``curl`` asking the server what dicomfs asks (the
   series listing, each series' instance listing, each series: what this design costs the
   server), and the passthrough's CPU per GB while it serves the warm re-read (the CPU a daemon
   spends serving alone, before it receives or stores a byte).

Every cold copy is compared with the uploaded files (sha256), every prefetch's cache with
``dicomfs cache verify``. Raw figures: ``bench/results/wire-<link>-latest.json``; the
``bench-wire`` block of docs/benchmarks.md is rendered from every link's latest file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import link, report  # noqa: E402
from bench.mounts import DicomfsMount, PassthroughMount, cpu_seconds, memory_kib, run_timed, stop_on_sigterm  # noqa: E402
from bench.prefetch import command as prefetch_command  # noqa: E402
from bench.run import (  # noqa: E402
    COMMAND_TIMEOUT,
    DOC,
    RESULTS,
    STORED_ACCEPT,
    Study,
    build_study,
    curl_study,
    passthrough_copy,
    read_all,
    verify_copy,
)
from tests.servers import OrthancServer, require_tools  # noqa: E402

PIXEL_BYTES = 1 << 20
JOBS = 4
WARM_PAIRS = 3  # warm re-reads of each side per repetition
WarmSide = tuple[str, Callable[[], DicomfsMount | PassthroughMount], str]  # sample name, mount, folder below it
BEGIN, END = "<!-- bench-wire:begin -->", "<!-- bench-wire:end -->"
LINKS = ("loopback", "1gbit", "10gbit")


class Targets(TypedDict):
    """measurement -> {link kind: target}, or one target for every link"""

    cold: dict[str, str]
    prefetch: dict[str, str]
    one: dict[str, str]
    cpu: str
    warm: str
    rss: str


TARGETS: Targets = {  # measurement -> {link kind: target}
    "cold": {"1gbit": "≤ 1.05×", "fast": "≤ 2.5×"},
    "prefetch": {"1gbit": "≤ 1.03×", "fast": "≤ 1.6×"},
    "one": {"1gbit": "≤ 1.05×", "fast": "—"},
    "cpu": "≤ 1.2 s/GB",
    "warm": "≥ 0.9×",
    "rss": "≤ 150 MB",
}


def rusage_children() -> tuple[float, int]:
    """CPU seconds and the largest maximum RSS (KiB) of the waited-for children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss


class Wire:
    def __init__(self, work: Path, server: OrthancServer, studies: list[Study]) -> None:
        self.work = work
        self.server = server
        self.studies = studies
        self.samples: dict[str, list[float]] = {}
        self.checks: list[str] = []  # what failed a check
        self.peak_rss_kib = 0
        self.runs = 0

    def record(self, name: str, value: float) -> None:
        self.samples.setdefault(name, []).append(value)

    def fresh(self, name: str) -> Path:
        self.runs += 1
        path = self.work / f"{name}-{self.runs}"
        path.mkdir(parents=True)
        return path

    def mount(self, base: Path, cache: Path) -> DicomfsMount:
        mount = DicomfsMount(self.server.dicomweb, base / "mnt", cache, base / "dicomfs.log")
        mount.start()
        return mount

    def stopped(self, mount: DicomfsMount) -> None:
        if mount.pid is not None:
            self.peak_rss_kib = max(self.peak_rss_kib, memory_kib(mount.pid).get("VmHWM", 0))
        mount.stop()

    def cold_and_warm(self, study: Study) -> None:
        base = self.fresh("cold")
        cache = base / "cache"
        mount = self.mount(base, cache)
        try:
            cpu = cpu_seconds(mount.pid)
            wall, status, _ = run_timed(["cp", "-r", str(mount.path / "studies" / study.uid), str(base / "copy")],
                                        timeout=COMMAND_TIMEOUT)
            self.record("cold_cpu_s_per_gb", (cpu_seconds(mount.pid) - cpu) / (study.total_bytes / 1e9))
        finally:
            self.stopped(mount)
        self.record("cold_s", wall)
        verified = verify_copy(base / "copy", study, self.work / "original" / study.uid)
        if status != 0 or verified["identical"] != verified["expected"] or verified["extra_count"]:
            self.checks.append(f"cold copy of {study.uid}: status {status}, {verified}")
        shutil.rmtree(base / "copy")
        self.warm(base, cache, study)
        shutil.rmtree(base, ignore_errors=True)

    def warm(self, base: Path, cache: Path, study: Study) -> None:
        """Re-read the study through a fresh mount of the cache just filled, and the originals
        through the passthrough, the backing files of both in the page cache."""
        read_all(cache)
        original = self.work / "original"
        read_all(original / study.uid)
        sides: list[WarmSide] = [
            ("warm_dicomfs_s", lambda: self.mount(base / "warm", cache), "studies/" + study.uid),
            ("warm_passthrough_s", lambda: PassthroughMount(original, base / "pass", base / "pass.log"), study.uid)]
        for pair in range(WARM_PAIRS):
            self.warm_pair(study, sides[::-1] if (self.runs + pair) % 2 else sides)

    def warm_pair(self, study: Study, sides: list[WarmSide]) -> None:
        """One warm re-read on each side, in the order given."""
        for name, make, below in sides:
            mount = make()
            if isinstance(mount, PassthroughMount):
                mount.start()
            try:
                cpu = cpu_seconds(mount.pid)
                self.record(name, read_all(mount.path / below))
                gigabytes = study.total_bytes / 1e9
                self.record(name.removesuffix("_s") + "_cpu_s_per_gb", (cpu_seconds(mount.pid) - cpu) / gigabytes)
            finally:
                if isinstance(mount, DicomfsMount):
                    self.stopped(mount)
                else:
                    mount.stop()

    def floor(self, study: Study) -> None:
        """``cp -r`` of the study's original files through the passthrough, all in the page cache;
        and the same copy while ``curl`` fetches the study from the server, both at once: the work
        of a cold copy (receive and store, serve through FUSE) done by curl and the passthrough on
        the same cores. ``curl`` fetches it in one request (``floor_both_s``), or asks what dicomfs
        asks (``floor_asked_s``: the study's series listed, then each series' instances, then each
        series, one after another on one connection)."""
        base = self.fresh("floor")
        root = f"{self.server.dicomweb}/studies/{study.uid}"
        series = sorted({name.split("/")[0] for name in study.files})
        whole = ["curl", "-sS", "--fail", "-H", f"Accept: {STORED_ACCEPT}", "-o", str(base / "study.multipart"), root]
        asked = ["curl", "-sS", "--fail", "-o", "/dev/null", f"{root}/series"]
        for uid in series:
            asked += ["-o", "/dev/null", f"{root}/series/{uid}/instances"]
        asked += ["--next", "-sS", "--fail", "-H", f"Accept: {STORED_ACCEPT}"]
        for uid in series:
            asked += ["-o", str(base / f"{uid}.multipart"), f"{root}/series/{uid}"]
        sides = [("floor_cp_s", None), ("floor_both_s", whole), ("floor_asked_s", asked)]
        for name, alongside in sides[self.runs % 3:] + sides[:self.runs % 3]:
            wall, status = passthrough_copy(self.work / "original" / study.uid, base, alongside)
            received = sum(p.stat().st_size for p in base.glob("*.multipart"))
            if status != 0 or (alongside and received < study.total_bytes):
                self.checks.append(f"floor copy of {study.uid} ({name}): status {status}, {received} bytes received")
            self.record(name, wall)
            for path in base.glob("*.multipart"):
                path.unlink()
        shutil.rmtree(base, ignore_errors=True)

    def curl(self, study: Study) -> None:
        cpu, _ = rusage_children()
        self.record("curl_s", curl_study(self.server, study))
        self.record("curl_cpu_s_per_gb", (rusage_children()[0] - cpu) / (study.total_bytes / 1e9))

    def prefetch(self, studies: list[Study] | None = None) -> None:
        """``dicomfs prefetch`` of every study (or of ``studies``: ``prefetch_one_s``)."""
        out = self.fresh("prefetch")
        cpu, _ = rusage_children()
        wall, status, _ = run_timed(prefetch_command("dicomfs", self.server, studies or self.studies, out / "cache",
                                                     JOBS), timeout=COMMAND_TIMEOUT, cwd=ROOT)
        spent, max_rss = rusage_children()
        self.peak_rss_kib = max(self.peak_rss_kib, max_rss)
        if studies:
            self.record("prefetch_one_s", wall)
        else:
            self.record("prefetch_s", wall)
            self.record("prefetch_cpu_s_per_gb", (spent - cpu) / (self.total_bytes / 1e9))
        verify = run_timed([sys.executable, "-m", "dicomfs", "cache", "verify", "--cache-dir", str(out / "cache")],
                           timeout=COMMAND_TIMEOUT, cwd=ROOT)[1]
        if status != 0 or verify != 0:
            self.checks.append(f"prefetch: status {status}, cache verify status {verify}")
        shutil.rmtree(out, ignore_errors=True)

    def parallel_curl(self) -> None:
        out = self.fresh("curl-all")
        cpu, _ = rusage_children()
        wall, status, _ = run_timed(prefetch_command("curl", self.server, self.studies, out, JOBS),
                                    timeout=COMMAND_TIMEOUT)
        self.record("curl_all_cpu_s_per_gb", (rusage_children()[0] - cpu) / (self.total_bytes / 1e9))
        got = sum(p.stat().st_size for p in out.glob("*.multipart"))
        if status != 0 or got < self.total_bytes:
            self.checks.append(f"parallel curl: status {status}, {got} bytes")
        self.record("curl_all_s", wall)
        shutil.rmtree(out, ignore_errors=True)

    @property
    def total_bytes(self) -> int:
        return sum(s.total_bytes for s in self.studies)

    def repetition(self, number: int) -> None:
        study = self.studies[number % len(self.studies)]
        steps: list[Callable[[], None]] = [lambda: self.cold_and_warm(study), lambda: self.curl(study), self.prefetch,
                                           self.parallel_curl, lambda: self.prefetch([study]),
                                           lambda: self.floor(study)]
        for step in steps[number % len(steps):] + steps[:number % len(steps)]:
            step()


def measure(args: argparse.Namespace, on_link: str) -> dict[str, Any]:
    require_tools("curl", "cp", "fusermount3")
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dicomfs-bench-wire-")))
        server = stack.enter_context(OrthancServer(work / "orthanc"))
        studies = []
        for number in range(args.studies):
            print(f"[{on_link}] building study {number + 1}/{args.studies} ...", flush=True)
            studies.append(build_study(args.instances, args.series, work / "original", server,
                                       pixel_bytes=PIXEL_BYTES))
        wire = Wire(work, server, studies)
        for number in range(args.repeat):
            wire.repetition(number)
            s = wire.samples
            print(f"[{on_link}] repetition {number + 1}: cold cp {s['cold_s'][-1]:.2f} s vs curl "
                  f"{s['curl_s'][-1]:.2f} s; prefetch {s['prefetch_s'][-1]:.2f} s vs curl x{JOBS} "
                  f"{s['curl_all_s'][-1]:.2f} s", flush=True)
        facts = report.machine_facts()
        return {"when": facts["date"], "commit": facts["dicomfs_commit"], "cpu": facts["cpu"],
                "nproc": facts["nproc"], "link": on_link, "link_description": link.describe(
                    None if on_link == "loopback" else on_link),
                "studies": args.studies, "series": args.series, "instances": args.instances,
                "study_bytes": studies[0].total_bytes, "total_bytes": wire.total_bytes, "repeat": args.repeat,
                "failed_checks": wire.checks, "peak_rss_mib": wire.peak_rss_kib / 1024, "samples": wire.samples}


def curl_cpu(samples: dict[str, list[float]], name: str) -> str:
    return f"{statistics.median(samples[name]):.2f}" if name in samples else "—"


def result_file(on_link: str) -> Path:
    return RESULTS / f"wire-{on_link}-latest.json"


def render() -> str:
    rows = ["| link | measurement | dicomfs | baseline | ratio (spread) | target |", "|---|---|---|---|---|---|"]
    notes: list[str] = []
    for on_link in LINKS:
        path = result_file(on_link)
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        if "not_run" in r:
            notes.append(f"{on_link}: not run ({r['not_run']}).")
            continue
        s = r["samples"]
        med = {name: statistics.median(values) for name, values in s.items()}
        kind = "1gbit" if on_link == "1gbit" else "fast"
        study_mb, total_mb = r["study_bytes"] / 1e6, r["total_bytes"] / 1e6
        rows += [
            f"| {on_link} | cold `cp -r` of a study ({study_mb:.0f} MB) | {med['cold_s']:.2f} s | curl "
            f"{med['curl_s']:.2f} s | **{med['cold_s'] / med['curl_s']:.2f}×** "
            f"({report.ratio_spread(s, 'cold_s', 'curl_s')}) | {TARGETS['cold'][kind]} |",
            *([f"| {on_link} | the floor: `cp -r` of the study through the pyfuse3 passthrough, every byte local "
               f"| {med['floor_cp_s']:.2f} s | curl {med['curl_s']:.2f} s | {med['floor_cp_s'] / med['curl_s']:.2f}× "
               f"({report.ratio_spread(s, 'floor_cp_s', 'curl_s')}) | — |"] if "floor_cp_s" in s else []),
            *([f"| {on_link} | the floor of a cold copy: that `cp -r` while `curl` writes the study to a file "
               f"from the server, both at once (the same work: receive and store, serve through FUSE) "
               f"| {med['floor_both_s']:.2f} s | curl {med['curl_s']:.2f} s | "
               f"{med['floor_both_s'] / med['curl_s']:.2f}× "
               f"({report.ratio_spread(s, 'floor_both_s', 'curl_s')}) | — |"] if "floor_both_s" in s else []),
            *([f"| {on_link} | the same, `curl` asking what dicomfs asks (the series listing, each series' "
               f"instances, each series, one after another) | {med['floor_asked_s']:.2f} s | "
               f"curl {med['curl_s']:.2f} s | {med['floor_asked_s'] / med['curl_s']:.2f}× "
               f"({report.ratio_spread(s, 'floor_asked_s', 'curl_s')}) | — |"] if "floor_asked_s" in s else []),
            f"| {on_link} | `prefetch --jobs {JOBS}` of all ({total_mb:.0f} MB) | {med['prefetch_s']:.2f} s | "
            f"curl ×{JOBS} {med['curl_all_s']:.2f} s | **{med['prefetch_s'] / med['curl_all_s']:.2f}×** "
            f"({report.ratio_spread(s, 'prefetch_s', 'curl_all_s')}) | {TARGETS['prefetch'][kind]} |",
            f"| {on_link} | `prefetch` of one study | {med['prefetch_one_s']:.2f} s | curl {med['curl_s']:.2f} s | "
            f"**{med['prefetch_one_s'] / med['curl_s']:.2f}×** ({report.ratio_spread(s, 'prefetch_one_s', 'curl_s')}) "
            f"| {TARGETS['one'][kind]} |",
            f"| {on_link} | CPU per GB, cold copy (daemon) / prefetch | {med['cold_cpu_s_per_gb']:.2f} / "
            f"{med['prefetch_cpu_s_per_gb']:.2f} s | curl {curl_cpu(s, 'curl_cpu_s_per_gb')} / "
            f"{curl_cpu(s, 'curl_all_cpu_s_per_gb')} s | — | {TARGETS['cpu']} |",
            *([f"| {on_link} | the floor: CPU per GB serving the warm re-read, dicomfs / the passthrough | "
               f"{med['warm_dicomfs_cpu_s_per_gb']:.2f} s | {med['warm_passthrough_cpu_s_per_gb']:.2f} s | — | — |",
               f"| {on_link} | the floor: CPU per GB to receive, store and serve (curl writing the bytes to files "
               f"+ the passthrough serving them) | {med['cold_cpu_s_per_gb']:.2f} s (the cold copy) | "
               f"{med['curl_all_cpu_s_per_gb'] + med['warm_passthrough_cpu_s_per_gb']:.2f} s | — | — |"]
              if "warm_passthrough_cpu_s_per_gb" in s and "curl_all_cpu_s_per_gb" in s else []),
            f"| {on_link} | warm re-read of the study, throughput | {study_mb / med['warm_dicomfs_s']:.0f} MB/s | "
            f"passthrough {study_mb / med['warm_passthrough_s']:.0f} MB/s | "
            f"**{med['warm_passthrough_s'] / med['warm_dicomfs_s']:.2f}×** "
            f"({report.ratio_spread(s, 'warm_dicomfs_s', 'warm_passthrough_s', invert=True)}) | {TARGETS['warm']} |",
            f"| {on_link} | peak RSS, daemons and prefetch | {r['peak_rss_mib']:.0f} MiB | — | — | {TARGETS['rss']} |",
        ]
        checks = "every copy byte-identical, every prefetch cache verified" if not r["failed_checks"] \
            else "FAILED CHECKS: " + "; ".join(r["failed_checks"])[:400]
        notes.append(f"{on_link}: {r['link_description']}; run {r['when']}, dicomfs {r['commit']}, {r['cpu']} "
                     f"({r['nproc']} CPUs); {r['studies']} studies × {r['series']} series × "
                     f"{r['instances'] // r['series']} instances × 1 MiB; {r['repeat']} interleaved repetitions, "
                     f"medians; {checks}.")
    return "\n".join([BEGIN, "", *rows, "", *[f"- {note}" for note in notes], "", END])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--links", default=",".join(LINKS), help="comma-separated: loopback and/or tc rates")
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--series", type=int, default=4)
    parser.add_argument("--instances", type=int, default=512, help="per study")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args(argv)
    inside = os.environ.get(link.INSIDE)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if inside is not None:  # re-executed on one link: measure it, and only it
        stop_on_sigterm()
        result_file(inside).write_text(json.dumps(measure(args, inside), indent=1))
        return 0
    status = 0
    for on_link in args.links.split(","):
        if on_link == "loopback":
            stop_on_sigterm()
            result_file(on_link).write_text(json.dumps(measure(args, on_link), indent=1))
            continue
        if os.geteuid() != 0:
            reason = "emulating a link needs root (ip netns, tc)"
            print(f"{on_link}: not run: {reason}", file=sys.stderr)
            result_file(on_link).write_text(json.dumps({"link": on_link, "not_run": reason}))
            status = 1
            continue
        code = link.run_on_link(on_link, [sys.executable, "-m", "bench.wire", *sys.argv[1:]])
        if code != 0:
            print(f"{on_link}: the run on the link failed (status {code})", file=sys.stderr)
            status = 1
    block = render()
    print(block)
    if not args.no_doc:
        report.replace_block(DOC, block, BEGIN, END)
    failed = any(json.loads(result_file(x).read_text()).get("failed_checks") for x in args.links.split(",")
                 if result_file(x).exists())
    return 1 if failed else status


if __name__ == "__main__":
    sys.exit(main())
