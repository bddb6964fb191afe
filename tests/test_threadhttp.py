"""The worker-thread HTTP client's stop reaches every step of a request that can hang: a host name
whose resolver does not answer, an archive that never completes the TCP connect, one that
accepts but never answers the TLS handshake, one that never answers the request. Each job ends
when trio cancels it, not at its timeout (60 s here; a hard 30 s limit fails the test). And the
way the stop watches a connect leaves HTTPS working and no socket behind."""

from __future__ import annotations

import gc
import os
import socket
import ssl
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
import trustme

from dicomfs.errors import SourceUnavailable
from dicomfs.sources.base import Credentials
from dicomfs.sources.http import RetryPolicy
from dicomfs.sources.threadhttp import BlockingHttp
from dicomfs.tasks import StopSignal, run_stoppable
from tests.servers import AnsweringServer

LONG = 60.0  # the client's timeouts: far beyond the test's limit


@contextmanager
def listener(*, backlog: int) -> Iterator[tuple[socket.socket, int]]:
    """A loopback listener that never accepts (the kernel completes up to ``backlog`` + 1
    handshakes by itself, then drops the SYNs of the next connects)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    try:
        yield sock, sock.getsockname()[1]
    finally:
        sock.close()


@contextmanager
def full_listener() -> Iterator[int]:
    """A port whose connects hang: its accept queue is full."""
    with listener(backlog=0) as (_, port):
        fillers = []
        try:
            for _ in range(2):
                filler = socket.socket()
                filler.setblocking(False)
                fillers.append(filler)
                filler.connect_ex(("127.0.0.1", port))
            probe = socket.socket()  # the queue is full once a connect no longer completes
            probe.settimeout(1.5)
            with probe, pytest.raises(TimeoutError):
                probe.connect(("127.0.0.1", port))
            yield port
        finally:
            for filler in fillers:
                filler.close()


async def get_stopped(client: BlockingHttp, url: str) -> None:
    """GET ``url`` in a worker thread, cancelled after 0.3 s; the job must be over by 30 s."""

    def job(stop: StopSignal) -> None:
        with client.stream(url, {}, stop) as body:
            for _ in body.chunks():
                pass

    with trio.fail_after(30):
        with trio.move_on_after(0.3) as scope:
            await run_stoppable(job)
    assert scope.cancelled_caught
    client.close()


async def test_a_stop_leaves_a_resolver_that_does_not_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """``getaddrinfo`` cannot be broken; the job leaves it behind (the resolver here answers only
    when the test ends, 20 s at most)."""
    real = socket.getaddrinfo
    released = threading.Event()
    late = []

    def slow_resolver(host: str, *args: object) -> object:
        if host != "archive.invalid":
            return real(host, *args)  # type: ignore[arg-type]
        if args[4:5] == (socket.AI_NUMERICHOST,):  # (port, family, type, proto, flags)
            raise socket.gaierror(socket.EAI_NONAME, "not an address")
        released.wait(20)
        late.append("answered")
        raise socket.gaierror(socket.EAI_AGAIN, "no answer")

    monkeypatch.setattr(socket, "getaddrinfo", slow_resolver)
    try:
        await get_stopped(BlockingHttp(Credentials(), timeout=LONG, connect_timeout=LONG),
                          "http://archive.invalid:8042/x")
        assert not late  # the job ended while the resolver still said nothing
    finally:
        released.set()


async def test_a_stop_breaks_a_connect_that_hangs() -> None:
    with full_listener() as port:
        await get_stopped(BlockingHttp(Credentials(), timeout=LONG, connect_timeout=LONG),
                          f"http://127.0.0.1:{port}/x")


async def test_a_stop_breaks_a_tls_handshake_that_hangs() -> None:
    with listener(backlog=8) as (_, port):  # connects, then never says a word
        await get_stopped(BlockingHttp(Credentials(), timeout=LONG, connect_timeout=LONG),
                          f"https://127.0.0.1:{port}/x")


async def test_a_stop_breaks_a_wait_for_the_answer() -> None:
    with listener(backlog=8) as (_, port):  # takes the request, never answers
        await get_stopped(BlockingHttp(Credentials(), timeout=LONG, connect_timeout=LONG, tls=False),
                          f"http://127.0.0.1:{port}/x")


async def test_a_connect_that_fails_leaves_no_descriptor_behind() -> None:
    """The duplicate socket made for the stop is closed, not left to the collector, when a
    connect is refused (each of the 3 attempts of 3 requests)."""
    with listener(backlog=1) as (_, port):
        pass  # closed: its port now refuses
    client = BlockingHttp(Credentials(), timeout=LONG, connect_timeout=LONG)
    client.retry = RetryPolicy(attempts=3, first_delay=0.001, max_delay=0.01)
    stop = StopSignal()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()  # (what earlier tests left to the collector: not this test's)
        before = len(os.listdir("/proc/self/fd"))
        warnings.simplefilter("always", ResourceWarning)
        for _ in range(3):
            with pytest.raises(SourceUnavailable, match="cannot reach"):
                with client.stream(f"http://127.0.0.1:{port}/x", {}, stop):
                    pass
        client.close()
        gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


@pytest.fixture
def server_context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """A TLS server context for 127.0.0.1 whose certificate a site's CA signed; that CA is the one
    the client trusts (``SSL_CERT_FILE``)."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    monkeypatch.setenv("SSL_CERT_FILE", str(pem))
    return context


def test_https_through_the_watched_connect(server_context: ssl.SSLContext) -> None:
    """GETs over TLS from a server whose certificate a site's CA signed (``SSL_CERT_FILE``): the
    TLS layer takes over the socket that the stop watched while it connected."""
    answer = (200, {"Content-Length": "5"}, b"hello")
    with AnsweringServer(lambda path, headers: answer, tls=server_context) as server:
        client = BlockingHttp(Credentials(), timeout=LONG, connect_timeout=LONG)
        stop = StopSignal()
        got = []
        for _ in range(2):
            with client.stream(f"{server.url}/x", {}, stop) as body:
                got.append(b"".join(body.chunks()))
        client.close()
    assert got == [b"hello", b"hello"]
    assert server.scheme == "https" and len(server.requests) == 2


async def test_a_stop_breaks_a_tls_read(server_context: ssl.SSLContext) -> None:
    """Over TLS the stop shuts down the raw socket under the TLS layer (a duplicate of it), which
    ends a read of an answer that stalled."""
    released = threading.Event()

    def stalling() -> Iterator[bytes]:
        yield b"x" * 1000
        released.wait(30)

    try:
        with AnsweringServer(lambda path, headers: (200, {"Content-Length": "100000"}, stalling()),
                             tls=server_context) as server:
            await get_stopped(BlockingHttp(Credentials(), timeout=LONG, connect_timeout=LONG), f"{server.url}/x")
    finally:
        released.set()


def test_a_host_name_with_a_label_too_long_is_one_error() -> None:
    """As urllib3 says it (not a UnicodeError from the resolver)."""
    client = BlockingHttp(Credentials())
    client.retry = RetryPolicy(attempts=1)
    with pytest.raises(SourceUnavailable, match="failed: LocationParseError"):
        with client.stream(f"http://{'a' * 64}.example/x", {}, StopSignal()):
            pass
