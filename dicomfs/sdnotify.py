"""systemd's readiness protocol: ``READY=1`` and ``STOPPING=1`` to ``$NOTIFY_SOCKET``.

Owns sending one notification (abstract socket names included), for the mount daemon and
``dicomfs serve`` alike. Must not decide when a service is ready: its callers do.
"""

from __future__ import annotations

import os
import socket


def sd_notify(message: str) -> None:
    """Send ``message`` to systemd's notification socket, if there is one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
