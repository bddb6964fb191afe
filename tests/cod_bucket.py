"""A COD datastore in a GCS emulator or an S3 bucket holding the demo files (v1, v2, hashed keys) and a big series."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.cod_writer import CodSeriesFiles, write_series
from tests.fsutil import hashes, sh
from tests.servers import CountingProxy, GcsEmulator, S3BucketHandle

BUCKET = "cod-test"
BIG_STUDY, BIG_SERIES = "1.2.826.0.1.3680043.8.498.7", "1.2.826.0.1.3680043.8.498.7.1"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Bucket:
    def __init__(self, emulator: GcsEmulator | S3BucketHandle) -> None:
        self.emulator = emulator
        self.expected: dict[str, dict[str, str]] = {}  # prefix -> mount path -> sha256
        self.tars: dict[str, int] = {}  # object name -> size

    def add(self, prefix: str, series: list[CodSeriesFiles]) -> None:
        objects: dict[str, bytes] = {}
        for one in series:
            written, expected = write_series(prefix, one)
            objects.update(written)
            self.expected.setdefault(prefix, {}).update({k: digest(v) for k, v in expected.items()})
        self.tars.update({k: len(v) for k, v in objects.items() if k.endswith(".tar")})
        self.emulator.upload(objects)


def check_range_then_tar(bucket: Bucket, mount_root: Path, proxy: CountingProxy, copy_to: Path,
                         tar_bound: float = 1.05) -> None:
    """Through a mount whose bucket requests a ``CountingProxy`` counts: one instance of the big
    series read alone is one ranged request of about its size; a ``cp -r`` of the series then is
    the whole tar, once (at most ``tar_bound`` × its size), and every file is byte-identical."""
    tar_size = bucket.tars[f"big/dicomweb/studies/{BIG_STUDY}/series/{BIG_SERIES}.tar"]
    folder = Path("studies") / BIG_STUDY / BIG_SERIES
    one = mount_root / folder / f"{BIG_SERIES}.50.dcm"
    assert digest(one.read_bytes()) == bucket.expected["big/dicomweb"][str(folder / one.name)]
    size = one.stat().st_size
    assert proxy.counts["tar"] == 1
    assert proxy.bytes["tar"] <= 1.1 * size, (proxy.bytes["tar"], size)
    before = proxy.bytes["tar"]
    sh("cp", "-r", str(mount_root / folder), str(copy_to))
    moved = proxy.bytes["tar"] - before
    assert moved <= tar_bound * tar_size, (moved, tar_size)
    assert proxy.counts["tar"] == 2  # the whole tar, once
    copied = {f"{folder}/{k}": v for k, v in hashes(copy_to).items()}
    assert copied == bucket.expected["big/dicomweb"]
    assert len(copied) == 100


def mount_env(bucket: Bucket) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": bucket.emulator.endpoint}
