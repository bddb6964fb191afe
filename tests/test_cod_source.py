"""Unit tests of the COD source: index parsing, pagination (mock transport), tar routing, URLs."""

from __future__ import annotations

import base64
import gzip
import json
import logging
from collections.abc import Callable, Iterator

import httpx
import pytest
import zstandard

from dicomfs.errors import ProtocolError, TransferBroken, UsageError
from dicomfs.records import SeriesRecord
from dicomfs.sources import parse_source
from dicomfs.sources.base import Credentials
from dicomfs.sources.cod import CodSource, _route
from dicomfs.sources.cod_metadata import CodInstance, parse_series_index
from dicomfs.sources.gcs import GcsBucket
from tests.cod_writer import CodSeriesFiles, crc32c_b64, write_series
from tests.factory import MemorySink as Sink
from tests.factory import make_instance, streamed
from tests.servers import AnsweringServer

pytestmark = pytest.mark.mount  # real servers, processes or mounts (see conftest)

def paged_listing(prefixes: list[str], page: int) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == "Bearer tok"
        assert request.headers["X-Goog-User-Project"] == "billing-project"
        start = int(request.url.params.get("pageToken") or 0)
        body: dict[str, object] = {"kind": "storage#objects", "prefixes": prefixes[start:start + page]}
        if start + page < len(prefixes):
            body["nextPageToken"] = str(start + page)
        return httpx.Response(200, json=body)

    return handler


async def test_study_listing_follows_every_page() -> None:
    prefixes = [f"v1/dicomweb/studies/1.2.{n}/" for n in range(2500)]
    source = CodSource(GcsBucket("http://gcs.test", "bkt", Credentials(token="tok"), user_project="billing-project",
                                 transport=httpx.MockTransport(streamed(paged_listing(prefixes, 1000)))),
                       "v1/dicomweb")
    studies = await source.list_studies()
    assert len(studies) == 2500
    assert {s.uid for s in studies} == {f"1.2.{n}" for n in range(2500)}


def test_source_url_forms() -> None:
    assert parse_source("gs://bkt/v1/dicomweb").location == "gs://bkt/v1/dicomweb"
    assert parse_source("gs://bkt/exact/path/").location == "gs://bkt/exact/path"
    spec = parse_source("cod+https://storage.googleapis.com/bkt/pre/fix?token=abc")
    assert (spec.location, spec.endpoint, spec.token) == ("gs://bkt/pre/fix/dicomweb",
                                                          "https://storage.googleapis.com", "abc")
    assert parse_source("cod+https://storage.googleapis.com/bkt").location == "gs://bkt/dicomweb"
    assert "abc" not in repr(spec)
    for bad in ("gs://", "gs://bad bucket/x", "cod+https://host/"):
        with pytest.raises(UsageError):
            parse_source(bad)


def index_of(files: dict[str, bytes], **options: object) -> tuple[bytes, bytes]:
    objects, _ = write_series("p", CodSeriesFiles("1.2", "1.2.3", files, **options))  # type: ignore[arg-type]
    tar = next(v for k, v in objects.items() if k.endswith(".tar"))
    return next(v for k, v in objects.items() if k.endswith("metadata.json")), tar


FILES = {f"1.2.3.{n}": make_instance("1.2", "1.2.3", f"1.2.3.{n}", number=n) for n in range(1, 4)}


@pytest.mark.parametrize("options", [{"version": 1}, {"version": 2}, {"version": 2, "gzip_metadata": False},
                                     {"version": 1, "hashed_keys": True}])
def test_index_versions_and_encodings(options: dict[str, object]) -> None:
    raw, tar = index_of(FILES, **options)
    index = parse_series_index(raw, len(tar))
    assert len(index.instances) == 3
    for entry in index.instances.values():
        data = tar[entry.start:entry.end]
        assert data in FILES.values()
        assert entry.metadata["00080018"]["Value"][0] in FILES
        assert entry.crc32c is not None and entry.mtime_ns


def test_versions_are_dispatched_per_instance() -> None:
    raw, tar = index_of(FILES, version=1)
    document = json.loads(gzip.decompress(raw))
    key = sorted(document["cod"]["instances"])[0]
    entry = document["cod"]["instances"][key]
    packed = zstandard.ZstdCompressor().compress(json.dumps(entry["metadata"]).encode())
    entry.update(version="2.0", metadata=base64.b64encode(packed).decode())
    index = parse_series_index(json.dumps(document).encode(), len(tar))
    assert len(index.instances) == 3 and index.instances[key].metadata["00080018"]["Value"] == [key]


def test_hostile_entries_are_skipped(caplog: pytest.LogCaptureFixture) -> None:
    raw, tar = index_of(FILES, version=1)
    document = json.loads(gzip.decompress(raw))
    entries = document["cod"]["instances"]
    good = entries["1.2.3.1"]
    entries.update({
        "../up": good, "a/b": good, "x" * 300: good,
        "1.9": {**good, "size": -1},
        "1.10": {**good, "headers": {"start_byte": -512, "end_byte": good["size"] - 512}},
        "1.11": {**good, "headers": {"start_byte": len(tar), "end_byte": len(tar) + good["size"]}},
        "1.12": {**good, "version": "3.0"},
        "1.13": {**good, "version": "2.0", "metadata": "%%%"},
        "1.14": {**good, "version": "2.0", "metadata": base64.b64encode(b"not zstd").decode()},
        "1.15": {**good, "version": "2.0",
                 "metadata": base64.b64encode(zstandard.ZstdCompressor().compress(b"[not json")).decode()},
        "1.16": {**good, "crc32c": "???"},
        "1.17": {**good, "headers": "nope"},
        "1.18": "not an object",
    })
    with caplog.at_level(logging.WARNING):
        index = parse_series_index(json.dumps(document).encode(), len(tar))
    assert set(index.instances) == {"1.2.3.1", "1.2.3.2", "1.2.3.3"}
    assert caplog.text.count("skipped") == 13


@pytest.mark.parametrize("raw", [b"", b"[]", b"{}", b'{"cod": []}', gzip.compress(b"{nope"), b"\x1f\x8bnot gzip"])
def test_unusable_index_documents(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_series_index(raw, None)


def chunks_of(data: bytes, size: int) -> Iterator[bytes]:
    for at in range(0, len(data), size):
        yield data[at:at + size]


def entry(key: str, start: int, data: bytes, crc: str | None = None) -> CodInstance:
    value = int.from_bytes(base64.b64decode(crc or crc32c_b64(data)), "big")
    return CodInstance(key, start, len(data), value, {})


@pytest.mark.parametrize("chunk", [1, 7, 512, 100_000])
async def test_route_cuts_instances_out_of_any_chunking(chunk: int) -> None:
    a, b = b"A" * 700, b"B" * 300
    tar = b"h" * 512 + a + b"p" * 324 + b"h" * 512 + b + b"\0" * 1024
    sink = Sink()
    ok = _route(chunks_of(tar, chunk), 0, [entry("a", 512, a), entry("b", 512 + 700 + 324 + 512, b)],
                sink.in_thread())
    assert ok and sink.files == {"a": a, "b": b}


async def test_route_rejects_bad_crc_and_short_streams() -> None:
    a, b = b"A" * 700, b"B" * 300
    tar = a + b
    sink = Sink()
    ok = _route(chunks_of(tar, 64), 0, [entry("a", 0, a, crc32c_b64(b"other")), entry("b", 700, b)],
                sink.in_thread())
    assert not ok and sink.files == {"b": b}  # the corrupt one is never finished, the other is
    with pytest.raises(TransferBroken, match="ended before"):  # resumable: the blob store may try again
        _route(chunks_of(tar[:900], 64), 0, [entry("a", 0, a), entry("b", 700, b)], Sink().in_thread())


async def test_fetch_instance_uses_one_range_request() -> None:
    """Against a loopback server answering as GCS does (the object read runs in a worker thread,
    with urllib3: a real socket)."""
    raw, tar = index_of(FILES, version=1)
    index = parse_series_index(raw, len(tar))
    seen: list[str | None] = []
    name = "p/studies/1.2/series/1.2.3"

    def answer(path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        if "prefix=" in path:
            listing = {"items": [{"name": f"{name}.tar", "size": str(len(tar))},
                                 {"name": f"{name}/metadata.json", "size": "1"}]}
            return 200, {"Content-Type": "application/json"}, json.dumps(listing).encode()
        if "metadata.json" in path:
            return 200, {"Content-Length": str(len(raw))}, raw
        seen.append(headers.get("range"))
        first, last = headers["range"][len("bytes="):].split("-")
        body = tar[int(first):int(last) + 1]
        return 206, {"Content-Range": f"bytes {first}-{last}/{len(tar)}", "Content-Length": str(len(body))}, body

    with AnsweringServer(answer) as server:
        source = CodSource(GcsBucket(server.url, "bkt", Credentials()), "p")
        await source.list_series("1.2")
        instances = await source.list_instances(SeriesRecord("1.2", "1.2.3"))
        target = next(i for i in instances if i.key == "1.2.3.2")
        sink = Sink()
        await source.fetch_instance(target, sink)
        await source.aclose()
    wanted = index.instances["1.2.3.2"]
    assert sink.files == {"1.2.3.2": FILES["1.2.3.2"]}
    assert seen == [f"bytes={wanted.start}-{wanted.end - 1}"]
