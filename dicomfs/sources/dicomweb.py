"""DICOMweb source: QIDO-RS for listings, one WADO-RS series retrieve per series blob.

Owns the DICOMweb dialect: paged QIDO queries, the exact Accept header that yields the stored
bytes (``transfer-syntax=*``, identity encoding), and naming each multipart part by its
SOPInstanceUID (the data set's, else the file meta's: ``uids.instance_key``). Every request runs
in a worker thread through ``threadhttp`` (a query, or a series retrieve end to end with
``SeriesSink.in_thread``): a DICOMweb archive needs no httpx. Must not cache anything or know
about files on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import trio

from dicomfs.errors import ProtocolError
from dicomfs.multipart import (
    MultipartParser,
    PartData,
    PartEnd,
    PartStart,
    boundary_from_content_type,
)
from dicomfs.p10check import Part10Check
from dicomfs.query import Term
from dicomfs.records import DicomJson, InstanceRecord, SeriesRecord, StudyRecord, json_value
from dicomfs.sources.base import BlockingMemberWriter, BlockingSink, Credentials, SeriesSink
from dicomfs.sources.http import DEFAULT_TIMEOUT, MAX_JSON_BYTES
from dicomfs.sources.threadhttp import BlockingHttp
from dicomfs.tasks import StopSignal, retrieve_limiter, run_stoppable
from dicomfs.uids import instance_key, is_uid

log = logging.getLogger(__name__)

SERIES_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
PAGE_SIZE = 1000
QUERIES_AT_ONCE = 16  # as httpx's pool allowed before queries moved to threads
MAX_PAGES = 100_000
MAX_SERIES_METADATA_BYTES = 512 * 1024 * 1024  # a whole series' (or study's) metadata (inflated)
MAX_NAMING_BYTES = 1 << 20  # a part not named by its first MiB is named by its file meta

STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
# Asked for besides each server's defaults, so that listings show and filter on them.
# Counts and modalities too: the static DICOMweb tree's QIDO files carry them.
STUDY_FIELDS = "includefield=00081030&includefield=00080061&includefield=00201206&includefield=00201208"
SERIES_FIELDS = "includefield=0008103E&includefield=00201209"


class DicomwebSource:
    """An archive reached through QIDO-RS and WADO-RS under one service root URL."""

    serves_files_in_place = False
    # Orthanc with LimitFindInstances (LimitFindResults) answers a series' instance search (a
    # study's series search) with 3 of 5, no Warning, nothing at a further offset: the catalog
    # completes it from the series' (study's) metadata (``Source``)
    searches_may_stop_short = True

    def __init__(
        self,
        root: str,
        credentials: Credentials,
        *,
        page_size: int = PAGE_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.root = root.rstrip("/")
        self.description = self.root
        self.page_size = page_size
        tls = not self.root.lower().startswith("http://")
        # every request, in worker threads: queries (at most QUERIES_AT_ONCE, with their own
        # threads, so that a stalled archive cannot take those of disk work) and retrieves
        self.blocking = BlockingHttp(credentials, timeout=timeout, tls=tls, max_connections=2 * QUERIES_AT_ONCE)
        self._queries = trio.CapacityLimiter(QUERIES_AT_ONCE)
        self._retrieves = retrieve_limiter()

    async def aclose(self) -> None:
        self.blocking.close()

    async def check(self) -> None:
        await self._get_json(f"{self.root}/studies?limit=1")

    async def list_studies(self) -> list[StudyRecord]:
        rows = await self._qido(f"{self.root}/studies?{STUDY_FIELDS}")
        return [StudyRecord(uid, attrs) for uid, attrs in _valid(rows, STUDY_UID, "study")]

    async def search_studies(self, terms: Sequence[Term], narrowing: Sequence[Term] = ()
                             ) -> tuple[list[StudyRecord], list[Term]]:
        sent: list[tuple[str, str]] = []
        unchecked: list[Term] = []
        for term in terms:
            qido = term.qido("study")
            if qido is not None:
                sent.append(qido[:2])
            if (qido is None or not qido[2]) and term.value.strip("*"):
                unchecked.append(term)  # sent loosened (or not at all): checked by the caller
        # Built by hand: servers such as Orthanc do not percent-decode query values, so the
        # values (reduced to URL-safe characters by ``Term.qido``) go as they are.
        query = "&".join([*(f"{key}={value}" for key, value in sent), STUDY_FIELDS])
        rows = await self._qido(f"{self.root}/studies?{query}")
        return [StudyRecord(uid, attrs) for uid, attrs in _valid(rows, STUDY_UID, "study")], unchecked

    async def list_series(self, study_uid: str) -> list[SeriesRecord]:
        rows = await self._qido(f"{self.root}/studies/{study_uid}/series?{SERIES_FIELDS}")
        return [SeriesRecord(study_uid, uid, attrs) for uid, attrs in _valid(rows, SERIES_UID, "series")]

    async def list_instances(self, series: SeriesRecord) -> list[InstanceRecord]:
        rows = await self._qido(f"{self.root}/studies/{series.study_uid}/series/{series.uid}/instances")
        return [
            InstanceRecord(series.study_uid, series.uid, uid, attrs=attrs)
            for uid, attrs in _valid(rows, SOP_UID, "instance")
        ]

    async def series_metadata(self, series: SeriesRecord) -> dict[str, DicomJson]:
        return await self._metadata(f"studies/{series.study_uid}/series/{series.uid}", "series")

    async def study_metadata(self, study_uid: str) -> dict[str, DicomJson]:
        """Every instance's DICOM JSON in the study (``searches_may_stop_short``: the catalog finds
        the series a search left out in it)."""
        return await self._metadata(f"studies/{study_uid}", "study")

    async def _metadata(self, path: str, level: str) -> dict[str, DicomJson]:
        rows, _ = await self._get_json(f"{self.root}/{path}/metadata", limit=MAX_SERIES_METADATA_BYTES)
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise ProtocolError(f"{level} metadata from {self.root} is not a JSON array of objects")
        return dict(_valid(rows, SOP_UID, "instance"))

    def local_file(self, instance: InstanceRecord) -> Path | None:
        return None

    async def _qido(self, url: str) -> list[dict[str, Any]]:
        """All rows of a QIDO query, page by page.

        A short page ends the listing unless the server says (a ``Warning`` header) that it cut
        the page to its own maximum; a page that brings nothing new ends it too (a server that
        ignores ``offset``).
        """
        rows: list[dict[str, Any]] = []
        seen: set[str] = set()
        offset = 0
        for _ in range(MAX_PAGES):
            sep = "&" if "?" in url else "?"
            page, headers = await self._get_json(f"{url}{sep}limit={self.page_size}&offset={offset}")
            if page is None:
                page = []
            if not isinstance(page, list) or not all(isinstance(row, dict) for row in page):
                raise ProtocolError(f"QIDO answer from {url} is not a JSON array of objects")
            fresh = [row for row in page if _row_identity(row) not in seen]
            seen.update(_row_identity(row) for row in fresh)
            rows.extend(fresh)
            if not page or not fresh:
                break
            offset += len(page)
            if len(page) < self.page_size and "warning" not in headers:
                break
        return rows

    async def _get_json(self, url: str, limit: int = MAX_JSON_BYTES) -> tuple[Any, Mapping[str, str]]:
        """A JSON GET in a worker thread. A cancelled one returns at once: its thread, which owns
        nothing but the answer, is left to end by itself (the stop breaks its connect or read)
        instead of being waited for."""
        stop = StopSignal()
        try:
            return await trio.to_thread.run_sync(partial(self.blocking.get_json, url, stop, limit=limit),
                                                 abandon_on_cancel=True, limiter=self._queries)
        finally:
            stop.set()  # (after an answer: nothing left to stop)

    async def fetch_series(self, series: SeriesRecord, sink: SeriesSink) -> None:
        """One WADO-RS retrieve, run end to end in a worker thread (receive, multipart parsing,
        checks, writing): the event loop only hears of finished instances."""
        url = f"{self.root}/studies/{series.study_uid}/series/{series.uid}"
        await run_stoppable(partial(self._retrieve, url, sink.in_thread()), limiter=self._retrieves)

    def _retrieve(self, url: str, sink: BlockingSink, stop: StopSignal) -> None:
        # identity: DICOM is mostly compressed pixels already, and raw bytes pass with no decoder;
        # an answer compressed anyway is refused by the HTTP client (no unbounded inflation)
        with self.blocking.stream(url, {"Accept": SERIES_ACCEPT, "Accept-Encoding": "identity"}, stop) as body:
            parser = MultipartParser(boundary_from_content_type(body.headers.get("content-type", "")))
            part = _PartRouter(sink)
            try:
                for chunk in body.chunks():
                    sink.arrived(len(chunk))
                    for event in parser.feed(chunk):
                        part.handle(event)
                    sink.publish()
                parser.close()
            finally:
                sink.publish()  # whatever was finished, also when a piece broke off: a resume skips it


class _PartRouter:
    """Names each part by its SOPInstanceUID and forwards its bytes to the sink."""

    def __init__(self, sink: BlockingSink) -> None:
        self._sink = sink
        self._size: int | None = None
        self._writer: BlockingMemberWriter | None = None
        self._skipping = False
        self._check: Part10Check | None = None  # reads the head of a part until it is named
        self._head: list[bytes | memoryview] = []  # the bytes read meanwhile, handed on once named
        self._head_bytes = 0

    def handle(self, event: PartStart | PartData | PartEnd) -> None:
        if isinstance(event, PartStart):
            self._size = event.content_length
            self._writer = None
            self._skipping = False
            self._check = Part10Check()
            self._head.clear()
            self._head_bytes = 0
        elif isinstance(event, PartData):
            if self._writer is not None:
                self._writer.write(event.data)
            elif not self._skipping:
                self._read_head(event.data)
        else:
            if self._writer is None and not self._skipping:
                self._name(final=True)
            if self._writer is not None:
                self._writer.finish()
            self._writer = None

    def _read_head(self, data: bytes | memoryview) -> None:
        """Keep the part's first bytes until its UIDs are known; then name it and hand them on.
        (Usually the first piece holds them: no copy is made.)"""
        assert self._check is not None
        self._head.append(data)
        self._head_bytes += len(data)
        try:
            self._check.feed(data)
        except ProtocolError:
            if self._check.meta is None:
                raise  # not even a file meta: nothing to name it by
            # named by what is known; the blob store's own check refuses the malformed part
        else:
            if not self._check.identified and self._head_bytes < MAX_NAMING_BYTES:
                return
        self._name()

    def _name(self, final: bool = False) -> None:
        assert self._check is not None
        meta = self._check.meta
        if meta is None:
            if final:
                raise ProtocolError("a multipart part is too short to be a DICOM file")
            raise ProtocolError("a multipart part is not a DICOM Part 10 file (no complete file meta)")
        dataset_uid = self._check.dataset_uid
        key = instance_key(dataset_uid, meta.sop_instance_uid)
        if key is None:
            log.warning("skipping a part with an invalid SOPInstanceUID %r",
                        (dataset_uid or meta.sop_instance_uid)[:80])
            self._skipping = True
            return
        if dataset_uid and meta.sop_instance_uid and dataset_uid != meta.sop_instance_uid:
            log.info("instance %s: its file meta names it %s; filed under its data set's UID", key,
                     meta.sop_instance_uid[:80])
        if not self._sink.wants(key):
            self._skipping = True
            return
        self._writer = self._sink.begin(key, self._size)
        head, self._head = self._head, []
        for piece in head:
            self._writer.write(piece)


def _row_identity(row: dict[str, Any]) -> str:
    for tag in (SOP_UID, SERIES_UID, STUDY_UID):
        value = json_value(row, tag)
        if isinstance(value, str):
            return f"{tag}={value}"
    return repr(sorted(row))[:200]


def _valid(rows: list[dict[str, Any]], tag: str, level: str) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    for row in rows:
        uid = json_value(row, tag)
        if not isinstance(uid, str) or not is_uid(uid):
            log.warning("archive listed a %s with an invalid UID %r: skipped", level, str(uid)[:80])
            continue
        if uid in seen:
            continue
        seen.add(uid)
        out.append((uid, row))
    return out
