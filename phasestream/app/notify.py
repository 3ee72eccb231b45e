"""Readiness for systemd (``Type=notify``): ``READY=1`` on ``$NOTIFY_SOCKET`` once a service serves.

The protocol is one datagram of ``KEY=VALUE`` lines on the Unix socket systemd names in
``NOTIFY_SOCKET`` (a leading ``@`` is the abstract namespace), as sd_notify(3) describes; without
the variable (a terminal, ``phasestream up``, honcho) nothing is sent. Written here rather than
taken from ``systemd-python``, which needs libsystemd's headers to build, for one ``sendto``.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["notify"]

logger = logging.getLogger(__name__)


def notify(*, ready: bool = False, stopping: bool = False, status: str | None = None) -> bool:
    """Tell systemd the service is ready (or stopping), with a status line; whether it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    lines = [*(["READY=1"] if ready else []), *(["STOPPING=1"] if stopping else []),
             *([f"STATUS={status}"] if status else [])]
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode())
    except OSError as exc:  # systemd went away, or the socket is not ours to write: the service goes on
        logger.warning("could not notify systemd at NOTIFY_SOCKET: %s", exc)
        return False
    return True
