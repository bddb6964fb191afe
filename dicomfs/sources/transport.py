"""An httpx transport whose connections read the socket in large pieces.

httpcore reads an HTTP/1.1 body 64 KiB at a time; every piece then costs a trip through h11,
httpx and trio (cancel scopes, events), which was most of the CPU of a series retrieve while
retrieves ran through httpx (they now run in worker threads, ``threadhttp``; httpx carries bucket
listings and small whole objects). Asking the socket for up to ``READ_SIZE`` at once (the
kernel returns what it has) cuts those trips several-fold on a fast link. Owns only that;
everything else is httpx's default transport.
"""

from __future__ import annotations

import ssl
import typing

import httpcore
import httpx

READ_SIZE = 1 << 20


class LargeReadTransport(httpx.AsyncHTTPTransport):
    def __init__(self, limits: httpx.Limits, *, tls: bool = True) -> None:
        # Certificates load once (tens of milliseconds), and only for an https archive; without
        # them a TLS connection cannot be verified, so it fails rather than going unchecked.
        ssl_context = httpx.create_ssl_context() if tls else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        super().__init__(limits=limits, verify=ssl_context)
        # httpx builds its pool without a way to pass a network backend: build the same pool
        # with one (the pool is the only thing this transport changes).
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_LargeReads(_default_backend()),
        )


def _default_backend() -> httpcore.AsyncNetworkBackend:
    from httpcore._backends.auto import AutoBackend

    return AutoBackend()


class _LargeReads(httpcore.AsyncNetworkBackend):
    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: typing.Iterable[typing.Any] | None = None) -> httpcore.AsyncNetworkStream:
        return _LargeReadStream(await self._inner.connect_tcp(host, port, timeout, local_address, socket_options))

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: typing.Iterable[typing.Any] | None = None
                                  ) -> httpcore.AsyncNetworkStream:
        return _LargeReadStream(await self._inner.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _LargeReadStream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max(max_bytes, READ_SIZE), timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        return _LargeReadStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)
