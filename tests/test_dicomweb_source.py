"""The DICOMweb source against a mock transport (QIDO: paging, empty answers, hostile answers) and,
for series retrieves (urllib3 in a worker thread), a loopback server answering as a test says."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import httpx
import pytest
import trio

from dicomfs.errors import ProtocolError, SourceError, SourceUnavailable
from dicomfs.records import SeriesRecord
from dicomfs.sources.base import Credentials
from dicomfs.sources.dicomweb import SERIES_ACCEPT, DicomwebSource
from dicomfs.sources.http import RetryPolicy
from tests.factory import MemorySink as Sink
from tests.factory import make_instance, multipart, streamed
from tests.servers import Answer, AnsweringServer

ROOT = "http://archive.test/dicom-web"


def study_row(uid: object) -> dict[str, dict[str, object]]:
    return {"0020000D": {"vr": "UI", "Value": [uid]}, "00080020": {"vr": "DA", "Value": ["20240102"]}}


def source_for(handler: Callable[[httpx.Request], httpx.Response], **kwargs: int) -> DicomwebSource:
    source = DicomwebSource(ROOT, Credentials(), transport=httpx.MockTransport(streamed(handler)), **kwargs)
    source.http.retry = RetryPolicy(attempts=3, first_delay=0.001, max_delay=0.01)
    return source


MULTIPART = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=dicomfs-test-boundary'}


def retrieving(answer: Answer) -> tuple[AnsweringServer, DicomwebSource]:
    server = AnsweringServer(answer)
    source = DicomwebSource(f"{server.url}/dicom-web", Credentials())
    source.blocking.retry = RetryPolicy(attempts=3, first_delay=0.001, max_delay=0.01)
    return server, source


async def test_qido_pages_through_large_listings() -> None:
    uids = [f"1.2.3.{i}" for i in range(2500)]
    seen_queries = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen_queries.append(str(request.url))
        limit = int(request.url.params["limit"])
        offset = int(request.url.params["offset"])
        return httpx.Response(200, json=[study_row(u) for u in uids[offset:offset + limit]])

    source = source_for(handler, page_size=1000)
    studies = await source.list_studies()
    assert [s.uid for s in studies] == uids
    assert len(seen_queries) == 3


async def test_qido_follows_a_server_that_caps_pages_and_says_so() -> None:
    uids = [f"1.2.3.{i}" for i in range(250)]

    def handler(request: httpx.Request) -> httpx.Response:
        offset = int(request.url.params["offset"])
        page = uids[offset:offset + 100]
        headers = {"Warning": "299 archive: result truncated"} if len(page) == 100 else {}
        return httpx.Response(200, json=[study_row(u) for u in page], headers=headers)

    assert [s.uid for s in await source_for(handler).list_studies()] == uids


async def test_qido_stops_when_a_server_ignores_offset() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=[study_row(f"1.2.{i}") for i in range(5)])

    assert len(await source_for(handler, page_size=5).list_studies()) == 5


@pytest.mark.parametrize("response", [httpx.Response(204), httpx.Response(200, json=[]),
                                      httpx.Response(200, content=b"")])
async def test_empty_answers_mean_empty(response: httpx.Response) -> None:
    assert await source_for(lambda request: response).list_studies() == []


async def test_hostile_uids_are_skipped() -> None:
    rows = [study_row(u) for u in ["1.2.3", "../../etc", "1.2/3", "1.2\x003", "9" * 300, 17, None]]
    rows.append({"0020000D": {"vr": "UI"}})
    rows.append(study_row("1.2.3"))  # duplicate

    studies = await source_for(lambda r: httpx.Response(200, json=rows)).list_studies()
    assert [s.uid for s in studies] == ["1.2.3"]


@pytest.mark.parametrize("body", [b"{not json", b'{"an": "object"}', b"[1, 2]"])
async def test_malformed_json_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        await source_for(lambda r: httpx.Response(200, content=body)).list_studies()


async def test_retries_on_5xx_and_429_then_succeeds() -> None:
    answers = [httpx.Response(503), httpx.Response(429, headers={"Retry-After": "0"}),
               httpx.Response(200, json=[study_row("1.2")])]

    def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)

    assert [s.uid for s in await source_for(handler).list_studies()] == ["1.2"]


async def test_unreachable_archive_is_source_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(SourceUnavailable):
        await source_for(handler).check()


async def test_auth_failure_names_no_secret() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == "Bearer s3cr3t-token"
        return httpx.Response(401)

    source = DicomwebSource(ROOT, Credentials(token="s3cr3t-token"), transport=httpx.MockTransport(handler))
    with pytest.raises(SourceUnavailable) as info:
        await source.check()
    assert "s3cr3t" not in str(info.value)
    assert "s3cr3t" not in repr(Credentials(token="s3cr3t-token", password="pw"))


@pytest.mark.parametrize("lengths", [True, False])
async def test_series_retrieve_names_parts_by_sop_uid(lengths: bool) -> None:
    files = {f"1.2.3.4.{i}": make_instance("1.2.3", "1.2.3.4", f"1.2.3.4.{i}", number=i) for i in range(5)}
    body = multipart(list(files.values()), lengths=lengths)

    def answer(path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], list[bytes]]:
        assert headers["accept"] == SERIES_ACCEPT
        assert path == "/dicom-web/studies/1.2.3/series/1.2.3.4"
        return 200, MULTIPART, [body[i:i + 1000] for i in range(0, len(body), 1000)]  # in many pieces

    server, source = retrieving(answer)
    sink = Sink()
    with server:
        await source.fetch_series(SeriesRecord("1.2.3", "1.2.3.4"), sink)
    assert sink.files == files
    assert sink.sizes == {k: (len(v) if lengths else None) for k, v in files.items()}
    assert sink.arrivals == len(body) and sink.published >= 1


async def test_series_retrieve_rejects_truncated_and_non_dicom_parts() -> None:
    good = make_instance("1.2.3", "1.2.3.4", "1.2.3.4.1")
    bodies = {"truncated": multipart([good])[:-40], "junk": multipart([b"\0" * 200])}
    statuses = {"truncated": 200, "junk": 200, "missing": 404}

    def answer(path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        which = path.split("/")[3]  # the "study" UID names the case
        return statuses[which], MULTIPART, bodies.get(which, b"")

    server, source = retrieving(answer)
    with server:
        with pytest.raises(ProtocolError, match="truncated"):
            await source.fetch_series(SeriesRecord("truncated", "1.2.3.4"), Sink())
        with pytest.raises(ProtocolError, match="not a DICOM"):
            await source.fetch_series(SeriesRecord("junk", "1.2.3.4"), Sink())
        with pytest.raises(SourceError, match="HTTP 404"):
            await source.fetch_series(SeriesRecord("missing", "1.2.3.4"), Sink())


async def test_series_retrieve_sends_credentials_and_retries_5xx_but_names_no_secret() -> None:
    calls = []

    def answer(path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        calls.append(headers.get("authorization"))
        return 503, {"Content-Length": "0"}, b""

    server = AnsweringServer(answer)
    source = DicomwebSource(f"{server.url}/dicom-web", Credentials(user="u", password="s3cr3t-pw"))
    source.blocking.retry = RetryPolicy(attempts=3, first_delay=0.001, max_delay=0.01)
    with server:
        with pytest.raises(SourceUnavailable, match="HTTP 503") as info:
            await source.fetch_series(SeriesRecord("1.2.3", "1.2.3.4"), Sink())
    assert calls == ["Basic dTpzM2NyM3QtcHc="] * 3  # base64 of u:s3cr3t-pw, on each of the 3 attempts
    assert "s3cr3t" not in str(info.value)


async def test_a_compressed_series_answer_is_refused() -> None:
    server, source = retrieving(lambda path, headers: (200, {**MULTIPART, "Content-Encoding": "gzip"}, b"x" * 100))
    with server:
        with pytest.raises(ProtocolError, match="Content-Encoding 'gzip'"):
            await source.fetch_series(SeriesRecord("1.2.3", "1.2.3.4"), Sink())


async def test_cancelling_a_series_retrieve_stops_its_thread_at_once() -> None:
    """A retrieve blocked in a read of a stalled archive ends as soon as trio cancels it: the
    socket is shut down, the thread returns, the task sees Cancelled (not an archive error)."""
    good = make_instance("1.2.3", "1.2.3.4", "1.2.3.4.1")
    released = threading.Event()
    stalled = []

    def stalling() -> Iterator[bytes]:
        yield multipart([good])[:500]
        released.wait(30)  # the archive stops sending
        stalled.append("over")

    server, source = retrieving(lambda path, headers: (200, MULTIPART, stalling()))
    sink = Sink()
    with server:
        with trio.move_on_after(0.5) as scope:
            await source.fetch_series(SeriesRecord("1.2.3", "1.2.3.4"), sink)
        assert not stalled  # the retrieve ended while the archive still stalled (not by a timeout)
        released.set()
    assert scope.cancelled_caught
    assert sink.arrivals == 500 and not sink.files


def test_proxies_from_the_environment_keep_httpx_default_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomfs.sources.http import HttpClient
    from dicomfs.sources.transport import LargeReadTransport

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    direct = HttpClient(Credentials())
    assert isinstance(direct._client._transport, LargeReadTransport)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    proxied = HttpClient(Credentials())
    assert not isinstance(proxied._client._transport, LargeReadTransport)
    assert any(key.pattern.startswith("https") for key in proxied._client._mounts)  # httpx mounted the proxy


def test_worker_thread_retrieves_go_through_the_environment_s_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib3

    from dicomfs.sources.threadhttp import BlockingHttp

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
                 "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "pacs.local")
    blocking = BlockingHttp(Credentials())
    proxied = blocking._pool("http://archive.example.org/dicom-web/studies/1/series/2")
    assert isinstance(proxied, urllib3.ProxyManager) and proxied.proxy is not None
    assert proxied.proxy.host == "proxy.invalid"
    assert blocking._pool("http://archive.example.org/other") is proxied  # decided once per host
    direct = blocking._pool("http://pacs.local/dicom-web/studies/1")
    assert not isinstance(direct, urllib3.ProxyManager)
    assert blocking._pool("https://archive.example.org/x") is direct  # no proxy named for https
