"""DIMSE associations with one PACS, through pynetdicom: opening them, a small bounded pool, and
running their blocking work from trio.

Owns the peer's address and AE titles, TLS, timeouts (ACSE, DIMSE, network), what our sockets
do (TCP_NODELAY, and TCP_QUICKACK after every PDU sent: a PACS's data must not wait for a delayed
ACK of ours, nor our replies for one of its) and the retrieve associations' shorter loop delay
(``quick_loop``), the pool that keeps at most ``--max-associations`` open (idle query
associations are reused, closed to make room, and released by a reaper after ``IDLE_SECONDS``),
one-line errors that tell the user what to change (association rejected, no common presentation
context, for the association or for one service on it, unreachable; a request left unanswered is
asked once more), who ended an association (``Ending``: a timeout of ours or the PACS), the
Storage SCP a C-MOVE delivers to (``storage_scp``: the PACS's AE title alone, on the move port),
and ``in_thread``: blocking pynetdicom work in a worker thread that the event loop can cancel
(C-CANCEL, then A-ABORT; the caller then sees its cancellation, not what the stopped request
ended with). Must not know what is queried or retrieved (``query``, the source).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from dicomfs.errors import AccessRefused, ProtocolError, SourceError, SourceUnavailable
from dicomfs.sources.dimse.imports import import_pynetdicom
from dicomfs.tasks import StopSignal, run_stoppable

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.presentation import PresentationContext

log = logging.getLogger(__name__)

T = TypeVar("T")
IDLE_SECONDS = 10.0  # an idle query association is released after this long
CANCEL_GRACE = 2.0  # after a C-CANCEL, how long the PACS has to stop before the association is aborted
RELEASES_AWAITED = 2.0  # at the end, how long releases still under way are waited for
MAX_PDU = 0  # no limit on the PDUs we receive: fewer, larger reads
PORT_RETRY = 0.1  # seconds between attempts to listen on a move port that another process holds
RETRIEVE_LOOP_DELAY = 0.0002  # see quick_loop


@dataclass(frozen=True)
class Peer:
    """The PACS, and how dicomfs presents itself to it."""

    host: str
    port: int
    called_ae: str
    calling_ae: str = "DICOMFS"
    timeout: float = 30.0  # ACSE and DIMSE replies; the network timeout is twice that
    tls: ssl.SSLContext | None = field(default=None, compare=False)
    tls_files: tuple[str | None, ...] | None = None  # (CA, certificate, key) the context was made of

    @property
    def description(self) -> str:
        scheme = "dimse+tls" if self.tls is not None else "dimse"
        return f"{scheme}://{self.called_ae}@{self.host}:{self.port}"


def tls_context(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    """A client TLS context for DICOM TLS: the PACS's certificate checked against ``ca_file`` (or
    the system's store), our certificate sent when given."""
    from dicomfs.errors import UsageError

    try:
        context = ssl.create_default_context(cafile=ca_file)
        if cert_file:
            context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot use the TLS files: {getattr(exc, 'strerror', None) or exc}") from None
    return context


def nodelay(event: Any) -> None:
    """EVT_CONN_OPEN: no Nagle on DICOM sockets (small DIMSE replies must not wait for ACKs)."""
    _set(event, socket.TCP_NODELAY)


def quickack(event: Any) -> None:
    """EVT_DATA_SENT: acknowledge the peer's next segment at once rather than after the delayed-ACK
    timer. Sending a reply puts Linux in its interactive mode, where ACKs wait up to 40 ms for data
    to ride on; a PACS that leaves Nagle on (DCMTK-based ones do unless started with
    TCP_NODELAY=1) holds each instance's data behind the ACK of its command, so every C-STORE
    sub-operation would cost 40 ms (200 small instances: 8.9 s instead of 0.6 s)."""
    _set(event, socket.TCP_QUICKACK)


def _set(event: Any, option: int) -> None:
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, option, 1)
    except (AttributeError, OSError):
        pass  # the socket is already gone


def quick_loop(assoc: Association) -> None:
    """Make the association's DUL loop check for work every ``RETRIEVE_LOOP_DELAY`` seconds
    instead of pynetdicom's 1 ms. It sleeps that long whenever it has nothing to do, so each C-STORE
    response of a retrieve waited up to 1 ms before it left, and the PACS with it: 116 MB/s became
    168 MB/s for pynetdicom alone on loopback, for the same CPU time. Only for retrieves: a waiting
    association polls 5,000 times a second. (A private attribute, the one pynetdicom's maintainers
    point to for this trade-off; without it, retrieves are slower, not wrong.)"""
    dul = getattr(assoc, "dul", None)
    if dul is not None and hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = RETRIEVE_LOOP_DELAY


def socket_handlers() -> list[tuple[Any, Callable[..., Any]]]:
    """The handlers every association of ours carries, as requestor or as storage SCP."""
    import_pynetdicom()
    from pynetdicom import evt

    return [(evt.EVT_CONN_OPEN, nodelay), (evt.EVT_DATA_SENT, quickack)]


def application_entity(peer: Peer, contexts: Sequence[PresentationContext]) -> Any:
    """A pynetdicom AE for one association: our AE title, the timeouts, these contexts."""
    import_pynetdicom()
    from pynetdicom import AE

    ae = AE(ae_title=peer.calling_ae)
    ae.acse_timeout = peer.timeout
    ae.dimse_timeout = peer.timeout
    ae.network_timeout = peer.timeout * 2
    ae.connection_timeout = min(peer.timeout, 10.0)
    ae.maximum_pdu_size = MAX_PDU
    ae.requested_contexts = list(contexts)
    return ae


def open_association(peer: Peer, contexts: Sequence[PresentationContext], *, roles: Sequence[Any] = (),
                     handlers: Sequence[tuple[Any, Callable[..., Any]]] = ()) -> Association:
    """An established association, or a one-line ``SourceError`` that says what to change.
    Blocking."""
    ae = application_entity(peer, contexts)
    tls_args = (peer.tls, peer.host) if peer.tls is not None else None
    for attempt in range(2):
        assoc: Association = ae.associate(peer.host, peer.port, ae_title=peer.called_ae, ext_neg=list(roles) or None,
                             tls_args=tls_args, max_pdu=MAX_PDU,
                             evt_handlers=[*socket_handlers(), *handlers])
        if assoc.is_established:
            return assoc
        error = association_error(peer, assoc)
        if not isinstance(error, _NoAnswer) or attempt:
            raise error
        # A PACS that rejects and resets the connection at once may have its rejection discarded
        # by our kernel before it is read: ask once more, for the reason
        time.sleep(0.2)
    raise AssertionError("unreachable")


def association_error(peer: Peer, assoc: Association) -> SourceError:
    answer = getattr(assoc.acceptor, "primitive", None)
    if assoc.is_rejected and answer is not None:
        reason = getattr(answer, "reason_str", "no reason given")
        if answer.result_source == 1 and answer.diagnostic == 7:
            return AccessRefused(f"{peer.description} rejected the association: the PACS is not called "
                                 f"{peer.called_ae!r} (check the AE title in the source)")
        if answer.result_source == 1 and answer.diagnostic in (1, 3):
            return AccessRefused(
                f"{peer.description} rejected the association ({reason}): the PACS must know our AE title "
                f"{peer.calling_ae!r}; register it there with this machine's address ({local_address(peer)}; for "
                "C-MOVE also the --move-port), or give --ae-title the one it knows")
        if answer.result == 2:
            return SourceUnavailable(f"{peer.description} turned the association away for now ({reason})")
        return AccessRefused(f"{peer.description} rejected the association ({reason})")
    if answer is not None and getattr(answer, "result", None) == 0:
        return no_common_context(peer)
    # No answer: pynetdicom says "aborted" for a connection that failed too; ask the network
    try:
        with socket.create_connection((peer.host, peer.port), timeout=min(peer.timeout, 10.0)):
            pass
    except OSError as exc:
        return SourceUnavailable(f"cannot reach {peer.description}: {exc.strerror or type(exc).__name__}")
    return _NoAnswer(f"{peer.description} ended the association without an answer "
                     "(a TLS port spoken to without TLS, or the other way round?)"
                     if peer.tls is None else f"{peer.description} ended the association without an answer")


def local_address(peer: Peer) -> str:
    """The address this machine reaches the PACS from (what the PACS sees; no packet is sent)."""
    try:
        family = socket.getaddrinfo(peer.host, peer.port, type=socket.SOCK_DGRAM)[0][0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((peer.host, peer.port))
            return str(probe.getsockname()[0])
    except OSError:
        return "unknown here"


class _NoAnswer(SourceUnavailable):
    """The PACS took the connection and ended it without answering the association request."""


def no_common_context(peer: Peer, service: str | None = None) -> ProtocolError:
    """The one line for a PACS that accepted none of the presentation contexts we proposed (for
    ``service``: the association stands, but not for that)."""
    purpose = f" for {service}" if service else ""
    return ProtocolError(f"{peer.description} accepted none of the presentation contexts dicomfs proposed{purpose} "
                         "(no common presentation context)")


def accepts(assoc: Association, abstract_syntax: str) -> bool:
    """Whether ``assoc`` has a context in which we may ask for ``abstract_syntax`` (the test
    pynetdicom makes before a request, and answers with a ``ValueError`` when it fails)."""
    return any(cx.abstract_syntax == abstract_syntax and cx.as_scu for cx in assoc.accepted_contexts)


def require(peer: Peer, assoc: Association, abstract_syntax: str, service: str) -> None:
    """Raise ``no_common_context`` unless ``assoc`` may carry ``service`` (``abstract_syntax``)."""
    if not accepts(assoc, abstract_syntax):
        raise no_common_context(peer, service)


class Ending:
    """Who ended an association first, told by its ACSE events (``handlers``): ``"us"`` (an
    A-ABORT of ours, which pynetdicom sends when a reply has not come within the DIMSE timeout
    and a ``stop`` sends too, or our A-RELEASE), or ``"peer"`` (an A-ABORT or A-RELEASE request
    from the PACS, or the connection closed under us); None while it stands. pynetdicom answers
    a request with an empty status either way: this tells a PACS that turned the request away
    from one that did not answer in time."""

    def __init__(self) -> None:
        self.by: str | None = None

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        import_pynetdicom()
        from pynetdicom import evt

        return [(evt.EVT_ACSE_SENT, self._sent), (evt.EVT_ACSE_RECV, self._received)]

    def _sent(self, event: Any) -> None:
        from pynetdicom.pdu_primitives import A_ABORT, A_RELEASE

        if self.by is None and isinstance(event.primitive, (A_ABORT, A_RELEASE)):
            self.by = "us"

    def _received(self, event: Any) -> None:
        from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT, A_RELEASE

        if self.by is None and isinstance(event.primitive, (A_ABORT, A_P_ABORT, A_RELEASE)):
            self.by = "peer"


def timed_out(description: str, what: str, timeout: float) -> SourceUnavailable:
    """The one line for a request the PACS did not answer in time."""
    return SourceUnavailable(f"{description} did not answer {what} within --timeout {timeout:g} s "
                             "(a PACS that takes longer needs a larger --timeout)")


def addresses_of(host: str) -> set[str]:
    """Every address ``host`` stands for (a Storage SCP of ours accepts the PACS from those alone).
    Blocking (name resolution)."""
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


def storage_scp(peer: Peer, port: int, handlers: Sequence[tuple[Any, Callable[..., Any]]]) -> Any:
    """A Storage SCP of ours on ``port``, for the association on which the PACS sends what a C-MOVE
    asked for: it accepts the PACS's AE title alone, every storage SOP class in every transfer
    syntax, and runs in pynetdicom's threads until its ``shutdown()``. A port that another process
    holds (another dicomfs moving from the same PACS) is waited for up to the peer's timeout, then
    a one-line ``SourceError``. Blocking."""
    import_pynetdicom()
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts

    ae = AE(ae_title=peer.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = peer.timeout
    ae.network_timeout = peer.timeout * 2
    ae.maximum_pdu_size = MAX_PDU
    ae.require_calling_aet = [peer.called_ae]
    for cx in StoragePresentationContexts:
        assert cx.abstract_syntax is not None
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    deadline = time.monotonic() + peer.timeout
    waiting = False
    while True:
        try:
            return ae.start_server(("", port), block=False, evt_handlers=[*socket_handlers(), *handlers])
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise SourceError(f"cannot listen on port {port} for C-MOVE: {exc.strerror or exc} "
                                  "(choose another with --move-port)") from None
            if not waiting:
                log.info("port %d for C-MOVE is in use (another dicomfs moving from this PACS?): waiting up to "
                         "%.0f s for it", port, peer.timeout)
                waiting = True
            time.sleep(PORT_RETRY)


CLIENT_CERT_WAIT = 0.02  # seconds, at least, for a PACS's word on our TLS client certificate (``check_tls``)
_CLIENT_CERT_REFUSED = frozenset({"TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE",
                                  "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
                                  "SSLV3_ALERT_CERTIFICATE_EXPIRED", "SSLV3_ALERT_CERTIFICATE_REVOKED",
                                  "TLSV1_ALERT_ACCESS_DENIED"})


def check_tls(peer: Peer) -> None:
    """A TLS handshake with the PACS alone, so that a certificate problem is one clear line
    (pynetdicom only says the connection failed, or that the PACS ended the association): its
    certificate not trusted, ours missing or not accepted. Blocking."""
    if peer.tls is None:
        return
    try:
        with socket.create_connection((peer.host, peer.port), timeout=peer.timeout) as raw:
            started = time.monotonic()
            with peer.tls.wrap_socket(raw, server_hostname=peer.host) as tls:
                # TLS 1.3: a PACS that wants (another) client certificate says so with an alert
                # after our side of the handshake is done, within a round trip; a DICOM server
                # says nothing else before we ask, so silence for twice the handshake is a yes.
                tls.settimeout(min(max(2 * (time.monotonic() - started), CLIENT_CERT_WAIT), peer.timeout))
                try:
                    tls.recv(1)
                except TimeoutError:
                    pass
    except ssl.SSLCertVerificationError as exc:
        raise AccessRefused(f"{peer.description}: its TLS certificate is not trusted "
                            f"({exc.verify_message or exc.reason}); give its CA with --tls-ca") from None
    except ssl.SSLError as exc:
        if exc.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
            raise AccessRefused(f"{peer.description} requires a TLS client certificate: give ours with "
                                "--tls-cert and --tls-key") from None
        if exc.reason in _CLIENT_CERT_REFUSED:
            raise AccessRefused(f"{peer.description} does not accept our TLS client certificate (--tls-cert): "
                                f"it must be one the PACS trusts ({exc.reason.lower()})") from None
        raise AccessRefused(f"{peer.description}: the TLS handshake failed ({exc.reason or exc})") from None
    except OSError as exc:
        raise SourceUnavailable(f"cannot reach {peer.description}: {exc.strerror or exc}") from None


def ended_by_peer(assoc: Association, wait: float = 1.0) -> bool:
    """Whether the association has ended (or ends within ``wait`` seconds: pynetdicom hands out
    the empty answer of an aborted request before it records the abort). Blocking."""
    deadline = time.monotonic() + wait
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.01)
    return not assoc.is_established


def release(assoc: Association) -> None:
    """End an association politely if it still stands; abort it if that fails. Blocking (for up to
    twice the ACSE timeout when the PACS does not answer). Never raises."""
    try:
        if assoc.is_established:
            assoc.release()
    except Exception:  # a half-dead association: just drop it
        try:
            assoc.abort()
        except Exception:
            log.debug("aborting an association failed", exc_info=True)  # (not its address: it may raise)


async def detached(work: Callable[[], T], *, limiter: trio.CapacityLimiter,
                   undo: Callable[[T | None], None] | None = None) -> T:
    """``work()`` in a worker thread of ``limiter`` that a cancellation leaves behind: the caller
    gets its ``Cancelled`` at once and the thread ends by pynetdicom's own timeouts. ``undo`` runs
    once, in a thread, if and only if the caller left: with what ``work`` made, or None if it
    failed or never ran (an association released, its place in the pool given back). For the steps
    nothing can break from outside: opening an association waits in pynetdicom for the ACSE
    timeout, then for its abort's as long again, and asks twice (with ``--timeout 10`` a Ctrl-C
    waited 19 s for a PACS that accepts connections and says nothing)."""
    lock = threading.Lock()
    made: list[T] = []
    left = started = ended = False

    def job() -> T:
        nonlocal started, ended
        with lock:
            started = True
        try:
            result = work()
        except BaseException:
            with lock:
                ended, gone = True, left
            if gone and undo is not None:
                undo(None)
            raise
        with lock:
            made.append(result)
            ended, gone = True, left
        if gone and undo is not None:
            undo(result)  # the caller left before it was made
        return result

    try:
        return await trio.to_thread.run_sync(job, abandon_on_cancel=True, limiter=limiter)
    except trio.Cancelled:
        with lock:
            left = True
            over = ended or not started  # (else the thread undoes when it ends)
        if over and undo is not None:
            threading.Thread(target=undo, args=(made[0] if made else None,), name="dicomfs-undo",
                             daemon=True).start()
        raise


async def in_thread(work: Callable[[], T], stop: Callable[[], None]) -> T:
    """``work()`` in a worker thread; its result, or its error as it was raised (never in a
    group). If the caller is cancelled meanwhile, ``stop()`` (called on the event loop, must not
    block) makes the work end soon, and the caller gets its ``Cancelled`` once it has: not what
    the stopped request ended with (a C-CANCEL's status 0xFE00, an abort's empty answer), which
    would tell the caller, and those sharing its work, that the PACS failed."""
    def job(signal: StopSignal) -> T:
        signal.check()  # stopped before it started: nothing to ask for, nothing to cancel
        signal.on_stop(stop)
        signal.check()
        return work()

    return await run_stoppable(job)


def cancel_then_abort(assoc: Association, msg_id: int, query_model: str) -> Callable[[], None]:
    """A ``stop`` for ``in_thread``: C-CANCEL the running request, and A-ABORT the association if
    the PACS has not stopped after ``CANCEL_GRACE`` seconds."""
    def stop() -> None:
        def act() -> None:
            try:
                assoc.send_c_cancel(msg_id, query_model=query_model)
            except Exception:
                assoc.abort()
                return
            deadline = time.monotonic() + CANCEL_GRACE
            while assoc.is_established and time.monotonic() < deadline:
                time.sleep(0.05)
            if assoc.is_established:
                assoc.abort()

        threading.Thread(target=act, name="dicomfs-cancel", daemon=True).start()

    return stop


class AssociationPool:
    """At most ``limit`` associations open with the PACS at once: the queries' (kept open a while
    and reused) and the retrieves' (each its own). A caller waits for room; an idle query
    association is closed when a retrieve needs its place, and by a reaper once it has been idle
    ``IDLE_SECONDS`` (an association left open holds one of the PACS's few places, and keeps it
    from shutting down until its own timeout)."""

    def __init__(self, peer: Peer, limit: int, query_syntaxes: Sequence[str]) -> None:
        """``query_syntaxes``: the abstract syntaxes (SOP classes) query associations propose."""
        self.peer = peer
        self.limit = max(1, limit)
        self._query_syntaxes = list(query_syntaxes)
        self._open = 0  # open or opening, and those being released (their places are not free yet)
        self._releasing = 0  # of those, being released (or opened for a caller that left)
        self.threads = trio.CapacityLimiter(max(8, 2 * self.limit))  # for ``detached`` work with the PACS
        self._idle: list[tuple[Association, float]] = []  # (association, trio time it went idle)
        self._changed = trio.Condition()
        self._reaping = False

    async def _room(self, reuse: bool) -> Association | None:
        """Wait until an association may be opened (None) or an idle one is handed over."""
        async with self._changed:
            while True:
                await self._release_idle(stale_only=True)
                if reuse and self._idle:
                    return self._idle.pop()[0]
                if self._open < self.limit:
                    self._open += 1
                    return None
                if self._idle and self._open - self._releasing >= self.limit:
                    # make room: the oldest idle query association goes (its place is free once
                    # it is released: the wait below; one release at a time makes the room)
                    old, _ = self._idle.pop(0)
                    self._release_soon(old)
                await self._changed.wait()

    async def _done(self, assoc: Association | None, keep: bool) -> None:
        async with self._changed:
            if keep and assoc is not None and assoc.is_established:
                self._idle.append((assoc, trio.current_time()))
                if not self._reaping:
                    self._reaping = True
                    trio.lowlevel.spawn_system_task(self._reap, name="dicomfs: idle DIMSE associations")
            elif assoc is not None:
                self._release_soon(assoc)
            else:
                self._open -= 1
            self._changed.notify_all()

    async def _release_idle(self, stale_only: bool) -> None:
        """Release the idle associations (those idle too long, or broken, with ``stale_only``).
        Called holding ``_changed``."""
        now = trio.current_time()
        for entry in list(self._idle):
            assoc, since = entry
            if not stale_only or not assoc.is_established or now - since >= IDLE_SECONDS:
                self._idle.remove(entry)
                self._release_soon(assoc)

    def _release_soon(self, assoc: Association) -> None:
        """Release ``assoc`` in a thread of its own, which frees its place once done: a PACS that
        does not answer holds that thread for up to twice the ACSE timeout, but neither the pool's
        lock, nor a caller, nor the shutdown (``aclose`` waits ``RELEASES_AWAITED`` at most)."""
        self._releasing += 1
        threading.Thread(target=self._release_then_free, args=(trio.lowlevel.current_trio_token(), assoc),
                         name="dicomfs-release", daemon=True).start()

    def _release_then_free(self, token: trio.lowlevel.TrioToken, assoc: Association | None) -> None:
        """In a thread: release ``assoc`` (if any), then free its place (counted in ``_releasing``)."""
        if assoc is not None:
            release(assoc)
        try:
            trio.from_thread.run(self._released, trio_token=token)
        except (trio.RunFinishedError, trio.Cancelled):
            pass  # (the run is ending)

    async def _released(self) -> None:
        async with self._changed:
            self._open -= 1
            self._releasing -= 1
            self._changed.notify_all()

    async def _reap(self) -> None:
        """While associations are idle: release each once it has been idle ``IDLE_SECONDS``.
        A system task (it outlives the caller that made the association idle; the run's end
        cancels it), so it must not raise."""
        try:
            while True:
                async with self._changed:
                    await self._release_idle(stale_only=True)
                    if not self._idle:
                        self._reaping = False  # (under the lock: _done starts a new reaper)
                        return
                    wake = min(since for _, since in self._idle) + IDLE_SECONDS
                await trio.sleep_until(wake)
        except Exception:  # a failure here must not end the run; the next _room retries
            log.exception("releasing idle associations with %s failed", self.peer.description)
            self._reaping = False

    def _open_for_queries(self) -> Association:
        import_pynetdicom()
        from pynetdicom import build_context

        return open_association(self.peer, [build_context(syntax) for syntax in self._query_syntaxes])

    @asynccontextmanager
    async def query(self) -> AsyncIterator[Association]:
        """An association for C-FIND and C-ECHO: an idle one reused, or a new one."""
        assoc = await self._room(reuse=True)
        keep = left = False
        try:
            if assoc is None:
                try:
                    assoc = await detached(self._open_for_queries, limiter=self.threads,
                                           undo=partial(self._release_then_free, trio.lowlevel.current_trio_token()))
                except trio.Cancelled:
                    # the opening goes on without us: its place stays taken until it is over and
                    # what it opened is released (the undo frees it, as a release does)
                    self._releasing += 1
                    left = True
                    raise
            assert assoc is not None  # (mypy: T solves to Optional with the undo's type)
            yield assoc
            keep = True
        finally:
            if not left:
                with trio.CancelScope(shield=True):
                    await self._done(assoc, keep)

    @asynccontextmanager
    async def room(self) -> AsyncIterator[None]:
        """A place for an association the caller opens and closes itself (a retrieve's)."""
        await self._room(reuse=False)
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                await self._done(None, keep=False)

    async def aclose(self) -> None:
        """Release the idle associations, and wait for the releases under way, but not long: a
        PACS that does not answer has them aborted by its own timeout, in threads the process
        does not wait for."""
        async with self._changed:
            await self._release_idle(stale_only=False)
            with trio.move_on_after(RELEASES_AWAITED):
                while self._releasing:
                    await self._changed.wait()
