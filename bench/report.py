"""Turning the benchmark's raw samples into a table, a markdown report block, and profile summaries."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
MB = 1_000_000


@dataclass
class Row:
    measure: str
    ours: str
    baseline: str
    ratio: str
    target: str
    passed: bool | None  # None: informative only


# --- facts ----------------------------------------------------------------------------------
def _command(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


def machine_facts() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    root = Path(__file__).resolve().parents[1]
    commit = _command(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    try:
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "dicomfs"],
                               capture_output=True, text=True, timeout=30, check=False).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        dirty = []
    changed = sorted(line[3:] for line in dirty if line.strip())
    import pyfuse3
    import trio

    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(), "pyfuse3": pyfuse3.__version__, "trio": trio.__version__,
        "curl": _command(["curl", "--version"]).split(" (")[0], "rclone": _command(["rclone", "version"]),
        "fuse": _command(["fusermount3", "--version"]),
        "dicomfs_commit": commit + (f" + uncommitted changes to {', '.join(changed)}" if changed else ""),
    }


def orthanc_version(server: Any) -> str:
    try:
        with urllib.request.urlopen(f"{server.url}/system", timeout=10) as response:
            return str(json.loads(response.read()).get("Version", "?"))
    except OSError:
        return "?"


# --- rows -----------------------------------------------------------------------------------
def median_of(samples: dict[str, list[float]], name: str) -> float:
    return statistics.median(samples[name])


def ratio_spread(samples: dict[str, list[float]], ours: str, base: str, invert: bool = False) -> str:
    ratios = [(b / a if invert else a / b) for a, b in zip(samples[ours], samples[base], strict=False)]
    return f"{min(ratios):.2f}–{max(ratios):.2f}"


def seconds_text(samples: dict[str, list[float]], name: str, size: int | None = None) -> str:
    value = median_of(samples, name)
    text = f"{value:.3f} s"
    return f"{text} ({size / value / MB:.0f} MB/s)" if size else text


def rows(results: dict[str, Any]) -> list[Row]:
    s, size = results["samples"], results["study_bytes"]
    out = []
    cold, curl, rclone = (median_of(s, n) for n in ("dicomfs_cold_s", "curl_s", "rclone_cold_s"))
    ratio = cold / curl
    out.append(Row("1. cold `cp -r` of the study: dicomfs vs curl (one WADO-RS study retrieve)",
                   seconds_text(s, "dicomfs_cold_s", size), seconds_text(s, "curl_s", size),
                   f"{ratio:.2f}× (per run {ratio_spread(s, 'dicomfs_cold_s', 'curl_s')})", "≤ 1.5×", ratio <= 1.5))
    ratio = cold / rclone
    out.append(Row("2. cold `cp -r` of the study: dicomfs vs rclone mount of Orthanc WebDAV",
                   seconds_text(s, "dicomfs_cold_s", size), seconds_text(s, "rclone_cold_s", size),
                   f"{ratio:.2f}× (per run {ratio_spread(s, 'dicomfs_cold_s', 'rclone_cold_s')})", "≤ 0.3×",
                   ratio <= 0.3))
    for key, label in (("dropped", "after drop_caches"), ("hot", "backing files in page cache")):
        ours, base = f"dicomfs_warm_{key}_s", f"passthrough_warm_{key}_s"
        if ours not in s:
            continue
        ratio = median_of(s, base) / median_of(s, ours)  # throughput ratio
        number = "3" if key == "dropped" else "3b"
        out.append(Row(f"{number}. warm re-read (`cat` all files, fresh mount, {label}): "
                       "dicomfs vs pyfuse3 passthrough, throughput",
                       seconds_text(s, ours, size), seconds_text(s, base, size),
                       f"{ratio:.2f}× (per run {ratio_spread(s, ours, base, invert=True)})", "≥ 0.8×", ratio >= 0.8))
    hwm = results["peak_hwm_kib"] / 1024
    out.append(Row("4. dicomfs daemon peak memory (max VmHWM over all daemons; max sampled VmRSS)",
                   f"{hwm:.0f} MiB (VmRSS {results['peak_rss_kib'] / 1024:.0f} MiB)", "—", "—", "≤ 150 MB",
                   hwm * 2**20 / MB <= 150))
    out.append(Row("dicomfs mount time (`dicomfs mount` until it returns, cold cache)",
                   seconds_text(s, "dicomfs_cold_mount_s"), "—", "—", "—", None))
    if "local_cp_s" in s:
        out.append(Row("for scale: `cp -r` of the same files from local disk (page cache) to tmpfs, no FUSE",
                       seconds_text(s, "local_cp_s", size), seconds_text(s, "curl_s", size),
                       f"{median_of(s, 'local_cp_s') / curl:.2f}×", "—", None))
    if "dicomfs_cold_ls_s" in s:
        out.append(Row("cold `ls -R` of the study on a fresh dicomfs mount (QIDO listings only; part of row 1)",
                       seconds_text(s, "dicomfs_cold_ls_s"), "—", "—", "—", None))
    for name, label in (("diagnose_httpx_raw_s", "httpx streaming the series retrieves to nowhere"),
                        ("diagnose_fetch_series_s", "+ multipart parsing and naming (fetch_series, bytes dropped)"),
                        ("diagnose_blobstore_s", "+ writing the cache blobs (BlobStore.open_instance of all)")):
        if name in s:
            out.append(Row(f"diagnosis, no FUSE: {label}", seconds_text(s, name, size), seconds_text(s, "curl_s", size),
                           f"{median_of(s, name) / curl:.2f}×", "—", None))
    out.append(Row("rclone mount time (until the mount appears)", seconds_text(s, "rclone_mount_s"), "—", "—", "—",
                   None))
    out.append(Row("bytes dicomfs's `cp -r` produced vs uploaded", verification(results, "dicomfs"), "—", "—",
                   "identical", _all_identical(results, "dicomfs")))
    out.append(Row("bytes rclone's `cp -r` produced vs uploaded (the baseline's correctness, not a dicomfs target)",
                   verification(results, "rclone"), "—", "—", "—", None))
    return out


def _checks(results: dict[str, Any], side: str) -> list[dict[str, Any]]:
    return [check for name, check in sorted(results["checks"].items()) if name.startswith(side + "-")]


def _all_identical(results: dict[str, Any], side: str) -> bool:
    return all(c["identical"] == c["expected"] for c in _checks(results, side))


def verification(results: dict[str, Any], side: str) -> str:
    checks = _checks(results, side)
    counts = ", ".join(f"{c['identical']}/{c['expected']}" for c in checks)
    text = f"identical .dcm files per run: {counts}"
    wrong_bytes = sum(c["wrong_bytes"] for c in checks)
    if wrong_bytes:
        offsets = sorted({o for c in checks for o in c["first_difference_at"]})
        text += (f"; {wrong_bytes} files in all had the right size but wrong bytes, the first difference "
                 f"at byte offset {', '.join(map(str, offsets[:5]))}")
    wrong_size = [w for c in checks for w in c["wrong_size"]]
    if wrong_size:
        text += f"; {len(wrong_size)} files had the wrong size, e.g. {wrong_size[0]}"
    missing = sum(c["missing"] for c in checks)
    if missing:
        text += f"; {missing} files missing"
    extra = max((c["extra_count"] for c in checks), default=0)
    if extra:
        names = sorted({os.path.basename(n) for c in checks for n in c["extra_files"]})
        text += f"; plus {extra} extra non-instance files ({', '.join(names)})"
    return text


def text_table(table: list[Row]) -> str:
    lines = []
    for row in table:
        verdict = {True: "PASS", False: "FAIL", None: "info"}[row.passed]
        lines.append(f"[{verdict}] {row.measure}\n       ours: {row.ours}   baseline: {row.baseline}   "
                     f"ratio: {row.ratio}   target: {row.target}")
    return "\n".join(lines)


# --- the markdown block ---------------------------------------------------------------------
def markdown_table(table: list[Row]) -> str:
    lines = ["| measurement | dicomfs (median) | baseline (median) | ratio | target | result |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in table:
        verdict = {True: "pass", False: "**FAIL**", None: "info"}[row.passed]
        lines.append(f"| {row.measure} | {row.ours} | {row.baseline} | {row.ratio} | {row.target} | {verdict} |")
    return "\n".join(lines)


def raw_table(results: dict[str, Any], digits: int = 3) -> str:
    samples, repeat = results["samples"], results["repeat"]
    lines = ["| sample | " + " | ".join(f"run {i + 1}" for i in range(repeat)) + " | median |",
             "| --- |" + " --- |" * (repeat + 1)]
    others = []
    for name in sorted(samples):
        values = samples[name]
        cells = " | ".join(f"{v:.{digits}f}" for v in values)
        if len(values) == repeat:
            lines.append(f"| `{name}` | {cells} | {statistics.median(values):.{digits}f} |")
        else:
            others.append(f"- `{name}` ({len(values)} samples): {cells.replace(' |', ',')}; "
                          f"median {statistics.median(values):.{digits}f}")
    return "\n".join(lines) + ("\n\nMounts made more than once per repetition:\n\n" + "\n".join(others)
                               if others else "")


def profile_section(profiles: dict[str, Any] | None) -> str:
    if not profiles:
        return ""
    parts = []
    for what, profile in profiles.items():
        lines = [f"### Profile of the daemon during one extra {what} (py-spy, 1 kHz)", "",
                 (f"The command took {profile['seconds_under_profiler']:.3f} s under the profiler; "
                  f"{profile['total']} samples of non-idle threads; raw stacks in `{profile['raw']}` "
                  "(not committed)."), "",
                 "| main (trio) thread: activity | samples |", "| --- | --- |"]
        lines += [f"| {name} | {count} |" for name, count in profile["main_thread"]]
        lines += ["", "| worker threads (trio.to_thread): innermost dicomfs or diskcache function | samples |",
                  "| --- | --- |"]
        lines += [f"| {name} | {count} |" for name, count in profile["workers"]]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def render_block(results: dict[str, Any], table: list[Row]) -> str:
    m = results["machine"]
    size_mb = results["study_bytes"] / MB
    drop = ("`echo 1 > /proc/sys/vm/drop_caches` worked and was used" if results["drop_caches"]
            else "`drop_caches` was not writable: the 'after drop_caches' rows are missing")
    return f"""{BEGIN}
<!-- generated by `python -m bench.run`; edit bench/report.py, not this block -->
## Results of the last run

- **Date:** {m['date']}; **machine:** {m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB,
  kernel {m['kernel']}; load average {results['load_before'][0]:.2f} before, {results['load_after'][0]:.2f} after
  (a shared machine: other work ran at the same time).
- **Software:** Python {m['python']}, pyfuse3 {m['pyfuse3']}, trio {m['trio']}, Orthanc {m.get('orthanc', '?')},
  {m['rclone']}, {m['curl']}, {m['fuse']}; dicomfs at `{m['dicomfs_commit']}`.
- **Study:** {results['instances']} instances in {results['series']} series, {size_mb:.1f} MB in all
  (secondary captures from `tests.factory.make_instance`, 512 KiB of pixels each, Explicit VR LE).
- **Repetitions:** {results['repeat']}, interleaved; medians shown, ratios are ratios of medians with the
  range of the per-repetition ratios. {drop}.

{markdown_table(table)}

<details><summary>Every sample (seconds)</summary>

{raw_table(results)}

</details>

{profile_section(results.get('profiles'))}{END}"""


def write_doc(path: Path, results: dict[str, Any], table: list[Row]) -> None:
    replace_block(path, render_block(results, table), BEGIN, END)


def replace_block(path: Path, block: str, begin: str, end: str) -> None:
    """Put ``block`` (which starts with ``begin`` and ends with ``end``) in place of the text between
    those markers in ``path``, or append it; the rest of the file is left alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


# --- py-spy raw output ----------------------------------------------------------------------
MAIN_THREAD_BUCKETS = [  # first match wins, tested against the whole stack
    ("FUSE read (DicomOperations.read, InstanceHandle.read)", ("DicomOperations.read ", "InstanceHandle.read ")),
    ("FUSE lookup/getattr (tree, blobstore.size_of)", ("DicomOperations.lookup ", "DicomOperations.getattr ")),
    ("FUSE open (blobstore.open_instance)", ("DicomOperations.open ",)),
    ("FUSE opendir/readdir/release/other (incl. listings: QIDO, or bucket + metadata.json)", ("DicomOperations.",)),
    ("series download: multipart parsing + routing", ("MultipartParser", "_PartRouter.handle ")),
    ("series download: writing to the .part file (batching, thread hand-off)", ("_MemberWriter",)),
    ("series download: socket receive + HTTP parsing (httpx/httpcore/h11)",
     ("httpcore", "h11/", "receive_some", "_nonblocking_helper")),
    ("COD download: cutting instances out of the tar stream, CRC32C (cod._route itself)", (";_route (",)),
    ("series download: socket receive + HTTP parsing (httpx/httpcore/h11)", ("fetch_series",)),
    ("series download: other", ("_run_download",)),
    ("trio: blocked in epoll (waiting for the kernel, cp, the archive or a worker thread)", ("EpollIOManager",)),
    ("pyfuse3 C code: receiving requests, sending replies (no Python frame below)",
     ("async_wrapper.<locals>.wrapper (_pyfuse3.py",)),
]


def _frame_name(frame: str) -> str:
    return frame.split(" (")[0]


def summarize_profile(raw: Path) -> dict[str, Any]:
    main: Counter[str] = Counter()
    workers: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        if "MainThread" in frames[0]:
            bucket = next((name for name, markers in MAIN_THREAD_BUCKETS if any(m in stack for m in markers)),
                          "trio scheduler, or a stack py-spy could not unwind")
            main[bucket] += count
        else:
            ours = [f for f in frames if "dicomfs/" in f or "diskcache/" in f]
            workers[_frame_name(ours[-1]) if ours else "idle worker / trio thread plumbing"] += count
    return {"total": total, "main_thread": main.most_common(), "workers": workers.most_common(8)}
