"""Static DICOMweb benchmark: series metadata of a 1,500-instance series through nginx from a mount,
against the same metadata fetched from Orthanc directly.

    .venv/bin/python -m bench.dicomweb [--instances 1500] [--repeat 5] [--cached 10]

Builds one series of ``--instances`` CT images (pydicom's CT_small.dcm, ~100 attributes each,
with fresh UIDs), uploads it to a fresh loopback Orthanc, then, ``--repeat`` times and
alternating which goes first:

1. Orthanc direct: ``GET {dicom-web}/studies/<st>/series/<se>/metadata`` (Orthanc's own full
   metadata), the body read completely;
2. dicomfs, first request: a fresh mount (empty cache) of the same Orthanc, served by nginx with
   the documented config (docs/nginx/dicomweb.conf), ``GET {nginx}/dicomweb/studies/<st>/series/
   <se>/metadata`` — everything the first viewer request costs: lookups (QIDO), Orthanc's metadata,
   rendering to canonical JSON, gzip, FUSE and nginx;
3. dicomfs, cached: the same request ``--cached`` more times on that mount (median).

Both clients are the same httpx client in this process; the clock runs until the whole body has
arrived (gzip decoded for nginx), the JSON is parsed after it stops.
Every figure is a ratio to a baseline measured in the same run. Each dicomfs answer is checked:
1,500 instances, the same SOP Instance UIDs and key attribute values as Orthanc's answer.
Writes ``bench/results/dicomweb-latest.json`` and the block between ``bench-dicomweb:begin`` and
``bench-dicomweb:end`` in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from bench import report  # noqa: E402
from tests.mounting import Mount  # noqa: E402
from tests.nginx import serve_static_tree  # noqa: E402
from tests.servers import OrthancServer  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench-dicomweb:begin -->", "<!-- bench-dicomweb:end -->"
KEY_TAGS = ("00080016", "00080018", "0020000D", "0020000E", "00200013", "00280010", "00280011",
            "00200032", "00281050", "00100010")
TIMEOUT = 600.0


def build_series(count: int) -> tuple[str, str, list[bytes]]:
    import io

    path = pydicom.data.get_testdata_file("CT_small.dcm")
    assert isinstance(path, str)  # a path (read=False), never None: pydicom ships CT_small.dcm
    template = pydicom.dcmread(path)
    study, series = generate_uid(), generate_uid()
    files = []
    for number in range(1, count + 1):
        ds = template.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [0, 0, float(number)]
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        files.append(out.getvalue())
    return study, series, files


def timed_get(client: httpx.Client, url: str) -> tuple[float, list[dict[str, Any]]]:
    """Seconds until the whole body has arrived (decompressed, as a client reads it); the JSON is
    parsed after the clock stops (parsing costs the same on both sides, and is the client's)."""
    started = time.perf_counter()
    response = client.get(url, headers={"Accept": "application/dicom+json"})
    response.raise_for_status()
    body = response.content
    seconds = time.perf_counter() - started
    return seconds, json.loads(body)


def peak_rss_mib(pid: int | None) -> float:
    """The daemon's peak resident memory so far (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def check(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> bool:
    mine = {m["00080018"]["Value"][0]: m for m in ours}
    other = {m["00080018"]["Value"][0]: m for m in theirs}
    if set(mine) != set(other):
        return False
    return all(mine[sop].get(t, {}).get("Value") == other[sop].get(t, {}).get("Value")
               for sop in other for t in KEY_TAGS if t in other[sop])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=1500)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cached", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dicomfs-bench-dicomweb-"))
    work.chmod(0o755)  # nginx's workers (www-data) walk into the mount point below it
    samples: dict[str, list[float]] = {"orthanc": [], "first": [], "cached": []}
    checks: list[bool] = []
    try:
        study, series, files = build_series(args.instances)
        with OrthancServer(work / "orthanc") as server, httpx.Client(timeout=TIMEOUT) as client:
            server.upload(files)
            direct = f"{server.dicomweb}/studies/{study}/series/{series}/metadata"
            timed_get(client, direct)  # Orthanc's own first touch (database pages) is not ours to count
            for rep in range(args.repeat):
                mount = Mount(server.dicomweb, work / f"mnt{rep}", work / f"cache{rep}", "--allow-other")
                mount.start()
                try:
                    with serve_static_tree(mount.path) as base:
                        url = f"{base}/studies/{study}/series/{series}/metadata"
                        if rep % 2:
                            first, ours = timed_get(client, url)
                            orthanc, theirs = timed_get(client, direct)
                        else:
                            orthanc, theirs = timed_get(client, direct)
                            first, ours = timed_get(client, url)
                        cached = []
                        for _ in range(args.cached):
                            seconds, again = timed_get(client, url)
                            cached.append(seconds)
                        checks.append(check(ours, theirs) and again == ours and len(ours) == args.instances)
                        samples.setdefault("peak_rss_mib", []).append(peak_rss_mib(mount.pid))
                finally:
                    mount.stop()
                samples["orthanc"].append(orthanc)
                samples["first"].append(first)
                samples["cached"].append(statistics.median(cached))
                print(f"rep {rep + 1}: orthanc {orthanc:.3f} s, first {first:.3f} s, "
                      f"cached {statistics.median(cached) * 1000:.1f} ms", flush=True)
            version = report.orthanc_version(server)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {"machine": report.machine_facts(), "orthanc": version, "instances": args.instances,
               "repeat": args.repeat, "cached_requests": args.cached, "samples": samples, "checks": checks}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dicomweb-latest.json").write_text(json.dumps(results, indent=2))
    report.replace_block(DOC, render(results), BEGIN, END)
    print(render(results))
    return 0 if all(checks) else 1


def render(results: dict[str, Any]) -> str:
    s = results["samples"]
    orthanc, first, cached = (statistics.median(s[k]) for k in ("orthanc", "first", "cached"))
    per_rep = ", ".join(f"{f / o:.2f}" for f, o in zip(s["first"], s["orthanc"], strict=False))
    speedups = ", ".join(f"{f / c:.0f}" for f, c in zip(s["first"], s["cached"], strict=False))
    m = results["machine"]
    first_ratio, cached_ratio = first / orthanc, first / cached
    return "\n".join([
        BEGIN,
        f"Series metadata of one {results['instances']}-instance series (CT_small.dcm headers), "
        f"{results['repeat']} repetitions, medians; run {m['date']} on {m['nproc']} CPUs ({m['cpu']}), "
        f"Orthanc {results['orthanc']}, dicomfs {m['dicomfs_commit']}.",
        "",
        "| measure | seconds | ratio | target | met |",
        "|---|---|---|---|---|",
        f"| Orthanc direct (`/metadata`) | {orthanc:.3f} | 1 (baseline) | | |",
        f"| dicomfs + nginx, first request (fresh mount, empty cache) | {first:.3f} | "
        f"{first_ratio:.2f}× Orthanc (per repetition: {per_rep}) | ≤ 2× | {'yes' if first_ratio <= 2 else 'NO'} |",
        f"| dicomfs + nginx, repeated request (median of {results['cached_requests']}) | {cached:.4f} | "
        f"first / repeated = {cached_ratio:.0f}× (per repetition: {speedups}) | ≥ 10× | "
        f"{'yes' if cached_ratio >= 10 else 'NO'} |",
        f"| dicomfs daemon, peak resident memory (VmHWM) | {statistics.median(s['peak_rss_mib']):.0f} MiB | | | |",
        "",
        f"Every dicomfs answer checked against Orthanc's (SOP Instance UIDs, key attributes, "
        f"{results['instances']} entries, repeated answers identical): "
        f"{'all passed' if all(results['checks']) else 'FAILED in ' + str(results['checks'].count(False)) + ' runs'}.",
        END,
    ])


if __name__ == "__main__":
    raise SystemExit(main())
