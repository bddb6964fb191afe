"""DIMSE source: a PACS reached by C-FIND for listings and C-GET (or C-MOVE) per series.

Owns the DIMSE dialect of the source protocol: Study Root C-FIND at STUDY, SERIES and IMAGE level
(identifiers and answers in ``query``), one retrieve per series at SERIES level, each C-STORE
sub-operation turned into a Part 10 file (``part10``) and handed to the sink as it arrives, the
C-GET presentation contexts that let the PACS send what it stores (``contexts``), C-MOVE to a
Storage SCP of our own when the PACS refuses C-GET (``--retrieve auto``), and the pool of
associations (``net``). Instances that the IMAGE-level listing did not name, or whose UID is not
valid, are dropped with a log line; instances the PACS failed to send are logged with its status.
It has no metadata service (``MetadataSource``): the static DICOMweb tree reads the headers of
retrieved instances. Must not cache anything, or know about files on disk.

pynetdicom is blocking: associations run in worker threads (``net.in_thread``); C-STORE
sub-operations cross to trio through a small memory channel, whose back-pressure holds the PACS
when the disk is slower than the network, and whose closing stops a retrieve that the blob store
gave up (a full disk, a cancelled download).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from dicomfs.errors import ProtocolError, SourceError, SourceUnavailable
from dicomfs.query import Term
from dicomfs.records import InstanceRecord, SeriesRecord, StudyRecord
from dicomfs.sources.base import SeriesSink
from dicomfs.sources.dimse import contexts, net, part10, query
from dicomfs.sources.dimse.net import Peer

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pynetdicom.association import Association

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
PROGRESS_TICK = 0.5
DELIVERY_QUEUE = 2  # instances received but not yet handed to the sink (memory: a few instances)
_STORE_OK, _STORE_REFUSED = 0x0000, 0xA700  # C-STORE: success; out of resources (we stopped)
_PENDING = (0xFF00, 0xFF01)


class GetRefused(SourceError):
    """The PACS will not do C-GET for us (no such context, or a refusal status): try C-MOVE."""


@dataclass
class _Retrieve:
    """One series being retrieved: what may arrive, where it goes, how much came."""

    series: SeriesRecord
    listed: dict[str, str]  # SOP instance UID -> SOP class UID, from the IMAGE-level C-FIND
    send: trio.MemorySendChannel[tuple[str, bytes, bytes]]
    token: trio.lowlevel.TrioToken
    received: int = 0  # bytes off the wire (counted by the association's thread)
    delivered: int = 0  # instances handed to the trio side
    stopped: threading.Event = field(default_factory=threading.Event)


class DimseSource:
    """A DIMSE archive: ``dimse://<called AE>@<host>:<port>``."""

    serves_files_in_place = False

    def __init__(self, peer: Peer, *, retrieve: str = "auto", move_port: int = 11112,
                 max_associations: int = 2) -> None:
        from pynetdicom import build_context

        self.peer = peer
        self.description = peer.description
        self.retrieve = retrieve
        self.move_port = move_port
        self._use_move = retrieve == "move"
        self.pool = net.AssociationPool(peer, max_associations,
                                        [build_context(query.STUDY_ROOT_FIND), build_context(VERIFICATION)])
        self._listed: dict[str, dict[str, str]] = {}  # series key -> its instances' SOP classes
        self._moves: dict[str, _Retrieve] = {}  # SOP instance UID -> the C-MOVE it belongs to
        self._scp: Any = None  # the Storage SCP for C-MOVE, once started
        self._peer_addresses: set[str] = set()
        self._move_associations: dict[int, _Retrieve] = {}  # id of the PACS's association -> its move

    async def aclose(self) -> None:
        await self.pool.aclose()
        if self._scp is not None:
            await trio.to_thread.run_sync(self._scp.shutdown)
            self._scp = None

    # --- listings -------------------------------------------------------------------------
    async def check(self) -> None:
        await trio.to_thread.run_sync(net.check_tls, self.peer)
        async with self.pool.query() as assoc:
            status = await trio.to_thread.run_sync(assoc.send_c_echo)
        if not status or getattr(status, "Status", None) != 0x0000:
            raise SourceUnavailable(f"{self.description} did not answer C-ECHO")

    async def _find(self, identifier: Dataset, what: str) -> list[Dataset]:
        """Every answer of one C-FIND (pending answers are collected as they come; a caller that
        gives up has a C-CANCEL sent)."""
        async with self.pool.query() as assoc:
            def work() -> list[Dataset]:
                answers: list[Dataset] = []
                for status, found in assoc.send_c_find(identifier, query.STUDY_ROOT_FIND, msg_id=1):
                    code = _status(status, self.description, what)
                    if code in _PENDING:
                        if found is not None:
                            answers.append(found)
                        continue
                    if code != 0x0000:
                        raise _failure(self.description, "C-FIND", what, code)
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
        answers = await self._find(query.identifier("IMAGE", {"StudyInstanceUID": series.study_uid,
                                                               "SeriesInstanceUID": series.uid}),
                                   f"the instances of series {series.uid}")
        found = query.instances(series, answers)
        self._listed[series.key] = {i.key: _sop_class(i) for i in found}
        return found

    def local_file(self, instance: InstanceRecord) -> Path | None:
        return None

    # --- retrieve ---------------------------------------------------------------------------
    async def fetch_series(self, series: SeriesRecord, sink: SeriesSink) -> None:
        listed = self._listed.get(series.key)
        if listed is None:
            await self.list_instances(series)
            listed = self._listed[series.key]
        if not listed:
            return
        if not self._use_move:
            try:
                await self._retrieve(series, listed, sink, self._get)
                return
            except GetRefused as exc:
                if self.retrieve != "auto":
                    raise
                log.warning("%s; using C-MOVE to dicomfs's storage SCP on port %d from now on (register AE "
                            "title %s with this machine's address and that port at the PACS)", exc,
                            self.move_port, self.peer.calling_ae)
                self._use_move = True
        await self._retrieve(series, listed, sink, self._move)

    async def _retrieve(self, series: SeriesRecord, listed: dict[str, str], sink: SeriesSink,
                        how: Callable[[_Retrieve], Any]) -> None:
        """Run ``how`` (C-GET or C-MOVE) in a worker thread, hand the instances it receives to the
        sink as they come, and report the bytes that arrived (for the minimum rate)."""
        send, receive = trio.open_memory_channel[tuple[str, bytes, bytes]](DELIVERY_QUEUE)
        job = _Retrieve(series, listed, send, trio.lowlevel.current_trio_token())
        reported = 0

        async def progress() -> None:
            nonlocal reported
            while True:
                await trio.sleep(PROGRESS_TICK)
                seen = job.received
                if seen > reported:
                    sink.arrived(seen - reported)
                    reported = seen

        async def run() -> None:
            async with send:
                await how(job)

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

    def _store(self, job: _Retrieve, event: Any) -> int:
        """A C-STORE sub-operation (in the association's thread): the instance, as a Part 10 file,
        to the trio side; refused once the retrieve was given up."""
        if job.stopped.is_set():
            return _STORE_REFUSED
        request = event.request
        key = str(request.AffectedSOPInstanceUID)
        if key not in job.listed:
            log.warning("series %s: the PACS sent instance %r, which its listing did not name: dropped",
                        job.series.uid, key[:80])
            return _STORE_OK
        head = part10.header(str(request.AffectedSOPClassUID), key, str(event.context.transfer_syntax),
                             self.peer.called_ae)
        data = request.DataSet.getvalue()
        try:
            trio.from_thread.run(job.send.send, (key, head, data), trio_token=job.token)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError, trio.Cancelled):
            job.stopped.set()  # nobody takes instances any more
            return _STORE_REFUSED
        job.delivered += 1
        return _STORE_OK

    def _count(self, job: _Retrieve, event: Any) -> None:
        job.received += len(event.data)

    async def _get(self, job: _Retrieve) -> None:
        """One C-GET of the series on an association of its own, its instances arriving on it."""
        from pynetdicom import evt

        cxs, roles = contexts.retrieve_contexts(query.STUDY_ROOT_GET, job.listed.values())
        identifier = query.identifier("SERIES", {"StudyInstanceUID": job.series.study_uid,
                                                  "SeriesInstanceUID": job.series.uid})
        holder: dict[str, Association] = {}

        def work() -> None:
            assoc = net.open_association(self.peer, cxs, roles=roles, handlers=[
                (evt.EVT_C_STORE, lambda event: self._store(job, event)),
                (evt.EVT_DATA_RECV, lambda event: self._count(job, event))])
            holder["assoc"] = assoc
            try:
                if not any(cx.abstract_syntax == query.STUDY_ROOT_GET for cx in assoc.accepted_contexts):
                    raise GetRefused(f"{self.description} accepts no Study Root C-GET")
                self._responses(assoc.send_c_get(identifier, query.STUDY_ROOT_GET, msg_id=1), job, "C-GET", assoc)
            finally:
                net.release(assoc)

        def stop() -> None:
            job.stopped.set()
            assoc = holder.get("assoc")
            if assoc is not None:
                net.cancel_then_abort(assoc, 1, query.STUDY_ROOT_GET)()

        async with self.pool.room():
            await net.in_thread(work, stop)

    def _responses(self, responses: Any, job: _Retrieve, what: str, assoc: Association) -> None:
        """Follow a C-GET or C-MOVE to its end: a failure is an error (a refused C-GET a
        ``GetRefused``: some PACS, Orthanc among them, refuse by ending the association before
        sending anything);
        instances it could not send are logged, the others were delivered."""
        for status, found in responses:
            if (not status and what == "C-GET" and not job.delivered and not job.stopped.is_set()
                    and net.ended_by_peer(assoc)):
                raise GetRefused(f"{self.description} ended the association when asked for C-GET")
            code = _status(status, self.description, f"series {job.series.uid}")
            if code in _PENDING:
                continue
            if code == 0x0000:
                return
            if code == 0xB000:  # done, with failures: those instances stay missing
                failed = list(getattr(found, "FailedSOPInstanceUIDList", None) or []) if found else []
                log.warning("series %s: the PACS could not send %s instances (%s status 0xB000)%s",
                            job.series.uid, len(failed) or "some", what,
                            ": " + ", ".join(map(str, failed[:5])) if failed else "")
                return
            if job.stopped.is_set():
                raise SourceError(f"the {what} of series {job.series.uid} was stopped")
            error = _failure(self.description, what, f"series {job.series.uid}", code)
            if what == "C-GET" and code in _GET_REFUSALS:
                raise GetRefused(str(error))
            raise error

    async def _move(self, job: _Retrieve) -> None:
        """One C-MOVE of the series to our Storage SCP; the instances arrive on the PACS's own
        association to it, which must come from the PACS's address and AE title, during this move,
        with instances of this series."""
        await self._start_scp()
        identifier = query.identifier("SERIES", {"StudyInstanceUID": job.series.study_uid,
                                                  "SeriesInstanceUID": job.series.uid})
        for key in job.listed:
            self._moves[key] = job
        holder: dict[str, Association] = {}
        from pynetdicom import build_context

        def work() -> None:
            assoc = net.open_association(self.peer, [build_context(query.STUDY_ROOT_MOVE)])
            holder["assoc"] = assoc
            try:
                self._responses(assoc.send_c_move(identifier, self.peer.calling_ae, query.STUDY_ROOT_MOVE,
                                                  msg_id=1), job, "C-MOVE", assoc)
            finally:
                net.release(assoc)

        def stop() -> None:
            job.stopped.set()
            assoc = holder.get("assoc")
            if assoc is not None:
                net.cancel_then_abort(assoc, 1, query.STUDY_ROOT_MOVE)()

        try:
            async with self.pool.room():
                await net.in_thread(work, stop)
        finally:
            for key in job.listed:
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
            return _STORE_REFUSED
        self._move_associations[id(event.assoc)] = job
        return self._store(job, event)

    def _count_moved(self, event: Any) -> None:
        job = self._move_associations.get(id(event.assoc))  # known from its first instance on
        if job is not None:
            job.received += len(event.data)


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


def _status(status: Any, description: str, what: str) -> int:
    """The status code of a DIMSE answer; no answer at all means the PACS went silent or away."""
    code = getattr(status, "Status", None) if status else None
    if code is None:
        raise SourceUnavailable(f"{description} did not answer about {what} (timed out, or the association "
                                "was aborted)")
    return int(code)


_TABLES = {"C-FIND": "QR_FIND_SERVICE_CLASS_STATUS", "C-GET": "QR_GET_SERVICE_CLASS_STATUS",
           "C-MOVE": "QR_MOVE_SERVICE_CLASS_STATUS"}
# What a PACS answers when it will not serve C-GET to us (then C-MOVE is worth trying)
_GET_REFUSALS = frozenset({0x0122, 0x0124, 0xA701, 0xA702, 0xA900, 0xAA00, 0xAA01, 0xAA02, 0xAA03, 0xAA04})


def _failure(description: str, service: str, what: str, code: int) -> SourceError:
    """A failure status of a C-FIND, C-GET or C-MOVE as one line that says what it means."""
    from pynetdicom import status

    if code == 0xA801:
        return ProtocolError(f"{description} does not know the C-MOVE destination (status 0xA801): register "
                             "dicomfs's AE title there with this machine's address and the --move-port")
    table = {**status.GENERAL_STATUS, **getattr(status, _TABLES[service])}
    meaning = table.get(code, ("", ""))[1] or ("unable to process" if 0xC000 <= code <= 0xCFFF else "unknown")
    return SourceError(f"{description}: {service} of {what} failed with status 0x{code:04X} ({meaning})")
