"""One series retrieved over DIMSE, blocking (pynetdicom): a C-GET on an association of its own,
or a C-MOVE to a Storage SCP of ours that listens only while the move runs; each C-STORE
sub-operation made a Part 10 file (``part10``) for a ``deliver`` callback, and the responses of
the C-GET or C-MOVE followed to their end.

Runs in a retrieve worker process (``worker``: the whole retrieve, its instances received there,
not in the daemon). Instances that the IMAGE-level listing did not name are dropped with a log
line, instances from anyone but the PACS refused; instances the PACS failed to send are logged
with its status and stay missing. Must not know where instances go (``deliver``), or use trio.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dicomfs.errors import SourceError, TransferBroken
from dicomfs.sources.dimse import contexts, net, part10, query, status
from dicomfs.sources.dimse.imports import import_pynetdicom
from dicomfs.sources.dimse.net import Peer

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pynetdicom.association import Association

log = logging.getLogger(__name__)

STORE_OK, STORE_REFUSED = 0x0000, 0xA700  # C-STORE: success; out of resources (we stopped)


@dataclass
class Job:
    """One series being retrieved: what may arrive, where it goes, how much came."""

    description: str  # the PACS, for messages
    source_ae: str  # its AE title, written into the files' meta
    study_uid: str
    series_uid: str
    listed: dict[str, str]  # SOP instance UID -> SOP class UID, from the IMAGE-level C-FIND
    deliver: Callable[[str, bytes, bytes], bool]  # (UID, Part 10 header, data set) -> False: stop
    received: int = 0  # bytes off the wire (counted by the association's threads)
    delivered: int = 0  # instances handed over
    stopped: threading.Event = field(default_factory=threading.Event)
    assoc: Association | None = None  # the C-GET's or C-MOVE's association, once open
    ending: net.Ending = field(default_factory=net.Ending)  # who ended that association
    destination: str | None = None  # a C-MOVE's: our AE title, address and port, as the PACS must know them
    model: str = query.STUDY_ROOT_GET  # the information model of the retrieve (what a C-CANCEL names)

    def identifier(self) -> Dataset:
        return query.identifier("SERIES", {"StudyInstanceUID": self.study_uid, "SeriesInstanceUID": self.series_uid})


def store(job: Job, event: Any) -> int:
    """A C-STORE sub-operation (in an association's thread): the instance, as a Part 10 file, to
    ``deliver``; refused once the retrieve was given up."""
    if job.stopped.is_set():
        return STORE_REFUSED
    request = event.request
    key = str(request.AffectedSOPInstanceUID)
    if key not in job.listed:
        log.warning("series %s: the PACS sent instance %r, which its listing did not name: dropped",
                    job.series_uid, key[:80])
        return STORE_OK
    head = part10.header(str(request.AffectedSOPClassUID), key, str(event.context.transfer_syntax), job.source_ae)
    if not job.deliver(key, head, request.DataSet.getvalue()):
        job.stopped.set()  # nobody takes instances any more
        return STORE_REFUSED
    job.delivered += 1
    return STORE_OK


def count(job: Job, event: Any) -> None:
    """EVT_DATA_RECV: the bytes of a PDU, for the retrieve's progress."""
    job.received += len(event.data)


def follow(job: Job, responses: Iterable[tuple[Any, Any]], what: str, assoc: Association) -> None:
    """Follow a C-GET or C-MOVE to its end: a failure is an error; instances it could not send
    are logged, the others were delivered. An empty answer (pynetdicom's, when the association
    ended) is told apart by who ended it (``job.ending``): we did, because the PACS had not
    answered within the DIMSE timeout (a PACS slow to start: near-line storage, a busy one), so
    a timeout; or the PACS did, before sending anything, which for a C-GET is a ``GetRefused``
    (some PACS, Orthanc among them, refuse C-GET by aborting the association)."""
    about = f"series {job.series_uid}"
    for answer, found in responses:
        if not answer and not job.stopped.is_set():
            net.ended_by_peer(assoc)  # (pynetdicom hands out the empty answer before it records the end)
            if job.delivered:  # it broke off midway: what came is kept, the rest may be resumed
                why = {"us": f"the PACS sent nothing more within --timeout {assoc.dimse_timeout or 0.0:g} s",
                       "peer": "the PACS ended the association"}.get(job.ending.by or "", "the association ended")
                raise TransferBroken(f"the {what} of {about} broke off after {job.delivered} instances ({why})")
            if job.ending.by == "us":
                raise net.timed_out(job.description, f"the {what} of {about}", assoc.dimse_timeout or 0.0)
            if what == "C-GET" and job.ending.by == "peer":
                raise status.GetRefused(f"{job.description} ended the association when asked for C-GET")
        code = status.code_of(answer, job.description, about)
        if code in status.PENDING:
            continue
        if code == status.SUCCESS:
            return
        if code == status.SOME_FAILED:  # done, with failures: those instances stay missing
            failed = list(getattr(found, "FailedSOPInstanceUIDList", None) or []) if found else []
            log.warning("series %s: the PACS could not send %s instances (%s status 0xB000)%s", job.series_uid,
                        len(failed) or "some", what, ": " + ", ".join(map(str, failed[:5])) if failed else "")
            return
        if job.stopped.is_set():
            raise SourceError(f"the {what} of {about} was stopped")
        raise status.failure(job.description, what, about, code, job.destination)


def get(peer: Peer, job: Job) -> None:
    """The C-GET of the series on an association of its own, its instances arriving on it, one
    presentation context per (SOP class, transfer syntax) so that the PACS sends what it stores."""
    import_pynetdicom()
    from pynetdicom import evt

    cxs, roles = contexts.retrieve_contexts(query.STUDY_ROOT_GET, job.listed.values())
    job.assoc = assoc = net.open_association(peer, cxs, roles=roles, handlers=[
        (evt.EVT_C_STORE, lambda event: store(job, event)), (evt.EVT_DATA_RECV, lambda event: count(job, event)),
        *job.ending.handlers()])
    net.quick_loop(assoc)
    try:
        if not net.accepts(assoc, query.STUDY_ROOT_GET):
            raise status.GetRefused(f"{job.description} accepts no Study Root C-GET")
        follow(job, assoc.send_c_get(job.identifier(), query.STUDY_ROOT_GET, msg_id=1), "C-GET", assoc)
    finally:
        net.release(assoc)


def move(peer: Peer, job: Job, port: int) -> None:
    """The C-MOVE of the series to ourselves: a Storage SCP on ``port`` for as long as the move
    runs (``net.storage_scp``: the PACS's AE title alone), whose associations must also come from
    the PACS's address; their instances go to ``deliver`` as a C-GET's do."""
    import_pynetdicom()
    from pynetdicom import build_context, evt

    addresses = net.addresses_of(peer.host)
    job.destination = f"AE title {peer.calling_ae!r} at {net.local_address(peer)} port {port}"
    scp = net.storage_scp(peer, port, [(evt.EVT_C_STORE, lambda event: store_moved(job, addresses, event)),
                                       (evt.EVT_DATA_RECV, lambda event: count_moved(job, addresses, event))])
    try:
        job.assoc = assoc = net.open_association(peer, [build_context(query.STUDY_ROOT_MOVE)],
                                                 handlers=job.ending.handlers())
        try:
            follow(job, assoc.send_c_move(job.identifier(), peer.calling_ae, query.STUDY_ROOT_MOVE, msg_id=1),
                   "C-MOVE", assoc)
        finally:
            net.release(assoc)
    finally:
        scp.shutdown()


def store_moved(job: Job, addresses: set[str], event: Any) -> int:
    """``store`` on the Storage SCP of a C-MOVE: refused unless the association comes from one of
    the PACS's ``addresses``."""
    if not _from(addresses, event):
        log.warning("storage SCP: refused instance %r from %s (not the PACS)",
                    str(event.request.AffectedSOPInstanceUID)[:80], getattr(event.assoc.requestor, "address", "?"))
        return STORE_REFUSED
    net.quick_loop(event.assoc)  # the PACS's association, known from its first instance (idempotent)
    return store(job, event)


def count_moved(job: Job, addresses: set[str], event: Any) -> None:
    """``count`` on the Storage SCP of a C-MOVE, for the PACS's associations alone."""
    if _from(addresses, event):
        count(job, event)


def _from(addresses: set[str], event: Any) -> bool:
    return str(getattr(event.assoc.requestor, "address", "")) in addresses


def stop(job: Job, model: str) -> None:
    """Give the retrieve up (from another thread; does not block): no more instances are taken,
    the PACS is sent a C-CANCEL, and the association is aborted if it does not end soon."""
    job.stopped.set()
    if job.assoc is not None:
        net.cancel_then_abort(job.assoc, 1, model)()
