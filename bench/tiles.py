"""A tile of a large slide level through ``dicomfs serve``: this checkout, an earlier commit, curl.

One series in a bucket holds a slide level: an encapsulated instance of ``--frames`` frames of
~64 KiB with a basic offset table; ``--archive cod``: a COD series in a GCS emulator (PyPI
``gcp-storage-emulator``), ``--archive idc``: an IDC-layout object in moto's S3 server with an
index parquet (the servers the tests use). Side by side, in alternating order, ``--repeat``
times: a fresh ``dicomfs serve`` of the bucket with an empty cache asked, as a viewer asks, for
the series' metadata, then the frame in the middle of the level, then the next one (each timed
from request to the last byte); the same for the ``--base`` commit (a ``git worktree``, run from
there); and ``curl`` of that frame's byte range straight from the bucket. The bucket bytes each
serve asked for are counted by a proxy in front of it; ``--latency MS`` makes that proxy wait
so long before each request it passes on (a cloud bucket's round trip), and puts curl behind
such a proxy too; ``--more N`` puts N more instances (of 64 KiB) in the series, whose headers its
metadata reads too; ``--all`` then asks for every frame of the level at once (the ``frames`` URL
of its pixel data's BulkDataURI), beside curl of the whole level. Every frame served is
compared with pydicom's.

    .venv/bin/python -m bench.tiles --archive cod --base 5185aa2 --frames 2000 --repeat 7 [--latency 20]

Prints medians; writes nothing into the repository.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pydicom
from pydicom.encaps import generate_frames

from bench.ab import versions_of
from tests.cod_bucket import Bucket
from tests.cod_writer import CodSeriesFiles, frame_table
from tests.factory import make_instance, slide
from tests.idc_bucket import IdcBucket
from tests.reference import parts
from tests.servers import CountingProxy, GcsEmulator, S3Server, free_port, wait_until

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.71", "1.2.826.0.1.3680043.8.498.71.1"
ANY_FRAME = "multipart/related; type=application/octet-stream; transfer-syntax=*"
TIMEOUT = 300


@dataclass
class Archive:
    """The level in a bucket: what ``dicomfs serve`` is given (with the proxy's URL), and where
    curl finds the level's first byte."""

    port: int  # the bucket server's
    serve_args: list[str]  # (``{proxy}`` stands for the proxy's URL)
    env: dict[str, str]  # (values may hold ``{proxy}`` too)
    level_url: str  # the object holding the level
    level_start: int  # the level's first byte in it


def cod_archive(stack: contextlib.ExitStack, data: bytes, sop: str, work: Path, more: dict[str, bytes]) -> Archive:
    emulator = stack.enter_context(GcsEmulator("bench-frames"))
    Bucket(emulator).add("s/dicomweb", [CodSeriesFiles(STUDY, SERIES, {sop: data, **more}, version=2)])
    folder = f"s/dicomweb/studies/{STUDY}/series/{SERIES}"
    objects = f"{emulator.endpoint}/storage/v1/b/{emulator.bucket}/o"
    index = json.loads(gzip.decompress(httpx.get(f"{objects}/{quote(folder + '/metadata.json', safe='')}",
                                                 params={"alt": "media"}, timeout=60).content))
    return Archive(emulator.port, [f"gs://{emulator.bucket}/s/dicomweb"], {"STORAGE_EMULATOR_HOST": "{proxy}"},
                   f"{objects}/{quote(folder + '.tar', safe='')}?alt=media",
                   index["cod"]["instances"][sop]["headers"]["start_byte"])


def idc_archive(stack: contextlib.ExitStack, data: bytes, sop: str, work: Path, more: dict[str, bytes]) -> Archive:
    server = stack.enter_context(S3Server())
    store = IdcBucket(server.create_bucket("idc-bench", public=True))
    store.add_series("bench", [data, *more.values()])
    index = store.write_index(work / "idc_index.parquet")
    key = store.object_of[f"studies/{STUDY}/{SERIES}/{sop}.dcm"]
    return Archive(server.port, ["idc", "--idc-index", str(index), "--endpoint", "{proxy}"],
                   server.env(signed=False), f"{server.endpoint}/idc-bench/{key}", 0)


ARCHIVES = {"cod": cod_archive, "idc": idc_archive}


def serve_once(checkout: Path, archive: Archive, work: Path, sop: str, frame: int,
               reference: list[bytes], latency: float, every: bool = False) -> tuple[float, float, float, int, float]:
    """A fresh ``dicomfs serve`` from ``checkout``: (seconds to the series metadata, to frame
    ``frame``, to the next one; bucket bytes asked for; with ``every``, seconds to all the
    frames, else 0)."""
    with CountingProxy(archive.port, lambda path: "bucket") as proxy:
        proxy.delay = latency
        port, log_path = free_port(), work / f"serve-{time.monotonic_ns()}.log"
        args = [a.replace("{proxy}", proxy.url) for a in archive.serve_args]
        env = {k: v.replace("{proxy}", proxy.url) for k, v in archive.env.items()}
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "dicomfs", "serve", *args, "--port", str(port), "--cache-dir",
                 str(work / f"cache-{time.monotonic_ns()}")], cwd=checkout, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env={**os.environ, **env})
        try:
            wait_until(lambda: "serving" in log_path.read_text(errors="replace") or process.poll() is not None,
                       60, "dicomfs serve to listen")
            root = f"http://127.0.0.1:{port}/dicomweb/studies/{STUDY}/series/{SERIES}"
            started = time.perf_counter()
            httpx.get(f"{root}/metadata", timeout=TIMEOUT).raise_for_status()
            timings = [time.perf_counter() - started]
            for number in (frame, frame + 1):
                started = time.perf_counter()
                response = httpx.get(f"{root}/instances/{sop}/frames/{number}", headers={"Accept": ANY_FRAME},
                                     timeout=TIMEOUT)
                timings.append(time.perf_counter() - started)
                if response.status_code != 200 or [d for _, d in parts(response)] != [reference[number - 1]]:
                    raise SystemExit(f"frame {number} from {checkout}: status {response.status_code}, not pydicom's")
            moved, all_frames = proxy.bytes["bucket"], 0.0
            if every:
                started = time.perf_counter()
                response = httpx.get(f"{root}/instances/{sop}/frames", headers={"Accept": ANY_FRAME}, timeout=TIMEOUT)
                all_frames = time.perf_counter() - started
                if response.status_code != 200 or [d for _, d in parts(response)] != reference:
                    raise SystemExit(f"all frames from {checkout}: status {response.status_code}, not pydicom's")
            return timings[0], timings[1], timings[2], moved, all_frames
        finally:
            process.terminate()
            process.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", choices=sorted(ARCHIVES), default="cod")
    parser.add_argument("--base", required=True, help="the earlier commit to compare with")
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--latency", type=float, default=0.0, help="ms before each bucket request")
    parser.add_argument("--more", type=int, default=0, help="more instances (64 KiB) in the series")
    parser.add_argument("--all", action="store_true", help="then every frame of the level at once")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dicomfs-tiles-"))
    try:
        with versions_of(args.base, work) as versions:
            compare(versions, work, args.archive, args.frames, args.repeat, args.latency / 1000, args.more, args.all)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def compare(versions: dict[str, Path], work: Path, kind: str, frame_count: int, repeat: int,
            latency: float, more_count: int = 0, every: bool = False) -> None:
    """Each version's fresh serves and curl, alternating, ``repeat`` times; medians printed."""
    data = slide(STUDY, SERIES, encapsulated=True, frames=frame_count, frame_bytes=65536, number=1)
    more = {f"{SERIES}.{k}": make_instance(STUDY, SERIES, f"{SERIES}.{k}", pixel_bytes=65536, number=k)
            for k in range(2, more_count + 2)}
    sop = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
    reference = list(generate_frames(pydicom.dcmread(io.BytesIO(data)).PixelData, number_of_frames=frame_count))
    frame = frame_count // 2
    table = frame_table(data)
    offset, length = table["CustomOffsetTable"][frame - 1], table["CustomOffsetTableLengths"][frame - 1]
    print(f"{kind}: a level of {len(data) / 1e6:.1f} MB, {frame_count} frames; frame {frame}: {length} bytes; "
          f"{latency * 1000:g} ms before each bucket request; {more_count} more instances", flush=True)
    samples: dict[str, list[tuple[float, float, float, int, float]]] = {name: [] for name in versions}
    curl: list[float] = []
    curl_level: list[float] = []
    with contextlib.ExitStack() as stack:
        archive = ARCHIVES[kind](stack, data, sop, work, more)
        start = archive.level_start + offset
        curl_proxy = stack.enter_context(CountingProxy(archive.port, lambda path: "bucket"))
        curl_proxy.delay = latency
        level_url = archive.level_url.replace(f"127.0.0.1:{archive.port}", curl_proxy.url.split("//")[1])
        for rep in range(repeat):
            order = [*versions, "curl"] if rep % 2 == 0 else ["curl", *list(versions)[::-1]]
            for name in order:
                if name == "curl":
                    started = time.perf_counter()
                    got = subprocess.run(["curl", "-sS", "--fail", "-r", f"{start}-{start + length - 1}",
                                          level_url], capture_output=True, check=True, timeout=TIMEOUT).stdout
                    curl.append(time.perf_counter() - started)
                    if got != reference[frame - 1]:
                        raise SystemExit("curl's range is not the frame")
                    if every:
                        started = time.perf_counter()
                        got = subprocess.run(["curl", "-sS", "--fail", "-r", f"{archive.level_start}-"
                                              f"{archive.level_start + len(data) - 1}", level_url],
                                             capture_output=True, check=True, timeout=TIMEOUT).stdout
                        curl_level.append(time.perf_counter() - started)
                        if got != data:
                            raise SystemExit("curl's range is not the level")
                else:
                    samples[name].append(serve_once(versions[name], archive, work, sop, frame, reference, latency,
                                                    every))
            print(f"repetition {rep + 1}/{repeat} done", flush=True)
    for name, runs in samples.items():
        metadata, first, following, moved, all_frames = zip(*runs, strict=True)
        print(f"{name}: series metadata {statistics.median(metadata) * 1000:.1f} ms, frame {frame} "
              f"{statistics.median(first) * 1000:.1f} ms ({min(first) * 1000:.1f}-{max(first) * 1000:.1f}), the next "
              f"{statistics.median(following) * 1000:.1f} ms; {statistics.median(moved) / 1e6:.3f} MB asked of the "
              "bucket" + (f"; all frames {statistics.median(all_frames) * 1000:.1f} ms "
                          f"({min(all_frames) * 1000:.1f}-{max(all_frames) * 1000:.1f})" if every else ""))
    print(f"curl of the frame's range: {statistics.median(curl) * 1000:.1f} ms"
          + (f"; of the whole level: {statistics.median(curl_level) * 1000:.1f} ms" if every else ""))


if __name__ == "__main__":
    raise SystemExit(main())
