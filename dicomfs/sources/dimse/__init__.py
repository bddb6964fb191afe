"""DIMSE source: a PACS reached by C-FIND for listings and C-GET (or C-MOVE) per series.

Owns the DIMSE dialect of the source protocol: Study Root C-FIND at STUDY, SERIES and IMAGE level
(identifiers and answers in ``query``, statuses in ``status``), one retrieve per series at SERIES
level, and the choice between C-GET and C-MOVE (``--retrieve auto``: C-MOVE to a Storage SCP of
our own once the PACS refuses C-GET). A C-GET runs in a retrieve worker process (``workers``,
``worker``, ``retrieve``), whose instances stream into the sink as they arrive; a C-MOVE is
requested from a worker thread and its instances reach the Storage SCP here, in the daemon, and
cross to trio through a small memory channel. Associations come from a bounded pool (``net``).
It has no metadata service (``MetadataSource``): the static DICOMweb tree reads the headers of
retrieved instances. Must not cache anything, or know about files on disk.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from dicomfs.errors import SourceError, SourceUnavailable
from dicomfs.query import Term
from dicomfs.records import InstanceRecord, SeriesRecord, StudyRecord
from dicomfs.sources.base import SeriesSink
from dicomfs.sources.dimse import net, pipe, query, retrieve, status
from dicomfs.sources.dimse.net import Peer
from dicomfs.sources.dimse.retrieve import Job
from dicomfs.sources.dimse.status import GetRefused
from dicomfs.sources.dimse.workers import WorkerPool

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
PROGRESS_TICK = 0.5
DELIVERY_QUEUE = 2  # moved instances received but not yet handed to the sink (memory: a few instances)


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
        self._moves: dict[str, Job] = {}  # SOP instance UID -> the C-MOVE it belongs to
        self._scp: Any = None  # the Storage SCP for C-MOVE, once started
        self._peer_addresses: set[str] = set()
        self._move_associations: dict[int, Job] = {}  # id of the PACS's association -> its move

    async def aclose(self) -> None:
        await self.pool.aclose()
        await self.workers.aclose()
        if self._scp is not None:
            await trio.to_thread.run_sync(self._scp.shutdown)
            self._scp = None

    # --- listings -------------------------------------------------------------------------
    async def check(self) -> None:
        await trio.to_thread.run_sync(net.check_tls, self.peer)
        async with self.pool.query() as assoc:
            answer = await trio.to_thread.run_sync(assoc.send_c_echo)
        if not answer or getattr(answer, "Status", None) != status.SUCCESS:
            raise SourceUnavailable(f"{self.description} did not answer C-ECHO")

    async def _find(self, identifier: Dataset, what: str) -> list[Dataset]:
        """Every answer of one C-FIND (pending answers are collected as they come; a caller that
        gives up has a C-CANCEL sent)."""
        async with self.pool.query() as assoc:
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

    async def search_studies(self, terms: Sequence[Term]) -> tuple[list[StudyRecord], list[Term]]:
        matching = query.study_matching(terms)
        answers = await self._find(query.identifier("STUDY", matching), "the studies")
        return query.studies(answers), list(terms)  # a PACS may match loosely: all checked again

    async def list_series(self, study_uid: str) -> list[SeriesRecord]:
        answers = await self._find(query.identifier("SERIES", {"StudyInstanceUID": study_uid}),
                                   f"the series of study {study_uid}")
        return query.series(study_uid, answers)

    async def list_instances(self, series: SeriesRecord) -> list[InstanceRecord]:
        if not self._use_move:
            await self.workers.warm()  # a series opened is often read: have a worker start meanwhile
        answers = await self._find(query.identifier("IMAGE", {"StudyInstanceUID": series.study_uid,
                                                               "SeriesInstanceUID": series.uid}),
                                   f"the instances of series {series.uid}")
        found = query.instances(series, answers)
        self._listed[series.key] = {i.key: _sop_class(i) for i in found}
        return found

    def local_file(self, instance: InstanceRecord) -> Path | None:
        return None

    # --- retrieve ---------------------------------------------------------------------------
    async def prepare_fetches(self) -> None:
        """Start the retrieve workers now (each takes a third of a second), not on the first read."""
        if not self._use_move:
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
                log.warning("%s; using C-MOVE to dicomfs's storage SCP on port %d from now on (register AE "
                            "title %s with this machine's address and that port at the PACS)", exc,
                            self.move_port, self.peer.calling_ae)
                self._use_move = True
        await self._move(series, listed, sink)

    async def _get(self, series: SeriesRecord, listed: dict[str, str], sink: SeriesSink) -> None:
        """One C-GET of the series, run by a retrieve worker process on an association of its own."""
        request = pipe.request(self.peer, series.study_uid, series.uid, listed,
                               logging.getLogger("dicomfs").getEffectiveLevel())
        async with self.pool.room():
            await self.workers.retrieve(request, sink, f"series {series.uid}")

    async def _move(self, series: SeriesRecord, listed: dict[str, str], sink: SeriesSink) -> None:
        """One C-MOVE of the series to our Storage SCP, requested from a worker thread; the
        instances arrive on the PACS's own association to the SCP, which must come from the PACS's
        address and AE title, during this move, with instances of this series. They cross to trio
        through a memory channel, whose back-pressure holds the PACS when the disk is slower than
        the network, and whose closing stops a move that the blob store gave up."""
        await self._start_scp()
        send, receive = trio.open_memory_channel[tuple[str, bytes, bytes]](DELIVERY_QUEUE)
        token = trio.lowlevel.current_trio_token()

        def deliver(key: str, head: bytes, data: bytes) -> bool:
            try:
                trio.from_thread.run(send.send, (key, head, data), trio_token=token)
                return True
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError, trio.Cancelled):
                return False

        job = Job(self.description, self.peer.called_ae, series.study_uid, series.uid, listed, deliver)
        reported = 0

        async def progress() -> None:
            nonlocal reported
            while True:
                await trio.sleep(PROGRESS_TICK)
                if job.received > reported:
                    sink.arrived(job.received - reported)
                    reported = job.received

        def work() -> None:
            from pynetdicom import build_context

            job.assoc = assoc = net.open_association(self.peer, [build_context(query.STUDY_ROOT_MOVE)])
            try:
                retrieve.follow(job, assoc.send_c_move(job.identifier(), self.peer.calling_ae,
                                                       query.STUDY_ROOT_MOVE, msg_id=1), "C-MOVE", assoc)
            finally:
                net.release(assoc)

        async def run() -> None:
            async with send:
                async with self.pool.room():
                    await net.in_thread(work, lambda: retrieve.stop(job, query.STUDY_ROOT_MOVE))

        for key in listed:
            self._moves[key] = job
        try:
            from dicomfs.tasks import open_nursery

            async with open_nursery() as nursery:
                nursery.start_soon(progress)
                nursery.start_soon(run)
                async with receive:
                    async for key, head, data in receive:
                        if not sink.wants(key):
                            continue
                        writer = await sink.begin(key, len(head) + len(data))
                        await writer.write(head)
                        await writer.write(data)
                        await writer.finish()
                nursery.cancel_scope.cancel()
            if job.received > reported:
                sink.arrived(job.received - reported)
        finally:
            for key in listed:
                if self._moves.get(key) is job:
                    del self._moves[key]
            for assoc_id, moved in list(self._move_associations.items()):
                if moved is job:
                    del self._move_associations[assoc_id]

    async def _start_scp(self) -> None:
        if self._scp is not None:
            return
        self._peer_addresses = await trio.to_thread.run_sync(_addresses_of, self.peer.host)
        self._scp = await trio.to_thread.run_sync(self._serve_moves)
        log.info("storage SCP %s listening on port %d for C-MOVE", self.peer.calling_ae, self.move_port)

    def _serve_moves(self) -> Any:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt

        ae = AE(ae_title=self.peer.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = self.peer.timeout
        ae.network_timeout = self.peer.timeout * 2
        ae.maximum_pdu_size = net.MAX_PDU
        ae.require_calling_aet = [self.peer.called_ae]
        for cx in StoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        handlers: list[Any] = [(evt.EVT_C_STORE, self._store_moved), (evt.EVT_DATA_RECV, self._count_moved),
                               *net.socket_handlers()]
        try:
            return ae.start_server(("", self.move_port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise SourceError(f"cannot listen on port {self.move_port} for C-MOVE: {exc.strerror or exc} "
                              "(choose another with --move-port)") from None

    def _from_the_pacs(self, event: Any) -> bool:
        address = str(getattr(event.assoc.requestor, "address", ""))
        return address in self._peer_addresses

    def _store_moved(self, event: Any) -> int:
        key = str(event.request.AffectedSOPInstanceUID)
        job = self._moves.get(key)
        if job is None or not self._from_the_pacs(event):
            log.warning("storage SCP: refused instance %r from %s (no C-MOVE of ours asked for it)", key[:80],
                        getattr(event.assoc.requestor, "address", "?"))
            return retrieve.STORE_REFUSED
        if id(event.assoc) not in self._move_associations:
            net.quick_loop(event.assoc)  # (its first instance)
            self._move_associations[id(event.assoc)] = job
        return retrieve.store(job, event)

    def _count_moved(self, event: Any) -> None:
        job = self._move_associations.get(id(event.assoc))  # known from its first instance on
        if job is not None:
            retrieve.count(job, event)


def _addresses_of(host: str) -> set[str]:
    """Every address ``host`` stands for (the Storage SCP accepts the PACS from those alone)."""
    try:
        found = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError:
        found = {host}
    for address in list(found):
        try:
            if ipaddress.ip_address(address).is_loopback:
                found |= {"127.0.0.1", "::1"}
        except ValueError:
            pass
    return found


def _sop_class(instance: InstanceRecord) -> str:
    element = instance.attrs.get("00080016")
    values = element.get("Value") if isinstance(element, dict) else None
    return str(values[0]) if values else ""
