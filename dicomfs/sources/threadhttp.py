"""HTTP in worker threads: a urllib3 pool, read in large pieces.

Owns the blocking side of a source's HTTP: one urllib3 pool per source (and per proxy, as the
environment names them), a streamed GET and a bounded JSON GET under the one retry policy and
error mapping of ``http.py`` (its ``RetryPolicy``, statuses, messages and ``Authorization`` rule),
and breaking a blocked connect or read when trio stops the job (``StopSignal``: the socket is
shut down).
Retrieves of every source and a DICOMweb archive's queries use it. urllib3 and not httpx's sync
client: on a series retrieve from a loopback Orthanc urllib3 took 0.12-0.15 s of CPU per GB, httpx
0.46-0.59 s (h11 copies every body byte into and out of its buffer); and a DICOMweb command that
never imports httpx starts 40-50 ms sooner. Must not know DICOM, and must never put a credential
into a log line or an error message.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import certifi
import urllib3
import urllib3.connection
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    LocationParseError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ReadTimeoutError,
)
from urllib3.util.connection import allowed_gai_family

from dicomfs.decoding import BoundedDecoder
from dicomfs.sources.base import Credentials
from dicomfs.sources.http import (
    DEFAULT_TIMEOUT,
    JSON_HEADERS,
    MAX_JSON_BYTES,
    RETRY_STATUS,
    RetryPolicy,
    auth_header,
    body_error,
    check_encoding,
    describe,
    json_document,
    status_error,
    transport_error,
)
from dicomfs.tasks import StopSignal

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20  # what one read asks the socket for (it returns what it has)
GATHER_BELOW = 256 << 10  # a read that brought less: the socket is drained faster than it fills
GATHER_SECONDS = 0.002  # then wait this long before the next read (250 KB at 1 Gbit/s)
GATHER_AFTER = 4 << 20  # but only once the answer has brought this much
Sign = Callable[[str, Mapping[str, str]], dict[str, str]]
MAX_REDIRECTS = 10


class BlockingHttp:
    """The blocking HTTP client of one source; its calls run in worker threads (any number)."""

    def __init__(self, credentials: Credentials, *, timeout: float = DEFAULT_TIMEOUT, connect_timeout: float = 5.0,
                 retry: RetryPolicy | None = None, max_connections: int = 16, tls: bool = True,
                 extra_headers: dict[str, str] | None = None, sign: Sign | None = None,
                 hint: Callable[[Mapping[str, str]], str | None] | None = None) -> None:
        """As ``asynchttp.HttpClient``; ``sign(url, headers)``: the headers that sign one request (an S3
        bucket's SigV4), made anew for every attempt."""
        self.retry = retry or RetryPolicy()
        self._headers = {"User-Agent": "dicomfs", **(extra_headers or {})}
        header = auth_header(credentials)
        if header:
            self._headers["Authorization"] = header
        self._sign = sign
        self._hint = hint
        self._timeout = urllib3.Timeout(connect=connect_timeout, read=timeout)
        self._max_connections = max_connections
        self._ca_certs, self._ca_dir = trusted_certificates() if tls else (None, None)  # (for https only)
        self._pools: dict[str | None, urllib3.PoolManager] = {}
        # The environment's proxies, read once as httpx does when its client is made (reading
        # them cost 0.1 ms a request), and each host's proxy once decided.
        self._proxies = urllib.request.getproxies()
        self._proxy_of: dict[tuple[str, str], str | None] = {}

    def close(self) -> None:
        for pool in self._pools.values():
            pool.clear()

    def _pool(self, url: str) -> urllib3.PoolManager:
        """The pool for ``url``: direct, or through the proxy the environment names for it."""
        parts = urllib.parse.urlsplit(url)
        where = (parts.scheme, parts.hostname or "")
        try:
            proxy = self._proxy_of[where]
        except KeyError:
            proxy = self._proxies.get(parts.scheme) or self._proxies.get("all")
            if proxy and urllib.request.proxy_bypass(where[1]):
                proxy = None
            self._proxy_of[where] = proxy
        pool = self._pools.get(proxy)
        if pool is None:
            pool = (urllib3.ProxyManager(proxy, proxy_headers=proxy_auth(proxy), maxsize=self._max_connections,
                                         ca_certs=self._ca_certs, ca_cert_dir=self._ca_dir) if proxy
                    else urllib3.PoolManager(maxsize=self._max_connections, ca_certs=self._ca_certs,
                                             ca_cert_dir=self._ca_dir))
            pool.pool_classes_by_scheme = {"http": _Pool, "https": _TlsPool}
            self._pools[proxy] = pool
        return pool

    @contextmanager
    def stream(self, url: str, headers: dict[str, str], stop: StopSignal) -> Iterator[Body]:
        """A successful (2xx) streamed GET; retries happen before the body is handed out, and a
        stop breaks off a blocked read (the body then raises ``Stopped``)."""
        response = self._send(url, headers, stop)
        body = Body(url, response, stop)
        try:
            if not 200 <= response.status < 300:  # (a redirect with nowhere to go, too)
                raise status_error(url, response.status, self._hint(response.headers) if self._hint else None)
            check_encoding(url, headers, response.headers.get("content-encoding"))
            yield body
        finally:
            body.close()

    def get_json(self, url: str, stop: StopSignal, *, headers: Mapping[str, str] | None = None,
                 limit: int = MAX_JSON_BYTES) -> tuple[Any, Mapping[str, str]]:
        """GET a JSON document of at most ``limit`` bytes (inflated: a compressed answer is
        inflated step by step and counted) and its answer's headers. ``204`` and an empty body
        are None."""
        with self.stream(url, {**JSON_HEADERS, **(headers or {})}, stop) as body:
            decoder = BoundedDecoder(body.headers.get("content-encoding"), limit,
                                     f"the JSON answer from {describe(url)}")
            pieces: list[Any] = []
            for chunk in body.chunks():
                pieces.extend(decoder.feed(chunk))
            decoder.finish()
        data = b"".join(pieces)
        del pieces
        return json_document(data, body.status, url), body.headers

    def _send(self, url: str, headers: dict[str, str], stop: StopSignal) -> urllib3.BaseHTTPResponse:
        retries = urllib3.Retry(total=MAX_REDIRECTS, connect=0, read=0, status=0, other=0,
                                redirect=MAX_REDIRECTS, raise_on_redirect=False)
        attempt = 0
        while True:
            stop.check()
            sent = {**self._headers, **headers}
            if self._sign is not None:
                sent.update(self._sign(url, sent))
            _job.stop = stop
            try:
                response = self._pool(url).request("GET", url, headers=sent,
                                                   preload_content=False, decode_content=False,
                                                   retries=retries, timeout=self._timeout)
            except HTTPError as exc:
                reason = exc.reason if isinstance(exc, MaxRetryError) and exc.reason is not None else exc
                stop.check()
                timeout = isinstance(reason, (ConnectTimeoutError, ReadTimeoutError))
                if not self.retry.again(attempt, timeout=timeout):
                    raise transport_error(url, type(reason).__name__, timeout=timeout,
                                          connect=isinstance(reason, (NewConnectionError, ConnectTimeoutError))
                                          ) from None
                log.info("retrying %s after %s", describe(url), type(reason).__name__)
                stop.wait(self.retry.delay(attempt))
                attempt += 1
                continue
            finally:
                _job.stop = None
            if response.status in RETRY_STATUS and self.retry.again(attempt):
                retry_after = response.headers.get("retry-after")
                response.close()  # (its body unread: the connection is not reused)
                log.info("retrying %s after HTTP %d", describe(url), response.status)
                stop.wait(self.retry.delay(attempt, retry_after))
                attempt += 1
                continue
            return response


def trusted_certificates() -> tuple[str | None, str | None]:
    """The certificates a TLS archive is checked against (a file, a folder), chosen as httpx
    chooses them: the file ``SSL_CERT_FILE`` names, else the folder ``SSL_CERT_DIR`` names, else
    certifi's (so a site's own CA reaches both clients the same way)."""
    if os.environ.get("SSL_CERT_FILE"):
        return os.environ["SSL_CERT_FILE"], None
    if os.environ.get("SSL_CERT_DIR"):
        return None, os.environ["SSL_CERT_DIR"]
    return certifi.where(), None


def proxy_auth(proxy: str) -> dict[str, str]:
    """``Proxy-Authorization`` for a proxy URL with a user and password in it (httpx sends it from
    the URL; urllib3 only when told)."""
    auth = urllib3.util.parse_url(proxy).auth
    return urllib3.make_headers(proxy_basic_auth=urllib.parse.unquote(auth)) if auth else {}


_job = threading.local()  # .stop: the StopSignal of the job sending a request in this thread


if TYPE_CHECKING:  # what the mixin is mixed into (mypy cannot follow super() otherwise)
    _ConnectionBase = urllib3.connection.HTTPConnection
else:
    _ConnectionBase = object


class _Stoppable(_ConnectionBase):
    """A connection that a stop can break, from its first step to the end of the answer.

    - While it connects (the TCP connect, a proxy's tunnel, the TLS handshake) and sends the
      request, a stop shuts down a duplicate of its socket made for that: the duplicate names the
      same socket, and stays valid when the TLS layer takes the original over (``wrap_socket``
      detaches it).
    - Once the request is sent (on a new connection or one from the pool), a stop shuts the socket
      itself down, which ends a wait for the answer's head as well as a read of its body.
      (http.client forgets the socket, ``sock = None``, when an answer that closes the connection
      begins: the hook keeps its own reference.)

    A host name is resolved in a thread of its own, which a stop leaves behind (``_resolve``):
    ``getaddrinfo`` cannot be broken, and a resolver that does not answer takes its timeouts.
    """

    sock: socket.socket | None
    stop_hook: tuple[StopSignal, Callable[[], None], socket.socket | None] | None = None

    def _new_conn(self) -> socket.socket:
        stop: StopSignal | None = getattr(_job, "stop", None)
        if stop is None:
            return super()._new_conn()
        # urllib3's own steps (util.connection.create_connection, and _new_conn's errors), but with
        # the socket in hand before it connects, so that the stop can reach it.
        try:
            return self._connect_watched(stop)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        except TimeoutError as exc:
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out. "
                                            f"(connect timeout={self.timeout})") from exc
        except OSError as exc:
            raise NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc

    def _connect_watched(self, stop: StopSignal) -> socket.socket:
        error: OSError | None = None
        host = self._dns_host.strip("[]")
        try:
            host.encode("idna")
        except UnicodeError:  # (as urllib3 refuses it: a label empty or too long)
            raise LocationParseError(f"'{host}', label empty or too long") from None
        for family, kind, proto, _, address in _resolve(host, self.port, stop):
            sock = socket.socket(family, kind, proto)
            try:
                for option in self.socket_options or ():
                    sock.setsockopt(*option)
                sock.settimeout(self.timeout if isinstance(self.timeout, (int, float)) else None)
                if self.source_address:
                    sock.bind(self.source_address)
                self._watch(stop, sock.dup(), owned=True)
                stop.check()  # (a stop just before the watch shut down a socket not yet connected)
                sock.connect(address)
                stop.check()  # (or one just before the connect began)
                return sock
            except OSError as exc:
                self.forget_stop()
                sock.close()
                error = exc
                if stop.is_set():
                    break  # not the next address: the job is over
            except BaseException:
                self.forget_stop()
                sock.close()
                raise
        raise error or OSError("getaddrinfo returns an empty list")

    def connect(self) -> None:
        try:
            super().connect()
        except BaseException:
            self.forget_stop()
            raise

    def request(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().request(*args, **kwargs)
        finally:
            self.forget_stop()  # the connect's watch, or a hook left from a job before
        stop: StopSignal | None = getattr(_job, "stop", None)
        if stop is not None and self.sock is not None:
            if type(self.sock) is socket.socket:
                self._watch(stop, self.sock, owned=False)
            else:  # TLS: the raw socket under it (SSLSocket.shutdown would drop its state under a
                # reading thread, and TLS through an HTTPS proxy's tunnel has no shutdown at all)
                self._watch(stop, socket.socket(fileno=os.dup(self.sock.fileno())), owned=True)

    def _watch(self, stop: StopSignal, sock: socket.socket, *, owned: bool) -> None:
        """Let ``stop`` shut ``sock`` down; ``owned``: a duplicate, closed when forgotten."""
        hook = partial(sock.shutdown, socket.SHUT_RDWR)
        self.stop_hook = (stop, hook, sock if owned else None)
        stop.on_stop(hook)

    def forget_stop(self) -> None:
        if self.stop_hook is not None:
            stop, hook, owned = self.stop_hook
            self.stop_hook = None
            stop.forget(hook)
            if owned is not None:
                owned.close()


def _resolve(host: str, port: int, stop: StopSignal) -> list[tuple[Any, ...]]:
    """The addresses to try for ``host``, as urllib3 asks for them. An address is taken as it is;
    a name is resolved in a daemon thread while this one waits for it or for the stop, whichever
    comes first (a stopped job returns, the resolution ends when the resolver gives up)."""
    family = allowed_gai_family()
    try:
        return socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except socket.gaierror:
        pass  # a name
    answer: list[list[tuple[Any, ...]] | Exception] = []
    done = threading.Event()

    def resolve() -> None:
        try:
            answer.append(socket.getaddrinfo(host, port, family, socket.SOCK_STREAM))
        except Exception as exc:
            answer.append(exc)
        finally:
            done.set()

    threading.Thread(target=resolve, name="dicomfs-resolve", daemon=True).start()
    stop.on_stop(done.set)
    try:
        done.wait()
    finally:
        stop.forget(done.set)
    stop.check()
    if isinstance(answer[0], Exception):
        raise answer[0]
    return answer[0]


class _Connection(_Stoppable, urllib3.connection.HTTPConnection):
    pass


class _TlsConnection(_Stoppable, urllib3.connection.HTTPSConnection):
    pass


class _Pool(urllib3.HTTPConnectionPool):
    ConnectionCls = _Connection


class _TlsPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _TlsConnection


class Body:
    """A response body read piece by piece in a worker thread."""

    def __init__(self, url: str, response: urllib3.BaseHTTPResponse, stop: StopSignal) -> None:
        self.url = url
        self.status = response.status
        self.headers = response.headers
        self._response = response
        self._stop = stop
        self._complete = False
        self._received = 0
        self._connection = response.connection if isinstance(response.connection, _Stoppable) else None

    def chunks(self) -> Iterator[bytes]:
        """The body's bytes as they come, up to ``READ_SIZE`` at a time (fresh objects: a
        consumer may keep views of them)."""
        while True:
            try:
                data = self._response.read1(READ_SIZE)
            except (HTTPError, OSError) as exc:
                self._stop.check()  # a read broken by the stop: not the archive's fault
                raise body_error(self.url, type(exc).__name__, timeout=isinstance(exc, ReadTimeoutError)) from None
            if not data:
                self._stop.check()  # (a shut-down socket reads as the end)
                self._complete = True
                return
            yield data
            self._received += len(data)
            if len(data) < GATHER_BELOW and self._received >= GATHER_AFTER:
                # A long answer on a link slower than we read: let more arrive before the next
                # read, so that every piece's costs (parsing, writing, waking readers) are paid
                # less often. (Not in a short answer, one instance say: its reader waits for it.)
                self._stop.wait(GATHER_SECONDS)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.forget_stop()  # it may go back to the pool, to another job
            self._connection = None
        if self._complete and not self._stop.is_set():
            self._response.release_conn()
        else:
            self._response.close()  # read partly: its connection is not handed back to the pool
