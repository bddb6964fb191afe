"""Fault-injecting proxies on loopback, in front of a real server (Orthanc), for the tests that
prove dicomfs survives a slow or hostile archive: ``FaultProxy`` for HTTP, ``TcpProxy`` for DICOM.

Requests are forwarded byte for byte, and counted by kind (``CountingProxy.kind``), unless a
rule picks them: ``stall`` (read the request, answer nothing), ``trickle`` (forward the answer at
a few KB/s), ``cut`` (forward part of the answer, then reset the connection), ``status`` (answer
5xx/429 with a Retry-After), ``gzip`` (answer with a given gzip'd body: bombs), ``body`` (answer
a given body: deep JSON), ``short`` (announce a Content-Length, send less, close). ``down()``
refuses connections (the listening socket closes, open connections are reset) until ``up()``,
on the same port: an archive that died and came back. Every wait is bounded; ``close()`` ends
all of it.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.servers import CountingProxy, ask_upstream, pass_headers

HOLD_LIMIT = 600.0  # the longest a stalled answer is held (teardown releases it sooner)
RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets the connection


@dataclass
class Rule:
    match: Callable[[str], bool]  # the request path (with query)
    mode: str
    times: int | None = None  # None: every matching request
    rate: int = 10_000  # trickle: bytes per second
    after: int = 0  # cut/short: bytes forwarded (or sent) before the fault
    status: int = 503
    retry_after: str | None = None
    body: bytes = b""
    content_type: str = "application/dicom+json"


class FaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.rules: list[Rule] = []
        self.counts: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()  # requests a rule answered, by mode
        self.lock = threading.Lock()
        self.release = threading.Event()  # set: stalled answers end
        self._connections: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def add(self, rule: Rule) -> Rule:
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()
        self.release.set()
        self.release = threading.Event()

    def retrieves(self) -> int:
        return self.counts["wado-series"]

    # --- the listening socket -----------------------------------------------------------------
    def up(self) -> None:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        server.daemon_threads = True
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def down(self) -> None:
        """Die: new connections are refused, open ones reset."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self.lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.release.set()
        self.release = threading.Event()

    def close(self) -> None:
        self.release.set()
        self.down()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- requests -------------------------------------------------------------------------------
    def _rule_for(self, path: str) -> Rule | None:
        with self.lock:
            for rule in self.rules:
                if rule.match(path) and (rule.times is None or rule.times > 0):
                    if rule.times is not None:
                        rule.times -= 1
                    self.faults[rule.mode] += 1
                    return rule
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with proxy.lock:
                    proxy._connections.add(self.request)

            def finish(self) -> None:
                with proxy.lock:
                    proxy._connections.discard(self.request)
                try:
                    super().finish()
                except OSError:
                    pass

            def do_GET(self) -> None:
                self.close_connection = True
                with proxy.lock:
                    proxy.counts[CountingProxy.kind(self.path)] += 1
                rule = proxy._rule_for(self.path)
                try:
                    if rule is None:
                        self._forward(None)
                    elif rule.mode == "stall":
                        proxy.release.wait(HOLD_LIMIT)
                    elif rule.mode == "status":
                        self.send_response(rule.status)
                        if rule.retry_after is not None:
                            self.send_header("Retry-After", rule.retry_after)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                    elif rule.mode in ("gzip", "body"):
                        self.send_response(200)
                        self.send_header("Content-Type", rule.content_type)
                        if rule.mode == "gzip":
                            self.send_header("Content-Encoding", "gzip")
                        self.send_header("Content-Length", str(len(rule.body)))
                        self.end_headers()
                        self.wfile.write(rule.body)
                    else:  # trickle, cut, short: a real answer, damaged on the way
                        self._forward(rule)
                except OSError:
                    pass  # the client went away

            def _forward(self, rule: Rule | None) -> None:
                upstream, response = ask_upstream(self, proxy.upstream_port, timeout=120)
                try:
                    body_length = response.getheader("Content-Length")
                    pass_headers(self, response, leave_out=("content-length",))
                    data = response.read()  # the test archives are small: read it whole, then misbehave
                    announced = len(data) if body_length is None else int(body_length)
                    if rule is not None and rule.mode == "short":
                        announced = max(announced, rule.after + 1000)
                        data = data[:rule.after]
                    self.send_header("Content-Length", str(announced))
                    self.end_headers()
                    if rule is None or rule.mode == "short":
                        self.wfile.write(data)
                    elif rule.mode == "cut":
                        self.wfile.write(data[:rule.after])
                        self.wfile.flush()
                        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
                        self.request.close()  # a reset, not a clean end
                    elif rule.mode == "trickle":
                        piece = max(rule.rate // 10, 1)
                        for start in range(0, len(data), piece):
                            if proxy.release.is_set():
                                return
                            self.wfile.write(data[start:start + piece])
                            self.wfile.flush()
                            time.sleep(0.1)
                finally:
                    upstream.close()

        return Handler


class TcpProxy:
    """TCP on loopback to ``upstream_port``, byte for byte (a PACS's DICOM port). ``rate`` (bytes
    per second; None for no limit) slows what comes back from the PACS; ``connections()`` counts
    the open ones. Every thread ends at ``close()``."""

    def __init__(self, upstream_port: int, rate: int | None = None) -> None:
        self.upstream_port = upstream_port
        self.rate = rate
        self._closing = threading.Event()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def connections(self) -> int:
        with self._lock:
            return len(self._open) // 2

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._open |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, from_upstream: bool) -> None:
        try:
            while not self._closing.is_set():
                rate = self.rate if from_upstream else None
                if not select.select([source], [], [], 0.2)[0]:
                    continue
                data = source.recv(min(rate // 10, 1 << 16) if rate else 1 << 16)
                if not data:
                    break
                target.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except (OSError, ValueError):  # reset, or closed by the other direction's pump
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                for sock in (source, target):
                    if sock in self._open:
                        self._open.discard(sock)
                        sock.close()

    def close(self) -> None:
        self._closing.set()
        self._listener.close()
        with self._lock:
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
