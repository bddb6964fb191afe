"""The floor of any frame server on hypercorn's trio worker: an ASGI app that answers every GET with
the same bytes, and does nothing else.

    python -m bench.asgi_floor PORT SIZE

``bench/serve.py`` asks it for the same number of frames, from the same clients, as it asks
``dicomfs serve`` and nginx: what hypercorn, h11 and trio cost per request on this machine, with
no lookup, no rendering, no negotiation. Configured as ``dicomfs.server.run`` configures hypercorn.
Runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import functools
import signal
import sys
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from dicomfs.server.app import lifespan


def make_app(size: int) -> Any:
    body = bytes(range(256)) * (size // 256) + bytes(size % 256)
    headers = [(b"content-type", b"application/octet-stream"), (b"content-length", str(len(body)).encode())]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


async def main(port: int, size: int) -> None:
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.include_server_header = False
    stop = trio.Event()

    async def on_signal() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                stop.set()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_signal)
        await nursery.start(functools.partial(serve, make_app(size), config, shutdown_trigger=stop.wait))
        print("listening", flush=True)
        await stop.wait()
        nursery.cancel_scope.deadline = trio.current_time() + 2


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), int(sys.argv[2]))
