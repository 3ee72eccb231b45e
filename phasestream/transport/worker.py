"""Analysis worker side of the document transport: receive, check for losses, dispatch.

``DocumentReceiver`` reads the frames a :class:`~phasestream.transport.wire.DocumentPublisher` sends through
the proxy, checks the per-publisher sequence numbers, survives anything undecodable and hands
``(name, doc)`` to subscribed callbacks. ``RunTracker`` watches the documents for what PUB/SUB cannot tell:
runs hit by a gap, missing events, missing stops, events of unknown descriptors, and tells a listener
(``run_incomplete(run_uid, reason)``) so the run can be marked partial and reprocessed from Tiled; the
documents of a run whose start never arrived are held back from the callback, which could not place them.
``run_worker`` wires both to one document callback and runs until SIGTERM/SIGINT or a stop event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio
import zmq.utils.monitor
from bluesky.callbacks.zmq import RemoteDispatcher
from bluesky.run_engine import DocumentNames

from phasestream.transport.tracking import RunIncompleteListener, RunTracker, log_sparsely
from phasestream.transport.wire import (
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_OUT_ADDRESS,
    WireFormatError,
    deserialize,
    normalize_address,
    open_envelope,
    split_frame,
)

logger = logging.getLogger(__name__)

DocumentCallback = Callable[[str, dict[str, Any]], Any]
GapCallback = Callable[[str, int, int], Any]

FRAME_OVERHEAD = 4096
"""Bytes allowed on top of ``max_message_size`` in 0MQ's own limit: the frame's prefix and document name."""
RECONNECT_GRACE = 0.25
"""Seconds to wait, after a disconnection, for libzmq to announce that it reconnects by itself."""
RESTART_WINDOW = 1000
"""A sequenced message this many numbers or more behind the last one of its publisher, or numbered 1,
starts that publisher's sequence again (a publisher restarted under a fixed id, or a last number that
was never the publisher's): PUB/SUB keeps one publisher's order, so only a few can be duplicates."""
MAX_PUBLISHERS = 1000
"""Publishers whose last sequence number is kept (the least recently heard from are dropped); also the
number of gap sizes kept in ``stats["gaps"]`` (the latest)."""


class DocumentReceiver(RemoteDispatcher):
    """Receive documents from a 0MQ proxy, detect lost messages and dispatch to subscribed callbacks.

    Parameters
    ----------
    address : str or int or tuple
        Output address of the proxy (the receiver connects). A bare port means 127.0.0.1.
    prefix : bytes
        Only frames published with this exact prefix are received (filtered by 0MQ); all when empty.
    max_message_size : int
        Largest payload accepted (bytes). 0MQ itself refuses frames over ``max_message_size + FRAME_OVERHEAD``
        (``ZMQ_MAXMSGSIZE``) before allocating them; payloads in between are counted as undecodable.
    on_gap : callable, optional
        ``on_gap(publisher_id, expected_seq, received_seq)``, called before the document after a gap.
    rcvhwm : int
        0MQ receive high-water mark (messages queued while callbacks are busy).

    Notes
    -----
    bluesky's ``_poll`` prints (not logs) bad messages, dies on an unknown document name, never yields to
    the loop under load, and ``stop()`` closes the loop, so it cannot be called from the loop.
    ``start``, ``stop`` and ``_poll`` are replaced here: ``stop()`` is thread-safe and callable from the
    loop, and one callback raising neither stops the loop nor the other callbacks for that document.
    Payloads carrying a sequence envelope are checked per publisher; bare maps are counted as unsequenced.

    libzmq (4.3) drops a frame over ``ZMQ_MAXMSGSIZE`` by closing the connection as a protocol error, and then
    does not reconnect: the receiver would stay deaf. It therefore watches its connection: a disconnection
    that libzmq does not follow with a reconnection attempt within ``RECONNECT_GRACE`` seconds is counted in
    ``stats["oversize"]``, logged, and the receiver connects again itself. Documents published until the
    subscription is back are lost and show up as a sequence gap (``lost``), like any other loss.
    """

    def __init__(
        self,
        address: str | int | tuple[str, int] = DEFAULT_OUT_ADDRESS,
        *,
        prefix: bytes = b"",
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        on_gap: GapCallback | None = None,
        rcvhwm: int = 1000,
    ):
        super().__init__(normalize_address(address), prefix=prefix, deserializer=deserialize)
        if type(max_message_size) is not int or max_message_size < 1:
            raise ValueError(f"max_message_size must be a positive number of bytes, got {max_message_size!r}")
        self.max_message_size = max_message_size
        self.on_gap = on_gap
        self.rcvhwm = rcvhwm
        self.connected = threading.Event()
        self._last_seq: OrderedDict[str, int] = OrderedDict()  # at most MAX_PUBLISHERS, the least recent dropped
        self._reconnect_timer: asyncio.TimerHandle | None = None
        self._stats: dict[str, Any] = {
            "messages": 0,
            "received": 0,
            "lost": 0,
            "gaps": deque(maxlen=MAX_PUBLISHERS),
            "missed_at_join": 0,
            "out_of_order": 0,
            "restarts": 0,
            "undecodable": 0,
            "oversize": 0,
            "unsequenced": 0,
            "callback_errors": 0,
            "publishers": 0,
        }

    @property
    def stats(self) -> dict[str, Any]:
        """Counters: documents ``received``, ``lost`` (sum of ``gaps`` sizes), ``undecodable`` messages,
        ``oversize`` (connections 0MQ closed over a message larger than allowed), ..."""
        return {**self._stats, "gaps": list(self._stats["gaps"])}

    def subscribe(self, func: DocumentCallback, name: str = "all") -> int:
        """Subscribe ``func(name, doc)``; its exceptions are logged and counted, never propagated."""

        def guarded(doc_name: str, doc: dict[str, Any]) -> None:
            try:
                func(doc_name, doc)
            except Exception:
                self._stats["callback_errors"] += 1
                logger.exception("callback %r raised on %s document %s; continuing", func, doc_name, doc.get("uid"))

        return super().subscribe(guarded, name)

    # -- receive loop -------------------------------------------------------------------------------------

    def _undecodable(self, message: bytes, problem: str) -> None:
        self._stats["undecodable"] += 1
        if log_sparsely(self._stats["undecodable"]):
            logger.error(
                "dropped undecodable message #%d (%d bytes, starts %r) from %s: %s",
                self._stats["undecodable"],
                len(message),
                bytes(message[:32]),
                self.address,
                problem,
            )

    def _check_sequence(self, publisher_id: str, seq: int) -> bool:
        """Record ``seq``; report a gap; False for a duplicate or reordered message (not dispatched).

        A message far behind the last one, or numbered 1, restarts the publisher's sequence
        (``RESTART_WINDOW``): one bad number must not silence a publisher for good."""
        last = self._last_seq.get(publisher_id)
        if last is None:
            self._stats["publishers"] += 1
            if seq > 1:
                self._stats["missed_at_join"] += seq - 1
            if seq > 1 and log_sparsely(self._stats["publishers"]):
                logger.warning(
                    "publisher %s first seen at message %d: %d earlier messages were not received "
                    "(worker started late, or lost before the subscription)",
                    publisher_id,
                    seq,
                    seq - 1,
                )
        elif seq <= last and (seq == 1 or last - seq >= RESTART_WINDOW):
            self._stats["restarts"] += 1
            logger.warning(
                "publisher %s: message %d after %d, its sequence starts again (publisher restarted, or %d "
                "was not its own)",
                publisher_id,
                seq,
                last,
                last,
            )
        elif seq <= last:
            self._stats["out_of_order"] += 1
            logger.warning(
                "publisher %s: message %d after %d, dropped as duplicate/out of order", publisher_id, seq, last
            )
            return False
        elif seq > last + 1:
            lost = seq - last - 1
            self._stats["lost"] += lost
            self._stats["gaps"].append(lost)
            logger.error(
                "publisher %s: %d message(s) lost (expected %d, received %d)", publisher_id, lost, last + 1, seq
            )
            if self.on_gap is not None:
                try:
                    self.on_gap(publisher_id, last + 1, seq)
                except Exception:
                    logger.exception("gap handler %r raised; continuing", self.on_gap)
        self._last_seq[publisher_id] = seq
        self._last_seq.move_to_end(publisher_id)
        if len(self._last_seq) > MAX_PUBLISHERS:
            self._last_seq.popitem(last=False)
        return True

    def handle_message(self, message: bytes) -> None:
        """Decode one frame, check its sequence and dispatch it; problems are logged and counted."""
        self._stats["messages"] += 1
        try:
            prefix, name, payload = split_frame(message)
            if self._prefix and prefix != self._prefix:
                return
            try:
                doc_name = DocumentNames[name]
            except KeyError:
                raise WireFormatError(f"unknown document name {name!r}") from None
            envelope = open_envelope(deserialize(payload, max_message_size=self.max_message_size))
        except WireFormatError as exc:
            self._undecodable(message, str(exc))
            return
        if envelope.seq is None:
            self._stats["unsequenced"] += 1
        elif not self._check_sequence(envelope.publisher_id, envelope.seq):
            return
        self._stats["received"] += 1
        self.process(doc_name, envelope.doc)

    async def _watch_connection(self, socket: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            event = zmq.utils.monitor.parse_monitor_message(await monitor.recv_multipart())
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                logger.info("connected to %s", self.address)
                self.connected.set()
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.connected.clear()
                self._cancel_reconnect()
                self._reconnect_timer = loop.call_later(RECONNECT_GRACE, self._reconnect, socket, monitor)
            elif event["event"] == zmq.EVENT_CONNECT_RETRIED and self._reconnect_timer is not None:
                # the peer went away (proxy stopped, network): libzmq reconnects by itself
                self._cancel_reconnect()
                logger.warning(
                    "disconnected from %s; reconnecting, documents published meanwhile are lost", self.address
                )

    def _cancel_reconnect(self) -> None:
        if self._reconnect_timer is not None:
            self._reconnect_timer.cancel()
            self._reconnect_timer = None

    def _reconnect(self, socket: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket) -> None:
        """Connect again after libzmq closed the connection for good (a protocol error: an oversize message)."""
        self._reconnect_timer = None
        if socket.closed:
            return
        if monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # a busy loop has not read libzmq's news yet
            self._reconnect_timer = asyncio.get_running_loop().call_later(
                RECONNECT_GRACE, self._reconnect, socket, monitor
            )
            return
        self._stats["oversize"] += 1
        if log_sparsely(self._stats["oversize"]):
            logger.error(
                "0MQ closed the connection to %s without reconnecting (#%d): a message larger than "
                "max_message_size=%d bytes (plus %d for the frame) arrived and was dropped unread. Connecting "
                "again; documents published until then are lost",
                self.address,
                self._stats["oversize"],
                self.max_message_size,
                FRAME_OVERHEAD,
            )
        with contextlib.suppress(zmq.ZMQError):  # the endpoint may already be gone
            socket.disconnect(self.address)
        socket.connect(self.address)

    async def _poll(self) -> None:
        self._context = context = zmq.asyncio.Context()
        self._socket = socket = context.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVHWM, self.rcvhwm)
        # refused by libzmq before it allocates the message (see the class notes for what follows)
        socket.setsockopt(zmq.MAXMSGSIZE, self.max_message_size + FRAME_OVERHEAD)
        monitor = socket.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
        )
        watcher = asyncio.get_running_loop().create_task(self._watch_connection(socket, monitor))
        socket.connect(self.address)
        socket.setsockopt(zmq.SUBSCRIBE, self._prefix + b" " if self._prefix else b"")
        try:
            while True:
                self.handle_message(await socket.recv())
                # recv() completes without yielding while messages are queued: let timers and stop() run
                await asyncio.sleep(0)
        finally:
            self._cancel_reconnect()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            socket.disable_monitor()
            monitor.close(linger=0)
            socket.close(linger=0)
            context.term()
            self.connected.clear()

    def start(self) -> None:
        """Receive and dispatch until :meth:`stop` (blocking); the receiver cannot be restarted."""
        if self.closed:
            raise RuntimeError(f"this DocumentReceiver has already run; create a new one for {self.address}")
        self._task = self.loop.create_task(self._poll())
        try:
            self.loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        finally:
            self.closed = True
            self.loop.close()
            logger.info("receiver for %s stopped: %s", self.address, self.stats)

    def stop(self) -> None:
        """Ask the receive loop to end; safe from any thread and from callbacks running on the loop."""
        if self.loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop closed between the check and the call
            self.loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


class DocumentWorker:
    """A :class:`DocumentReceiver` feeding a :class:`RunTracker` and one document callback.

    Parameters
    ----------
    address : str or int or tuple
        Output address of the proxy.
    callback : callable
        ``callback(name, doc)`` for every document, after the tracker has seen it, except the documents of
        a run whose start document was not received (the tracker logs and reports such a run once;
        ``stats["withheld"]`` counts them). Its exceptions are logged and counted; delivery goes on.
    listener : RunIncompleteListener, optional
        Told about runs that lost documents.
    stop_timeout : float
        Seconds without documents after which a run without stop is reported.
    prefix : bytes
        Receive only this publisher prefix.
    max_message_size : int
        Larger messages are dropped (see :class:`DocumentReceiver`).
    """

    def __init__(
        self,
        address: str | int | tuple[str, int],
        callback: DocumentCallback,
        *,
        listener: RunIncompleteListener | None = None,
        stop_timeout: float = 60.0,
        prefix: bytes = b"",
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ):
        self.tracker = RunTracker(listener, stop_timeout=stop_timeout)
        self.receiver = DocumentReceiver(
            address, prefix=prefix, max_message_size=max_message_size, on_gap=self.tracker.message_gap
        )
        self.callback = callback
        self.withheld = 0
        self.receiver.subscribe(self.tracker)
        self.receiver.subscribe(self._deliver)

    def _deliver(self, name: str, doc: dict[str, Any]) -> None:
        if self.tracker.analysable(name, doc):
            self.callback(name, doc)
        else:
            self.withheld += 1

    @property
    def connected(self) -> threading.Event:
        """Set while the receiving socket is connected to the proxy."""
        return self.receiver.connected

    @property
    def stats(self) -> dict[str, Any]:
        """Receiver counters plus the tracker's (``runs_started``, ``reports``, ``missing_events``, ...)."""
        return {
            **self.receiver.stats,
            **self.tracker.stats,
            "incomplete_runs": len(self.tracker.incomplete),
            "withheld": self.withheld,
        }

    def stop(self) -> None:
        """Stop :meth:`run` from any thread."""
        self.receiver.stop()

    def run(self, stop_event: threading.Event | None = None) -> dict[str, Any]:
        """Receive until SIGTERM/SIGINT (main thread only), ``stop_event`` is set or :meth:`stop`; the stats."""
        loop = self.receiver.loop
        check_every = min(1.0, max(0.05, self.tracker.stop_timeout / 4))

        def check_timeouts() -> None:
            self.tracker.check_timeouts()
            loop.call_later(check_every, check_timeouts)

        def check_stop_event() -> None:
            if stop_event.is_set():
                self.receiver.stop()
            else:
                loop.call_later(0.05, check_stop_event)

        loop.call_later(check_every, check_timeouts)
        if stop_event is not None:
            loop.call_soon(check_stop_event)
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.getsignal(sig)
                loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            self.receiver.start()
        finally:
            for sig, handler in previous.items():  # closing the loop reset them to the defaults
                signal.signal(sig, handler)
        stats = self.stats
        logger.info("worker stopped: %s", stats)
        return stats

    def _on_signal(self, sig: int) -> None:
        logger.info("received %s; stopping the worker", signal.Signals(sig).name)
        self.receiver.stop()


def run_worker(
    address: str | int | tuple[str, int],
    callback: DocumentCallback,
    *,
    listener: RunIncompleteListener | None = None,
    stop_timeout: float = 60.0,
    stop_event: threading.Event | None = None,
) -> dict[str, Any]:
    """Receive documents from the proxy at ``address`` and feed ``callback`` until told to stop (blocking).

    Parameters
    ----------
    address : str or int or tuple
        Output address of the proxy, e.g. ``"tcp://127.0.0.1:5578"``.
    callback : callable
        ``callback(name, doc)``; an exception for one document is logged and delivery goes on.
    listener : RunIncompleteListener, optional
        Told (``run_incomplete(run_uid, reason)``) about runs that lost documents.
    stop_timeout : float
        Seconds after a run's last document at which a missing stop is reported.
    stop_event : threading.Event, optional
        Returns soon after it is set; SIGTERM and SIGINT also stop the worker in the main thread.

    Returns
    -------
    dict
        Counters: ``received``, ``lost``, ``gaps``, ``undecodable``, ``callback_errors``, ``reports``, ...
    """
    worker = DocumentWorker(address, callback, listener=listener, stop_timeout=stop_timeout)
    return worker.run(stop_event)
