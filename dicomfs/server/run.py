"""The life of ``dicomfs serve``: the archive, the HTTP server, signals, systemd.

Owns the order of start-up (open the archive as a mount does: cache lock, source check or the
stored catalog offline, blob store; then bind and listen: a port in use is a one-line error before
anything is served) and of shut-down (SIGTERM/SIGINT: stop accepting, requests in flight get
``SHUTDOWN_GRACE`` seconds, downloads are cancelled, the cache closed), ``READY=1``/``STOPPING=1``
with ``--systemd``, and hypercorn's configuration (loopback by default, bounded header sizes, a
send timeout, no access log unless asked). Why hypercorn: an ASGI server with a trio worker, so the app, the blob
store and the sources share one event loop with the rest of dicomfs. Must not answer requests.
"""

from __future__ import annotations

import functools
import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import trio

from dicomfs.archive import Archive, ArchiveOptions, open_archive
from dicomfs.errors import UsageError
from dicomfs.sdnotify import sd_notify
from dicomfs.server.app import ROOT, DicomwebApp
from dicomfs.server.qido import Qido
from dicomfs.server.viewer import Viewer
from dicomfs.server.wado import Wado
from dicomfs.tasks import open_nursery
from dicomfs.webfiles import WebFiles

if TYPE_CHECKING:
    from hypercorn.config import Config
    from hypercorn.typing import ASGIFramework  # (hypercorn's types are stricter than the app's dict scope)

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 3.0
MAX_HEADER_BYTES = 16 * 1024  # a request head larger than this is refused (hypercorn: 431/400)


@dataclass(frozen=True)
class ServeOptions:
    archive: ArchiveOptions
    host: str = "127.0.0.1"
    port: int = 8080
    cors_origin: str | None = None
    viewer: Path | None = None
    access_log: bool = False
    send_timeout: float = 60.0  # a client that takes no bytes for this long is disconnected


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(options: ServeOptions, on_ready: Callable[[str], None], *, systemd: bool = False) -> None:
    """Serve until SIGTERM/SIGINT. ``on_ready`` gets the DICOMweb root's URL once it listens.
    Raises DicomfsError (UsageError for a host/port that cannot be bound)."""
    from hypercorn.trio import serve as hypercorn_serve

    viewer = Viewer(options.viewer, "/" + ROOT) if options.viewer is not None else None
    _check_can_listen(options.host, options.port)  # before the archive is opened: a typo costs nothing
    async with open_archive(options.archive) as archive:
        app = app_for(archive, cors_origin=options.cors_origin, viewer=viewer)
        config = _config(options.send_timeout)
        config.bind = [f"[{options.host}]:{options.port}" if ":" in options.host else f"{options.host}:{options.port}"]
        config.accesslog = logging.getLogger("dicomfs.access") if options.access_log else None
        config.errorlog = logging.getLogger("hypercorn.error")
        config.graceful_timeout = SHUTDOWN_GRACE
        config.h11_max_incomplete_size = MAX_HEADER_BYTES
        config.include_server_header = False
        stop = trio.Event()
        async with open_nursery() as nursery:
            nursery.start_soon(_on_signals, stop)
            try:
                await nursery.start(functools.partial(hypercorn_serve, cast("ASGIFramework", app), config,
                                                      shutdown_trigger=stop.wait))
            except* OSError as group:  # (from hypercorn's own nursery: in a group)
                exc = _first_leaf(group)
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                raise UsageError(f"cannot listen on {options.host}:{options.port}: {reason}") from None
            root = url_of(options.host, options.port) + "/" + ROOT
            log.info("serving %s at %s", archive.source.description, root)
            on_ready(root)
            if systemd:
                sd_notify("READY=1")
            await stop.wait()
            if systemd:
                sd_notify("STOPPING=1")
            log.info("stopping")
            # hypercorn stops accepting and gives requests in flight the grace; then this ends them
            nursery.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE + 1


def _config(send_timeout: float) -> Config:
    """hypercorn's configuration, whose listening sockets disconnect a client that takes none of
    its answer's bytes for ``send_timeout`` seconds. hypercorn has no write timeout, and sends
    with its task shielded from cancellation: a client that stops reading (a paused pipe, a
    suspended process) would hold its request, the blob it reads and the server's shutdown for
    good. ``TCP_USER_TIMEOUT``, which accepted sockets inherit, has the kernel end such a
    connection (its zero-window probes go unanswered by data), and the send fails."""
    from hypercorn.config import Config, Sockets

    class _Config(Config):
        def create_sockets(self) -> Sockets:
            sockets = super().create_sockets()
            for sock in sockets.insecure_sockets + sockets.secure_sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                                    min(max(round(send_timeout * 1000), 1), 2**31 - 1))  # (0: no timeout)
            return sockets

    return _Config()


def app_for(archive: Archive, *, cors_origin: str | None = None, viewer: Viewer | None = None) -> DicomwebApp:
    """The app serving an opened archive (with a blob store) through one renderer."""
    assert archive.blobs is not None
    files = WebFiles(archive.catalog, archive.blobs, studies=archive.shown.studies)
    return DicomwebApp(Qido(archive.catalog, archive.shown, files), Wado(archive.catalog, archive.blobs, files),
                       cors_origin=cors_origin, viewer=viewer)


def _check_can_listen(host: str, port: int) -> None:
    """UsageError, in one line, if ``host:port`` cannot be listened on (in use, no such address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as hypercorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def _on_signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: stopping", signal.Signals(signum).name)
            stop.set()
            return
