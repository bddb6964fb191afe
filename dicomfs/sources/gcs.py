"""Google Cloud Storage access for bucket sources: paginated listings and ranged object reads.

Owns the GCS JSON API URLs (also served by emulators), ``nextPageToken`` pagination, bearer
tokens and requester-pays headers. Must not know what the objects contain.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import httpx

from dicomfs.errors import ProtocolError
from dicomfs.sources.base import Credentials
from dicomfs.sources.http import DEFAULT_TIMEOUT, HttpClient

DEFAULT_ENDPOINT = "https://storage.googleapis.com"
MAX_LIST_PAGES = 100_000


def default_endpoint() -> str:
    """``STORAGE_EMULATOR_HOST`` (the google-cloud-storage convention) or Google's endpoint."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
    if emulator:
        return emulator if "://" in emulator else f"http://{emulator}"
    return DEFAULT_ENDPOINT


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int
    crc32c: str | None
    updated: str | None


class GcsBucket:
    def __init__(self, endpoint: str, bucket: str, credentials: Credentials, *, user_project: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None, page_size: int = 1000,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.bucket = bucket
        self.page_size = page_size
        headers = {"X-Goog-User-Project": user_project} if user_project else None
        self.http = HttpClient(credentials, transport=transport, extra_headers=headers, timeout=timeout,
                               tls=not self.endpoint.lower().startswith("http://"))

    async def aclose(self) -> None:
        await self.http.aclose()

    async def list(self, prefix: str, *, delimiter: str | None = "/",
                   max_pages: int = MAX_LIST_PAGES) -> tuple[list[str], list[ObjectInfo]]:
        """All sub-prefixes and objects under ``prefix``, following every page (up to ``max_pages``)."""
        prefixes: list[str] = []
        objects: list[ObjectInfo] = []
        token: str | None = None
        for _ in range(max_pages):
            query: dict[str, Any] = {"prefix": prefix, "maxResults": self.page_size}
            if delimiter:
                query["delimiter"] = delimiter
            if token:
                query["pageToken"] = token
            url = f"{self.endpoint}/storage/v1/b/{quote(self.bucket, safe='')}/o?{urlencode(query)}"
            page, _ = await self.http.get_json(url)
            if page is None:
                break
            if not isinstance(page, dict):
                raise ProtocolError("bucket listing is not a JSON object")
            found = page.get("prefixes") or []
            items = page.get("items") or []
            if not isinstance(found, list) or not isinstance(items, list):
                raise ProtocolError("bucket listing has a malformed prefixes/items field")
            prefixes.extend(p for p in found if isinstance(p, str))
            objects.extend(info for info in map(_object_info, items) if info is not None)
            token = page.get("nextPageToken")
            if not isinstance(token, str) or not token:
                break
        return prefixes, objects

    def media_url(self, name: str) -> str:
        return f"{self.endpoint}/storage/v1/b/{quote(self.bucket, safe='')}/o/{quote(name, safe='')}?alt=media"

    async def read(self, name: str, limit: int) -> bytes:
        """A whole (small) object, as stored: no transparent decompression."""
        async with self.http.stream(self.media_url(name), {"Accept-Encoding": "identity"}) as response:
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > limit:
                    raise ProtocolError(f"object {name} is larger than {limit} bytes")
            return bytes(body)

    @asynccontextmanager
    async def stream(self, name: str, start: int = 0, end: int | None = None) -> AsyncIterator[AsyncIterator[bytes]]:
        """The bytes ``[start, end)`` of an object (a Range request unless it is the whole object)."""
        headers = {"Accept-Encoding": "identity"}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        async with self.http.stream(self.media_url(name), headers) as response:
            skip = start if (start and response.status_code == 200) else 0  # Range ignored
            if response.status_code == 206 and not response.headers.get("content-range", "").startswith(
                    f"bytes {start}-"):
                raise ProtocolError(f"object {name}: the server answered a different range")
            yield _skipping(response.aiter_raw(), skip)


async def _skipping(chunks: AsyncIterator[bytes], skip: int) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        if skip >= len(chunk):
            skip -= len(chunk)
            continue
        yield chunk[skip:] if skip else chunk
        skip = 0


def _object_info(item: object) -> ObjectInfo | None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    try:
        size = int(item.get("size", -1))
    except (TypeError, ValueError):
        return None
    if size < 0:
        return None
    crc = item.get("crc32c")
    updated = item.get("updated")
    return ObjectInfo(item["name"], size, crc if isinstance(crc, str) else None,
                      updated if isinstance(updated, str) else None)
