"""HTTP access for sources: one httpx client with timeouts, retries with backoff, and auth.

Owns how a request is retried (idempotent GETs, on connection errors, timeouts, 429 and 5xx,
with exponential backoff honouring Retry-After) and how failures map to SourceError. Must not
know DICOM, and must never put a credential into a log line or an error message.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import AsyncIterator, Generator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from dicomfs.errors import AccessRefused, ProtocolError, SourceError, SourceUnavailable
from dicomfs.gcpause import paused
from dicomfs.sources.base import Credentials
from dicomfs.sources.transport import LargeReadTransport

log = logging.getLogger(__name__)

RETRY_STATUS = {429, 500, 502, 503, 504}
LARGE_JSON_BYTES = 1 << 20
MAX_JSON_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    first_delay: float = 0.25
    max_delay: float = 5.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        if retry_after and retry_after.isdigit():
            return min(float(retry_after), self.max_delay)
        base = min(self.first_delay * (2**attempt), self.max_delay)
        return base * (0.5 + random.random() / 2)


class _BearerAuth(httpx.Auth):
    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header
        yield request


def _auth(credentials: Credentials) -> httpx.Auth | None:
    if credentials.token:
        return _BearerAuth(credentials.token)
    if credentials.user:
        return httpx.BasicAuth(credentials.user, credentials.password or "")
    return None


def _proxied() -> bool:
    """Whether the environment names a proxy (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``)."""
    import urllib.request

    return any(scheme in urllib.request.getproxies() for scheme in ("http", "https", "all"))


def _describe(url: httpx.URL | str) -> str:
    """The URL as it may appear in a message: no query values, no user info."""
    parsed = httpx.URL(str(url))
    return str(parsed.copy_with(query=None, userinfo=b""))


class HttpClient:
    """A small wrapper around ``httpx.AsyncClient`` shared by one source."""

    def __init__(
        self,
        credentials: Credentials,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 16,
        extra_headers: dict[str, str] | None = None,
        tls: bool = True,
    ) -> None:
        """``tls=False`` for a plain-http archive: no certificate store is loaded (tens of
        milliseconds), and a redirect to https fails verification instead of going unchecked."""
        self.retry = retry or RetryPolicy()
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._client = httpx.AsyncClient(
            auth=_auth(credentials),
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            # httpx applies HTTP(S)_PROXY only to its own default transport: keep that one then.
            transport=transport or (None if _proxied() else LargeReadTransport(limits, tls=tls)),
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
        """A successful (2xx) streamed GET. Retries happen before the body is handed out."""
        attempt = 0
        while True:
            try:
                request = self._client.build_request("GET", url, headers=headers)
                response = await self._client.send(request, stream=True)
            except httpx.TransportError as exc:
                if attempt + 1 >= self.retry.attempts:
                    raise _transport_error(url, exc) from None
                log.info("retrying %s after %s", _describe(url), type(exc).__name__)
                await trio.sleep(self.retry.delay(attempt))
                attempt += 1
                continue
            if response.status_code in RETRY_STATUS and attempt + 1 < self.retry.attempts:
                retry_after = response.headers.get("retry-after")
                await response.aclose()
                log.info("retrying %s after HTTP %d", _describe(url), response.status_code)
                await trio.sleep(self.retry.delay(attempt, retry_after))
                attempt += 1
                continue
            try:
                if response.status_code >= 400:
                    raise _status_error(url, response.status_code)
                yield response
            finally:
                await response.aclose()
            return

    async def get_json(self, url: str, headers: dict[str, str] | None = None) -> tuple[Any, httpx.Headers]:
        """GET a JSON document. ``204`` and an empty body are returned as None."""
        all_headers = {"Accept": "application/dicom+json, application/json"}
        all_headers.update(headers or {})
        async with self.stream(url, all_headers) as response:
            body = bytearray()
            try:
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_JSON_BYTES:
                        raise ProtocolError(f"JSON answer from {_describe(url)} is too large")
            except httpx.TransportError as exc:
                raise _transport_error(url, exc) from None
            if response.status_code == 204 or not body.strip():
                return None, response.headers
            try:
                if len(body) < LARGE_JSON_BYTES:
                    return json.loads(body), response.headers
                # a whole series' metadata parses for a second or more: not on the event loop
                return await trio.to_thread.run_sync(paused, json.loads, body), response.headers
            except ValueError:
                raise ProtocolError(f"malformed JSON from {_describe(url)}") from None


def _transport_error(url: str, exc: httpx.TransportError) -> SourceError:
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return SourceUnavailable(f"cannot reach {_describe(url)}: {type(exc).__name__}")
    return SourceError(f"request to {_describe(url)} failed: {type(exc).__name__}")


def _status_error(url: str, status: int) -> SourceError:
    if status in (401, 403):
        return AccessRefused(f"{_describe(url)} refused access (HTTP {status}): check credentials")
    if status == 404:
        return SourceError(f"{_describe(url)} not found (HTTP 404)")
    return SourceError(f"{_describe(url)} answered HTTP {status}")
