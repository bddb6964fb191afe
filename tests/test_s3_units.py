"""Unit tests of the S3 store (``dicomfs.sources.s3``): listing pages, addressing, signing, refusals.
The proof against a real S3 server is tests/test_mount_s3.py."""

from __future__ import annotations

import httpx
import pytest
from botocore.credentials import Credentials

from dicomfs.errors import AccessRefused, ProtocolError, SourceError
from dicomfs.sources import parse_source
from dicomfs.sources.s3 import S3Bucket, parse_listing
from dicomfs.tasks import StopSignal
from tests.factory import streamed
from tests.servers import AnsweringServer

NS = 'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'


def page(keys: list[tuple[str, str]], prefixes: list[str], token: str | None = None) -> bytes:
    contents = "".join(f"<Contents><Key>{k}</Key><Size>{s}</Size><ETag>&quot;abc&quot;</ETag></Contents>"
                       for k, s in keys)
    common = "".join(f"<CommonPrefixes><Prefix>{p}</Prefix></CommonPrefixes>" for p in prefixes)
    more = f"<IsTruncated>true</IsTruncated><NextContinuationToken>{token}</NextContinuationToken>" if token \
        else "<IsTruncated>false</IsTruncated>"
    return f'<?xml version="1.0"?><ListBucketResult {NS}>{more}{contents}{common}</ListBucketResult>'.encode()


def test_listing_pages_parse_and_malformed_entries_are_left_out() -> None:
    prefixes, objects, token = parse_listing(page([("a/x.tar", "10"), ("a/bad", "-1"), ("", "3")], ["a/b/"], "t1"))
    assert prefixes == ["a/b/"] and token == "t1"
    assert [(o.name, o.size, o.etag) for o in objects] == [("a/x.tar", 10, "abc")]
    assert parse_listing(page([], []))[2] is None
    with pytest.raises(ProtocolError, match="not valid XML"):
        parse_listing(b"<ListBucketResult><oops")
    with pytest.raises(ProtocolError, match="Error"):
        parse_listing(b"<Error><Code>AccessDenied</Code></Error>")
    with pytest.raises(ProtocolError, match="continuation token"):
        parse_listing(f"<ListBucketResult {NS}><IsTruncated>true</IsTruncated></ListBucketResult>".encode())


async def test_every_page_is_followed_and_requests_are_signed() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        token = request.url.params.get("continuation-token")
        if token is None:
            return httpx.Response(200, content=page([("p/1", "1")], ["p/a/"], "next page/+="))
        assert token == "next page/+="
        return httpx.Response(200, content=page([("p/2", "2")], ["p/b/"]))

    bucket = S3Bucket("bkt", endpoint="http://s3.test:9000", credentials=Credentials("AKID", "SECRET"),
                      transport=httpx.MockTransport(streamed(handler)))
    prefixes, objects = await bucket.list("p/")
    await bucket.aclose()
    assert prefixes == ["p/a/", "p/b/"] and [o.name for o in objects] == ["p/1", "p/2"]
    assert str(seen[0].url).startswith("http://s3.test:9000/bkt/?")  # path-style on a custom endpoint
    for request in seen:
        assert request.headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKID/")
        assert "/us-east-1/s3/aws4_request" in request.headers["Authorization"]
        assert "x-amz-date" in request.headers and "x-amz-content-sha256" in request.headers
    assert "SECRET" not in repr(bucket.http._client.auth)


def test_ranges_are_signed_and_anonymous_requests_carry_no_authorization() -> None:
    """Object reads go from worker threads (urllib3), on a real socket."""
    def answer(path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        return 206, {"Content-Range": "bytes 5-6/10", "Content-Length": "2"}, b"ab"

    with AnsweringServer(answer) as server:
        signed = S3Bucket("bkt", endpoint=server.url, credentials=Credentials("AKID", "SECRET"))
        with signed.stream_in_thread("dir/a b+c.dcm", 5, 7, StopSignal()) as chunks:
            assert b"".join(chunks) == b"ab"
        anonymous = S3Bucket("bkt", endpoint=server.url, sign=False)
        with anonymous.stream_in_thread("x", 5, 7, StopSignal()) as chunks:
            assert b"".join(chunks) == b"ab"
        signed.blocking.close()
        anonymous.blocking.close()
    (path, headers), (_, unsigned) = server.requests
    assert path == "/bkt/dir/a%20b%2Bc.dcm" and headers["range"] == "bytes=5-6"
    assert headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKID/")
    assert "range" in headers["authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
    assert unsigned["range"] == "bytes=5-6" and "authorization" not in unsigned


async def test_a_bucket_refusing_anonymous_requests_says_what_to_set() -> None:
    bucket = S3Bucket("private", endpoint="http://s3.test", sign=False,
                      transport=httpx.MockTransport(streamed(lambda r: httpx.Response(403, content=b"<Error/>"))))
    with pytest.raises(AccessRefused) as caught:
        await bucket.list("p/")
    await bucket.aclose()
    assert str(caught.value) == ("s3://private refused anonymous access: set AWS credentials "
                                 "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")


def test_addressing_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    assert S3Bucket("idc-open-data", sign=False).object_url("k") == "https://idc-open-data.s3.us-east-1.amazonaws.com/k"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert S3Bucket("a.b", sign=False).object_url("k") == "https://s3.eu-west-1.amazonaws.com/a.b/k"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.local:9000/")
    assert S3Bucket("b", sign=False).object_url("k/1.dcm") == "http://minio.local:9000/b/k/1.dcm"
    assert S3Bucket("b", endpoint="http://other:1", sign=False).object_url("k") == "http://other:1/b/k"


def test_s3_source_urls() -> None:
    spec = parse_source("s3://my-bucket/v1/dicomweb/")
    assert (spec.kind, spec.location) == ("cod", "s3://my-bucket/v1/dicomweb")
    assert parse_source("S3://b/p").location == "s3://b/p"


async def test_a_bucket_in_another_region_says_which_and_a_redirect_body_is_never_data() -> None:
    def handler(request: httpx.Request) -> httpx.Response:  # S3's answer to a request sent to the wrong region
        return httpx.Response(301, content=b"<Error><Code>PermanentRedirect</Code></Error>",
                              headers={"x-amz-bucket-region": "eu-west-1"})

    bucket = S3Bucket("far", endpoint="http://s3.test", sign=False, transport=httpx.MockTransport(streamed(handler)))
    with pytest.raises(SourceError) as listing:
        await bucket.list("p/")
    with pytest.raises(SourceError) as reading:  # (the error page is not the object's bytes)
        await bucket.read("p/a.dcm", 1000)
    await bucket.aclose()
    for caught in (listing, reading):
        assert str(caught.value).endswith(
            "answered HTTP 301: the bucket is in region eu-west-1: set AWS_REGION=eu-west-1")
