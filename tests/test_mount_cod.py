"""Real mounts of COD datastores in a GCS emulator (PyPI gcp-storage-emulator) started here."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cod_bucket import BUCKET, Bucket, check_range_then_tar, digest, mount_env
from tests.cod_writer import CodSeriesFiles, write_series
from tests.factory import make_instance
from tests.fsutil import hashes, listdir, p10_hashes, read_errno, sh
from tests.mounting import Mount
from tests.servers import CountingProxy, classify_gcs

pytestmark = pytest.mark.mount  # real servers, processes or mounts (see conftest)

@pytest.mark.parametrize("prefix", ["v1/dicomweb", "v2/dicomweb", "deid/dicomweb"])
def test_every_file_is_byte_identical(bucket: Bucket, prefix: str, mount_factory: Callable[..., Mount]) -> None:
    mount = mount_factory(f"gs://{BUCKET}/{prefix}", env=mount_env(bucket))
    assert p10_hashes(mount.path) == bucket.expected[prefix]
    assert len(bucket.expected[prefix]) == 54
    # and again from the cache after a remount
    mount.stop()
    mount.start()
    assert p10_hashes(mount.path) == bucket.expected[prefix]


def test_downloader_url_form_and_endpoint_option(bucket: Bucket, mount_factory: Callable[..., Mount]) -> None:
    token = "t0k3n-abc"
    mount = mount_factory(f"cod+{bucket.emulator.endpoint}/{BUCKET}/v1?token={token}")
    assert p10_hashes(mount.path) == bucket.expected["v1/dicomweb"]  # "/dicomweb" was appended
    assert "visible in 'ps'" in mount.log and token not in mount.log
    other = mount_factory(f"gs://{BUCKET}/v2/dicomweb", "--endpoint", bucket.emulator.endpoint,
                          name="mnt2", cache="cache2")
    assert p10_hashes(other.path) == bucket.expected["v2/dicomweb"]


def test_listing_and_sizes_touch_no_tar(bucket: Bucket, mount_factory: Callable[..., Mount]) -> None:
    with CountingProxy(bucket.emulator.port, classify_gcs) as proxy:
        mount = mount_factory(f"gs://{BUCKET}/v1/dicomweb", env={"STORAGE_EMULATOR_HOST": proxy.url})
        out = sh("find", str(mount.path / "studies"), "-type", "f", "-printf", "%P %s\n").stdout
        sizes = {f"studies/{name}": size for name, size in (line.split() for line in out.splitlines())}
        assert set(sizes) == set(bucket.expected["v1/dicomweb"])
        assert proxy.counts["tar"] == 0, proxy.paths
        assert proxy.counts["metadata"] == 20  # one index per series, nothing else
    # sizes are the real ones: compare with the bytes read through a fresh mount
    check = mount_factory(f"gs://{BUCKET}/v1/dicomweb", env=mount_env(bucket), name="m3", cache="c3")
    for rel, size in sizes.items():
        assert os.path.getsize(check.path / rel) == int(size)


def test_one_instance_is_one_range_and_a_series_copy_is_one_tar(bucket: Bucket, tmp_path: Path,
                                                                 mount_factory: Callable[..., Mount]) -> None:
    with CountingProxy(bucket.emulator.port, classify_gcs) as proxy:
        mount = mount_factory(f"gs://{BUCKET}/big/dicomweb", env={"STORAGE_EMULATOR_HOST": proxy.url})
        check_range_then_tar(bucket, mount.path, proxy, tmp_path / "copy", tar_bound=1.1)


def test_hostile_buckets_are_contained(bucket: Bucket, tmp_path: Path, mount_factory: Callable[..., Mount]) -> None:
    import gzip
    import json

    prefix = "bad/dicomweb"
    good = {f"1.2.9.1.{n}": make_instance("1.2.9", "1.2.9.1", f"1.2.9.1.{n}", number=n) for n in range(1, 4)}
    objects, expected = write_series(prefix, CodSeriesFiles("1.2.9", "1.2.9.1", good))
    # 1.2.9.2: one instance's bytes corrupted in the tar (CRC32C mismatch)
    corrupt_files = {f"1.2.9.2.{n}": make_instance("1.2.9", "1.2.9.2", f"1.2.9.2.{n}", number=n) for n in (1, 2)}
    corrupt, corrupt_expected = write_series(prefix, CodSeriesFiles("1.2.9", "1.2.9.2", corrupt_files))
    tar_name = f"{prefix}/studies/1.2.9/series/1.2.9.2.tar"
    tar = bytearray(corrupt[tar_name])
    first = corrupt_files["1.2.9.2.1"]
    at = bytes(tar).find(first) + len(first) - 5
    tar[at] ^= 0xFF
    corrupt[tar_name] = bytes(tar)
    objects.update(corrupt)
    # 1.2.9.3: the tar is shorter than the index says
    short_files = {f"1.2.9.3.{n}": make_instance("1.2.9", "1.2.9.3", f"1.2.9.3.{n}", number=n) for n in (1, 2)}
    short, _ = write_series(prefix, CodSeriesFiles("1.2.9", "1.2.9.3", short_files))
    short_tar = f"{prefix}/studies/1.2.9/series/1.2.9.3.tar"
    short_index = json.loads(gzip.decompress(short[f"{prefix}/studies/1.2.9/series/1.2.9.3/metadata.json"]))
    cut = min(e["headers"]["end_byte"] for e in short_index["cod"]["instances"].values()) + 10
    short[short_tar] = short[short_tar][:cut]
    objects.update(short)
    # 1.2.9.4: a hostile index: bad keys, ranges, sizes, encodings — and an error.log
    hostile_files = {"1.2.9.4.1": make_instance("1.2.9", "1.2.9.4", "1.2.9.4.1")}
    hostile, hostile_expected = write_series(prefix, CodSeriesFiles("1.2.9", "1.2.9.4", hostile_files, damaged=True))
    index_name = f"{prefix}/studies/1.2.9/series/1.2.9.4/metadata.json"
    document = json.loads(gzip.decompress(hostile[index_name]))
    entry = document["cod"]["instances"]["1.2.9.4.1"]
    tar_len = len(hostile[f"{prefix}/studies/1.2.9/series/1.2.9.4.tar"])
    bad = {
        "../../escape": dict(entry),
        "1.2/3": dict(entry),
        "1.2.9.4.5": {**entry, "headers": {"start_byte": tar_len - 10, "end_byte": tar_len + 90}, "size": 100},
        "1.2.9.4.6": {**entry, "size": -5},
        "1.2.9.4.7": {**entry, "version": "2.0", "metadata": "!!not base64!!"},
        "1.2.9.4.8": {**entry, "version": "2.0", "metadata": "aGVsbG8="},  # base64, not zstd
        "1.2.9.4.9": {**entry, "version": "9.9"},
        # two entries in the tar's trailing blocks that overlap each other
        "1.2.9.4.10": {**entry, "headers": {"start_byte": tar_len - 600, "end_byte": tar_len - 500}, "size": 100},
        "1.2.9.4.11": {**entry, "headers": {"start_byte": tar_len - 550, "end_byte": tar_len - 450}, "size": 100},
    }
    document["cod"]["instances"].update(bad)
    hostile[index_name] = gzip.compress(json.dumps(document).encode())
    objects.update(hostile)
    # 1.2.9.5: an index that is not JSON at all
    objects[f"{prefix}/studies/1.2.9/series/1.2.9.5.tar"] = b"\0" * 1024
    objects[f"{prefix}/studies/1.2.9/series/1.2.9.5/metadata.json"] = gzip.compress(b"{not json")
    bucket.emulator.upload(objects)

    (tmp_path / "bystander").write_text("untouched")
    mount = mount_factory(f"gs://{BUCKET}/{prefix}", env=mount_env(bucket))
    study = mount.path / "studies" / "1.2.9"
    assert listdir(study) == ["1.2.9.1", "1.2.9.2", "1.2.9.3", "1.2.9.4", "1.2.9.5"]
    assert hashes(study / "1.2.9.1") == {Path(k).name: digest(v) for k, v in expected.items()}
    # CRC mismatch: EIO for that instance, alone (by range) and within the whole tar
    assert read_errno(study / "1.2.9.2" / "1.2.9.2.1.dcm") == errno.EIO
    assert read_errno(study / "1.2.9.2" / "1.2.9.2.2.dcm") == 0
    assert read_errno(study / "1.2.9.2" / "1.2.9.2.1.dcm") == errno.EIO
    # a tar shorter than its index: the entry past its end is skipped, the others serve
    assert listdir(study / "1.2.9.3") == ["1.2.9.3.1.dcm"]
    assert read_errno(study / "1.2.9.3" / "1.2.9.3.1.dcm") == 0
    # the hostile index: only the good entry is listed, and it reads right
    assert listdir(study / "1.2.9.4") == ["1.2.9.4.1.dcm"]
    assert digest((study / "1.2.9.4" / "1.2.9.4.1.dcm").read_bytes()) == next(
        digest(v) for v in hostile_expected.values())
    assert sh("ls", str(study / "1.2.9.5"), check=False).returncode != 0
    assert mount.alive()
    log = mount.log
    for message in ("CRC32C mismatch", "not a safe name",
                    "past the end of the tar", "inconsistent byte range", "not base64 zstd",
                    "does not decompress", "unknown entry version", "overlaps", "damaged",
                    "malformed JSON from metadata.json"):
        assert message in log, message
    assert (tmp_path / "bystander").read_text() == "untouched"
    for path in (tmp_path / "cache").rglob("*"):
        assert "escape" not in path.name and ".." not in path.name


def test_prefetch_plan_bytes_equal_the_transfer_and_ls_filters_on_metadata(bucket: Bucket, tmp_path: Path,
                                                                          demo_dir: Path) -> None:
    from tests.mounting import dicomfs

    source = f"gs://{BUCKET}/v2/dicomweb"
    cache = tmp_path / "cache"
    env = mount_env(bucket)
    total = sum(p.stat().st_size for p in demo_dir.rglob("*.dcm"))
    with CountingProxy(bucket.emulator.port, classify_gcs) as proxy:
        proxy_env = {"STORAGE_EMULATOR_HOST": proxy.url}
        dry = dicomfs("prefetch", source, "--all", "--dry-run", "--cache-dir", str(cache), env=proxy_env, check=True)
        assert "plan: 9 studies, 20 series, 54 instances, " in dry.stdout and f"({total} bytes)" in dry.stdout
        assert "to fetch: 20 series, " in dry.stdout and proxy.counts["tar"] == 0  # sizes from metadata.json
        run = dicomfs("prefetch", source, "--all", "--cache-dir", str(cache), env=proxy_env, check=True)
        assert "fetched 20 series, " in run.stdout and f"({total} bytes)" in run.stdout
        assert proxy.counts["tar"] == 20
        tar_bytes = sum(size for name, size in bucket.tars.items() if name.startswith("v2/"))
        assert total < proxy.bytes["tar"] <= tar_bytes  # each tar once (up to its last member)
    verify = dicomfs("cache", "verify", "--cache-dir", str(cache), env=env, check=True)
    assert "54 instance CRC32Cs): 0 bad" in verify.stdout
    # COD lists studies without attributes: ls filters on each study's instance metadata.
    listing = dicomfs("ls", source, "--cache-dir", str(cache), "--query", "PatientName=Doe^Peter",
                      "--json", env=env, check=True)
    import json

    rows = [json.loads(line) for line in listing.stdout.splitlines()]
    assert len(rows) == 4 and {r["PatientName"] for r in rows} == {"Doe^Peter"}
