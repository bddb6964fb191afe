"""COD benchmark: dicomfs over a Cloud Optimized DICOM bucket vs curl, every figure a ratio.

    .venv/bin/python -m bench.cod [--instances 120] [--repeat 5] [--diagnose] [--no-doc]

Writes one COD series (``--instances`` secondary captures of ~0.5 MB: one PAX tar and its
metadata.json, by ``tests.cod_writer.write_series``) into a GCS emulator started here
(``tests.servers.GcsEmulator``: in memory, on loopback), then repeats, interleaved (which side
goes first alternates from one repetition to the next):

1. cold ``cp -r`` of the series folder through a fresh dicomfs mount with an empty cache dir vs
   ``curl`` of the series' tar object (GCS JSON API media URL) to /dev/null;
2. time to first byte of one instance through a fresh mount with an empty cache dir (after an
   untimed ``ls`` of the series folder, so that the listing and the metadata.json fetch are not
   counted): ``open()`` to the first byte ``read()``, timed inside a small Python child vs one
   ranged ``curl`` of that instance's bytes (curl's own ``time_total``; ``time_starttransfer`` too);
3. bytes moved, untimed: the same single-instance read and the same ``cp -r``, each through its
   own fresh mount whose endpoint is a ``tests.servers.CountingProxy`` in front of the emulator.

Every copied or read instance is compared with the bytes written (sha256). Prints a table,
writes the raw figures to ``bench/results/cod-latest.json`` and the block between the
``bench-cod:begin``/``bench-cod:end`` markers of ``docs/benchmarks.md``. The CPU time of the
daemon and of the emulator is sampled in every repetition; ``--diagnose`` adds, per repetition,
the download path without FUSE (``bench/diagnose.py``), ``cat`` of every instance in tar order vs
in inode order (``cp``'s order) and a warm ``cp -r``, and after them a py-spy profile of the
daemon during one extra cold copy. Everything started is stopped and unmounted, also on error,
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pydicom.uid import generate_uid

from bench import diagnose, report
from bench.mounts import DicomfsMount, cpu_seconds, memory_kib, run_timed, stop_on_sigterm
from bench.run import (
    COMMAND_TIMEOUT,
    DOC,
    RESULTS,
    Study,
    passthrough_copy,
    py_spy,
    py_spy_record,
    timed,
    verify_copy,
)
from tests.cod_writer import CodSeriesFiles, write_series
from tests.factory import make_instance
from tests.servers import CountingProxy, GcsEmulator, classify_gcs, require_tools

PIXEL_BYTES = 512 * 1024
BUCKET, PREFIX = "cod-bench", "bench/dicomweb"
BEGIN, END = "<!-- bench-cod:begin -->", "<!-- bench-cod:end -->"
TARGET_COPY, TARGET_FIRST_BYTE, TARGET_MOVED = 1.3, 1.5, 1.1
MB = report.MB

# Run in a child (so a hung mount cannot hang the benchmark: run_timed kills it): the clock runs
# from open() to the first byte read; then the rest is read for the checksum, untimed.
FIRST_BYTE = """
import hashlib, os, sys, time
started = time.perf_counter()
fd = os.open(sys.argv[1], os.O_RDONLY)
first = os.read(fd, 1)
elapsed = time.perf_counter() - started
digest = hashlib.sha256(first)
while chunk := os.read(fd, 1 << 20):
    digest.update(chunk)
print(elapsed, digest.hexdigest())
"""


# --- the series -----------------------------------------------------------------------------
@dataclass
class Series:
    study_uid: str
    uid: str
    tar_name: str
    tar_size: int
    ranges: dict[str, tuple[int, int]]  # instance key -> [start, end) in the tar, from metadata.json
    expected: Study  # "<key>.dcm" -> (size, sha256), as bench.run.verify_copy wants it
    probe: str  # the instance whose first byte is timed: the one in the middle of the tar

    @property
    def folder(self) -> str:
        return f"studies/{self.study_uid}/{self.uid}"


def build_series(count: int, files: Path, emulator: GcsEmulator) -> Series:
    """Make the instances (a copy under ``files``), write them as one COD series, upload it."""
    study_uid, series_uid = generate_uid(), generate_uid()
    blobs: dict[str, bytes] = {}
    for number in range(1, count + 1):
        sop = str(generate_uid())
        blobs[sop] = make_instance(study_uid, series_uid, sop, pixel_bytes=PIXEL_BYTES, number=number)
    objects, _ = write_series(PREFIX, CodSeriesFiles(study_uid, series_uid, blobs))
    base = f"{PREFIX}/studies/{study_uid}/series/{series_uid}"
    index = json.loads(gzip.decompress(objects[f"{base}/metadata.json"]))
    ranges = {key: (entry["headers"]["start_byte"], entry["headers"]["end_byte"])
              for key, entry in index["cod"]["instances"].items()}
    tar = objects[f"{base}.tar"]
    expected = Study(series_uid)
    files.mkdir(parents=True, exist_ok=True)
    for sop, blob in blobs.items():
        start, end = ranges[sop]
        assert tar[start:end] == blob, "metadata.json offsets do not match the tar"
        (files / f"{sop}.dcm").write_bytes(blob)
        expected.files[f"{sop}.dcm"] = (len(blob), hashlib.sha256(blob).hexdigest())
    emulator.upload(objects)
    by_start = sorted(ranges, key=lambda key: ranges[key][0])
    return Series(study_uid, series_uid, f"{base}.tar", len(tar), ranges, expected, by_start[len(by_start) // 2])


def media_url(endpoint: str, name: str) -> str:
    return f"{endpoint}/storage/v1/b/{BUCKET}/o/{quote(name, safe='')}?alt=media"


# --- measuring ------------------------------------------------------------------------------
def curl(url: str, *headers: str) -> dict[str, float]:
    """One curl to /dev/null: wall time of the process, and curl's own timings."""
    argv = ["curl", "-sS", "--fail", "-o", "/dev/null", "-w",
            "%{http_code} %{size_download} %{time_starttransfer} %{time_total}", url]
    for header in headers:
        argv += ["-H", header]
    wall, status, out = run_timed(argv, capture=True, timeout=COMMAND_TIMEOUT)
    if status != 0:
        raise RuntimeError(f"curl {url} exited with status {status}")
    code, size, first, total = out.split()
    return {"wall": wall, "code": int(code), "size": int(size), "first": float(first), "total": float(total)}


def first_byte(path: Path) -> tuple[float, str]:
    """Seconds from open() to the first byte of ``path``, and the sha256 of the whole file."""
    _, status, out = run_timed([sys.executable, "-c", FIRST_BYTE, str(path)], capture=True,
                               timeout=COMMAND_TIMEOUT)
    if status != 0:
        raise RuntimeError(f"reading {path} failed with status {status}")
    elapsed, digest = out.split()
    return float(elapsed), digest


class Bench:
    """The measurements of one run; ``work`` is on disk (caches, mounts), ``scratch`` on tmpfs (copies)."""

    def __init__(self, work: Path, scratch: Path, emulator: GcsEmulator, proxy: CountingProxy,
                 series: Series) -> None:
        self.work, self.scratch, self.emulator, self.proxy, self.series = work, scratch, emulator, proxy, series
        assert emulator.process is not None
        self.emulator_pid = emulator.process.pid
        self.samples: dict[str, list[float]] = {}
        self.moved: dict[str, list[int]] = {}
        self.checks: dict[str, dict[str, object]] = {}
        self.peak_hwm_kib = 0

    def record(self, name: str, value: float) -> None:
        self.samples.setdefault(name, []).append(value)

    def fresh(self, path: Path) -> Path:
        shutil.rmtree(path, ignore_errors=True)
        return path

    @contextlib.contextmanager
    def mounted(self, name: str, endpoint: str, label: str | None = None,
                cache: Path | None = None) -> Iterator[DicomfsMount]:
        """A fresh dicomfs mount of the bucket, always unmounted after; with an empty cache dir (deleted
        after) unless ``cache`` is given (kept)."""
        keep = cache is not None
        cache = cache or self.fresh(self.work / f"cache-{name}")
        mount = DicomfsMount(f"gs://{BUCKET}/{PREFIX}", self.work / name, cache, self.work / "dicomfs.log",
                             env={"STORAGE_EMULATOR_HOST": endpoint})
        try:
            seconds = mount.start()
            if label:
                self.record(f"{label}_mount_s", seconds)
            yield mount
            self.peak_hwm_kib = max(self.peak_hwm_kib, memory_kib(mount.pid).get("VmHWM", 0) if mount.pid else 0)
        finally:
            mount.stop()
            if not keep:
                shutil.rmtree(cache, ignore_errors=True)

    def repetition(self, number: int) -> None:
        copy: list[Callable[[], None]] = [self.curl_tar, lambda: self.cold_copy(number), self.floor]
        first: list[Callable[[], None]] = [self.curl_range, lambda: self.dicomfs_first_byte(number)]
        if number % 2:
            copy.reverse()
            first.reverse()
        for step in (*copy, *first):
            step()
        self.bytes_moved(number)

    # 1. cold cp -r vs curl of the tar
    def curl_tar(self) -> None:
        emulator_cpu = cpu_seconds(self.emulator_pid)
        result = curl(media_url(self.emulator.endpoint, self.series.tar_name))
        self.record("emulator_cpu_curl_s", cpu_seconds(self.emulator_pid) - emulator_cpu)
        if result["code"] != 200 or result["size"] != self.series.tar_size:
            raise RuntimeError(f"curl of the tar: HTTP {result['code']}, {result['size']} bytes "
                               f"(the tar has {self.series.tar_size})")
        self.record("curl_tar_s", result["wall"])
        self.record("curl_tar_time_total_s", result["total"])
        # what dicomfs asks for: the tar from its first instance on (costs the emulator a copy of the object)
        first = min(start for start, _ in self.series.ranges.values())
        self.record("curl_tar_ranged_s",
                    curl(media_url(self.emulator.endpoint, self.series.tar_name), f"Range: bytes={first}-")["wall"])

    def cold_copy(self, number: int) -> None:
        out = self.fresh(self.scratch / "copy")
        with self.mounted("mnt-cold", self.emulator.endpoint, "dicomfs_cold") as mount:
            daemon_cpu, emulator_cpu = cpu_seconds(mount.pid), cpu_seconds(self.emulator_pid)
            self.record("dicomfs_cold_s", timed(["cp", "-r", str(mount.path / self.series.folder), str(out)]))
            self.record("daemon_cpu_cold_s", cpu_seconds(mount.pid) - daemon_cpu)
            self.record("emulator_cpu_cold_s", cpu_seconds(self.emulator_pid) - emulator_cpu)
        self.checks[f"dicomfs-{number}"] = verify_copy(out, self.series.expected, self.work / "files")
        shutil.rmtree(out)

    # 1b. the floor of row 1: the series' files copied through a pyfuse3 passthrough, every byte local
    def floor(self) -> None:
        wall, status = passthrough_copy(self.work / "files", self.fresh(self.work / "floor"))
        if status != 0:
            raise RuntimeError(f"cp -r through the passthrough exited with {status}")
        self.record("floor_cp_s", wall)

    # 2. time to first byte of one instance vs a ranged curl
    def curl_range(self) -> None:
        start, end = self.series.ranges[self.series.probe]
        result = curl(media_url(self.emulator.endpoint, self.series.tar_name), f"Range: bytes={start}-{end - 1}")
        if result["code"] != 206 or result["size"] != end - start:
            raise RuntimeError(f"ranged curl: HTTP {result['code']}, {result['size']} bytes, wanted {end - start}")
        self.record("curl_range_time_total_s", result["total"])
        self.record("curl_range_time_starttransfer_s", result["first"])

    def dicomfs_first_byte(self, number: int) -> None:
        with self.mounted("mnt-first", self.emulator.endpoint, "dicomfs_first") as mount:
            folder = mount.path / self.series.folder
            self.record("dicomfs_ls_series_s", timed(["ls", str(folder)]))  # listing + metadata.json
            seconds, digest = first_byte(folder / f"{self.series.probe}.dcm")
        self.record("dicomfs_first_byte_s", seconds)
        self.checks[f"first-byte-{number}"] = self.check_one(digest)

    def check_one(self, digest: str) -> dict[str, object]:
        good = digest == self.series.expected.files[f"{self.series.probe}.dcm"][1]
        return {"identical": int(good), "expected": 1, "missing": 0, "wrong_size": [], "wrong_bytes": int(not good),
                "first_difference_at": [], "extra_files": [], "extra_count": 0}

    # 3. bytes moved, through the counting proxy (untimed)
    def bytes_moved(self, number: int) -> None:
        with self.mounted("mnt-count-one", self.proxy.url) as mount, self.counting("one"):
            _, digest = first_byte(mount.path / self.series.folder / f"{self.series.probe}.dcm")
        self.checks[f"counted-one-{number}"] = self.check_one(digest)
        out = self.fresh(self.scratch / "counted-copy")
        with self.mounted("mnt-count-cp", self.proxy.url) as mount, self.counting("cp"):
            timed(["cp", "-r", str(mount.path / self.series.folder), str(out)])
        self.checks[f"counted-cp-{number}"] = verify_copy(out, self.series.expected, self.work / "files")
        shutil.rmtree(out)

    @contextlib.contextmanager
    def counting(self, name: str) -> Iterator[None]:
        """Record what the proxy forwarded during the block: tar bytes and requests, metadata bytes."""
        tar_bytes, tar_requests, metadata_bytes = self.proxy.bytes["tar"], self.proxy.counts["tar"], \
            self.proxy.bytes["metadata"]
        yield
        self.moved.setdefault(f"{name}_tar_bytes", []).append(self.proxy.bytes["tar"] - tar_bytes)
        self.moved.setdefault(f"{name}_tar_requests", []).append(self.proxy.counts["tar"] - tar_requests)
        self.moved.setdefault(f"{name}_metadata_bytes", []).append(self.proxy.bytes["metadata"] - metadata_bytes)

    # --diagnose
    def diagnose(self) -> None:
        """The download stages without FUSE (bench/diagnose.py), the reading order, a warm copy."""
        series, endpoint = self.series, self.emulator.endpoint
        found = diagnose.measure_cod(endpoint, BUCKET, PREFIX, series.study_uid, series.uid, series.tar_name,
                                     series.probe, series.ranges, self.work / "cache-diagnose")
        for stage, seconds in found.items():
            self.record(f"diagnose_{stage}", seconds)
        # `cat` of every instance on a fresh mount, in the tar's order vs in inode order (which is cp's)
        tar_order = sorted(series.ranges, key=lambda key: series.ranges[key][0])
        for order in ("tar", "inode"):
            with self.mounted("mnt-order", endpoint) as mount:
                folder = mount.path / series.folder
                timed(["ls", str(folder)])  # listing + metadata.json, untimed; sizes are known: no download
                keys = tar_order if order == "tar" else sorted(
                    tar_order, key=lambda key: os.stat(folder / f"{key}.dcm").st_ino)
                self.record(f"diagnose_cat_{order}_order_s", timed(["cat", *(str(folder / f"{k}.dcm") for k in keys)]))
        # warm cp -r: a fresh mount of the cache a cold copy filled (FUSE serving alone, no download)
        cache, out = self.fresh(self.work / "cache-warm"), self.fresh(self.scratch / "warm-copy")
        for label in ("fill", "warm"):
            with self.mounted("mnt-warm", endpoint, cache=cache) as mount:
                seconds = timed(["cp", "-r", str(mount.path / series.folder), str(self.fresh(out))])
            if label == "warm":
                self.record("diagnose_warm_cp_s", seconds)
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)

    def profile(self) -> dict[str, Any] | None:
        """py-spy profile of the daemon during one extra cold cp -r; None without py-spy."""
        spy = py_spy()
        if spy is None:
            return None
        raw = RESULTS / "profile-cod-cold-cp.txt"
        out = self.fresh(self.scratch / "profile-copy")
        with self.mounted("mnt-profile", self.emulator.endpoint) as mount:
            assert mount.pid is not None
            with py_spy_record(spy, mount.pid, raw):
                elapsed = timed(["cp", "-r", str(mount.path / self.series.folder), str(out)])
        shutil.rmtree(out, ignore_errors=True)
        return {"cold cp -r of the COD series": {"seconds_under_profiler": elapsed, "raw": str(raw.relative_to(ROOT)),
                                                 **report.summarize_profile(raw)}}


# --- the report -----------------------------------------------------------------------------
def rows(results: dict[str, Any]) -> list[report.Row]:
    s, moved, tar, size = results["samples"], results["moved"], results["tar_bytes"], results["probe_bytes"]
    median, spread, seconds = report.median_of, report.ratio_spread, _seconds
    out = []
    ratio = median(s, "dicomfs_cold_s") / median(s, "curl_tar_s")
    out.append(report.Row(
        "1. cold `cp -r` of the series: dicomfs (fresh mount, empty cache) vs `curl` of the series' tar",
        seconds(s, "dicomfs_cold_s", tar), seconds(s, "curl_tar_s", tar),
        f"{ratio:.2f}× (per run {spread(s, 'dicomfs_cold_s', 'curl_tar_s')})", f"≤ {TARGET_COPY}×",
        ratio <= TARGET_COPY))
    if "floor_cp_s" in s:
        ratio = median(s, "floor_cp_s") / median(s, "curl_tar_s")
        out.append(report.Row(
            "1b. the floor of row 1: `cp -r` of the series' files through `bench/passthrough.py` (a minimal pyfuse3 "
            "filesystem), every byte already local, vs the same `curl` of the tar",
            seconds(s, "floor_cp_s", tar), seconds(s, "curl_tar_s", tar),
            f"{ratio:.2f}× (per run {spread(s, 'floor_cp_s', 'curl_tar_s')})", "—", None))
    ratio = median(s, "dicomfs_first_byte_s") / median(s, "curl_range_time_total_s")
    out.append(report.Row(
        "2. first byte of one instance, `open()` to first `read()` (fresh mount, empty cache, after an untimed "
        "`ls` of the series) vs one ranged `curl` of its bytes (curl's `time_total`)",
        seconds(s, "dicomfs_first_byte_s"), seconds(s, "curl_range_time_total_s"),
        f"{ratio:.2f}× (per run {spread(s, 'dicomfs_first_byte_s', 'curl_range_time_total_s')})",
        f"≤ {TARGET_FIRST_BYTE}×", ratio <= TARGET_FIRST_BYTE))
    ratio = median(s, "dicomfs_first_byte_s") / median(s, "curl_range_time_starttransfer_s")
    out.append(report.Row(
        "2b. the same vs the ranged `curl`'s `time_starttransfer` (its first byte, not its last)",
        seconds(s, "dicomfs_first_byte_s"), seconds(s, "curl_range_time_starttransfer_s"),
        f"{ratio:.2f}× (per run {spread(s, 'dicomfs_first_byte_s', 'curl_range_time_starttransfer_s')})", "—", None))
    worst = max(moved["cp_tar_bytes"]) / tar
    out.append(report.Row(
        "3. tar bytes moved by a cold `cp -r` of the series (counting proxy), vs the tar's size",
        f"{_mb(max(moved['cp_tar_bytes']))} in {_counts(moved['cp_tar_requests'])} (worst run)",
        _mb(tar), f"{worst:.3f}×", f"≤ {TARGET_MOVED}×", worst <= TARGET_MOVED))
    worst = max(moved["one_tar_bytes"]) / size
    out.append(report.Row(
        "4. tar bytes moved by reading one instance (fresh mount, counting proxy), vs the instance's size",
        f"{_mb(max(moved['one_tar_bytes']))} in {_counts(moved['one_tar_requests'])} (worst run)",
        _mb(size), f"{worst:.3f}×", f"≤ {TARGET_MOVED}×", worst <= TARGET_MOVED))
    checks = results["checks"]
    good = all(c["identical"] == c["expected"] for c in checks.values())
    out.append(report.Row(
        "5. bytes produced vs written (sha256 of every file)",
        f"{report.verification(results, 'dicomfs')} (timed copies); "
        f"{report.verification(results, 'counted-cp').split(': ', 1)[1]} (counted copies); "
        f"one-instance reads identical: {sum(c['identical'] for n, c in checks.items() if 'one' in n or 'first' in n)}"
        f"/{sum(1 for n in checks if 'one' in n or 'first' in n)}", "—", "—", "identical", good))
    for sample, label, base in INFO:
        if sample in s:
            whole_tar = base.startswith("curl_tar") or sample.startswith(("diagnose_cat", "diagnose_warm"))
            volume = tar if whole_tar else None
            ratio_text = f"{median(s, sample) / median(s, base):.2f}×" if base and median(s, base) else "—"
            out.append(report.Row(label, seconds(s, sample, volume), seconds(s, base, volume) if base else "—",
                                  ratio_text, "—", None))
    out.append(report.Row("dicomfs daemon peak memory (max VmHWM over all daemons of the run)",
                          f"{results['peak_hwm_kib'] / 1024:.0f} MiB", "—", "—", "—", None))
    return out


INFO = [  # rows without a target: (sample, what it is, the sample it is compared with or "")
    ("dicomfs_cold_mount_s", "dicomfs mount time (`dicomfs mount` until it returns; in no row above)", ""),
    ("dicomfs_ls_series_s", ("`ls` of the series folder on a fresh mount (bucket listing + metadata.json; "
     "untimed in row 2, part of row 1)"), ""),
    ("curl_tar_time_total_s", ("curl of the tar, curl's own `time_total` (row 1's baseline is the process's wall "
     "time)"), "curl_tar_s"),
    ("curl_tar_ranged_s", ("curl of the tar with the Range dicomfs sends (`bytes=<first instance>-`; the emulator "
     "copies the object to answer a Range)"), "curl_tar_s"),
    ("daemon_cpu_cold_s", ("CPU time (user+system, 10 ms ticks) during the cold `cp -r`: dicomfs daemon vs "
     "emulator"), "emulator_cpu_cold_s"),
    ("emulator_cpu_cold_s", ("CPU time of the emulator (10 ms ticks): serving the cold `cp -r` (a Range, then "
     "the tar by a Range) vs serving curl the tar"), "emulator_cpu_curl_s"),
    ("diagnose_httpx_raw_s", "diagnosis, in-process, no FUSE: httpx streaming the tar to nowhere", "curl_tar_s"),
    ("diagnose_fetch_series_s", ("diagnosis, no FUSE: + cutting the instances out, CRC32C (CodSource.fetch_series "
     "into a sink that drops the bytes)"), "curl_tar_s"),
    ("diagnose_blobstore_s", ("diagnosis, no FUSE: + the cache (BlobStore.open_instance of every instance in key "
     "order, empty cache: the first alone by Range, then the tar)"), "curl_tar_s"),
    ("diagnose_warm_cp_s", ("diagnosis: warm `cp -r` (fresh mount of the cache a cold copy filled: FUSE serving "
     "alone, no download)"), "curl_tar_s"),
    ("diagnose_cat_tar_order_s", ("diagnosis: `cat` of every instance on a fresh mount (after an untimed `ls`) in "
     "tar order vs in inode order (the order `cp -r` reads in)"), "diagnose_cat_inode_order_s"),
    ("diagnose_range_raw_s", "diagnosis, in-process, no FUSE: httpx, one Range GET of the row-2 instance",
     "curl_range_time_total_s"),
    ("diagnose_fetch_instance_s", "diagnosis, no FUSE: + CRC32C (CodSource.fetch_instance, bytes dropped)",
     "curl_range_time_total_s"),
    ("diagnose_open_one_s", ("diagnosis, no FUSE: + the cache (BlobStore.open_instance of that instance, empty "
     "cache: the daemon's `open()` without FUSE)"), "curl_range_time_total_s"),
]


def _seconds(samples: dict[str, list[float]], name: str, size: int | None = None) -> str:
    """As report.seconds_text, but in milliseconds below 0.1 s."""
    value = report.median_of(samples, name)
    return f"{value * 1000:.2f} ms" if value < 0.1 and not size else report.seconds_text(samples, name, size)


def _mb(value: float) -> str:
    return f"{value / MB:.2f} MB"


def _counts(values: list[int]) -> str:
    """How many requests, e.g. "1 request" or "2 requests" ("2/3 requests" if runs differ)."""
    counts = sorted(set(values))
    return "/".join(map(str, counts)) + (" request" if counts == [1] else " requests")


def _moved_table(results: dict[str, Any]) -> str:
    moved = results["moved"]
    lines = ["| counted (bytes, requests) | " + " | ".join(f"run {i + 1}" for i in range(results["repeat"])) + " |",
             "| --- |" + " --- |" * results["repeat"]]
    lines += [f"| `{name}` | " + " | ".join(str(v) for v in values) + " |" for name, values in sorted(moved.items())]
    return "\n".join(lines)


def render_block(results: dict[str, Any], table: list[report.Row]) -> str:
    m = results["machine"]
    return f"""{BEGIN}
<!-- generated by `python -m bench.cod`; edit bench/cod.py, not this block -->
### Results of the last COD run

- **Date:** {m['date']}; **machine:** {m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB,
  kernel {m['kernel']}; load average {results['load_before'][0]:.2f} before, {results['load_after'][0]:.2f} after
  (a shared machine: other work ran at the same time).
- **Software:** Python {m['python']}, pyfuse3 {m['pyfuse3']}, trio {m['trio']},
  gcp-storage-emulator {results['emulator_version']}, {m['curl']}, {m['fuse']}; dicomfs at `{m['dicomfs_commit']}`.
- **Series:** {results['instances']} instances of {results['probe_bytes'] / MB:.2f} MB (secondary captures from
  `tests.factory.make_instance`, 512 KiB of pixels each), one tar of {results['tar_bytes'] / MB:.1f} MB written by
  `tests.cod_writer.write_series`; row 2 reads the instance in the middle of the tar.
- **Repetitions:** {results['repeat']}, interleaved (which side goes first alternates); medians shown, ratios are
  ratios of medians with the range of the per-repetition ratios. Bytes moved are counted on separate, untimed
  mounts through `tests.servers.CountingProxy`.

{report.markdown_table(table)}

<details><summary>Every sample (seconds) and every count</summary>

{report.raw_table(results, digits=4)}

{_moved_table(results)}

</details>

{report.profile_section(results.get('profiles'))}{END}"""


# --- main -----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=120, help="instances in the series (default 120)")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions; medians are reported (default 5)")
    parser.add_argument("--diagnose", action="store_true",
                        help="also time the download path without FUSE, the reading order and a warm cp -r, and "
                             "py-spy record the daemon during one extra cold cp -r")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped and unmounted", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    require_tools("curl", "cp", "ls", "fusermount3")
    stop_on_sigterm()
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = report.machine_facts()
    with contextlib.ExitStack() as cleanup:
        work = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="dicomfs-bench-cod-")))
        scratch_root = "/dev/shm" if os.path.isdir("/dev/shm") else None
        scratch = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="dicomfs-bench-cod-",
                                                                         dir=scratch_root)))
        emulator = GcsEmulator(BUCKET)
        cleanup.callback(emulator.stop)
        emulator.start()
        print(f"writing {args.instances} instances as one COD series ...", flush=True)
        series = build_series(args.instances, work / "files", emulator)
        proxy = cleanup.enter_context(CountingProxy(emulator.port, classify_gcs))
        bench = Bench(work, scratch, emulator, proxy, series)
        load_before = os.getloadavg()
        for number in range(args.repeat):
            print(f"repetition {number + 1}/{args.repeat} ...", flush=True)
            bench.repetition(number)
            if args.diagnose:
                bench.diagnose()
        profiles = bench.profile() if args.diagnose else None
        load_after = os.getloadavg()
    probe_start, probe_end = series.ranges[series.probe]
    results = {
        "machine": machine, "load_before": load_before, "load_after": load_after,
        "emulator_version": importlib.metadata.version("gcp-storage-emulator"),
        "instances": args.instances, "repeat": args.repeat, "tar_bytes": series.tar_size,
        "probe_bytes": probe_end - probe_start, "samples": bench.samples, "moved": bench.moved,
        "checks": bench.checks, "peak_hwm_kib": bench.peak_hwm_kib, "profiles": profiles,
    }
    (RESULTS / "cod-latest.json").write_text(json.dumps(results, indent=2))
    table = rows(results)
    print(report.text_table(table))
    if not args.no_doc:
        report.replace_block(DOC, render_block(results, table), BEGIN, END)
        print(f"wrote {DOC.relative_to(ROOT)} and {(RESULTS / 'cod-latest.json').relative_to(ROOT)}")
    return 0 if all(row.passed is not False for row in table) else 1


if __name__ == "__main__":
    sys.exit(main())
