"""Real mounts of COD datastores in S3: moto's S3 server (PyPI) on loopback, started here.

Two servers: one that checks every request's SigV4 signature against an IAM user (a private
bucket), one that lets anyone read (a public bucket, read anonymously).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from dicomfs.sources.s3 import S3Bucket
from tests.cod_bucket import BIG_SERIES, BIG_STUDY, Bucket, check_range_then_tar
from tests.cod_writer import CodSeriesFiles, series_from_files
from tests.factory import make_instance
from tests.fsutil import p10_hashes
from tests.mounting import Mount, dicomfs
from tests.servers import CountingProxy, S3Server, classify_gcs

pytestmark = pytest.mark.mount  # real servers, processes or mounts (see conftest)

PRIVATE, PUBLIC = "cod-private", "cod-public"


def _fill(store: Bucket, files: list[bytes]) -> None:
    store.add("v1/dicomweb", series_from_files(files, version=1))
    store.add("v2/dicomweb", series_from_files(files, version=2, gzip_metadata=False))
    store.add("deid/dicomweb", series_from_files(files, version=2, hashed_keys=True))
    big = {f"{BIG_SERIES}.{n}": make_instance(BIG_STUDY, BIG_SERIES, f"{BIG_SERIES}.{n}", pixel_bytes=20_000,
                                              number=n) for n in range(1, 101)}
    store.add("big/dicomweb", [CodSeriesFiles(BIG_STUDY, BIG_SERIES, big)])


@pytest.fixture(scope="module")
def private(demo_dir: Path) -> Iterator[Bucket]:
    with S3Server(enforce_auth=True) as server:
        store = Bucket(server.create_bucket(PRIVATE))
        _fill(store, [p.read_bytes() for p in sorted(demo_dir.rglob("*.dcm"))])
        yield store


@pytest.fixture(scope="module")
def public(demo_dir: Path) -> Iterator[Bucket]:
    with S3Server() as server:
        store = Bucket(server.create_bucket(PUBLIC, public=True))
        _fill(store, [p.read_bytes() for p in sorted(demo_dir.rglob("*.dcm"))])
        yield store


def _server(store: Bucket) -> S3Server:
    return store.emulator.server  # type: ignore[union-attr]


@pytest.mark.parametrize("prefix", ["v1/dicomweb", "v2/dicomweb", "deid/dicomweb"])
def test_signed_requests_read_every_file_byte_identical(private: Bucket, prefix: str,
                                                        mount_factory: Callable[..., Mount]) -> None:
    mount = mount_factory(f"s3://{PRIVATE}/{prefix}", env=_server(private).env())
    assert p10_hashes(mount.path) == private.expected[prefix]
    assert len(private.expected[prefix]) == 54
    assert _server(private).secret_key not in mount.log
    mount.stop()
    mount.start()  # and again from the cache
    assert p10_hashes(mount.path) == private.expected[prefix]


def test_endpoint_option_and_anonymous_reads_of_a_public_bucket(public: Bucket,
                                                                mount_factory: Callable[..., Mount]) -> None:
    env = {**_server(public).env(signed=False), "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # --endpoint wins
    mount = mount_factory(f"s3://{PUBLIC}/v2/dicomweb", "--endpoint", _server(public).endpoint, env=env)
    assert p10_hashes(mount.path) == public.expected["v2/dicomweb"]
    # with credentials in the environment, --no-sign-request still sends none
    signed_env = {**_server(public).env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    other = mount_factory(f"s3://{PUBLIC}/v1/dicomweb", "--no-sign-request", env=signed_env, name="m2", cache="c2")
    assert p10_hashes(other.path) == public.expected["v1/dicomweb"]


def test_refusals_are_one_line_and_never_show_the_secret(private: Bucket, tmp_path: Path) -> None:
    server = _server(private)
    wrong = {**server.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret-0123"}
    result = dicomfs("ls", f"s3://{PRIVATE}/v1/dicomweb", "--cache-dir", str(tmp_path / "c1"), env=wrong)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused access (HTTP 403)" in lines[0], result.stderr
    assert "wrong-secret-0123" not in result.stderr + result.stdout
    # no credentials at all against a bucket that checks signatures: refused, one line
    result = dicomfs("ls", f"s3://{PRIVATE}/v1/dicomweb", "--cache-dir", str(tmp_path / "c2"),
                     env=server.env(signed=False))
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_one_instance_is_one_range_and_a_series_copy_is_one_tar(public: Bucket, tmp_path: Path,
                                                                 mount_factory: Callable[..., Mount]) -> None:
    """Transfer accounting, counted by a proxy in front of the server (the public one: a proxy
    changes the Host header a signature covers)."""
    with CountingProxy(_server(public).port, classify_gcs) as proxy:
        mount = mount_factory(f"s3://{PUBLIC}/big/dicomweb", "--no-sign-request",
                              env={**_server(public).env(signed=False), "AWS_ENDPOINT_URL": proxy.url})
        check_range_then_tar(public, mount.path, proxy, tmp_path / "copy")


def test_listings_follow_every_continuation_token(private: Bucket) -> None:
    """ListObjectsV2 in pages of 7 against the real server: every study, no repeats."""
    server = _server(private)
    from botocore.credentials import Credentials

    async def listing() -> tuple[list[str], int]:
        bucket = S3Bucket(PRIVATE, endpoint=server.endpoint, credentials=Credentials(server.access_key,
                                                                                       server.secret_key),
                          page_size=7)
        try:
            prefixes, _ = await bucket.list("v1/dicomweb/studies/")
            _, objects = await bucket.list("v1/dicomweb/studies/", delimiter=None)
            return prefixes, len(objects)
        finally:
            await bucket.aclose()

    prefixes, objects = trio.run(listing)
    studies = {name.split("/")[1] for name in private.expected["v1/dicomweb"]}
    assert sorted(p.split("/")[-2] for p in prefixes) == sorted(studies)
    assert len(prefixes) == len(studies) > 7
    assert objects == 2 * 20  # a tar and a metadata.json per series
