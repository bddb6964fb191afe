"""The DICOMweb source against a loopback server answering as a test says: QIDO (paging, empty,
hostile and malformed answers, retries, refusals) and series retrieves (urllib3 in a worker
thread); and the source URL's normal form."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import trio

from dicomfs.errors import AccessRefused, ProtocolError, SourceError, SourceUnavailable, UsageError
from dicomfs.records import SeriesRecord
from dicomfs.sources import parse_source
from dicomfs.sources.base import Credentials
from dicomfs.sources.dicomweb import SERIES_ACCEPT, DicomwebSource
from dicomfs.sources.http import RetryPolicy
from tests.factory import MemorySink as Sink
from tests.factory import make_instance, multipart
from tests.servers import Answer, AnsweringServer

JSON = {"Content-Type": "application/dicom+json"}
Reply = tuple[int, dict[str, str], bytes]


def study_row(uid: object) -> dict[str, dict[str, object]]:
    return {"0020000D": {"vr": "UI", "Value": [uid]}, "00080020": {"vr": "DA", "Value": ["20240102"]}}


def rows(data: object, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    body = json.dumps(data).encode()
    return status, {**JSON, "Content-Length": str(len(body)), **(headers or {})}, body


def params(path: str) -> dict[str, str]:
    return {key: values[-1] for key, values in parse_qs(urlsplit(path).query).items()}


def retrieving(answer: Answer, credentials: Credentials | None = None,
               page_size: int = 1000) -> tuple[AnsweringServer, DicomwebSource]:
    server = AnsweringServer(answer)
    source = DicomwebSource(f"{server.url}/dicom-web", credentials or Credentials(), page_size=page_size)
    source.blocking.retry = RetryPolicy(attempts=3, first_delay=0.001, max_delay=0.01)
    return server, source


async def studies_of(answer: Callable[[str, dict[str, str]], Reply], page_size: int = 1000) -> list[str]:
    server, source = retrieving(answer, page_size=page_size)
    with server:
        return [study.uid for study in await source.list_studies()]


MULTIPART = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=dicomfs-test-boundary'}


async def test_qido_pages_through_large_listings() -> None:
    uids = [f"1.2.3.{i}" for i in range(2500)]
    seen_queries = []

    def answer(path: str, headers: dict[str, str]) -> Reply:
        seen_queries.append(path)
        limit, offset = int(params(path)["limit"]), int(params(path)["offset"])
        return rows([study_row(u) for u in uids[offset:offset + limit]])

    assert await studies_of(answer, page_size=1000) == uids
    assert len(seen_queries) == 3


async def test_qido_follows_a_server_that_caps_pages_and_says_so() -> None:
    uids = [f"1.2.3.{i}" for i in range(250)]

    def answer(path: str, headers: dict[str, str]) -> Reply:
        offset = int(params(path)["offset"])
        page = uids[offset:offset + 100]
        return rows([study_row(u) for u in page], headers={"Warning": "299 archive: result truncated"}
                    if len(page) == 100 else {})

    assert await studies_of(answer) == uids


async def test_qido_stops_when_a_server_ignores_offset() -> None:
    assert len(await studies_of(lambda path, headers: rows([study_row(f"1.2.{i}") for i in range(5)]),
                                page_size=5)) == 5


@pytest.mark.parametrize("reply", [(204, {}, b""), rows([]), (200, {"Content-Length": "0"}, b"")])
async def test_empty_answers_mean_empty(reply: Reply) -> None:
    assert await studies_of(lambda path, headers: reply) == []


async def test_a_gzip_answer_is_inflated() -> None:
    import gzip

    body = gzip.compress(json.dumps([study_row("1.2.3")]).encode())
    seen: list[str] = []

    def answer(path: str, headers: dict[str, str]) -> Reply:
        seen.append(headers.get("accept-encoding", ""))
        return 200, {**JSON, "Content-Encoding": "gzip", "Content-Length": str(len(body))}, body

    assert await studies_of(answer) == ["1.2.3"]
    assert "gzip" in seen[0]


async def test_hostile_uids_are_skipped() -> None:
    hostile = [study_row(u) for u in ["1.2.3", "../../etc", "1.2/3", "1.2\x003", "9" * 300, 17, None]]
    hostile.append({"0020000D": {"vr": "UI"}})
    hostile.append(study_row("1.2.3"))  # duplicate

    assert await studies_of(lambda path, headers: rows(hostile)) == ["1.2.3"]


@pytest.mark.parametrize("body", [b"{not json", b'{"an": "object"}', b"[1, 2]"])
async def test_malformed_json_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        await studies_of(lambda path, headers: (200, {"Content-Length": str(len(body))}, body))


async def test_retries_on_5xx_and_429_then_succeeds() -> None:
    answers = [(503, {"Content-Length": "0"}, b""), (429, {"Retry-After": "0", "Content-Length": "0"}, b""),
               rows([study_row("1.2")])]
    assert await studies_of(lambda path, headers: answers.pop(0)) == ["1.2"]
    assert not answers


async def test_unreachable_archive_is_source_unavailable() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = DicomwebSource(f"http://127.0.0.1:{port}/dicom-web", Credentials())
    source.blocking.retry = RetryPolicy(attempts=2, first_delay=0.001, max_delay=0.01)
    with pytest.raises(SourceUnavailable, match="cannot reach"):
        await source.check()


async def test_auth_failure_names_no_secret() -> None:
    sent: list[str | None] = []

    def answer(path: str, headers: dict[str, str]) -> Reply:
        sent.append(headers.get("authorization"))
        return 401, {"Content-Length": "0"}, b""

    server, source = retrieving(answer, Credentials(token="s3cr3t-token"))
    with server:
        with pytest.raises(AccessRefused) as info:
            await source.check()
    assert sent == ["Bearer s3cr3t-token"]
    assert "s3cr3t" not in str(info.value)
    assert "s3cr3t" not in repr(Credentials(token="s3cr3t-token", password="pw"))


async def test_cancelling_a_query_stops_it_at_once() -> None:
    """A query waiting on a stalled archive ends when trio cancels it, not at the timeout."""
    released = threading.Event()

    def stalling(path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], Iterator[bytes]]:
        def body() -> Iterator[bytes]:
            yield b"[" + json.dumps(study_row("1.2.3")).encode()
            released.wait(30)  # the archive stops sending
        return 200, JSON, body()

    server, source = retrieving(stalling)
    with server:
        with trio.move_on_after(0.5) as scope:
            await source.list_studies()
        released.set()
    assert scope.cancelled_caught


# The normal form of a DICOMweb URL is the one httpx writes: one archive, one location, one
# default cache folder, whichever way its URL was typed (and the same as before httpx was left
# out of the usual case).
@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8042/dicom-web/", "http://127.0.0.1:8042/dicom-web", "http://h", "http://h:8042",
    "http://h:80/x", "https://h:443", "https://h:443/x", "http://h:443/x", "https://h:80/x",
    "http://h/a//b/../c/./d", "http://h/a/..", "http://h/.well/x", "http://h/a..b/", "http://h/~u/x",
    "http://h/x'y", "http://h/a:b@c", "http://h:65535/x", "http://h:65536/x",
    "http://pacs.example.org:8080/dcm4chee-arc/aets/DCM4CHEE/rs",
    "HTTP://Host.EXAMPLE:80/Dicom-Web", "https://h:443/a b/c?x=1#f", "http://[::1]:8042/dicom-web",
    "https://b\u00fccher.de/dw", "http://h/dw/%41", "HTTPS://h:443/x", "http://H:8042/Dicom-Web/",
    "http://h:08042/x", "http://h:/x", "http://h/x?", "http://h/x?a=b c", "http://h/\u00e9", "http://h./x",
    "http://10.0.0.255:8042/x", "http://0.0.0.0/x", "http://1.2.3/x", "http://1.2.3.4.5/x", "https://xn--bcher-kva.de/dw",
])
def test_a_dicomweb_url_takes_httpx_s_normal_form(url: str) -> None:
    assert parse_source(url).location == str(httpx.URL(url)).rstrip("/")


@pytest.mark.parametrize("url", ["http://256.1.1.1/x", "http://01.2.3.4/x", "http://1.2.3.456/x", "http://xn--a/x",
                                 "http://xn--ls8h/x", "http://user:pw@h/x", "http:///x"])
def test_a_dicomweb_url_httpx_refuses_is_refused(url: str) -> None:
    with pytest.raises(UsageError):
        parse_source(url)


def test_a_plain_dicomweb_url_does_not_load_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "httpx", None)  # importing it now fails
    assert parse_source("http://127.0.0.1:8042/dicom-web/").location == "http://127.0.0.1:8042/dicom-web"
    with pytest.raises(ImportError):
        parse_source("http://H:8042/x/")  # (this one needs it)


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

    server, source = retrieving(answer, Credentials(user="u", password="s3cr3t-pw"))
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


async def test_retrieves_leave_trio_s_threads_to_disk_work() -> None:
    """41 series retrieves stalled by their archive (a scan opening one file of each series, on a
    slow link) hold threads of their own: a disk job in trio's default threads (40 of them) is
    not kept waiting behind them."""
    good = make_instance("1.2.3", "1.2.3.4", "1.2.3.4.1")
    released = threading.Event()
    started = []

    def stalling() -> Iterator[bytes]:
        started.append(1)
        yield multipart([good])[:500]
        released.wait(30)

    server, source = retrieving(lambda path, headers: (200, MULTIPART, stalling()))
    with server:
        try:
            async with trio.open_nursery() as nursery:
                for n in range(41):
                    nursery.start_soon(source.fetch_series, SeriesRecord("1.2.3", f"1.2.3.{n}"), Sink())
                with trio.fail_after(20):
                    while len(started) < 40:  # (trio has 40 threads by default)
                        await trio.sleep(0.05)
                    assert await trio.to_thread.run_sync(lambda: "read") == "read"
                nursery.cancel_scope.cancel()
        finally:
            released.set()


def test_proxies_from_the_environment_keep_httpx_default_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomfs.sources.asynchttp import HttpClient
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


async def test_at_most_sixteen_queries_at_once() -> None:
    """Queries run in worker threads of their own, 16 at most (as httpx's pool allowed): a slow
    archive cannot take every thread the disk work needs."""
    lock = threading.Lock()
    now = [0]
    most = [0]

    def answer(path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], Iterator[bytes]]:
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
            if now[0] >= 16:
                full.set()

        def body() -> Iterator[bytes]:
            full.wait(10)  # every answer is held until 16 queries are in flight,
            time.sleep(0.3)  # and a while longer, for a 17th to come if it may
            with lock:
                now[0] -= 1
            yield json.dumps([]).encode()
        return 200, JSON, body()

    full = threading.Event()
    server, source = retrieving(answer)
    with server:
        async with trio.open_nursery() as nursery:
            for n in range(24):
                nursery.start_soon(source.list_series, f"1.2.{n}")
    assert most[0] == 16


def test_a_proxy_s_user_and_password_are_sent_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    from dicomfs.sources.threadhttp import BlockingHttp, proxy_auth

    assert proxy_auth("http://proxy.invalid:3128") == {}
    sent = proxy_auth("http://us%40er:p%3Ass@proxy.invalid:3128")
    assert sent == {"proxy-authorization": "Basic " + base64.b64encode(b"us@er:p:ss").decode()}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
                 "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://us%40er:p%3Ass@proxy.invalid:3128")
    pool = BlockingHttp(Credentials())._pool("http://archive.example.org/dicom-web/studies")
    assert pool.proxy_headers == sent  # type: ignore[attr-defined]


def test_a_site_s_certificates_reach_the_thread_client_as_they_reach_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    import certifi

    from dicomfs.sources.threadhttp import trusted_certificates

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    assert trusted_certificates() == (certifi.where(), None)
    monkeypatch.setenv("SSL_CERT_DIR", "/etc/site-cas")
    assert trusted_certificates() == (None, "/etc/site-cas")
    monkeypatch.setenv("SSL_CERT_FILE", "/etc/site-ca.pem")
    assert trusted_certificates() == ("/etc/site-ca.pem", None)
