"""HTTP on the event loop for bucket listings and small whole objects: one httpx client per source.

Owns the httpx side of a source's HTTP: timeouts, connection limits, the environment's proxies
(httpx's default transport then), requests signed by a store's ``httpx.Auth`` (S3's SigV4) or an
``Authorization`` header, streamed GETs and bounded JSON bodies, under the retry policy and error
mapping of ``http.py``. DICOMweb archives do not use it (their queries and retrieves are
``threadhttp``'s). Must not know DICOM, and must never put a credential into a log line or an
error message.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Generator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

from dicomfs.decoding import BoundedDecoder
from dicomfs.errors import SourceError
from dicomfs.sources.base import Credentials
from dicomfs.sources.http import (
    DEFAULT_TIMEOUT,
    JSON_HEADERS,
    LARGE_JSON_BYTES,
    MAX_JSON_BYTES,
    RETRY_STATUS,
    RetryPolicy,
    auth_header,
    body_error,
    check_encoding,
    describe,
    json_document,
    proxied,
    status_error,
    transport_error,
)
from dicomfs.sources.transport import LargeReadTransport

log = logging.getLogger(__name__)


class _HeaderAuth(httpx.Auth):
    def __init__(self, header: str) -> None:
        self._header = header

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header
        yield request


def _auth(credentials: Credentials) -> httpx.Auth | None:
    header = auth_header(credentials)
    return _HeaderAuth(header) if header else None


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
        async with self.stream(url, {**JSON_HEADERS, **(headers or {})}) as response:
            decoder = BoundedDecoder(response.headers.get("content-encoding"), limit,
                                     f"the JSON answer from {describe(url)}")
            pieces: list[Any] = []
            async for chunk in response.aiter_raw():
                pieces.extend(decoder.feed(chunk))
            decoder.finish()
            body = b"".join(pieces)
            del pieces
            if len(body) < LARGE_JSON_BYTES:
                return json_document(body, response.status_code, url), response.headers
            # a whole series' metadata parses for a second or more: not on the event loop
            return await trio.to_thread.run_sync(json_document, body, response.status_code, url), response.headers


def _transport_error(url: str, exc: httpx.TransportError) -> SourceError:
    return transport_error(url, type(exc).__name__, timeout=isinstance(exc, httpx.TimeoutException),
                           connect=isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)))


def _body_error(url: str, exc: httpx.TransportError) -> SourceError:
    return body_error(url, type(exc).__name__, timeout=isinstance(exc, httpx.TimeoutException))
