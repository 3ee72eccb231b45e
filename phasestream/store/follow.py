"""Follow one run's phase-mapping result in Tiled while a worker elsewhere writes it.

:class:`ResultFollower` watches ``<root>/<run uid>`` (docs/contract.md, "Results in Tiled") on a
thread of its own and hands each new state of the result, a :class:`ResultSnapshot` (status,
energies seen, fractions and the phase maps), to a function. It learns of changes from Tiled's
streaming subscription of the results container (``tiled.client.stream.ContainerSubscription``:
``container-child-created`` and ``container-child-metadata-updated`` of this uid) when the server
has a ``streaming_cache``, and otherwise by reading the result's metadata every ``poll_seconds``.
Polling is the fallback, not the rule: a Tiled server without a streaming cache refuses the
websocket, and the worker touches the metadata only when it publishes maps (or a heartbeat), so
one metadata read per second costs the server little and a viewer sees a new state within a
second. With a subscription the metadata is still read every ``max(poll_seconds, 5)`` s, in case
a message was lost while the websocket reconnected.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from phasestream.contract import Status, check_result_root, check_run_uid
from phasestream.contract.fields import field_key
from phasestream.contract.metadata import shown_metadata

__all__ = ["MAP_ARRAYS", "ResultFollower", "ResultSnapshot"]

logger = logging.getLogger(__name__)

#: the arrays a phase-map view needs (docs/contract.md): phase colour, reliability brightness, grey ambiguous
MAP_ARRAYS = ("phase", "reliability", "ambiguous", "mask")
#: seconds between metadata reads while a streaming subscription also tells of changes
STREAMING_SAFETY_POLL_S = 5.0


@dataclass(frozen=True)
class ResultSnapshot:
    """One state of a run's result: what a view draws.

    ``arrays`` holds the maps of :data:`MAP_ARRAYS` once any were written ((Y, X) each; empty
    before the first partial maps); ``metadata`` is the result metadata of docs/contract.md
    (``phase_fractions``, ``n_energies_seen``, ``status``, ``sample``, ...).
    """

    run_uid: str
    status: str
    n_energies_seen: int
    metadata: dict = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        """The worker will not change the result any more (``complete``, ``partial`` or ``failed``)."""
        return self.status != Status.RUNNING.value


def read_snapshot(container, run_uid: str) -> ResultSnapshot:
    """The result ``container``'s current state (metadata, then the maps present in it)."""
    md = dict(container.metadata)
    n = shown_metadata(md)["n_energies_seen"]  # a count, 0 when it is not one ("seven" followed for good)
    arrays = {}
    if n >= 2:  # maps are computed from two energies on; before that the arrays hold no maps
        keys = set(container.keys())
        arrays = {name: np.asarray(container[name].read()) for name in MAP_ARRAYS if name in keys}
    return ResultSnapshot(run_uid, str(md.get("status", Status.RUNNING.value)), n, md, arrays)


class ResultFollower:
    """Follow ``<root>/<run_uid>`` (a run of several fields: field ``field``'s result, ``<run_uid>.f<field>``) in
    Tiled until its status is final; call ``on_update`` on each new state.

    Parameters
    ----------
    client : a Tiled client (the catalog's root); read access is enough
    run_uid : the run whose result to follow; checked against the uid pattern before it names a
        Tiled key (``".."`` would be the root)
    on_update : called with each new :class:`ResultSnapshot`, on the follower's thread
    root : the results container (``serve --root``)
    poll_seconds : how often the metadata is read without a streaming subscription
    streaming : try Tiled's streaming subscription first (False: poll only)
    connect_timeout : seconds to wait for the websocket before falling back to polling
    field : which field's result to follow when the run was imaged at several positions (0-based)

    ``mode`` says which is in use (``"waiting"`` until the results container exists, then
    ``"streaming"`` or ``"polling"``). :meth:`stop` ends it early; :meth:`join` waits for the end.
    """

    def __init__(self, client, run_uid: str, on_update: Callable[[ResultSnapshot], None], *,
                 root: str = "phasestream", poll_seconds: float = 1.0, streaming: bool = True,
                 connect_timeout: float = 5.0, field: int = 0):
        self.client = client
        self.run_uid = check_run_uid(run_uid)
        self.keys = (self.run_uid, field_key(self.run_uid, field))  # the run's result, or its field's
        self.root = check_result_root(root)
        self.on_update = on_update
        self.poll_seconds = float(poll_seconds)
        self.streaming = bool(streaming)
        self.connect_timeout = float(connect_timeout)
        self.mode = "waiting"
        self.last: ResultSnapshot | None = None
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._subscription = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"follow-{self.run_uid[:12]}")

    def start(self) -> ResultFollower:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop following (the thread ends within one read)."""
        self._stopped.set()
        self._wake.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the result is final (or following stopped); True if it ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive() and self._thread.ident is not None

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                snapshot = self._read()
                if snapshot is not None and self._changed(snapshot):
                    self.last = snapshot
                    try:
                        self.on_update(snapshot)
                    except Exception:  # a view's error must not end the following
                        logger.exception("run %s: the result view failed on an update", self.run_uid)
                if snapshot is not None and snapshot.final:
                    return
                wait = max(self.poll_seconds, STREAMING_SAFETY_POLL_S) if self.mode == "streaming" \
                    else self.poll_seconds
                self._wake.wait(wait)
                self._wake.clear()
        finally:
            self._unsubscribe()

    def _changed(self, snapshot: ResultSnapshot) -> bool:
        last = self.last
        return last is None or (snapshot.status, snapshot.n_energies_seen, snapshot.metadata.get("updated_at")) != \
            (last.status, last.n_energies_seen, last.metadata.get("updated_at"))

    def _read(self) -> ResultSnapshot | None:
        try:
            try:
                results = self.client[self.root]
            except KeyError:  # no result written on this server yet
                return None
            if self.mode == "waiting":
                self._subscribe(results)
            # a run imaged at several positions has one result per field: the chosen field's is followed
            key = next((k for k in self.keys if k in results), None)
            return None if key is None else read_snapshot(results[key], self.run_uid)
        except Exception as exc:  # noqa: BLE001 - Tiled restarting, a write in progress: read again later
            logger.warning("run %s: reading the result from Tiled failed (%s); trying again", self.run_uid, exc)
            return None

    def _subscribe(self, results) -> None:
        """Subscribe to the results container's updates, or fall back to polling (see the module doc)."""
        self.mode = "polling"
        if not self.streaming:
            return
        try:
            subscription = results.subscribe()
            subscription.child_created.add_callback(self._on_stream_update)
            subscription.child_metadata_updated.add_callback(self._on_stream_update)
        except Exception as exc:  # noqa: BLE001 - an older server or client: polling does the job
            logger.info("run %s: no Tiled streaming subscription (%s); polling every %.1f s",
                        self.run_uid, exc, self.poll_seconds)
            return
        # start_in_thread blocks until the websocket is up, and forever when the server refuses it
        # (no streaming_cache): wait on it from a helper thread, at most connect_timeout
        connecting = threading.Thread(target=subscription.start_in_thread, daemon=True, name="follow-connect")
        connecting.start()
        connecting.join(self.connect_timeout)
        if connecting.is_alive():
            logger.info("run %s: Tiled did not open a streaming subscription within %.0f s (a server without a "
                        "streaming_cache); polling every %.1f s", self.run_uid, self.connect_timeout,
                        self.poll_seconds)
            threading.Thread(target=subscription.disconnect, kwargs={"wait": False}, daemon=True).start()
            return
        self._subscription = subscription
        self.mode = "streaming"

    def _on_stream_update(self, update) -> None:
        if getattr(update, "key", None) in self.keys:
            self._wake.set()

    def _unsubscribe(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            try:
                subscription.disconnect()
            except Exception:  # the server may be gone already
                logger.debug("run %s: closing the streaming subscription failed", self.run_uid, exc_info=True)
