"""A COD datastore in a GCS emulator or an S3 bucket holding the demo files (v1, v2, hashed keys) and a big series."""

from __future__ import annotations

import hashlib

from tests.cod_writer import CodSeriesFiles, write_series
from tests.servers import GcsEmulator, S3BucketHandle

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


def mount_env(bucket: Bucket) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": bucket.emulator.endpoint}
