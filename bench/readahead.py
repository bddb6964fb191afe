"""Readahead benchmark: a cold ``cp -r`` of a study with study readahead, without, and curl.

    .venv/bin/python -m bench.readahead [--series 4] [--instances 512] [--repeat 5] [--link 1gbit] [--no-doc]

One study of ``--instances`` secondary captures (0.5 MB each) in ``--series`` series, in an
Orthanc started here (``tests.servers.OrthancServer``). Interleaved repetitions, the order
rotating: a cold ``cp -r`` of the study through a fresh mount with an empty cache and the default
``--readahead study``; the same with ``--readahead series`` (each series fetched only when ``cp``
reaches it: what dicomfs did before); one ``curl`` of the whole study (a single WADO-RS retrieve,
stored bytes) to /dev/null. With ``--link RATE`` everything runs inside a network namespace whose
loopback has MTU 1500 and a ``tbf`` qdisc at RATE (``bench/link.py``; needs root). Every copy is
compared with the uploaded files (sha256). Writes ``bench/results/readahead-latest.json`` and the
``bench-readahead`` block of docs/benchmarks.md (one block per link).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import link, report  # noqa: E402
from bench.mounts import DicomfsMount, cpu_seconds, run_timed, stop_on_sigterm  # noqa: E402
from bench.run import COMMAND_TIMEOUT, DOC, PIXEL_BYTES, RESULTS, build_study, curl_study, verify_copy  # noqa: E402
from tests.servers import OrthancServer, require_tools  # noqa: E402


def markers(on_link: str | None) -> tuple[str, str]:
    name = f"bench-readahead-{on_link}" if on_link else "bench-readahead"
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--series", type=int, default=4)
    parser.add_argument("--instances", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--link", help="emulate a link of this rate (tc syntax, e.g. 1gbit); needs root")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args(argv)
    status = link.reexec("bench.readahead", args.link)
    if status is not None:
        return status
    stop_on_sigterm()
    require_tools("curl", "cp", "fusermount3")
    samples: dict[str, list[float]] = {}
    checks: list[bool] = []
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dicomfs-bench-readahead-")))
        server = stack.enter_context(OrthancServer(work / "orthanc"))
        study = build_study(args.instances, args.series, work / "original", server)
        runs = 0

        def copy(mode: str) -> None:
            nonlocal runs
            runs += 1
            base = work / f"run{runs}"
            mount = DicomfsMount(server.dicomweb, base / "mnt", base / "cache", base / "dicomfs.log",
                                 args=("--readahead", mode))
            mount.start()
            try:
                target = base / "copy"
                cpu = cpu_seconds(mount.pid)
                wall, code, _ = run_timed(["cp", "-r", str(mount.path / "studies" / study.uid), str(target)],
                                          timeout=COMMAND_TIMEOUT)
                samples.setdefault(f"{mode}_cpu_s", []).append(cpu_seconds(mount.pid) - cpu)
                verified = verify_copy(target, study, work / "original" / study.uid)
                checks.append(code == 0 and verified["identical"] == verified["expected"]
                              and verified["extra_count"] == 0)
                samples.setdefault(f"{mode}_s", []).append(wall)
            finally:
                mount.stop()
                shutil.rmtree(base, ignore_errors=True)

        steps: list[Callable[[], None]] = [lambda: copy("study"), lambda: copy("series"),
                                           lambda: samples.setdefault("curl_s", []).append(curl_study(server, study))]
        for rep in range(args.repeat):
            for step in steps[rep % 3:] + steps[:rep % 3]:
                step()
            print(f"repetition {rep + 1}: study readahead {samples['study_s'][-1]:.2f} s, series only "
                  f"{samples['series_s'][-1]:.2f} s, curl {samples['curl_s'][-1]:.2f} s", flush=True)
        facts = report.machine_facts()
        results: dict[str, Any] = {
            "when": facts["date"], "commit": facts["dicomfs_commit"], "cpu": facts["cpu"], "nproc": facts["nproc"],
            "link": link.describe(os.environ.get(link.INSIDE)), "series": args.series,
            "instances": args.instances, "study_bytes": study.total_bytes, "repeat": args.repeat,
            "all_identical": all(checks), "samples": samples}
    RESULTS.mkdir(parents=True, exist_ok=True)
    on_link = os.environ.get(link.INSIDE)
    (RESULTS / f"readahead{'-' + on_link if on_link else ''}-latest.json").write_text(json.dumps(results, indent=1))
    block = render(results, *markers(on_link))
    print(block)
    if not args.no_doc:
        report.replace_block(DOC, block, *markers(on_link))
    return 0 if results["all_identical"] else 1


def render(results: dict[str, Any], begin: str, end: str) -> str:
    s = results["samples"]
    mb = results["study_bytes"] / 1e6
    med = {name: statistics.median(values) for name, values in s.items()}

    def row(what: str, name: str, target: str) -> str:
        return (f"| {what} | {med[name]:.2f} s ({mb / med[name]:.0f} MB/s) | {med['curl_s']:.2f} s "
                f"({mb / med['curl_s']:.0f} MB/s) | **{med[name] / med['curl_s']:.2f}×** "
                f"({report.ratio_spread(s, name, 'curl_s')}) | {target} |")

    return "\n".join([
        begin, "",
        f"Run {results['when']}, dicomfs {results['commit']}, {results['cpu']} ({results['nproc']} CPUs), "
        f"{results['link']}: one study of {results['instances']} instances × {PIXEL_BYTES // 1024} KiB in "
        f"{results['series']} series ({mb:.0f} MB) in Orthanc; {results['repeat']} interleaved repetitions, "
        "medians (the spread is the range of the per-repetition ratios). Every copy byte-identical to the "
        f"uploads: {'yes' if results['all_identical'] else 'NO'}.", "",
        "| cold `cp -r` of the study | dicomfs | curl of the study | ratio (spread) | target |",
        "|---|---|---|---|---|",
        row("`--readahead study` (default)", "study_s", "≤ 1.05×" if "1gbit" in results["link"] else "≤ 2.5×"),
        row("`--readahead series` (as before)", "series_s", "—"),
        "",
        f"Daemon CPU per cold copy: {med['study_cpu_s']:.2f} s with study readahead "
        f"({med['study_cpu_s'] / (results['study_bytes'] / 1e9):.2f} s/GB), {med['series_cpu_s']:.2f} s without.",
        "", end])


def rerender(path: Path) -> None:
    """Write the block of a saved run again (``python -c 'from bench.readahead import rerender; …'``)."""
    results = json.loads(path.read_text())
    on_link = results["link"].rsplit("tbf ", 1)[1] if "tbf " in results["link"] else None
    report.replace_block(DOC, render(results, *markers(on_link)), *markers(on_link))


if __name__ == "__main__":
    sys.exit(main())
