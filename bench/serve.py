"""``dicomfs serve`` against Orthanc and against nginx over a mount, in one run.

    .venv/bin/python -m bench.serve [--instances 1500] [--frames 200] [--clients 8] [--repeat 5] [--no-doc]

One series of ``--instances`` secondary captures (128 KiB of pixels each) in an Orthanc started
here. ``--repeat`` interleaved repetitions (the order of the sides alternates), medians:

1. **Series metadata, first request**: a fresh ``dicomfs serve`` of the Orthanc (empty cache; the
   study's series listed first, untimed, as a viewer does) answers
   ``GET …/series/<se>/metadata`` vs the same request to Orthanc itself. Then **repeated**: the
   same request again to each (dicomfs answers from its memory), median of 5.
2. **Frames, warm**: ``--frames`` frame requests (frame 1 of that many instances) from
   ``--clients`` concurrent connections (``curl --parallel``), every frame requested once before,
   to ``dicomfs serve`` vs nginx with docs/nginx/dicomweb.conf serving the same frames from a
   dicomfs mount's ``dicomweb/`` tree (``tests/nginx.py``). Every answer is checked: status 200
   and the same number of bytes on both sides. Beside them, the floor of the server stack:
   ``bench/asgi_floor.py``, an ASGI app on hypercorn's trio worker that answers every request
   with the same bytes (as many as a frame) and does nothing else.

Raw figures: ``bench/results/serve-latest.json``; the ``bench-serve`` block of docs/benchmarks.md.
Needs root for nginx's workers to read the mount (``--allow-other``), like the nginx tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.mounts import DicomfsMount, run_timed, stop_on_sigterm  # noqa: E402
from bench.run import DOC, RESULTS, build_study  # noqa: E402
from tests.nginx import NginxServer  # noqa: E402
from tests.servers import DicomfsServe, OrthancServer, free_port, require_tools  # noqa: E402

PIXEL_BYTES = 128 << 10
JSON_ACCEPT = "Accept: application/dicom+json"
FRAME_ACCEPT = "Accept: multipart/related; type=application/octet-stream; transfer-syntax=*"
AGAIN = 5
BEGIN, END = "<!-- bench-serve:begin -->", "<!-- bench-serve:end -->"
TARGETS = {"first": "≤ 1.2×", "again": "≥ 20× faster", "frames": "≥ 0.8×"}


def curl(*args: str) -> tuple[float, str]:
    """One curl command: (wall seconds, what it wrote with -w). Raises on failure."""
    elapsed, status, out = run_timed(["curl", "-sS", "--no-progress-meter", "--fail", *args], capture=True, timeout=600)
    if status != 0:
        raise RuntimeError(f"curl {' '.join(args)[:200]} ... failed with status {status}")
    return elapsed, out


def metadata_request(root: str, study: str, series: str) -> tuple[float, int]:
    """The series metadata, gzip accepted (as browsers do): seconds, bytes decoded."""
    elapsed, out = curl("--compressed", "-H", JSON_ACCEPT, "-o", "/dev/null", "-w", "%{size_download}",
                        f"{root}/studies/{study}/series/{series}/metadata")
    return elapsed, int(out)


def frame_urls(root: str, study: str, series: str, sops: list[str]) -> list[str]:
    return [f"{root}/studies/{study}/series/{series}/instances/{sop}/frames/1" for sop in sops]


def frames_request(urls: list[str], clients: int) -> tuple[float, list[tuple[int, int]]]:
    """Every URL once, ``clients`` at a time: seconds, and (status, bytes) of each answer."""
    args = ["--parallel", "--parallel-max", str(clients), "-H", FRAME_ACCEPT, "-w", "%{http_code} %{size_download}\\n"]
    for url in urls:
        args += ["-o", "/dev/null", url]
    elapsed, out = curl(*args)
    answers = [tuple(int(x) for x in line.split()) for line in out.splitlines() if line.strip()]
    return elapsed, cast(list[tuple[int, int]], answers)  # two numbers a line: the -w format above


@contextlib.contextmanager
def asgi_floor(size: int) -> Iterator[str]:
    """``bench/asgi_floor.py`` answering every request with ``size`` bytes; yields a root URL."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "bench.asgi_floor", str(port), str(size)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != "listening":
            raise RuntimeError("bench/asgi_floor.py did not start")
        yield f"http://127.0.0.1:{port}/dicomweb"
    finally:
        process.terminate()
        process.wait(timeout=30)


class Bench:
    def __init__(self, work: Path, orthanc: OrthancServer, study: str, series: str, sops: list[str],
                 args: argparse.Namespace) -> None:
        self.work = work
        self.orthanc = orthanc
        self.study, self.series, self.sops = study, series, sops
        self.args = args
        self.samples: dict[str, list[float]] = {}
        self.checks: list[str] = []
        self.runs = 0

    def record(self, name: str, value: float) -> None:
        self.samples.setdefault(name, []).append(value)

    def metadata(self, number: int) -> None:
        self.runs += 1
        sides = ["orthanc", "serve"] if number % 2 else ["serve", "orthanc"]
        sizes = {}
        for side in sides:
            if side == "orthanc":
                first, sizes[side] = metadata_request(self.orthanc.dicomweb, self.study, self.series)
                again = [metadata_request(self.orthanc.dicomweb, self.study, self.series)[0] for _ in range(AGAIN)]
            else:
                with DicomfsServe(self.orthanc.dicomweb, self.work / f"serve-{self.runs}") as server:
                    curl("-H", JSON_ACCEPT, "-o", "/dev/null", f"{server.root}/studies/{self.study}/series")
                    first, sizes[side] = metadata_request(server.root, self.study, self.series)
                    again = [metadata_request(server.root, self.study, self.series)[0] for _ in range(AGAIN)]
                shutil.rmtree(self.work / f"serve-{self.runs}", ignore_errors=True)
            self.record(f"{side}_first_s", first)
            self.record(f"{side}_again_s", statistics.median(again))
        if sizes["serve"] < sizes["orthanc"] // 2:
            self.checks.append(f"series metadata from dicomfs is {sizes['serve']} bytes, Orthanc's {sizes['orthanc']}")

    def frames(self, number: int, serve_root: str, nginx_root: str, floor_root: str) -> None:
        sides = [("serve", serve_root), ("nginx", nginx_root), ("floor", floor_root)]
        sides = sides[number % 3:] + sides[:number % 3]
        got = {}
        for side, root in sides:
            elapsed, answers = frames_request(frame_urls(root, self.study, self.series, self.sops),
                                              self.args.clients)
            self.record(f"frames_{side}_s", elapsed)
            got[side] = answers
        for side, answers in got.items():  # (the floor answers anything: its sizes prove nothing)
            if len(answers) != len(self.sops) or any(status != 200 for status, _ in answers):
                self.checks.append(f"frames from {side}: {[a for a in answers if a[0] != 200][:3]}")
        if sorted(b for _, b in got["serve"]) != sorted(b for _, b in got["nginx"]):
            self.checks.append("frames from dicomfs serve and from nginx differ in size")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    require_tools("curl", "fusermount3")
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dicomfs-bench-serve-")))
        public = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dicomfs-bench-serve-mnt-")))
        public.chmod(0o755)  # (nginx's workers run as www-data and must reach the mount)
        orthanc = stack.enter_context(OrthancServer(work / "orthanc"))
        print(f"building a series of {args.instances} instances ...", flush=True)
        study = build_study(args.instances, 1, work / "original", orthanc, pixel_bytes=PIXEL_BYTES)
        series = next(iter(study.files)).split("/")[0]
        sops = sorted(name.split("/")[1].removesuffix(".dcm") for name in study.files)[:args.frames]
        bench = Bench(work, orthanc, study.uid, series, sops, args)
        for number in range(args.repeat):
            bench.metadata(number)
            s = bench.samples
            print(f"repetition {number + 1}: metadata first {s['serve_first_s'][-1]:.3f} s vs Orthanc "
                  f"{s['orthanc_first_s'][-1]:.3f} s; again {s['serve_again_s'][-1] * 1000:.1f} ms vs "
                  f"{s['orthanc_again_s'][-1] * 1000:.1f} ms", flush=True)
        mount = DicomfsMount(orthanc.dicomweb, public / "mnt", work / "mount-cache", work / "mount.log",
                             args=("--allow-other",))
        mount.start()
        stack.callback(mount.stop)
        nginx = stack.enter_context(NginxServer(work / "nginx", mount.path))
        server = stack.enter_context(DicomfsServe(orthanc.dicomweb, work / "serve-frames"))
        for root in (server.root, nginx.dicomweb):  # warm: every frame cut and kept once
            frames_request(frame_urls(root, study.uid, series, sops), args.clients)
        frame_size = frames_request(frame_urls(server.root, study.uid, series, sops[:1]), 1)[1][0][1]
        floor_root = stack.enter_context(asgi_floor(frame_size))
        for number in range(args.repeat):
            bench.frames(number, server.root, nginx.dicomweb, floor_root)
            s = bench.samples
            print(f"repetition {number + 1}: {len(sops)} frames, {args.clients} clients: dicomfs serve "
                  f"{s['frames_serve_s'][-1]:.3f} s vs nginx {s['frames_nginx_s'][-1]:.3f} s, hypercorn "
                  f"alone {s['frames_floor_s'][-1]:.3f} s", flush=True)
        facts = report.machine_facts()
        return {"when": facts["date"], "commit": facts["dicomfs_commit"], "cpu": facts["cpu"], "nproc": facts["nproc"],
                "orthanc": report.orthanc_version(orthanc), "instances": args.instances, "frames": len(sops),
                "clients": args.clients, "frame_bytes": PIXEL_BYTES, "repeat": args.repeat,
                "failed_checks": bench.checks, "samples": bench.samples}


def render(r: dict[str, Any]) -> str:
    s = r["samples"]
    med = {name: statistics.median(values) for name, values in s.items()}
    rate = r["frames"] / med["frames_serve_s"], r["frames"] / med["frames_nginx_s"]
    floor = r["frames"] / med["frames_floor_s"]
    rows = [
        "| measurement | dicomfs serve | baseline | ratio (spread) | target |", "|---|---|---|---|---|",
        f"| series metadata, {r['instances']} instances, first request | {med['serve_first_s']:.3f} s | Orthanc "
        f"{med['orthanc_first_s']:.3f} s | **{med['serve_first_s'] / med['orthanc_first_s']:.2f}×** "
        f"({report.ratio_spread(s, 'serve_first_s', 'orthanc_first_s')}) | {TARGETS['first']} |",
        f"| the same, repeated | {med['serve_again_s'] * 1000:.1f} ms | Orthanc {med['orthanc_again_s'] * 1000:.1f} ms"
        f" | **{med['orthanc_again_s'] / med['serve_again_s']:.0f}× faster** "
        f"({report.ratio_spread(s, 'serve_again_s', 'orthanc_again_s', invert=True)}) | {TARGETS['again']} |",
        f"| {r['frames']} frame requests, {r['clients']} clients, warm | {rate[0]:.0f} frames/s | nginx over a mount "
        f"{rate[1]:.0f} frames/s | **{rate[0] / rate[1]:.2f}×** "
        f"({report.ratio_spread(s, 'frames_serve_s', 'frames_nginx_s', invert=True)}) | {TARGETS['frames']} |",
        f"| the floor: the same requests to hypercorn (trio) answering every one with a frame's bytes, nothing else "
        f"| — | {floor:.0f} frames/s | **{floor / rate[1]:.2f}×** nginx "
        f"({report.ratio_spread(s, 'frames_floor_s', 'frames_nginx_s', invert=True)}) | — |",
    ]
    failed = "; ".join(r["failed_checks"])[:400]
    checks = f"FAILED CHECKS: {failed}" if failed else "every answer checked"
    note = (f"- run {r['when']}, dicomfs {r['commit']}, {r['cpu']} ({r['nproc']} CPUs), Orthanc {r['orthanc']}; one "
            f"series of {r['instances']} secondary captures with {r['frame_bytes'] // 1024} KiB of pixels; "
            f"{r['repeat']} interleaved repetitions, medians; {checks}.")
    return "\n".join([BEGIN, "", *rows, "", note, "", END])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=1500)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args(argv)
    stop_on_sigterm()
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = measure(args)
    (RESULTS / "serve-latest.json").write_text(json.dumps(result, indent=1))
    block = render(result)
    print(block)
    if not args.no_doc:
        report.replace_block(DOC, block, BEGIN, END)
    return 1 if result["failed_checks"] else 0


if __name__ == "__main__":
    sys.exit(main())
