"""Headers read into DICOM JSON by 16 threads at once, as an IDC series' metadata reads them.

``--instances`` secondary captures (64 KiB of pixels; headers of ~1 KB) made in memory, each
read with ``instancemeta.header_metadata`` over a ``bucket.ObjectFile`` that holds its first
16 KiB (as a listing left them: no request), 16 threads at once. Side by side, alternating,
``--repeat`` times: as dicomfs does it, and with ``dicomread.import_pydicom`` taking its lock at
every call, as it did before `import_pydicom: no lock once pydicom is whole` (it is called for
every element of a header). Prints medians; writes nothing.

    .venv/bin/python -m bench.headers [--instances 400] [--repeat 7]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from dicomfs import dicomread, instancemeta
from dicomfs.sources.bucket import ObjectFile
from dicomfs.tasks import StopSignal
from tests.factory import make_instance
from tests.test_dicomjson import _BytesBucket

THREADS = 16
FIRST = 16 << 10


class _NeverImported:
    """In place of ``dicomread._PYDICOM_IMPORTED``: every call takes the lock (the old way)."""

    def is_set(self) -> bool:
        return False

    def set(self) -> None:
        pass


@contextlib.contextmanager
def lock_every_call() -> Iterator[None]:
    real = dicomread._PYDICOM_IMPORTED
    dicomread._PYDICOM_IMPORTED = _NeverImported()  # type: ignore[assignment]
    try:
        yield
    finally:
        dicomread._PYDICOM_IMPORTED = real


def read_all(files: list[bytes]) -> float:
    def one(data: bytes) -> None:
        file = ObjectFile(_BytesBucket(data), "x", len(data), StopSignal(), first_block=FIRST,  # type: ignore[arg-type]
                          first=data[:FIRST])
        instancemeta.header_metadata(file, "x")

    with ThreadPoolExecutor(THREADS) as pool:
        started = time.perf_counter()
        list(pool.map(one, files))
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    files = [make_instance("1.2.826.0.1.3680043.8.498.72", "1.2.826.0.1.3680043.8.498.72.1",
                           f"1.2.826.0.1.3680043.8.498.72.1.{k}", pixel_bytes=65536, number=k)
             for k in range(1, args.instances + 1)]
    dicomread.import_pydicom()
    read_all(files[:THREADS])  # (warm)
    now, before = [], []
    for rep in range(args.repeat):
        for side in (("now", "before") if rep % 2 == 0 else ("before", "now")):
            if side == "now":
                now.append(read_all(files))
            else:
                with lock_every_call():
                    before.append(read_all(files))
    print(f"{args.instances} headers, {THREADS} threads, {args.repeat} alternating repetitions, medians: "
          f"no lock once imported {statistics.median(now) * 1000:.0f} ms "
          f"({min(now) * 1000:.0f}-{max(now) * 1000:.0f}), "
          f"the lock at every call {statistics.median(before) * 1000:.0f} ms "
          f"({min(before) * 1000:.0f}-{max(before) * 1000:.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
