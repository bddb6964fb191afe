"""Prefetch benchmark: ``dicomfs prefetch`` vs parallel curl, dicomweb-client and dicomtrolley.

    .venv/bin/python -m bench.prefetch [--studies 2] [--instances 160] [--series 2] [--repeat 3]

Builds ``--studies`` synthetic studies (``--instances`` secondary captures of ~0.5 MB each per
study, spread over ``--series`` series), uploads them to a fresh loopback Orthanc, then repeats,
interleaved and in rotating order, each tool downloading all the studies to disk (the same disk,
a fresh folder each time):

1. ``dicomfs prefetch URL STUDY...`` into an empty ``--cache-dir`` (default ``--jobs``);
2. raw parallel ``curl``: one WADO-RS series retrieve per series (stored bytes,
   ``transfer-syntax=*``), as many at once as prefetch's ``--jobs``, each to a file;
3. dicomweb-client (PyPI): ``retrieve_study`` per study, asking for the stored transfer syntax,
   every instance written with pydicom — the loop people script today;
4. dicomtrolley (PyPI): ``Trolley(WadoRS, QidoRS).download(StudyReference)`` per study into a
   folder, as its README shows.

Every figure is a ratio to its baseline from the same run. dicomfs's cache is checked afterwards
(``cache verify`` and ``prefetch --to`` compared file by file with the uploaded bytes); the
clients' files are hashed against the uploaded bytes too and the result is reported, not assumed.
Writes ``bench/results/prefetch-latest.json`` and the block between ``bench-prefetch:begin`` and
``bench-prefetch:end`` in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import cast

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import report
from bench.mounts import run_timed, stop_on_sigterm
from bench.run import STORED_ACCEPT, Study, build_study
from dicomfs.commands.options import DEFAULT_JOBS
from tests.servers import OrthancServer, require_tools

TIMEOUT = 1800.0
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench-prefetch:begin -->", "<!-- bench-prefetch:end -->"
TOOLS = ("dicomfs", "curl", "dicomweb_client", "dicomtrolley")
TARGETS = {"curl": ("≤ 1.25×", 1.25), "dicomweb_client": ("≤ 0.5×", 0.5), "dicomtrolley": ("≤ 0.5×", 0.5)}


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def command(tool: str, server: OrthancServer, studies: list[Study], out: Path, jobs: int) -> list[str]:
    uids = [s.uid for s in studies]
    if tool == "dicomfs":
        return python("-m", "dicomfs", "prefetch", server.dicomweb, *uids, "--cache-dir", str(out),
                      "--jobs", str(jobs))
    if tool == "curl":
        argv = ["curl", "-sS", "--fail", "--parallel", "--parallel-max", str(jobs), "--create-dirs",
                "-H", f"Accept: {STORED_ACCEPT}"]
        for number, path in enumerate(series_urls(studies)):
            argv += [f"{server.dicomweb}/{path}", "-o", str(out / f"series-{number}.multipart")]
        return argv
    return python("-m", "bench.clients", tool.replace("_", "-"), server.dicomweb, str(out), *uids)


def series_urls(studies: list[Study]) -> list[str]:
    return sorted({f"studies/{s.uid}/series/{name.split('/')[0]}" for s in studies for name in s.files})


def hashed_files(folder: Path) -> dict[str, str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest(): p.name for p in folder.rglob("*") if p.is_file()}


def identical_count(folder: Path, studies: list[Study]) -> int:
    """How many uploaded instances appear byte for byte among the files below ``folder`` (for
    curl's multipart bodies: among their parts)."""
    found = hashed_files(folder)
    for body in folder.glob("*.multipart"):
        found.update({hashlib.sha256(part).hexdigest(): body.name for part in multipart_parts(body.read_bytes())})
    return sum(1 for s in studies for _, digest in s.files.values() if digest in found)


def multipart_parts(body: bytes) -> list[bytes]:
    from dicomfs.multipart import MultipartParser, PartData, PartStart

    boundary = body[2:body.index(b"\r\n")]
    parser = MultipartParser(boundary)
    parts: list[bytes] = []
    for event in [*parser.feed(body)]:
        if isinstance(event, PartStart):
            parts.append(b"")
        elif isinstance(event, PartData):
            parts[-1] += event.data
    return parts


def check_dicomfs(server: OrthancServer, studies: list[Study], cache: Path, scratch: Path) -> dict[str, object]:
    verify_status = run_timed(python("-m", "dicomfs", "cache", "verify", "--cache-dir", str(cache)),
                              timeout=TIMEOUT)[1]
    out = scratch / "dicomfs-files"
    run_timed(python("-m", "dicomfs", "prefetch", server.dicomweb, *[s.uid for s in studies], "--cache-dir",
                     str(cache), "--to", str(out)), timeout=TIMEOUT)
    expected = {f"{s.uid}/{name}": digest for s in studies for name, (_, digest) in s.files.items()}
    got = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*.dcm")}
    shutil.rmtree(out)
    return {"verify_status": verify_status, "identical": sum(1 for k, v in expected.items() if got.get(k) == v),
            "expected": len(expected)}


def measure(args: argparse.Namespace) -> dict[str, object]:
    require_tools("curl")
    with contextlib.ExitStack() as cleanup:
        work = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="dicomfs-bench-prefetch-")))
        server = OrthancServer(work / "orthanc")
        cleanup.callback(server.stop)
        server.start()
        studies = []
        for number in range(args.studies):
            print(f"building study {number + 1}/{args.studies}: {args.instances} instances ...", flush=True)
            studies.append(build_study(args.instances, args.series, work / "files", server))
        total = sum(s.total_bytes for s in studies)
        samples: dict[str, list[float]] = {tool: [] for tool in TOOLS}
        checks: dict[str, object] = {}
        for repetition in range(args.repeat):
            order = TOOLS[repetition % len(TOOLS):] + TOOLS[: repetition % len(TOOLS)]
            print(f"repetition {repetition + 1}/{args.repeat}: {', '.join(order)}", flush=True)
            for tool in order:
                out = work / f"{tool}-{repetition}"
                seconds, status, _ = run_timed(command(tool, server, studies, out, args.jobs), timeout=TIMEOUT)
                if status != 0:
                    raise RuntimeError(f"{tool} exited with status {status}")
                samples[tool].append(seconds)
                if repetition == 0:
                    checks[tool] = (check_dicomfs(server, studies, out, work) if tool == "dicomfs"
                                    else {"identical": identical_count(out, studies),
                                          "expected": sum(len(s.files) for s in studies)})
                shutil.rmtree(out, ignore_errors=True)
        orthanc = report.orthanc_version(server)
    return {"machine": {**report.machine_facts(), "orthanc": orthanc}, "studies": args.studies,
            "instances_per_study": args.instances, "series_per_study": args.series, "repeat": args.repeat,
            "jobs": args.jobs, "total_bytes": total, "samples": samples, "checks": checks}


def rows(results: dict[str, object]) -> list[tuple[str, str, str, str, bool]]:
    samples = cast(dict[str, list[float]], results["samples"])
    ours = statistics.median(samples["dicomfs"])
    out = []
    for base, (target_text, target) in TARGETS.items():
        theirs = statistics.median(samples[base])
        ratio = ours / theirs
        spread = [a / b for a, b in zip(samples["dicomfs"], samples[base], strict=False)]
        out.append((base.replace("_", "-"), f"{ours:.2f} s vs {theirs:.2f} s",
                    f"{ratio:.2f}× ({min(spread):.2f}–{max(spread):.2f})", target_text, ratio <= target))
    return out


def render(results: dict[str, object]) -> str:
    machine = cast(dict[str, object], results["machine"])
    checks = cast(dict[str, dict[str, object]], results["checks"])
    total = cast(int, results["total_bytes"])
    lines = [BEGIN, "", f"Run of `python -m bench.prefetch --studies {results['studies']} --instances "
             f"{results['instances_per_study']} --series {results['series_per_study']} --repeat {results['repeat']}` "
             f"on {machine.get('date', '?')}, dicomfs {machine.get('dicomfs_commit', '?')}, {machine.get('cpu', '?')} "
             f"({machine.get('nproc', '?')} CPUs), Orthanc {machine.get('orthanc', '?')}: "
             f"{results['studies']} studies, {total / 1e6:.0f} MB stored; prefetch `--jobs {results['jobs']}`, "
             "curl as many at once. Medians; spread of the per-repetition ratios in brackets.", "",
             "| dicomfs prefetch vs | time | ratio | target | met |", "| --- | --- | --- | --- | --- |"]
    for name, times, ratio, target, met in rows(results):
        lines.append(f"| {name} | {times} | {ratio} | {target} | {'yes' if met else '**no**'} |")
    samples = cast(dict[str, list[float]], results["samples"])
    lines += ["", "Raw seconds per repetition: " + "; ".join(
        f"{tool.replace('_', '-')} {', '.join(f'{v:.2f}' for v in samples[tool])}" for tool in TOOLS), "",
        "Bytes checked against the uploads (sha256), first repetition: " + "; ".join(
        f"{tool.replace('_', '-')} {c['identical']}/{c['expected']} files identical"
        + (f", `cache verify` exit {c['verify_status']}" if "verify_status" in c else "")
        for tool, c in checks.items()) + ".", "", END]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=2)
    parser.add_argument("--instances", type=int, default=160, help="instances per study (default 160)")
    parser.add_argument("--series", type=int, default=2, help="series per study (default 2)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS)
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    try:
        results = measure(args)
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped", file=sys.stderr)
        return 130
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "prefetch-latest.json").write_text(json.dumps(results, indent=2))
    block = render(results)
    print(block)
    if not args.no_doc:
        report.replace_block(DOC, block, BEGIN, END)
    return 0 if all(met for *_, met in rows(results)) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
