"""Google Cloud Storage access for bucket sources: listing pages and object URLs.

Owns the GCS JSON API URLs (also served by emulators), a listing page and its ``nextPageToken``,
bearer tokens and requester-pays headers. Following pages and reading objects is
``bucket.ObjectReader``'s. Must not know what the objects contain.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote, urlencode

import httpx

from dicomfs.errors import ProtocolError
from dicomfs.sources.asynchttp import HttpClient
from dicomfs.sources.base import Credentials
from dicomfs.sources.bucket import ObjectInfo, ObjectReader
from dicomfs.sources.http import DEFAULT_TIMEOUT
from dicomfs.sources.threadhttp import BlockingHttp

DEFAULT_ENDPOINT = "https://storage.googleapis.com"


def default_endpoint() -> str:
    """``STORAGE_EMULATOR_HOST`` (the google-cloud-storage convention) or Google's endpoint."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
    if emulator:
        return emulator if "://" in emulator else f"http://{emulator}"
    return DEFAULT_ENDPOINT


class GcsBucket(ObjectReader):
    def __init__(self, endpoint: str, bucket: str, credentials: Credentials, *, user_project: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None, page_size: int = 1000,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.bucket = bucket
        self.description = f"gs://{bucket}"
        self.page_size = page_size
        headers = {"X-Goog-User-Project": user_project} if user_project else None
        tls = not self.endpoint.lower().startswith("http://")
        self.http = HttpClient(credentials, transport=transport, extra_headers=headers, timeout=timeout, tls=tls)
        self.blocking = BlockingHttp(credentials, extra_headers=headers, timeout=timeout, tls=tls)

    async def list_page(self, prefix: str, delimiter: str | None,
                        token: str | None) -> tuple[list[str], list[ObjectInfo], str | None]:
        query: dict[str, Any] = {"prefix": prefix, "maxResults": self.page_size}
        if delimiter:
            query["delimiter"] = delimiter
        if token:
            query["pageToken"] = token
        url = f"{self.endpoint}/storage/v1/b/{quote(self.bucket, safe='')}/o?{urlencode(query)}"
        page, _ = await self.http.get_json(url)
        if page is None:
            return [], [], None
        if not isinstance(page, dict):
            raise ProtocolError("bucket listing is not a JSON object")
        found = page.get("prefixes") or []
        items = page.get("items") or []
        if not isinstance(found, list) or not isinstance(items, list):
            raise ProtocolError("bucket listing has a malformed prefixes/items field")
        following = page.get("nextPageToken")
        return ([p for p in found if isinstance(p, str)],
                [info for info in map(_object_info, items) if info is not None],
                following if isinstance(following, str) and following else None)

    def object_url(self, name: str) -> str:
        return f"{self.endpoint}/storage/v1/b/{quote(self.bucket, safe='')}/o/{quote(name, safe='')}?alt=media"


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
