"""A running result's phase-map arrays as Tiled streams them, so the view draws a map without reading it back.

The worker overwrites ``phase``, ``reliability`` and ``ambiguous`` in place with every partial and
final map (``ResultWriter.write_maps``: one PUT of each whole array, the three concurrently), and
then updates the result's metadata (``n_energies_seen``, fractions, status). Tiled streams each
whole-array write to the array's subscribers with the bytes inline (an ``array-data`` message, sent
as the write arrives, before it is stored); the metadata update reaches the results container's
subscribers. Messages carry the Tiled server's timestamp.

So the arrays behind the maps of a metadata update U are the writes that Tiled received between
the result's metadata update before U and U itself. :meth:`LiveMaps.arrays` hands them out only
when, for each of the three arrays, that window holds at least one whole-array message with its
data inline and the same number as the other two (one write each, or the same number of
concurrent rounds), and the latest of each is taken: the three are then from one round of
writes, the round that U followed. Anything else (an update whose window holds no write: an
error recorded, a heartbeat in between; a write that arrived before the subscription; a message
still on its way after a short wait) answers None, and the view reads the arrays from Tiled as
before.

The view subscribes to the result container as soon as the result runs, and to each map array as
soon as Tiled announces it (``container-child-created``), from the first update Tiled's streaming
cache still holds (``start=1``): the write that created the array (the run's first map) is
replayed even when it went in before the array's subscription did. Arrays that already existed
when the view started following the result are followed from their next update only (a long
run's history is not replayed).

The windows compare the server's own clocks: with several Tiled servers behind one Redis
streaming cache they must be synchronised (NTP) to well under the time between a map write and
its metadata update.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from tiled.client.stream import ArraySubscription, ContainerSubscription

from phasestream.contract import DEFAULT_MAX_NUM_POINTS
from phasestream.references import MAX_PHASES

__all__ = ["MAP_ARRAYS", "MAX_MESSAGE_BYTES", "MAX_METADATA_MESSAGE_BYTES", "LiveMaps"]

log = logging.getLogger(__name__)

MAP_ARRAYS = ("phase", "reliability", "ambiguous")
"""The arrays of the phase map (``render.phase_png``), streamed together."""

MAX_MESSAGE_BYTES = 64 * 2**20
"""The largest streamed update the view accepts: a whole result array (or OD block) inline.
Tiled's client default (1 MB) is smaller than one 512x512 float32 map."""

MAX_METADATA_MESSAGE_BYTES = 2 * 9 * (MAX_PHASES + 1) * DEFAULT_MAX_NUM_POINTS + 8 * 2**20
"""The largest update the view accepts on a container subscription (a result's metadata inline): twice the
largest the worker writes at its default bounds, its ``reference_values`` (K x E) and ``energies_eV`` (E) at
9 bytes of msgpack a number (K = ``MAX_PHASES``, E = ``DEFAULT_MAX_NUM_POINTS``), plus 8 MiB for the rest
(the start document's ``sample`` and ``phasestream`` blocks, at most 64 KiB of JSON each; errors; job records):
about 55 MB. Tiled's client default (1 MB) is less than 12 phases at 10,000 energies. A larger message ends the
subscription; the view then connects again and reads the results (docs/cli.md, "view")."""

KEPT = 4  # messages kept per array: a window rarely holds more than one


@dataclass(frozen=True)
class _Message:
    timestamp: datetime
    update: Any  # tiled's LiveArrayData of a whole-array write, or None (a block, a patch, a reference)


class LiveMaps:
    """Subscriptions to a running result's phase-map arrays; see the module docstring.

    Parameters
    ----------
    context : the Tiled client context
    path_parts : the result container's path in Tiled
    structure_clients : the Tiled client's structure clients (to make clients of announced arrays)
    """

    def __init__(self, context, path_parts: list[str], structure_clients):
        self._context = context
        self._messages: dict[str, deque[_Message]] = {name: deque(maxlen=KEPT) for name in MAP_ARRAYS}
        self._changed = threading.Condition()
        self._closed = False
        self._last_mark: datetime | None = None
        self._window: tuple[int, datetime, datetime] | None = None  # (version, after, before)
        self._subscriptions: dict[str, Any] = {}
        self._callbacks: list = []  # held: Tiled's callback registries keep callbacks weakly
        self._container = ContainerSubscription(context, path_parts, structure_clients=structure_clients)
        self._callbacks.append(self._on_child)
        self._container.child_created.add_callback(self._on_child)

    def start(self) -> LiveMaps:
        options = {"max_size": MAX_METADATA_MESSAGE_BYTES}  # children's metadata inline
        threading.Thread(target=self._run, args=("result", self._container, options), daemon=True,
                         name="view-map-result").start()
        return self

    @property
    def missing(self) -> list[str]:
        """The map arrays not subscribed to yet."""
        with self._changed:
            return [name for name in MAP_ARRAYS if name not in self._subscriptions]

    def subscribe(self, name: str, node, *, replay: bool = False) -> None:
        """Follow map array ``name`` (its Tiled client ``node``); with ``replay``, from the oldest update Tiled
        still holds (an array just created: its first write), else from the next one."""
        sub = ArraySubscription(self._context, node.path_parts)
        receive = self._receiver(name, tuple(node.shape), np.dtype(node.dtype))
        sub.new_data.add_callback(receive)
        with self._changed:  # started under the lock: close() never misses it
            if name in self._subscriptions or self._closed:
                return
            self._subscriptions[name] = sub
            self._callbacks.append(receive)
            threading.Thread(target=self._run, args=(name, sub, {"start": 1 if replay else None,
                                                                 "max_size": MAX_MESSAGE_BYTES}),
                             daemon=True, name=f"view-map-{name}").start()

    def _on_child(self, update) -> None:
        if update.key in MAP_ARRAYS and update.structure_family == "array":
            try:
                self.subscribe(update.key, update.child(), replay=True)
            except Exception as error:  # noqa: BLE001 - the maps are read from Tiled instead
                log.debug("view: cannot follow %s: %s", update.key, error)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            subs = [self._container, *self._subscriptions.values()]
            self._window = None
            self._changed.notify_all()
        for sub in subs:
            threading.Thread(target=sub.disconnect, daemon=True).start()  # may wait for its thread

    def _run(self, name: str, sub, options: dict) -> None:
        try:
            sub.start(**options)
        except Exception as error:  # noqa: BLE001 - the maps are read from Tiled instead
            log.debug("view: %s subscription ended: %s", name, error)

    def _receiver(self, name: str, shape: tuple[int, ...], dtype: np.dtype):

        def receive(update) -> None:
            whole = (getattr(update, "type", None) == "array-data" and update.offset is None
                     and update.block is None and tuple(update.shape) == shape
                     and update.data_type.to_numpy_dtype() == dtype)
            with self._changed:
                self._messages[name].append(_Message(update.timestamp, update if whole else None))
                self._changed.notify_all()

        return receive

    def mark(self, timestamp: datetime | None, version: int | None) -> None:
        """A metadata update of the result, as the container stream delivered it (in order).

        ``timestamp``: Tiled's, None when the update did not come from the stream (a catch-up
        read); ``version``: the view's new map version when the update bumped it, else None.
        """
        with self._changed:
            after, self._last_mark = self._last_mark, timestamp
            if version is not None:
                self._window = (version, after, timestamp) if after is not None and timestamp is not None else None
            self._changed.notify_all()

    def arrays(self, version: int, timeout: float = 0.15) -> dict[str, np.ndarray] | None:
        """The three arrays of map version ``version`` as streamed, or None (read them from Tiled).

        Waits up to ``timeout`` seconds for messages still on their way (they travel on their
        own websockets, so they can arrive just after the metadata update that follows them).
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                window = self._window
                if window is None or window[0] != version:
                    return None
                chosen = self._round(window[1], window[2])
                remaining = deadline - time.monotonic()
                if chosen is not None or remaining <= 0:
                    break
                self._changed.wait(remaining)
        if chosen is None:
            return None
        try:
            return {name: message.update.data() for name, message in chosen.items()}
        except Exception as error:  # noqa: BLE001 - a payload that does not decode: read the arrays instead
            log.warning("view: streamed map arrays of version %d do not decode (%s); reading them", version, error)
            return None

    def _round(self, after: datetime, before: datetime) -> dict[str, _Message] | None:
        chosen, counts = {}, set()
        for name in MAP_ARRAYS:
            inside = [m for m in self._messages.get(name, ()) if after < m.timestamp < before]
            if not inside or inside[-1].update is None:
                return None
            chosen[name] = inside[-1]
            counts.add(len(inside))
        return chosen if len(counts) == 1 else None
