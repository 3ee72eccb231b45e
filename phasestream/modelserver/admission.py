"""How many clients the model server lets in at once: connections beyond ``max_connections`` are refused.

Each connection may queue up to ``RECEIVE_QUEUE_PER_CONNECTION`` requests of up to the socket's
``MAXMSGSIZE`` in the server's memory, so the bound per connection is only a bound on the whole server
when the number of connections is bounded too (a client that leaks connections, or many processes at
once). 0MQ has no connection limit of its own; its authentication protocol has the hook: with a ZAP
domain set on the server's socket, every handshake, the NULL mechanism's too, asks a ZAP handler
(RFC 27, ``inproc://zeromq.zap.01`` in the socket's context) whether to let the peer in.
:class:`ConnectionLimit` is that handler: it counts the socket's open connections from its monitor
events (accepted, then disconnected or closed; the connection asking is already counted) and answers
400 beyond the limit. 0MQ then drops that connection and tells the client (its monitor's
``HANDSHAKE_FAILED_AUTH`` with status 400, which :class:`~phasestream.modelserver.client.ModelClient`
reports). Connections over ``inproc://`` never handshake and are not counted.
"""

from __future__ import annotations

import logging
import threading

import zmq
from zmq.utils.monitor import recv_monitor_message

__all__ = ["ZAP_DOMAIN", "ConnectionLimit"]

logger = logging.getLogger(__name__)

#: the ZAP domain of the model server's socket (any non-empty domain makes NULL handshakes ask the handler)
ZAP_DOMAIN = b"phasestream-models"
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_OPENED = zmq.EVENT_ACCEPTED
_ENDED = zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED


class ConnectionLimit:
    """The ZAP handler that refuses connections to ``sock`` beyond ``limit`` open ones (a daemon thread).

    ``open`` and ``refused`` say how many connections are open and how many were refused so far.
    :meth:`close` stops the thread and closes its sockets (before ``sock`` is closed).

    Raises
    ------
    zmq.ZMQError
        when another ZAP handler is already bound in ``context`` (one per context).
    """

    def __init__(self, context: zmq.Context, sock: zmq.Socket, limit: int):
        if limit < 1:
            raise ValueError(f"the connection limit must be >= 1, got {limit}")
        self.limit, self.refused = int(limit), 0
        self._fds: set[int] = set()
        self._zap = context.socket(zmq.REP)
        self._zap.setsockopt(zmq.LINGER, 0)
        try:
            self._zap.bind(_ZAP_ENDPOINT)
        except zmq.ZMQError:
            self._zap.close(linger=0)
            raise
        self._monitor = sock.get_monitor_socket(_OPENED | _ENDED)
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        self._sock = sock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="model-server-admission", daemon=True)
        self._thread.start()

    @property
    def open(self) -> int:
        return len(self._fds)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if not self._thread.is_alive():  # its sockets are the thread's while it runs
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._zap.close(linger=0)

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(self._zap, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll(200))
            # the connection events first: a peer's accept is queued before the handshake that asks about it
            while self._monitor.poll(0):
                self._count(recv_monitor_message(self._monitor))
            if ready.get(self._zap):
                self._answer(self._zap.recv_multipart())

    def _count(self, event: dict) -> None:
        if event["event"] & _OPENED:
            self._fds.add(int(event["value"]))
        elif event["event"] & _ENDED:
            self._fds.discard(int(event["value"]))

    def _answer(self, request: list[bytes]) -> None:
        """The reply to one ZAP request (RFC 27: version, request id, domain, address, identity, mechanism, ...)."""
        if len(request) < 6:  # only libzmq writes here (inproc), so never expected; still answered
            self._zap.send_multipart([b"1.0", request[1] if len(request) > 1 else b"", b"400", b"bad request", b"",
                                      b""])
            return
        request_id, address = request[1], request[3].decode("ascii", "replace")
        if len(self._fds) > self.limit:
            self.refused += 1
            logger.warning("refused a connection from %s: %d connections are open, the limit is %d "
                           "(serve-models --max-connections)", address[:100], len(self._fds) - 1, self.limit)
            self._zap.send_multipart([b"1.0", request_id, b"400", b"too many connections", b"", b""])
            return
        self._zap.send_multipart([b"1.0", request_id, b"200", b"OK", b"", b""])
