"""HTTP policy shared by both clients of a source: the one retry policy, auth headers, error mapping.

Owns how a request is retried (connection failures before an answer, HTTP 429 and 5xx, with
exponential backoff honouring Retry-After: a few fast attempts, never a timeout again, since a
stalled server does not recover in a second), how failures map to the error hierarchy (whole-
archive failures are ``SourceUnavailable``, a body cut short is ``TransferBroken``), that an answer
asked for in identity encoding must come that way, the ``Authorization`` header of a token or a
user and password, what a JSON GET asks for and how its body becomes a document, and how a URL
may appear in a message. The clients apply it: ``asynchttp``
(httpx on the event loop: bucket listings and small whole objects) and ``threadhttp`` (urllib3 in worker
threads: DICOMweb queries and retrieves, bucket objects). Retries happen before any body is
handed out; resuming a broken download is the blob store's. Imports no HTTP library (a DICOMweb
command never loads httpx). Must not know DICOM, and must never put a credential into a log line
or an error message.
"""

from __future__ import annotations

import base64
import random
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dicomfs.decoding import ACCEPTED_CODINGS, parse_json
from dicomfs.errors import (
    AccessRefused,
    ProtocolError,
    SourceError,
    SourceUnavailable,
    TransferBroken,
)
from dicomfs.gcpause import paused
from dicomfs.sources.base import Credentials
from dicomfs.transferlimits import DEFAULT_WINDOW

RETRY_STATUS = {429, 500, 502, 503, 504}
OUTAGE_STATUS = {429, 502, 503, 504}  # the archive (or its gateway) as a whole is not serving
LARGE_JSON_BYTES = 1 << 20
MAX_JSON_BYTES = 64 * 1024 * 1024  # a QIDO page or a bucket listing page, inflated
DEFAULT_TIMEOUT = DEFAULT_WINDOW  # ``--timeout``: a socket read, and the window of the minimum rate
JSON_HEADERS = {"Accept": "application/dicom+json, application/json", "Accept-Encoding": ACCEPTED_CODINGS}


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


def auth_header(credentials: Credentials) -> str | None:
    """The ``Authorization`` header for a bearer token, or for a user and password (Basic)."""
    if credentials.token:
        return f"Bearer {credentials.token}"
    if credentials.user:
        pair = f"{credentials.user}:{credentials.password or ''}".encode()
        return f"Basic {base64.b64encode(pair).decode()}"
    return None


def proxied() -> bool:
    """Whether the environment names a proxy (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``)."""
    import urllib.request

    return any(scheme in urllib.request.getproxies() for scheme in ("http", "https", "all"))


def describe(url: str) -> str:
    """The URL as it may appear in a message: no query, no fragment, no user info."""
    parts = urlsplit(str(url))
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def json_document(data: bytes, status: int, url: str) -> Any:
    """The document of a JSON answer's (inflated) body: None for ``204`` or an empty body. Blocking
    when the body is large (``LARGE_JSON_BYTES``: a whole series' metadata, 61,000 objects, is
    parsed with the cyclic collector paused); the event loop hands those to a worker thread."""
    if status == 204 or not data.strip():
        return None
    if len(data) < LARGE_JSON_BYTES:
        return parse_json(data, describe(url))
    return paused(parse_json, data, describe(url))


def check_encoding(url: str, asked: dict[str, str] | None, coding: str | None) -> None:
    """Refuse an answer compressed although identity encoding was asked for."""
    coding = (coding or "identity").strip().lower()
    if (asked or {}).get("Accept-Encoding") == "identity" and coding != "identity":
        raise ProtocolError(f"{describe(url)} answered in Content-Encoding {coding[:40]!r} "
                            "although dicomfs asked for none: refused")


def transport_error(url: str, name: str, *, connect: bool, timeout: bool) -> SourceError:
    """A request that got no answer: the archive is unreachable or not answering. ``name``: the
    HTTP library's name for what happened (no message: it may hold a URL with secrets)."""
    if connect:
        return SourceUnavailable(f"cannot reach {describe(url)}: {name}")
    if timeout:
        return SourceUnavailable(f"{describe(url)} did not answer in time ({name})")
    return SourceUnavailable(f"request to {describe(url)} failed: {name}")


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
