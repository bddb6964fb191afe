"""The DICOMweb server's ASGI application: routes, HTTP semantics, errors.

Owns which URL answers what (below ``/dicomweb``: QIDO-RS by ``qido``, WADO-RS by ``wado``; with
``--viewer``, the viewer's files everywhere else, by ``viewer``), the methods (GET, HEAD and
OPTIONS; anything else is 405: the server is read-only), CORS (``--cors-origin``, preflights),
validators and caching (a strong ETag of the bytes sent, If-None-Match → 304; ``Cache-Control``
immutable below an instance, revalidated for listings and searches), gzip (the stored gzip bytes
as they are when the client accepts gzip, decoded otherwise), one byte range on frames and bulk
data (206/416), and failures: each one status from the error's ``http_status`` and a one-line
reason, logged once; the server keeps serving. Must not search, render or fetch anything itself.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import cachetools
import trio

from dicomfs import dicomjson
from dicomfs.errors import (
    AccessRefused,
    CacheError,
    DicomfsError,
    IntegrityError,
    Interrupted,
    NotFound,
    ProtocolError,
    SourceUnavailable,
    WaitTimeout,
)
from dicomfs.server.accept import MediaRange, NotAcceptable, accepts_json, parse_accept
from dicomfs.server.qido import BadRequest, Qido, parse_request
from dicomfs.server.viewer import Viewer
from dicomfs.server.wado import JSON, Body, Wado
from dicomfs.webtree import WebKind, WebNode

log = logging.getLogger(__name__)

ROOT = "dicomweb"
ALLOWED = "GET, HEAD, OPTIONS"
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
PREFLIGHT_MAX_AGE = "86400"
EXPOSED = "Content-Range, Accept-Ranges, Content-Length, Content-Encoding, ETag"
MAX_QUERY = 8192  # bytes of a query string
OFF_LOOP_BYTES = 1 << 20  # data from which hashing and decompressing run in a worker thread
REPLIES_KEPT = 64 << 20  # bytes of immutable replies kept ready (bodies the renderer keeps anyway)
DIGESTS_KEPT = 64 << 20  # bytes of bodies whose digests are remembered (bodies the renderer keeps anyway)
T = TypeVar("T")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Request:
    method: str
    path: list[str]  # the segments below /dicomweb
    params: list[tuple[str, str]]
    headers: dict[str, list[str]]  # lower-case names

    def header(self, name: str) -> str | None:
        values = self.headers.get(name)
        return ", ".join(values) if values else None

    @property
    def accept(self) -> list[MediaRange]:
        return parse_accept(self.headers.get("accept", []))

    @property
    def takes_gzip(self) -> bool:
        """Whether ``Accept-Encoding`` admits gzip (named, or ``*``, with a q above 0)."""
        for piece in (self.header("accept-encoding") or "").split(","):
            coding, *params = (p.strip().lower() for p in piece.split(";"))
            q = next((p[2:] for p in params if p.startswith("q=")), "1")
            try:
                weight = float(q)
            except ValueError:
                weight = 0.0
            if coding in ("gzip", "x-gzip", "*") and weight > 0:
                return True
        return False


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: Body | bytes | None = None


class DicomwebApp:
    """An ASGI 3 application serving one archive's DICOMweb (and optionally a viewer)."""

    def __init__(self, qido: Qido, wado: Wado, *, cors_origin: str | None = None,
                 viewer: Viewer | None = None) -> None:
        self.qido = qido
        self.wado = wado
        self.cors_origin = cors_origin
        self.viewer = viewer
        self.digests = Digests()
        # Replies that never change (below an instance), ready to send again: a warm frame costs a
        # dict lookup instead of six lookups, a negotiation and the headers (measured: 0.27 ms of
        # a warm frame's 0.72 ms went there). Keyed by everything the reply depends on; requests
        # with Range or validators take the full path. Bodies are the renderer's own objects.
        self._replies: cachetools.LRUCache[tuple[object, ...], Reply] = cachetools.LRUCache(
            REPLIES_KEPT, getsizeof=lambda reply: len(reply.body) if isinstance(reply.body, bytes) else 1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers: dict[str, list[str]] = {}
        for name, value in scope.get("headers", []):
            headers.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
        method = scope["method"]
        origin = headers["origin"][0] if headers.get("origin") else None
        try:
            reply = await self._reply(scope, method, headers)
        except DicomfsError as exc:
            reply = _failure(exc)
        except Exception:  # a bug: one 500, the server goes on
            log.exception("%s %s: unexpected error", method, scope.get("path", "")[:200])
            reply = Reply(500, [], b"internal error (see the server's log)\n")
        reply.headers += self._cors(origin, method, headers)
        # (first: a client still sending would not read the answer. In HTTP/1 there is no body
        # without one of these headers: a warm frame is spared the step.)
        if ("content-length" in headers or "transfer-encoding" in headers
                or not scope.get("http_version", "1.1").startswith("1")):
            await _drain(receive)
        await _send(send, reply, head=method == "HEAD")

    # --- dispatch -------------------------------------------------------------------------------
    async def _reply(self, scope: Scope, method: str, headers: dict[str, list[str]]) -> Reply:
        path: str = scope["path"]
        if method == "OPTIONS":
            return Reply(204, [("Allow", ALLOWED)])
        if method not in ("GET", "HEAD"):
            return Reply(405, [("Allow", ALLOWED)], b"read-only: only GET, HEAD and OPTIONS\n")
        segments = path.split("/")[1:]
        if segments and segments[-1] == "" and len(segments) > 1:
            segments.pop()  # ".../studies/" is ".../studies"
        if not segments or segments[0] != ROOT:
            if self.viewer is None:
                raise NotFound(path[:200])
            return await _finish(Request(method, [], [], headers), await self.viewer.file(path), self.digests)
        query_string = scope.get("query_string", b"")
        if len(query_string) > MAX_QUERY:
            raise BadRequest(f"query string longer than {MAX_QUERY} bytes")
        try:
            params = parse_qsl(query_string.decode("utf-8"), keep_blank_values=True, strict_parsing=False,
                               max_num_fields=256)
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadRequest(f"unreadable query string: {exc}") from None
        request = Request(method, segments[1:], params, headers)
        key: tuple[object, ...] | None = None
        if not any(name in headers for name in ("range", "if-none-match", "if-range")):
            key = (path, query_string, tuple(headers.get("accept", ())), request.takes_gzip)
            known = self._replies.get(key)
            if known is not None:
                return Reply(known.status, list(known.headers), known.body)
        reply = await _finish(request, await self._route(request), self.digests)
        if key is not None and reply.status == 200 and isinstance(reply.body, bytes) and \
                ("Cache-Control", IMMUTABLE) in reply.headers and len(reply.body) <= REPLIES_KEPT // 16:
            self._replies[key] = Reply(reply.status, list(reply.headers), reply.body)
        return reply

    async def _route(self, request: Request) -> Body:
        p = request.path
        n = len(p)
        if n == 1 and p[0] in ("studies", "series", "instances"):
            return await self._search(request, p[0])
        if n < 2 or p[0] != "studies":
            raise NotFound("/".join(p)[:200])
        study = await self.wado.resolve(WebKind.STUDY, "studies", p[1])
        if n == 2:
            return await self.wado.instances(study, request.accept)
        if n == 3 and p[2] == "metadata":
            return await self._metadata(request, study)
        if n == 3 and p[2] in ("series", "instances"):
            return await self._search(request, p[2], study=study)
        if n == 6 and p[2] == "bulkdata":
            return await self.wado.bulk(await self.wado.resolve(WebKind.BULK_FILE, *p), request.accept)
        if p[2] != "series" or n < 4:
            raise NotFound("/".join(p)[:200])
        series = await self.wado.resolve(WebKind.SERIES, "series", p[3], below=study)
        if n == 4:
            return await self.wado.instances(series, request.accept)
        if n == 5 and p[4] == "metadata":
            return await self._metadata(request, series)
        if n == 5 and p[4] == "instances":
            return await self._search(request, "instances", study=study, series=series)
        if n < 6 or p[4] != "instances":
            raise NotFound("/".join(p)[:200])
        instance = await self.wado.resolve(WebKind.INSTANCE, "instances", p[5], below=series)
        if n == 6:
            return await self.wado.instances(instance, request.accept)
        if n == 7 and p[6] == "metadata":
            return await self._metadata(request, instance)
        if n in (7, 8) and p[6] == "frames":  # (no list: every frame)
            return await self.wado.frames(instance, p[7] if n == 8 else None, request.accept)
        raise NotFound("/".join(p)[:200])

    async def _metadata(self, request: Request, node: WebNode) -> Body:
        if not accepts_json(request.accept):
            raise NotAcceptable("metadata is application/dicom+json (dicomfs has no XML form)")
        return await self.wado.metadata(node)

    async def _search(self, request: Request, level: str, study: WebNode | None = None,
                      series: WebNode | None = None) -> Body:
        """A search's results: listed now, revalidated every time."""
        if not accepts_json(request.accept):
            raise NotAcceptable("searches answer application/dicom+json")
        qido = parse_request(request.params)
        record = study.study if study is not None else None
        if level == "studies":
            found = await self.qido.studies(qido)
        elif level == "series":
            found = await self.qido.series(qido, record)
        else:
            found = await self.qido.instances(qido, record, series.series if series is not None else None)
        return Body(JSON, await trio.to_thread.run_sync(lambda: dicomjson.gzipped(dicomjson.encode(found))),
                    gzipped=True)

    # --- CORS -----------------------------------------------------------------------------------
    def _cors(self, origin: str | None, method: str, headers: dict[str, list[str]]) -> list[tuple[str, str]]:
        if self.cors_origin is None or origin is None:
            return []
        if self.cors_origin != "*" and origin != self.cors_origin:
            return []
        out = [("Access-Control-Allow-Origin", self.cors_origin), ("Vary", "Origin"),
               ("Access-Control-Expose-Headers", EXPOSED)]
        if method == "OPTIONS" and "access-control-request-method" in headers:
            asked = ",".join(headers.get("access-control-request-headers", []))
            names = [h.strip() for h in asked.split(",") if _TOKEN.fullmatch(h.strip())]
            out += [("Access-Control-Allow-Methods", ALLOWED), ("Access-Control-Max-Age", PREFLIGHT_MAX_AGE)]
            if names:
                out.append(("Access-Control-Allow-Headers", ", ".join(names[:64])))
        return out


class Digests:
    """Content digests for ETags, one per body object, kept beside it: the renderer hands out the
    same bytes object for a file it keeps, so a frame asked for again is not hashed again
    (hashing was a quarter of the server's time for warm 128 KiB frames)."""

    def __init__(self, budget: int = DIGESTS_KEPT) -> None:
        self._known: cachetools.LRUCache[int, tuple[bytes, str]] = cachetools.LRUCache(
            budget, getsizeof=lambda entry: len(entry[0]))

    async def of(self, data: bytes | memoryview) -> str:
        known = self._known.get(id(data))
        if known is not None and known[0] is data:
            return known[1]
        digest = await _off_loop(lambda d: hashlib.blake2b(d, digest_size=16).hexdigest(), data)
        if isinstance(data, bytes) and len(data) <= self._known.maxsize // 16:
            self._known[id(data)] = (data, digest)  # (kept with its object: an id is not reused meanwhile)
        return digest


async def _finish(request: Request, body: Body, digests: Digests) -> Reply:
    """Headers for a body: type, encoding, validators, caching, a range."""
    headers = [("Cache-Control", IMMUTABLE if body.immutable else REVALIDATE)]
    if body.stream is not None:
        return Reply(200, [("Content-Type", body.media_type), *headers], body)
    assert body.data is not None
    data = body.data
    if body.gzipped:
        headers.append(("Vary", "Accept-Encoding"))
        if request.takes_gzip:
            headers.append(("Content-Encoding", "gzip"))
        else:
            data = await _off_loop(gzip.decompress, data)
    digest = await digests.of(data)
    etag = f'"{digest}-gz"' if body.gzipped and request.takes_gzip else f'"{digest}"'
    headers.append(("ETag", etag))
    if _matches(request.header("if-none-match"), etag):
        return Reply(304, headers)
    headers.insert(0, ("Content-Type", body.media_type))
    if body.ranges:
        headers.append(("Accept-Ranges", "bytes"))
        wanted = request.header("range")
        if_range = request.header("if-range")
        if wanted is not None and (if_range is None or if_range == etag):
            return _range(wanted, data, headers)
    return Reply(200, headers, bytes(data) if isinstance(data, memoryview) else data)


async def _off_loop(work: Callable[[Any], T], data: bytes | memoryview) -> T:
    """``work(data)``, in a worker thread when ``data`` is large enough to stall other requests."""
    if len(data) < OFF_LOOP_BYTES:
        return work(data)
    return await trio.to_thread.run_sync(work, data)


def _range(wanted: str, data: bytes | memoryview, headers: list[tuple[str, str]]) -> Reply:
    """One byte range (206), or 416; several ranges, or a malformed header, get the whole body."""
    match = _RANGE.fullmatch(wanted.strip())
    size = len(data)
    if match is None or (not match.group(1) and not match.group(2)):
        return Reply(200, headers, bytes(data))
    first, last = match.group(1), match.group(2)
    if first:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
        if last and int(last) < start:
            return Reply(200, headers, bytes(data))
    else:
        start, end = max(size - int(last), 0), size - 1
    if start >= size or size == 0:
        return Reply(416, [*headers, ("Content-Range", f"bytes */{size}")], b"range not satisfiable\n")
    return Reply(206, [*headers, ("Content-Range", f"bytes {start}-{end}/{size}")], bytes(data[start:end + 1]))


def _matches(if_none_match: str | None, etag: str) -> bool:
    if if_none_match is None:
        return False
    tags = [t.strip() for t in if_none_match.split(",")]
    return "*" in tags or etag in tags or f"W/{etag}" in tags


# What a client is told of a failure on our side or the archive's (the details, which name
# local paths, archive URLs and cache folders, go to the log): the first class that matches.
_PUBLIC_FAILURES: tuple[tuple[type[DicomfsError], str], ...] = (
    (AccessRefused, "the archive refused the server's credentials"),
    (SourceUnavailable, "the archive is unavailable; try again later"),
    (WaitTimeout, "the archive did not deliver in time; try again later"),
    (Interrupted, "the server is stopping"),
    (IntegrityError, "the archive's bytes for this failed a check"),
    (ProtocolError, "the archive answered with something malformed"),
    (CacheError, "the server's cache is unusable"),
    (DicomfsError, "the archive failed to deliver this"),
)


def _failure(exc: DicomfsError) -> Reply:
    status = exc.http_status
    reason = str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__
    if status >= 500:
        log.warning("%s: %s", status, reason)
        reason = next(text for kind, text in _PUBLIC_FAILURES if isinstance(exc, kind)) + " (the server's log says why)"
    else:
        log.debug("%s: %s", status, reason)
    if isinstance(exc, NotFound):
        reason = f"not found: {reason}"
    return Reply(status, [], (reason + "\n").encode("utf-8", "replace"))


async def _send(send: Send, reply: Reply, *, head: bool) -> None:
    headers = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in reply.headers]
    body = reply.body
    if isinstance(body, Body):
        assert body.stream is not None
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        stream = body.stream
        try:
            if not head:
                async for chunk in stream:
                    await send({"type": "http.response.body", "body": bytes(chunk), "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            with trio.CancelScope(shield=True):  # (a client gone mid-body: close what it read)
                await stream.aclose()
        return
    data = body or b""
    if reply.status >= 400 and not any(name == b"content-type" for name, _ in headers):
        headers.append((b"content-type", b"text/plain; charset=utf-8"))
    if reply.status not in (204, 304):
        headers.append((b"content-length", str(len(data)).encode()))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head or reply.status in (204, 304) else data})


async def _drain(receive: Receive) -> None:
    """Read a request's body to its end and drop it (nothing here takes a body). hypercorn hands
    a body over through a queue of a few pieces: one nobody reads stops its connection's reader
    for good, and the connection is never closed. In HTTP/2 (which hypercorn speaks to a client
    that starts with its preface) a body may come without a Content-Length."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def lifespan(receive: Receive, send: Send) -> None:
    """The ASGI lifespan protocol: nothing to start or stop (the archive is opened around the server)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
        await trio.lowlevel.checkpoint()

