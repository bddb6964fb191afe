"""IDC benchmark: dicomfs over an Imaging Data Commons layout vs curl, every figure a ratio.

    .venv/bin/python -m bench.idc [--instances 120] [--repeat 5] [--index-repeat 3] [--no-doc]

Writes one IDC-layout series (``--instances`` secondary captures of ~0.5 MB, one object each,
named by a UUID under the series' UUID prefix) into moto's S3 server started here
(``tests.servers.S3Server``: in memory, on loopback, public-read) with a small index parquet in
idc-index's schema (``tests.idc_bucket``), then repeats, interleaved (which side goes first
alternates from one repetition to the next):

1. cold ``cp -r`` of the series folder through a fresh dicomfs mount with an empty cache dir
   (the prefix listing and the header reads included) vs ``curl`` fetching the series' objects to
   /dev/null 8 at a time (``curl -Z --parallel-max 8``: one process, no start-up per object), and,
   as the floor of the layout's design, curl asking what dicomfs asks: the first 16 KiB of every
   object (which names its instance), 16 at a time, then every object;
2. first byte of one instance through a fresh mount with an empty cache dir, after an untimed
   ``ls`` of its series folder (the listing and the header reads are not counted): ``open()`` to
   the first ``read()`` byte vs one ``curl`` of that object with a Range header for all of it; and
   the floor of that first byte, in two parts: what any Python reader that checks the object must
   do before it has a byte to give (the object's GET as dicomfs sends it on a new connection, read
   in 1 MiB pieces and MD5-hashed, in a child process warmed by one GET of another object first,
   timed inside it as curl times itself),
   and ``open()`` to the first ``read()`` of the same bytes through ``bench/passthrough.py`` (a
   minimal pyfuse3 filesystem over a local copy).

Then, with the real index of the installed idc-index-data package (168,507 studies), ``--index-
repeat`` times: a fresh mount whose endpoint answers nothing (no network), ``ls studies | wc -l``
timed, and the daemon's RSS after it (target: 5 s, 300 MB). Every copied or read instance is
compared with the bytes written (sha256). Writes ``bench/results/idc-latest.json`` and the block
between the ``bench-idc`` markers of ``docs/benchmarks.md``. Everything started is stopped and
unmounted, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.cod import curl, first_byte  # noqa: E402
from bench.mounts import (  # noqa: E402
    DicomfsMount,
    PassthroughMount,
    cpu_seconds,
    memory_kib,
    run_timed,
    stop_on_sigterm,
)
from bench.run import COMMAND_TIMEOUT, DOC, RESULTS  # noqa: E402
from dicomfs.sources.idc.source import HEAD_BYTES, PARALLEL_HEADS  # noqa: E402
from tests.factory import make_instance  # noqa: E402
from tests.idc_bucket import IdcBucket  # noqa: E402
from tests.servers import S3Server, require_tools  # noqa: E402

PIXEL_BYTES = 512 * 1024
STUDY, SERIES = "1.2.826.0.1.3680043.8.498.77", "1.2.826.0.1.3680043.8.498.77.1"
BEGIN, END = "<!-- bench-idc:begin -->", "<!-- bench-idc:end -->"
DEAD = "http://127.0.0.1:9"


# What a Python reader that checks an object must do before it can hand out a byte of it: the GET
# dicomfs sends for one instance (no Range, identity), read as dicomfs reads it and MD5-hashed,
# timed from before the request like curl's time_total, in a process whose code is warm as a
# daemon's is (one untimed GET of another object first; moto closes every connection, so the
# timed one connects anew, as dicomfs's does). The body is kept for the passthrough.
FETCH_FLOOR = """
import hashlib, sys, time, urllib3
pool = urllib3.PoolManager()

def get(url):
    response = pool.request("GET", url, headers={"Accept-Encoding": "identity"}, preload_content=False,
                            decode_content=False)
    md5, pieces = hashlib.md5(usedforsecurity=False), []
    while piece := response.read1(1 << 20):
        md5.update(piece)
        pieces.append(piece)
    return response, md5, pieces

get(sys.argv[1])
started = time.perf_counter()
response, md5, pieces = get(sys.argv[2])
elapsed = time.perf_counter() - started
open(sys.argv[3], "wb").write(b"".join(pieces))
print(elapsed, md5.hexdigest() == response.headers["etag"].strip('"'))
"""


def parallel_curls(urls: list[str], config: Path, jobs: int = 8, headers: tuple[str, ...] = ()) -> float:
    """One ``curl`` fetching every URL to /dev/null, ``jobs`` transfers at a time (``-Z``)."""
    config.write_text("".join(f'url = "{url}"\noutput = "/dev/null"\n' for url in urls))
    extra = [arg for header in headers for arg in ("-H", header)]
    wall, status, _ = run_timed(["curl", "-sS", "--no-progress-meter", "--fail", "-Z", "--parallel-max", str(jobs),
                                 *extra, "-K", str(config)], timeout=COMMAND_TIMEOUT)
    if status != 0:
        raise RuntimeError(f"curl -Z exited with {status}")
    return wall


def shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


class Bench:
    def __init__(self, work: Path, scratch: Path, server: S3Server, store: IdcBucket, index: Path) -> None:
        self.work, self.scratch, self.server, self.store, self.index = work, scratch, server, store, index
        self.samples: dict[str, list[float]] = {}
        self.checks: list[bool] = []
        self.runs = 0
        prefix = store.series_prefix[SERIES]
        self.objects = sorted(k for k in store.objects if k.startswith(prefix))
        self.series_bytes = sum(store.objects[k] for k in self.objects)
        self.expected = {k.rsplit("/", 1)[1]: v for k, v in store.expected.items() if f"/{SERIES}/" in k}

    def add(self, name: str, value: float) -> None:
        self.samples.setdefault(name, []).append(value)

    def mount(self, *args: str, source: str = "idc", index: Path | None = None) -> DicomfsMount:
        self.runs += 1
        base = self.work / f"run{self.runs}"
        options = ("--idc-index", str(index)) if index is not None else ()
        mount = DicomfsMount(source, base / "mnt", base / "cache", base / "dicomfs.log",
                             env=self.server.env(signed=False), args=(*options, *args))
        mount.start()
        return mount

    def cold_copy(self) -> None:
        mount = self.mount("--endpoint", self.server.endpoint, index=self.index)
        try:
            target = self.scratch / "copy"
            shutil.rmtree(target, ignore_errors=True)
            cpu = cpu_seconds(mount.pid)
            wall, status, _ = run_timed(["cp", "-r", str(mount.path / "studies" / STUDY / SERIES), str(target)],
                                        timeout=COMMAND_TIMEOUT)
            self.add("daemon_cpu_s", cpu_seconds(mount.pid) - cpu)
            assert mount.pid is not None
            self.add("daemon_rss_mib", memory_kib(mount.pid).get("VmHWM", 0) / 1024)
            copied = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in target.iterdir()}
            self.checks.append(status == 0 and copied == self.expected)
            self.add("dicomfs_cold_s", wall)
            shutil.rmtree(target, ignore_errors=True)
        finally:
            mount.stop()

    def curls(self) -> None:
        urls = [f"{self.server.endpoint}/{self.store.handle.name}/{k}" for k in self.objects]
        self.add("curl8_s", parallel_curls(urls, self.work / "curl.config"))
        # the floor of the layout's design: what dicomfs asks, asked by curl (the header of every
        # object, 16 at a time, then every object, 8 at a time)
        self.add("curl_two_pass_s", parallel_curls(urls, self.work / "curl.config", PARALLEL_HEADS,
                                                   (f"Range: bytes=0-{HEAD_BYTES - 1}",))
                 + parallel_curls(urls, self.work / "curl.config"))

    def first_byte(self) -> None:
        mount = self.mount("--endpoint", self.server.endpoint, index=self.index)
        try:
            folder = mount.path / "studies" / STUDY / SERIES
            run_timed(["ls", "-l", str(folder)], timeout=COMMAND_TIMEOUT)  # listing + headers: untimed
            name = f"{SERIES}.{len(self.objects) // 2}.dcm"
            elapsed, digest = first_byte(folder / name)
            self.checks.append(digest == self.expected[name])
            self.add("dicomfs_first_byte_s", elapsed)
        finally:
            mount.stop()

    def ranged_curl(self) -> None:
        key = self.objects[len(self.objects) // 2]
        size = self.store.objects[key]
        result = curl(f"{self.server.endpoint}/{self.store.handle.name}/{key}", f"Range: bytes=0-{size - 1}")
        self.add("curl_range_s", result["total"])
        self.add("curl_range_first_s", result["first"])

    def first_byte_floor(self) -> None:
        key, other = self.objects[len(self.objects) // 2], self.objects[0]
        local = self.work / "floor"
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir()
        bucket = f"{self.server.endpoint}/{self.store.handle.name}"
        _, status, out = run_timed([sys.executable, "-c", FETCH_FLOOR, f"{bucket}/{other}", f"{bucket}/{key}",
                                    str(local / "object")],
                                   capture=True, timeout=COMMAND_TIMEOUT)
        if status != 0:
            raise RuntimeError(f"the fetch floor exited with {status}")
        elapsed, checked = out.split()
        self.checks.append(checked == "True")
        self.add("floor_fetch_s", float(elapsed))
        passthrough = PassthroughMount(local, self.work / "floor-mnt", self.work / "passthrough.log")
        passthrough.start()
        try:
            elapsed_fuse, digest = first_byte(passthrough.path / "object")
            self.checks.append(digest == hashlib.sha256((local / "object").read_bytes()).hexdigest())
            self.add("floor_fuse_s", elapsed_fuse)
        finally:
            passthrough.stop()

    def full_index(self) -> None:
        mount = self.mount("--endpoint", DEAD)
        try:
            wall, status, out = run_timed(["bash", "-c", f"ls {shell_quote(str(mount.path / 'studies'))} | wc -l"],
                                          capture=True, timeout=COMMAND_TIMEOUT)
            assert mount.pid is not None
            memory = memory_kib(mount.pid)
            self.checks.append(status == 0)
            self.add("index_ls_s", wall)
            self.add("index_studies", float(out.strip() or 0))
            self.add("index_rss_mib", memory.get("VmRSS", 0) / 1024)
            self.add("index_peak_mib", memory.get("VmHWM", 0) / 1024)
        finally:
            mount.stop()


def build(server: S3Server, count: int, folder: Path) -> tuple[IdcBucket, Path]:
    store = IdcBucket(server.create_bucket("idc-bench", public=True))
    store.add_series("bench", [make_instance(STUDY, SERIES, f"{SERIES}.{n}", pixel_bytes=PIXEL_BYTES, number=n,
                                             modality="CT") for n in range(1, count + 1)])
    return store, store.write_index(folder / "idc_index.parquet")


def median(samples: dict[str, list[float]], name: str) -> float:
    return statistics.median(samples[name])


def render(results: dict[str, Any]) -> str:
    s = results["samples"]
    cold, curl8 = median(s, "dicomfs_cold_s"), median(s, "curl8_s")
    first, ranged = median(s, "dicomfs_first_byte_s"), median(s, "curl_range_s")
    mb = results["series_bytes"] / 1e6
    lines = [BEGIN, "", f"Run {results['when']} on {results['machine']}; {results['instances']} instances, "
             f"{mb:.1f} MB; moto {results['moto']} on loopback; {results['repeat']} interleaved repetitions "
             "(medians; the spread is the range of the per-repetition ratios). Every copied or read file "
             f"was byte-identical to its source: {'yes' if results['all_identical'] else 'NO'}.", "",
             "| measurement | dicomfs | baseline | ratio (spread) | target |", "|---|---|---|---|---|",
             f"| cold `cp -r` of the series vs 8 parallel `curl`s of its objects | {cold:.3f} s "
             f"({mb / cold:.0f} MB/s) | {curl8:.3f} s ({mb / curl8:.0f} MB/s) | **{cold / curl8:.2f}×** "
             f"({report.ratio_spread(s, 'dicomfs_cold_s', 'curl8_s')}) | ≤ 1.3× |",
             *([f"| the floor of the layout: `curl` asking what dicomfs asks (every object's first "
                f"{HEAD_BYTES // 1024} KiB, 16 at a time, then every object, 8 at a time) | — | "
                f"{median(s, 'curl_two_pass_s'):.3f} s | {median(s, 'curl_two_pass_s') / curl8:.2f}× the 8 `curl`s "
                f"({report.ratio_spread(s, 'curl_two_pass_s', 'curl8_s')}) | — |"] if "curl_two_pass_s" in s else []),
             f"| first byte of one instance vs one ranged `curl` of it | {first * 1000:.1f} ms | "
             f"{ranged * 1000:.1f} ms (first byte {median(s, 'curl_range_first_s') * 1000:.1f} ms) | "
             f"**{first / ranged:.2f}×** ({report.ratio_spread(s, 'dicomfs_first_byte_s', 'curl_range_s')}) | "
             "≤ 1.5× |"]
    if "floor_fetch_s" in s:
        fetch, fuse = median(s, "floor_fetch_s"), median(s, "floor_fuse_s")
        floor = {"floor_s": [a + b for a, b in zip(s["floor_fetch_s"], s["floor_fuse_s"], strict=True)],
                 "curl_range_s": s["curl_range_s"]}
        lines += [f"| the floor of the first byte, 1: the object's GET and its MD5 in a warm Python process "
                  f"(urllib3, as dicomfs reads it; no FUSE, no cache) | — | {fetch * 1000:.1f} ms | "
                  f"{fetch / ranged:.2f}× the ranged `curl` "
                  f"({report.ratio_spread(s, 'floor_fetch_s', 'curl_range_s')}) | — |",
                  f"| the floor, 2: `open()` to first `read()` of the same bytes through the pyfuse3 passthrough "
                  f"| — | {fuse * 1000:.2f} ms | — | — |",
                  f"| the floor, 1 + 2 | — | {median(floor, 'floor_s') * 1000:.1f} ms | "
                  f"{median(floor, 'floor_s') / ranged:.2f}× the ranged `curl` "
                  f"({report.ratio_spread(floor, 'floor_s', 'curl_range_s')}); dicomfs "
                  f"{first / median(floor, 'floor_s'):.2f}× this floor | — |"]
    if "index_ls_s" in s:
        lines.append(f"| `ls studies \\| wc -l` of the full index ({int(median(s, 'index_studies')):,} studies, "
                     f"{results['index_release']}, no network) | {median(s, 'index_ls_s'):.2f} s | | | ≤ 5 s |")
        lines.append(f"| daemon RSS after that listing (peak) | {median(s, 'index_rss_mib'):.0f} MiB "
                     f"({median(s, 'index_peak_mib'):.0f} MiB) | | | ≤ 300 MB |")
    else:
        lines.append("| listing of the full index | not run: idc-index-data is not installed | | | |")
    lines += ["", f"Daemon CPU during a cold copy: {median(s, 'daemon_cpu_s'):.2f} s "
              f"({median(s, 'daemon_cpu_s') / (results['series_bytes'] / 1e9):.2f} s per GB); its peak RSS "
              f"{median(s, 'daemon_rss_mib'):.0f} MiB.", "", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=120)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--index-repeat", type=int, default=3)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args(argv)
    stop_on_sigterm()
    require_tools("curl", "cp", "fusermount3")
    import importlib.metadata

    from bench.report import machine_facts
    real_index: Path | None
    try:
        from dicomfs.sources.idc import IdcIndex, default_index

        real_index = default_index()
        release = IdcIndex(real_index).release
    except Exception:  # the extra is not installed
        real_index, release = None, ""
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dicomfs-bench-idc-")))
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dicomfs-bench-idc-", dir="/dev/shm")))
        server = stack.enter_context(S3Server())
        store, index = build(server, args.instances, work)
        bench = Bench(work, scratch, server, store, index)
        for rep in range(args.repeat):
            pairs = [(bench.cold_copy, bench.curls), (bench.first_byte, bench.ranged_curl)]
            for ours, theirs in pairs:
                for step in ((ours, theirs) if rep % 2 == 0 else (theirs, ours)):
                    step()
            bench.first_byte_floor()
            print(f"repetition {rep + 1}: cold copy {bench.samples['dicomfs_cold_s'][-1]:.3f} s, curls "
                  f"{bench.samples['curl8_s'][-1]:.3f} s, first byte {bench.samples['dicomfs_first_byte_s'][-1]:.4f} "
                  f"s, ranged curl {bench.samples['curl_range_s'][-1]:.4f} s", flush=True)
        if real_index is not None:
            for _ in range(args.index_repeat):
                bench.full_index()
                print(f"full index: {bench.samples['index_ls_s'][-1]:.2f} s, RSS "
                      f"{bench.samples['index_rss_mib'][-1]:.0f} MiB", flush=True)
        facts = machine_facts()
        results = {"when": facts["date"], "machine": f"{facts['nproc']} cores ({facts['cpu']}), kernel "
                   f"{facts['kernel']}, dicomfs {facts['dicomfs_commit']}",
                   "instances": args.instances, "series_bytes": bench.series_bytes, "repeat": args.repeat,
                   "moto": importlib.metadata.version("moto"), "index_release": release,
                   "all_identical": all(bench.checks), "samples": bench.samples}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "idc-latest.json").write_text(json.dumps(results, indent=1))
    block = render(results)
    print(block)
    if not args.no_doc:
        report.replace_block(DOC, block, BEGIN, END)
    return 0 if results["all_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
