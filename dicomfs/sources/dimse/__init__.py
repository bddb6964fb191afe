"""DIMSE source: a PACS reached by C-FIND for listings and C-GET (or C-MOVE) per series.

Owns the DIMSE dialect of the source protocol: Study Root C-FIND at STUDY, SERIES and IMAGE level
(identifiers and answers in ``query``, statuses in ``status``), one retrieve per series at SERIES
level, and the choice between C-GET and C-MOVE (``--retrieve auto``: C-MOVE to a Storage SCP of
our own once the PACS refuses C-GET). Either runs in a retrieve worker process (``workers``,
``worker``, ``retrieve``), whose instances stream into the sink as they arrive; for a C-MOVE the
worker also listens on ``--move-port`` while its move runs, so this process's moves take turns.
Associations come from a bounded pool (``net``).
It has no metadata service (``MetadataSource``): the static DICOMweb tree reads the headers of
retrieved instances. Must not cache anything, or know about files on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from dicomfs.errors import SourceUnavailable
from dicomfs.query import Term
from dicomfs.records import InstanceRecord, SeriesRecord, StudyRecord
from dicomfs.singleflight import SingleFlight
from dicomfs.sources.base import SeriesSink
from dicomfs.sources.dimse import net, pipe, query, status
from dicomfs.sources.dimse.net import Peer
from dicomfs.sources.dimse.status import GetRefused
from dicomfs.sources.dimse.workers import WorkerPool

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
FIND = "Study Root C-FIND"


class DimseSource:
    """A DIMSE archive: ``dimse://<called AE>@<host>:<port>``."""

    serves_files_in_place = False

    def __init__(self, peer: Peer, *, retrieve: str = "auto", move_port: int = 11112,
                 max_associations: int = 2) -> None:
        self.peer = peer
        self.description = peer.description
        self.retrieve = retrieve
        self.move_port = move_port
        self._use_move = retrieve == "move"
        self.pool = net.AssociationPool(peer, max_associations, [query.STUDY_ROOT_FIND, VERIFICATION])
        self.workers = WorkerPool(self.pool.limit)
        self._listed: dict[str, dict[str, str]] = {}  # series key -> its instances' SOP classes
        self._moving = trio.Lock()  # one C-MOVE at a time: its worker listens on the one move port
        self._image_finds: SingleFlight[list[InstanceRecord]] = SingleFlight()

    async def aclose(self) -> None:
        await self.pool.aclose()
        await self.workers.aclose()

    # --- listings -------------------------------------------------------------------------
    async def check(self) -> None:
        """An association for queries, which must take Study Root C-FIND (without it nothing can
        be listed), and a C-ECHO on it if the PACS does Verification."""
        await net.detached(lambda: net.check_tls(self.peer), limiter=self.pool.threads)
        async with self.pool.query() as assoc:
            net.require(self.peer, assoc, query.STUDY_ROOT_FIND, FIND)
            if not net.accepts(assoc, VERIFICATION):
                return  # (the association is the proof that the PACS answers)
            answer = await net.detached(assoc.send_c_echo, limiter=self.pool.threads)
        if not answer or getattr(answer, "Status", None) != status.SUCCESS:
            raise SourceUnavailable(f"{self.description} did not answer C-ECHO")

    async def _find(self, identifier: Dataset, what: str) -> list[Dataset]:
        """Every answer of one C-FIND (pending answers are collected as they come; a caller that
        gives up has a C-CANCEL sent, and its cancellation goes on: ``net.in_thread``)."""
        async with self.pool.query() as assoc:
            net.require(self.peer, assoc, query.STUDY_ROOT_FIND, FIND)

            def work() -> list[Dataset]:
                answers: list[Dataset] = []
                for answer, found in assoc.send_c_find(identifier, query.STUDY_ROOT_FIND, msg_id=1):
                    code = status.code_of(answer, self.description, what)
                    if code in status.PENDING:
                        if found is not None:
                            answers.append(found)
                        continue
                    if code != status.SUCCESS:
                        raise status.failure(self.description, "C-FIND", what, code)
                return answers

            return await net.in_thread(work, net.cancel_then_abort(assoc, 1, query.STUDY_ROOT_FIND))

    async def list_studies(self) -> list[StudyRecord]:
        return query.studies(await self._find(query.identifier("STUDY"), "the studies"))

    async def search_studies(self, terms: Sequence[Term], narrowing: Sequence[Term] = ()
                             ) -> tuple[list[StudyRecord], list[Term]]:
        matching = query.study_matching(terms)
        answers = await self._find(query.identifier("STUDY", matching), "the studies")
        return query.studies(answers), list(terms)  # a PACS may match loosely: all checked again

    async def list_series(self, study_uid: str) -> list[SeriesRecord]:
        answers = await self._find(query.identifier("SERIES", {"StudyInstanceUID": study_uid}),
                                   f"the series of study {study_uid}")
        return query.series(study_uid, answers)

    async def list_instances(self, series: SeriesRecord) -> list[InstanceRecord]:
        """The IMAGE-level C-FIND of the series; callers at the same time (the catalog's listing
        and a retrieve that needs the SOP classes, as a prefetch starts both) share one."""
        await self.workers.warm()  # a series opened is often read: have a worker start meanwhile

        async def find() -> list[InstanceRecord]:
            answers = await self._find(query.identifier("IMAGE", {"StudyInstanceUID": series.study_uid,
                                                                   "SeriesInstanceUID": series.uid}),
                                       f"the instances of series {series.uid}")
            found = query.instances(series, answers)
            self._listed[series.key] = {i.key: _sop_class(i) for i in found}
            return found

        return await self._image_finds.run(series.key, find)

    def local_file(self, instance: InstanceRecord) -> Path | None:
        return None

    # --- retrieve ---------------------------------------------------------------------------
    async def prepare_fetches(self) -> None:
        """Start the retrieve workers now (each takes a third of a second), not on the first read."""
        await self.workers.warm(self.workers.limit)

    async def fetch_series(self, series: SeriesRecord, sink: SeriesSink) -> None:
        listed = self._listed.get(series.key)
        if listed is None:
            await self.list_instances(series)
            listed = self._listed[series.key]
        if not listed:
            return
        if not self._use_move:
            try:
                await self._get(series, listed, sink)
                return
            except GetRefused as exc:
                if self.retrieve != "auto":
                    raise
                if not self._use_move:  # (once: retrieves refused at the same time say it once)
                    log.warning("%s; using C-MOVE to dicomfs's storage SCP on port %d from now on (register AE "
                                "title %s with this machine's address and that port at the PACS)", exc,
                                self.move_port, self.peer.calling_ae)
                self._use_move = True
        await self._move(series, listed, sink)

    async def _get(self, series: SeriesRecord, listed: dict[str, str], sink: SeriesSink) -> None:
        """One C-GET of the series, run by a retrieve worker process on an association of its own."""
        async with self.pool.room():
            await self.workers.retrieve(self._request(series, listed), sink, f"series {series.uid}")

    async def _move(self, series: SeriesRecord, listed: dict[str, str], sink: SeriesSink) -> None:
        """One C-MOVE of the series, run by a retrieve worker process that is our Storage SCP on
        the move port while it runs (the PACS's AE title and address alone; ``retrieve.move``)."""
        async with self._moving, self.pool.room():
            await self.workers.retrieve(self._request(series, listed, self.move_port), sink, f"series {series.uid}")

    def _request(self, series: SeriesRecord, listed: dict[str, str], move_port: int | None = None) -> bytes:
        return pipe.request(self.peer, series.study_uid, series.uid, listed,
                            logging.getLogger("dicomfs").getEffectiveLevel(), move_port)


def _sop_class(instance: InstanceRecord) -> str:
    element = instance.attrs.get("00080016")
    values = element.get("Value") if isinstance(element, dict) else None
    return str(values[0]) if values else ""
