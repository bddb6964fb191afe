"""Amazon S3 and S3-compatible stores (MinIO, Ceph) for bucket sources: listings, URLs, signing.

Owns where a bucket is (``--endpoint``, else ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, else
AWS S3 in the region its owner names (IDC's buckets: us-east-1), else ``AWS_REGION``/``AWS_DEFAULT_REGION``,
default us-east-1; path-style addressing for
custom endpoints and bucket names with dots, virtual-hosted for AWS), a ListObjectsV2 page and its
continuation token, and authentication: credentials from the standard AWS chain (botocore's
resolver: environment, shared credentials and config files, ``AWS_PROFILE``, …), every request
signed with botocore's SigV4 signer, anonymous requests when there are no credentials or
``--no-sign-request``. Secrets never reach a log line, an error or the command line. Following
pages and reading objects is ``bucket.ObjectReader``'s. Must not know what the objects contain.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Generator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from dicomfs.errors import AccessRefused, ProtocolError
from dicomfs.sources.asynchttp import HttpClient
from dicomfs.sources.base import Credentials
from dicomfs.sources.bucket import ObjectInfo, ObjectReader
from dicomfs.sources.http import DEFAULT_TIMEOUT
from dicomfs.sources.threadhttp import BlockingHttp

if TYPE_CHECKING:
    from botocore.credentials import Credentials as AwsCredentials

log = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"
MAX_LISTING_BYTES = 16 * 1024 * 1024  # one ListObjectsV2 page (1,000 keys) is ~300 kB
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
SIGNATURE_HEADERS = ("Authorization", "X-Amz-Date", "X-Amz-Content-SHA256", "X-Amz-Security-Token")


def region() -> str:
    return (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION).strip()


def configured_endpoint() -> str | None:
    """The endpoint the AWS SDK convention names (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``)."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def aws_credentials(sign: bool) -> AwsCredentials | None:
    """Credentials from the standard AWS chain, or None (anonymous requests) when there are none
    or ``sign`` is False."""
    if not sign:
        return None
    import botocore.session

    try:
        found = botocore.session.Session().get_credentials()
    except Exception as exc:  # a broken ~/.aws/config or profile: say what, never the values
        raise AccessRefused(f"cannot read AWS credentials: {type(exc).__name__}: {str(exc)[:200]}") from None
    return found


class SigV4(httpx.Auth):
    """Signs each request with botocore's S3 SigV4 signer (the signature covers the host, the
    exact path and query sent, the Range header and the x-amz-* headers)."""

    def __init__(self, credentials: AwsCredentials, region_name: str) -> None:
        self._credentials = credentials
        self._region = region_name

    def __repr__(self) -> str:
        return f"SigV4(region={self._region!r})"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers.update(self.headers_for(str(request.url), request.headers))
        yield request

    def headers_for(self, url: str, headers: Mapping[str, str]) -> dict[str, str]:
        """The headers that sign a GET of ``url`` with ``headers`` (for either HTTP client)."""
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        signed = {k: v for k, v in headers.items() if k.lower() == "range"}
        aws = AWSRequest(method="GET", url=url, headers=signed)
        # (frozen: a refreshing credential, an assumed role's say, changes as a whole)
        S3SigV4Auth(self._credentials.get_frozen_credentials(), "s3", self._region).add_auth(aws)
        return {name: aws.headers[name] for name in SIGNATURE_HEADERS if name in aws.headers}


class S3Bucket(ObjectReader):
    def __init__(self, bucket: str, *, endpoint: str | None = None, sign: bool = True,
                 credentials: AwsCredentials | None = None, transport: httpx.AsyncBaseTransport | None = None,
                 page_size: int = 1000, timeout: float = DEFAULT_TIMEOUT, region_name: str | None = None) -> None:
        """``endpoint`` None: the configured one, else AWS S3 in ``region_name`` (None: the
        configured region). ``credentials`` None: the AWS chain's (unless ``sign`` is False)."""
        self.bucket = bucket
        self.description = f"s3://{bucket}"
        self.region = region_name or region()
        self.page_size = page_size
        endpoint = endpoint or configured_endpoint()
        if endpoint:
            self.base = f"{endpoint.rstrip('/')}/{quote(bucket, safe='')}"
        elif "." in bucket:
            self.base = f"https://s3.{self.region}.amazonaws.com/{quote(bucket, safe='')}"
        else:
            self.base = f"https://{bucket}.s3.{self.region}.amazonaws.com"
        if credentials is None:
            credentials = aws_credentials(sign)
        self.signed = credentials is not None
        auth = SigV4(credentials, self.region) if credentials is not None else None
        tls = not self.base.lower().startswith("http://")
        self.http = HttpClient(Credentials(), auth=auth, transport=transport, timeout=timeout, tls=tls,
                               hint=_region_hint)
        self.blocking = BlockingHttp(Credentials(), timeout=timeout, tls=tls, hint=_region_hint,
                                     sign=auth.headers_for if auth is not None else None)

    def object_url(self, name: str) -> str:
        return f"{self.base}/{quote(name, safe='/~')}"

    async def list_page(self, prefix: str, delimiter: str | None,
                        token: str | None) -> tuple[list[str], list[ObjectInfo], str | None]:
        """One ListObjectsV2 page."""
        query: dict[str, Any] = {"list-type": "2", "prefix": prefix, "max-keys": self.page_size}
        if delimiter:
            query["delimiter"] = delimiter
        if token:
            query["continuation-token"] = token
        text = "&".join(f"{quote(k, safe='-_.~')}={quote(str(v), safe='-_.~')}" for k, v in sorted(query.items()))
        try:
            body = await self.read_url(f"{self.base}/?{text}", MAX_LISTING_BYTES,
                                       f"{self.description}: a listing page")
        except AccessRefused:
            if self.signed:
                raise
            raise AccessRefused(f"{self.description} refused anonymous access: set AWS credentials "
                                "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)") from None
        return parse_listing(body)


def _region_hint(headers: Mapping[str, str]) -> str | None:
    """S3 names the bucket's region when a request went to another one (301 PermanentRedirect,
    400 AuthorizationHeaderMalformed)."""
    found = headers.get("x-amz-bucket-region", "").strip()
    if found and all(c.isalnum() or c == "-" for c in found) and len(found) < 40:
        return f"the bucket is in region {found}: set AWS_REGION={found}"
    return None


def parse_listing(body: bytes) -> tuple[list[str], list[ObjectInfo], str | None]:
    """A ListObjectsV2 answer: its common prefixes, its objects (malformed ones left out) and the
    continuation token of the next page (None on the last)."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise ProtocolError(f"bucket listing is not valid XML ({exc})") from None
    ns = _NS if root.tag.startswith(_NS) else ""
    if root.tag != f"{ns}ListBucketResult":
        raise ProtocolError(f"bucket listing is a {root.tag.removeprefix(ns)[:40]!r}, not a ListBucketResult")
    prefixes = [p.text for p in root.iterfind(f"{ns}CommonPrefixes/{ns}Prefix") if p.text]
    objects = []
    for item in root.iterfind(f"{ns}Contents"):
        name, size = item.findtext(f"{ns}Key"), item.findtext(f"{ns}Size")
        if not name or size is None or not size.strip().isdigit():
            continue
        etag = (item.findtext(f"{ns}ETag") or "").strip().strip('"') or None
        objects.append(ObjectInfo(name, int(size), updated=item.findtext(f"{ns}LastModified"), etag=etag))
    truncated = (root.findtext(f"{ns}IsTruncated") or "").strip().lower() == "true"
    token = root.findtext(f"{ns}NextContinuationToken") if truncated else None
    if truncated and not token:
        raise ProtocolError("bucket listing says it is truncated but gives no continuation token")
    return prefixes, objects, token or None
