"""WADO-RS for the DICOMweb server: metadata, frames, bulk data, and instances as stored.

Owns turning a URL's UIDs into records through the static tree's layout (``webtree``: the same
names, the same checks, ENOENT there is 404 here; the tree's own files, ``index.json.gz`` and the
like, are 404 too), the study's metadata (its series' joined), frame lists (one part per frame;
``frames`` alone: every frame), bulk data (raw, or one part when multipart is asked for),
retrieves of instances, series and studies streamed from the blob store instance by instance
(never a whole series in memory), and the form of each body from ``Accept`` (``accept``). Rendered
bytes come from ``webfiles``, the same as the mount's ``dicomweb/`` files. Must not know HTTP
beyond media types (``app`` does).
"""

from __future__ import annotations

import gzip
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import trio

from dicomfs import dicomjson, frames, p10
from dicomfs.cache import BlobStore
from dicomfs.catalog import Catalog
from dicomfs.errors import NotFound, ProtocolError
from dicomfs.records import InstanceRecord, SeriesRecord
from dicomfs.server.accept import DICOM, MULTIPART, MediaRange, NotAcceptable, frame_form, instance_form
from dicomfs.webfiles import WebFiles
from dicomfs.webtree import FRAME_SUFFIX, METADATA, ROOT, WebKind, WebLayout, WebNode

JSON = "application/dicom+json"
CHUNK = 1 << 20  # bytes of an instance read and sent at once
PARTS = "dicomfs-part-6f0d2b9c81e4a357"  # boundary of the multipart bodies built here
MAX_FRAMES_ASKED = 10_000  # frame numbers in one request


@dataclass
class Body:
    """What a WADO-RS request answers: whole bytes or a stream, and how it may be cached."""

    media_type: str
    data: bytes | memoryview | None = None
    stream: AsyncGenerator[bytes | bytearray | memoryview, None] | None = None
    gzipped: bool = False  # ``data`` is gzip (the stored listing and metadata files)
    immutable: bool = False  # below an instance: never changes (SOP Instance UIDs are immutable)
    ranges: bool = False  # a Range request may cut it


class Wado:
    def __init__(self, catalog: Catalog, blobs: BlobStore, files: WebFiles) -> None:
        self.catalog = catalog
        self.blobs = blobs
        self.files = files
        self.layout = WebLayout(catalog, files)

    async def resolve(self, kind: WebKind, *names: str, below: WebNode = ROOT) -> WebNode:
        """The static tree's node at ``names`` below ``below`` (``dicomweb/``), which must be a
        ``kind``: NotFound if it names nothing, or names one of the tree's own files
        (``index.json.gz``, ``metadata.gz``, …), which are the mount's layout, not resources."""
        node = below
        for name in names:
            node = await self.layout.lookup(node, name)
        if node.kind is not kind:
            raise NotFound("/".join(node.path)[:200])
        return node

    # --- metadata -----------------------------------------------------------------------------
    async def metadata(self, node: WebNode) -> Body:
        """The metadata of a study (its series' joined), a series or an instance."""
        if node.kind is WebKind.STUDY:
            series_list = await self.layout.lookup(node, "series")
            parts = []
            for child in await self.layout.children(series_list):
                if child.kind is WebKind.SERIES:
                    parts.append(await self.files.content(await self.layout.lookup(child, METADATA)))
            return Body(JSON, await trio.to_thread.run_sync(_join_arrays, parts), gzipped=True)
        data = await self.files.content(await self.layout.lookup(node, METADATA))
        return Body(JSON, data, gzipped=True, immutable=node.kind is WebKind.INSTANCE)

    # --- frames -------------------------------------------------------------------------------
    async def frames(self, instance: WebNode, numbers: str | None, ranges: list[MediaRange]) -> Body:
        """Frames ``numbers`` ("1" or "1,3,2") of an instance, as stored; None: all its frames, as
        "1,2,…,n" (the URL of its pixel data's ``BulkDataURI``)."""
        if numbers is None:
            wanted = [str(n) for n in range(1, await self.files.frame_count(instance) + 1)]
        else:
            wanted = numbers.split(",")
        if len(wanted) > MAX_FRAMES_ASKED:
            raise NotFound(f"more than {MAX_FRAMES_ASKED} frames asked for")
        if numbers is None:
            self.files.every_frame_wanted(instance)
        folder = await self.layout.lookup(instance, "frames")  # (the layout checks each number)
        files = [await self.files.content(await self.layout.lookup(folder, f"{n}{FRAME_SUFFIX}")) for n in wanted]
        content_type, frame = frames.split_frame_file(files[0])
        media_type, _, syntax = content_type.partition(";transfer-syntax=")
        if not frame_form(ranges, media_type, syntax, len(files)):
            return Body(f"{media_type}; transfer-syntax={syntax}", frame, immutable=True, ranges=True)
        header = f'multipart/related; type="{media_type}"; boundary={frames.BOUNDARY}'
        if len(files) == 1:
            return Body(header, files[0], immutable=True, ranges=True)
        return Body(header, await trio.to_thread.run_sync(_join_frame_files, files), immutable=True, ranges=True)

    # --- bulk data ----------------------------------------------------------------------------
    async def bulk(self, node: WebNode, ranges: list[MediaRange]) -> Body:
        data = await self.files.content(node)
        for r in ranges:
            if r.type == frames.OCTET_STREAM or r.type in ("*/*", "*", "application/*"):
                break
            if r.covers(MULTIPART):
                body = _part(frames.OCTET_STREAM) + data + f"\r\n--{PARTS}--\r\n".encode()
                return Body(f'multipart/related; type="{frames.OCTET_STREAM}"; boundary={PARTS}', body,
                            immutable=True, ranges=True)
        else:
            raise NotAcceptable(f"bulk data is sent as {frames.OCTET_STREAM}, alone or as one multipart/related part")
        return Body(frames.OCTET_STREAM, data, immutable=True, ranges=True)

    # --- instances ----------------------------------------------------------------------------
    async def instances(self, node: WebNode, ranges: list[MediaRange]) -> Body:
        """The instances of a study, a series or one instance, as stored: streamed, one part each
        (or one ``application/dicom`` body for one instance, when asked so)."""
        pairs = await self._instances_below(node)
        if not pairs:
            raise NotFound("no instances")
        stored = await self._stored_syntaxes(pairs) if _names_a_syntax(ranges) else set()
        multipart = instance_form(ranges, stored, len(pairs))
        # The first instance is opened before any header goes out, so that an archive that cannot
        # deliver it is a status, not a body cut short. (The stream opens it again.)
        (await self.blobs.open_instance(*pairs[0])).close()
        if not multipart:
            return Body(DICOM, stream=_instance_bytes(self.blobs, pairs, multipart=False), immutable=True)
        return Body(f'multipart/related; type="{DICOM}"; boundary={PARTS}',
                    stream=_instance_bytes(self.blobs, pairs, multipart=True), immutable=node.kind is WebKind.INSTANCE)

    async def _instances_below(self, node: WebNode) -> list[tuple[SeriesRecord, InstanceRecord]]:
        if node.kind is WebKind.INSTANCE:
            assert node.series is not None and node.instance is not None
            return [(node.series, node.instance)]
        if node.kind is WebKind.SERIES:
            assert node.series is not None
            return [(node.series, i) for _, i in sorted((await self.catalog.instances_of(node.series)).items())]
        assert node.study is not None
        pairs: list[tuple[SeriesRecord, InstanceRecord]] = []
        for _, series in sorted((await self.catalog.series_of(node.study)).items()):
            pairs.extend((series, i) for _, i in sorted((await self.catalog.instances_of(series)).items()))
        return pairs

    async def _stored_syntaxes(self, pairs: list[tuple[SeriesRecord, InstanceRecord]]) -> set[str]:
        """The transfer syntaxes the instances are stored in, from their metadata."""
        found: set[str] = set()
        for series in {s.key: s for s, _ in pairs}.values():
            metadata = await self.files.series_json(series)
            keys = {i.key for s, i in pairs if s.key == series.key}
            for key, instance in metadata.instances.items():
                if key in keys:
                    found.add(instance.transfer_syntax or "unknown")
        return found


async def _instance_bytes(blobs: BlobStore, pairs: list[tuple[SeriesRecord, InstanceRecord]],
                          *, multipart: bool) -> AsyncGenerator[bytes | bytearray | memoryview, None]:
    """The instances' bytes as they are cached, read and sent a piece at a time; with
    ``multipart``, each as one part that names its transfer syntax."""
    for series, instance in pairs:
        handle = await blobs.open_instance(series, instance)
        try:
            head = await handle.read(0, min(CHUNK, handle.length))
            if multipart:
                syntax = _syntax_of(head)
                yield _part(f"{DICOM}; transfer-syntax={syntax}" if syntax else DICOM)
            yield head
            for offset in range(len(head), handle.length, CHUNK):
                yield await handle.read(offset, min(CHUNK, handle.length - offset))
            if multipart:
                yield b"\r\n"
        finally:
            handle.close()
    if multipart:
        yield f"--{PARTS}--\r\n".encode()


def _syntax_of(head: bytes | bytearray | memoryview) -> str | None:
    try:
        return p10.parse_file_meta(head).transfer_syntax_uid or None
    except (p10.NeedMoreData, ProtocolError):
        return None


def _part(content_type: str) -> bytes:
    return f"--{PARTS}\r\nContent-Type: {content_type}\r\n\r\n".encode("ascii")


def _names_a_syntax(ranges: list[MediaRange]) -> bool:
    return any(r.params.get("transfer-syntax") not in (None, "*") for r in ranges)


def _join_frame_files(files: list[bytes]) -> bytes:
    """Blocking: one multipart body with a part per frame file (their own part headers kept)."""
    out: list[bytes | memoryview] = []
    for file in files:
        content_type, frame = frames.split_frame_file(file)
        out += [f"--{frames.BOUNDARY}\r\nContent-Type: {content_type}\r\n\r\n".encode("ascii"), frame, b"\r\n"]
    out.append(f"--{frames.BOUNDARY}--\r\n".encode("ascii"))
    return b"".join(out)


def _join_arrays(gzipped: list[bytes]) -> bytes:
    """Blocking: gzip'd JSON arrays -> one gzip'd array of all their items."""
    items = [inner for inner in (gzip.decompress(g).strip()[1:-1].strip() for g in gzipped) if inner]
    return dicomjson.gzipped(b"[" + b",".join(items) + b"]")
