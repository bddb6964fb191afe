"""HTTP access for sources: one httpx client with timeouts, one retry policy, auth, bounded bodies.

Owns how a request is retried (connection failures before an answer, HTTP 429 and 5xx, with
exponential backoff honouring Retry-After: a few fast attempts, never a timeout again, since a
stalled server does not recover in a second), how failures map to the error hierarchy (whole-
archive failures are ``SourceUnavailable``, a body cut short is ``TransferBroken``), that an answer
asked for in identity encoding must come that way, and that JSON bodies are inflated and read
within a size limit. Retries happen here only, before any body is handed out; resuming a broken
download is the blob store's. Must not know DICOM, and must never put a credential into a log line
or an error message.
"""

from __future__ import annotations

import base64
import logging
import random
from collections.abc import AsyncIterator, Callable, Generator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from dicomfs.decoding import ACCEPTED_CODINGS, BoundedDecoder, parse_json
from dicomfs.errors import (
    AccessRefused,
    ProtocolError,
    SourceError,
    SourceUnavailable,
    TransferBroken,
)
from dicomfs.gcpause import paused
from dicomfs.sources.base import Credentials
from dicomfs.sources.transport import LargeReadTransport
from dicomfs.transferlimits import DEFAULT_WINDOW

log = logging.getLogger(__name__)

RETRY_STATUS = {429, 500, 502, 503, 504}
OUTAGE_STATUS = {429, 502, 503, 504}  # the archive (or its gateway) as a whole is not serving
LARGE_JSON_BYTES = 1 << 20
MAX_JSON_BYTES = 64 * 1024 * 1024  # a QIDO page or a bucket listing page, inflated
DEFAULT_TIMEOUT = DEFAULT_WINDOW  # ``--timeout``: a socket read, and the window of the minimum rate


@dataclass(frozen=True)
class RetryPolicy:
    """The one retry policy of dicomfs: how often, and how long apart, a request that failed
    before its answer began is sent again."""

    attempts: int = 3
    first_delay: float = 0.25
    max_delay: float = 5.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        if retry_after and retry_after.isdigit():
            return min(float(retry_after), self.max_delay)
        base = min(self.first_delay * 2.0**attempt, self.max_delay)
        return base * (0.5 + random.random() / 2)

    def again(self, attempt: int, *, timeout: bool = False) -> bool:
        """Whether attempt number ``attempt`` (from 0), which failed, is followed by another.
        Failures worth one are fast ones (refused, reset, HTTP 429/5xx); a timeout already took
        the whole ``--timeout`` once: the breaker, not another wait, deals with a stalled
        archive."""
        return not timeout and attempt + 1 < self.attempts


class _HeaderAuth(httpx.Auth):
    def __init__(self, header: str) -> None:
        self._header = header

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header
        yield request


def auth_header(credentials: Credentials) -> str | None:
    """The ``Authorization`` header for a bearer token, or for a user and password (Basic)."""
    if credentials.token:
        return f"Bearer {credentials.token}"
    if credentials.user:
        pair = f"{credentials.user}:{credentials.password or ''}".encode()
        return f"Basic {base64.b64encode(pair).decode()}"
    return None


def _auth(credentials: Credentials) -> httpx.Auth | None:
    header = auth_header(credentials)
    return _HeaderAuth(header) if header else None


def proxied() -> bool:
    """Whether the environment names a proxy (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``)."""
    import urllib.request

    return any(scheme in urllib.request.getproxies() for scheme in ("http", "https", "all"))


def describe(url: httpx.URL | str) -> str:
    """The URL as it may appear in a message: no query values, no user info."""
    parsed = httpx.URL(str(url))
    return str(parsed.copy_with(query=None, userinfo=b""))


class HttpClient:
    """A small wrapper around ``httpx.AsyncClient`` shared by one source."""

    def __init__(
        self,
        credentials: Credentials,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 16,
        extra_headers: dict[str, str] | None = None,
        tls: bool = True,
        auth: httpx.Auth | None = None,
        hint: Callable[[Mapping[str, str]], str | None] | None = None,
    ) -> None:
        """``auth``: how requests are signed, instead of the bearer token or user and password of
        ``credentials`` (an S3 bucket's SigV4). ``tls=False`` for a plain-http archive: no
        certificate store is loaded (tens of milliseconds), and a redirect to https fails
        verification instead of going unchecked. ``hint``: a store's reading of a refusal (S3: the
        bucket's region, from the answer's headers)."""
        self.retry = retry or RetryPolicy()
        self.hint = hint  # what a refusal's answer says to do (one line, no secrets), added to the error
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._client = httpx.AsyncClient(
            auth=auth or _auth(credentials),
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            # httpx applies HTTP(S)_PROXY only to its own default transport: keep that one then.
            transport=transport or (None if proxied() else LargeReadTransport(limits, tls=tls)),
            limits=limits,
            follow_redirects=True,
            headers={"User-Agent": "dicomfs", **(extra_headers or {})},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    @asynccontextmanager
    async def stream(
        self, url: str, headers: dict[str, str] | None = None
    ) -> AsyncIterator[httpx.Response]:
        """A successful (2xx) streamed GET. Retries happen before the body is handed out; errors
        while the caller reads the body come out as dicomfs errors. With ``Accept-Encoding:
        identity`` asked for, an answer in any other encoding is refused (read it with
        ``aiter_raw``)."""
        attempt = 0
        while True:
            try:
                request = self._client.build_request("GET", url, headers=headers)
                response = await self._client.send(request, stream=True)
            except httpx.TransportError as exc:
                if not self.retry.again(attempt, timeout=isinstance(exc, httpx.TimeoutException)):
                    raise _transport_error(url, exc) from None
                log.info("retrying %s after %s", describe(url), type(exc).__name__)
                await trio.sleep(self.retry.delay(attempt))
                attempt += 1
                continue
            if response.status_code in RETRY_STATUS and self.retry.again(attempt):
                retry_after = response.headers.get("retry-after")
                await response.aclose()
                log.info("retrying %s after HTTP %d", describe(url), response.status_code)
                await trio.sleep(self.retry.delay(attempt, retry_after))
                attempt += 1
                continue
            try:
                if not 200 <= response.status_code < 300:  # (a redirect with nowhere to go, too)
                    raise status_error(url, response.status_code, self.hint(response.headers) if self.hint else None)
                check_encoding(url, headers, response.headers.get("content-encoding"))
                yield response
            except httpx.TransportError as exc:  # raised while the caller read the body
                raise _body_error(url, exc) from None
            finally:
                await response.aclose()
            return

    async def get_json(self, url: str, headers: dict[str, str] | None = None,
                       limit: int = MAX_JSON_BYTES) -> tuple[Any, httpx.Headers]:
        """GET a JSON document of at most ``limit`` bytes (inflated: compressed answers are
        inflated step by step and counted). ``204`` and an empty body are returned as None."""
        all_headers = {"Accept": "application/dicom+json, application/json", "Accept-Encoding": ACCEPTED_CODINGS}
        all_headers.update(headers or {})
        async with self.stream(url, all_headers) as response:
            decoder = BoundedDecoder(response.headers.get("content-encoding"), limit,
                                     f"the JSON answer from {describe(url)}")
            pieces: list[Any] = []
            async for chunk in response.aiter_raw():
                pieces.extend(decoder.feed(chunk))
            decoder.finish()
            body = b"".join(pieces)
            del pieces
            if response.status_code == 204 or not body.strip():
                return None, response.headers
            what = describe(url)
            if len(body) < LARGE_JSON_BYTES:
                return parse_json(body, what), response.headers
            # a whole series' metadata parses for a second or more: not on the event loop
            return await trio.to_thread.run_sync(paused, parse_json, body, what), response.headers


def check_encoding(url: str, asked: dict[str, str] | None, coding: str | None) -> None:
    """Refuse an answer compressed although identity encoding was asked for."""
    coding = (coding or "identity").strip().lower()
    if (asked or {}).get("Accept-Encoding") == "identity" and coding != "identity":
        raise ProtocolError(f"{describe(url)} answered in Content-Encoding {coding[:40]!r} "
                            "although dicomfs asked for none: refused")


def _transport_error(url: str, exc: httpx.TransportError) -> SourceError:
    return transport_error(url, type(exc).__name__, timeout=isinstance(exc, httpx.TimeoutException),
                           connect=isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)))


def transport_error(url: str, name: str, *, connect: bool, timeout: bool) -> SourceError:
    """A request that got no answer: the archive is unreachable or not answering. ``name``: the
    HTTP library's name for what happened (no message: it may hold a URL with secrets)."""
    if connect:
        return SourceUnavailable(f"cannot reach {describe(url)}: {name}")
    if timeout:
        return SourceUnavailable(f"{describe(url)} did not answer in time ({name})")
    return SourceUnavailable(f"request to {describe(url)} failed: {name}")


def _body_error(url: str, exc: httpx.TransportError) -> SourceError:
    return body_error(url, type(exc).__name__, timeout=isinstance(exc, httpx.TimeoutException))


def body_error(url: str, name: str, *, timeout: bool) -> SourceError:
    """An answer whose body stopped: stalled (a timeout) or broken off."""
    if timeout:
        return SourceUnavailable(f"{describe(url)} stopped sending ({name})")
    return TransferBroken(f"the answer from {describe(url)} broke off: {name}")


def status_error(url: str, status: int, hint: str | None = None) -> SourceError:
    """The error for a refused request; ``hint``, what the archive's answer says to do about it."""
    tail = f": {hint}" if hint else ""
    if status in (401, 403):
        return AccessRefused(f"{describe(url)} refused access (HTTP {status}): {hint or 'check credentials'}")
    if status == 404:
        return SourceError(f"{describe(url)} not found (HTTP 404){tail}")
    if status in OUTAGE_STATUS:
        return SourceUnavailable(f"{describe(url)} answered HTTP {status}{tail}")
    return SourceError(f"{describe(url)} answered HTTP {status}{tail}")
