"""Following the results container in Tiled live: Tiled's streaming subscriptions, run summaries, catch-up.

:class:`CatalogFollower` keeps one :class:`RunSummary` per result under ``root`` (docs/contract.md,
"Results in Tiled"; ``view/summary.py``) and tells its listeners of every change. It learns of changes from Tiled's
websocket streaming (``tiled.client.stream.ContainerSubscription``, which needs the server's
``streaming_cache``): on the results container (a result created, a result's metadata updated:
every partial map, every final status, every post-scan job record), on each running result's
``od`` array (``ArraySubscription``: one update per OD plane written, the latest OD image) and on
its phase-map arrays (``live_maps.LiveMaps``: the maps' data as written, so the view draws a
running result's phase map without reading it back). It never polls: after each (re)connection it
reads the container once (catch-up) and then listens.

When the websocket closes (Tiled restarting) the listeners hear ``reconnecting``; the follower
connects again with backoff, reads the container again and says ``live``. A restarted server's
memory streaming cache numbers its updates from 1 again, so the subscription always starts from
the server's newest update (never from the last sequence number seen) and the catch-up read
fills the gap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from tiled.client.stream import ArraySubscription, ContainerSubscription

from phasestream.app.view.arrays import read_arrays, read_od_plane
from phasestream.app.view.live_maps import MAX_MESSAGE_BYTES, MAX_METADATA_MESSAGE_BYTES, LiveMaps
from phasestream.app.view.pixel import pixel_spectrum
from phasestream.app.view.summary import RunSummary
from phasestream.contract import FINAL_STATUSES, Status
from phasestream.contract.fields import parse_field_key
from phasestream.contract.metadata import image_shape_of
from phasestream.store.catalog import find
from phasestream.store.tiled import connect, public_uri

__all__ = ["CatalogFollower"]

log = logging.getLogger(__name__)

Listener = Callable[[str, dict], None]
"""``listener(kind, payload)``: ``("run", summary dict)``, ``("connection", {"state": ...})``,
``("snapshot", {"runs": [...]})``."""

MAPS_LINGER_S = 10.0  # a finished result's map subscriptions outlive its final update by this long


class _FollowedContainer(ContainerSubscription):
    """A container subscription that says when its websocket connects and when it is lost, and that
    always starts from the server's newest update (see the module docstring)."""

    def __init__(self, *args, on_connected: Callable[[], None], on_lost: Callable[[], None] = lambda: None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._on_connected, self._on_lost = on_connected, on_lost

    def _connect(self, start: int | None = None, max_size: int = 1_000_000) -> None:
        super()._connect(None, max_size=max_size)  # retried by Tiled (stamina) while the server is down
        self._on_connected()

    def _receive(self) -> None:
        try:
            super()._receive()
        except BaseException:  # the websocket broke: Tiled's loop reconnects (and we catch up then)
            self._on_lost()
            raise


class CatalogFollower:
    """The results under ``root`` in Tiled at ``uri``, followed live; see the module docstring.

    Parameters
    ----------
    uri : Tiled URI (a key in it moves to a header, see ``store.tiled.connect``)
    api_key : Tiled API key; default ``TILED_API_KEY``. Kept in this process only.
    root : the results container (default ``phasestream``)
    client : an open Tiled client to start with (else one is made from ``uri``)
    """

    def __init__(self, uri: str, *, api_key: str | None = None, root: str = "phasestream", client=None,
                 retry_seconds: float = 1.0):
        self.uri, self._api_key, self.root = uri, api_key, root
        self.client = client
        self.runs: dict[str, RunSummary] = {}
        self.state = "connecting"
        self.retry_seconds = retry_seconds
        self._listeners: list[Listener] = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._subscription: _FollowedContainer | None = None
        self._od_subscriptions: dict[str, ArraySubscription] = {}
        self._od_callbacks: dict[str, Callable] = {}  # Tiled's callback registry holds them weakly
        self._live_maps: dict[str, LiveMaps] = {}
        self._maps_lookups: set[str] = set()  # results whose existing map arrays are being looked up
        self._readers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="view-read")

    # -- listeners ------------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _tell(self, kind: str, payload: dict) -> None:
        for listener in list(self._listeners):
            try:
                listener(kind, payload)
            except Exception:
                log.exception("view listener failed")

    def summary(self, uid: str) -> dict | None:
        with self._lock:
            run = self.runs.get(uid)
            return None if run is None else run.as_dict(tiled_base=self.tiled_base, root=self.root)

    def summaries(self) -> list[dict]:
        with self._lock:
            rows = [r.as_dict(tiled_base=self.tiled_base, root=self.root) for r in self.runs.values()]
        return sorted(rows, key=_newest_first)

    @property
    def tiled_base(self) -> str:
        return public_uri(str(self.client.context.api_uri)) if self.client is not None else public_uri(self.uri)

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> CatalogFollower:
        self._thread = threading.Thread(target=self._follow, name="view-follow", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._drop_subscriptions()
        if self._thread is not None:
            self._thread.join(10)

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            log.info("view: Tiled at %s %s", public_uri(self.uri), state)
            self._tell("connection", {"state": state})

    def _follow(self) -> None:
        """Connect, catch up, listen; again after every disconnection, until closed."""
        delay = self.retry_seconds
        while not self._stop.is_set():
            created = False
            try:
                if self.client is None:
                    self.client = connect(self.uri, api_key=self._api_key)
                container = self._results_container()
                if container is None:  # no result yet: wait for the catalog to create the container
                    created = self._wait_for_container()
                    continue
                self._subscription = sub = _FollowedContainer(
                    self.client.context, container.path_parts, structure_clients=container.structure_clients,
                    on_connected=self._connected, on_lost=lambda: self._set_state("reconnecting"))
                sub.child_created.add_callback(self._on_child)
                sub.child_metadata_updated.add_callback(self._on_child)
                sub.start(max_size=MAX_METADATA_MESSAGE_BYTES)  # blocks until the websocket is gone for good
                delay = self.retry_seconds
            except Exception as error:  # noqa: BLE001 - Tiled down or restarting: try again
                log.info("view: Tiled at %s unreachable (%s: %s)", public_uri(self.uri), type(error).__name__,
                         str(error)[:200])
                delay = min(2 * delay, 10.0)
            finally:
                self._drop_subscriptions()
            if not self._stop.is_set() and not created:
                self._set_state("reconnecting")
                self._stop.wait(delay)

    def _wait_for_container(self) -> bool:
        """Listen on the catalog's root until the results container appears; True when it did."""
        appeared = threading.Event()

        def on_created(update) -> None:
            if update.key == self.root.split("/")[0]:
                appeared.set()
                threading.Thread(target=self._drop_subscriptions, daemon=True).start()

        def connected() -> None:
            if self._results_container() is not None:  # created before we listened
                appeared.set()
                threading.Thread(target=self._drop_subscriptions, daemon=True).start()
            else:
                self._set_state("live")
                self._tell("snapshot", {"state": "live", "runs": []})

        self._subscription = sub = _FollowedContainer(self.client.context, [], on_connected=connected)
        self._root_callback = on_created  # the registry holds callbacks weakly
        sub.child_created.add_callback(on_created)
        sub.start(max_size=MAX_METADATA_MESSAGE_BYTES)
        return appeared.is_set()

    def _results_container(self):
        try:
            return self.client[self.root]
        except KeyError:
            return None

    def _drop_subscriptions(self) -> None:
        with self._lock:
            subs = [self._subscription, *self._od_subscriptions.values()]
            live_maps = list(self._live_maps.values())
            self._subscription, self._od_subscriptions, self._live_maps = None, {}, {}
        for sub in subs:
            if sub is not None:
                threading.Thread(target=sub.disconnect, daemon=True).start()  # may wait for its thread
        for live in live_maps:
            live.close()

    def _connected(self) -> None:
        """The websocket is up: read every result once (what happened while it was down), then stream."""
        found = find(self.client, root=self.root)
        with self._lock:
            for uid, node in found.items():
                run = self.runs.setdefault(uid, RunSummary(uid, {}))
                run.absorb(dict(node.metadata))
                run.received_at, run.streamed_at = time.time(), None
            for uid in set(self.runs) - set(found):
                del self.runs[uid]  # replaced or removed while we were away
        for uid, run in list(self.runs.items()):
            if run.metadata.get("status") == Status.RUNNING:
                self._follow_running(uid)
        self._set_state("live")
        self._tell("snapshot", {"state": "live", "runs": self.summaries()})

    # -- updates --------------------------------------------------------------------------------

    def _on_child(self, update) -> None:
        metadata = dict(update.metadata or {})
        if "status" not in metadata:  # not a result's full metadata: read it
            try:
                metadata = dict(self.client[self.root][update.key].metadata)
            except KeyError:
                return
        self.apply(update.key, metadata, timestamp=update.timestamp)

    def apply(self, uid: str, metadata: dict, *, timestamp: datetime | None = None) -> None:
        """Take a result's new metadata (from the stream, with Tiled's ``timestamp``, or a catch-up read)
        and tell the listeners."""
        received = time.time()
        with self._lock:
            run = self.runs.setdefault(uid, RunSummary(uid, {}))
            changed = run.absorb(metadata)
            metadata = run.metadata  # checked (contract/metadata.py)
            run.received_at, run.streamed_at = received, timestamp
            live = self._live_maps.get(uid)
            if live is not None:
                live.mark(timestamp, run.version if changed else None)
        status = metadata["status"]
        if status == Status.RUNNING:
            self._follow_maps(uid, maps_written=bool(metadata["n_energies_seen"]))
            self._follow_running(uid)
        elif status in FINAL_STATUSES:
            self._unfollow(uid)
        if changed:
            self._tell("run", self.summary(uid))

    def _follow_running(self, uid: str) -> None:
        """Subscribe to a running result's ``od`` array (the latest OD plane), once it exists."""
        with self._lock:
            if uid in self._od_subscriptions or self._stop.is_set():
                return
            run = self.runs[uid]
        if run.expected is None:
            run.expected = self._expected(uid)
        try:
            node = self.client[self.root][uid]["od"]
        except KeyError:
            return  # no OD plane yet: the next metadata update tries again
        sub = ArraySubscription(self.client.context, node.path_parts)
        sub.new_data.add_callback(self._od_plane_callback(uid, tuple(node.chunks[0])))
        with self._lock:
            if uid in self._od_subscriptions:
                return
            self._od_subscriptions[uid] = sub
        threading.Thread(target=self._run_od, args=(uid, sub), daemon=True, name=f"view-od-{uid[:8]}").start()

    def _follow_maps(self, uid: str, maps_written: bool) -> None:
        """Follow a running result's phase-map arrays (``live_maps``): its container at once, for the
        arrays' creation; arrays that exist already (a view started mid-run) looked up on a thread."""
        with self._lock:
            if self._stop.is_set():
                return
            live = self._live_maps.get(uid)
            if live is None:
                live = self._live_maps[uid] = LiveMaps(self.client.context, [*self.root.split("/"), uid],
                                                       self.client.structure_clients).start()
                live.mark(self.runs[uid].streamed_at, None)  # the window of the next version opens here
            if not maps_written or not live.missing or uid in self._maps_lookups:
                return
            self._maps_lookups.add(uid)

        def look_up() -> None:
            try:
                for name in live.missing:
                    live.subscribe(name, self.client[f"{self.root}/{uid}/{name}"])
            except Exception as error:  # noqa: BLE001 - maps are read instead; the next update tries again
                log.debug("view: no live maps for %s: %s", uid, error)
            finally:
                with self._lock:
                    self._maps_lookups.discard(uid)

        threading.Thread(target=look_up, daemon=True, name=f"view-maps-{uid[:8]}").start()

    def streamed_maps(self, uid: str, version: int) -> dict[str, Any] | None:
        """The phase-map arrays of map version ``version`` of ``uid`` as Tiled streamed them, or None."""
        with self._lock:
            live = self._live_maps.get(uid)
        return None if live is None else live.arrays(version)

    def _run_od(self, uid: str, sub: ArraySubscription) -> None:
        try:
            sub.start(max_size=MAX_MESSAGE_BYTES)  # one OD plane inline is larger than Tiled's 1 MB default
        except Exception as error:  # noqa: BLE001 - the container subscription reconnects everything
            log.debug("view: od subscription of %s ended: %s", uid, error)
        with self._lock:
            if self._od_subscriptions.get(uid) is sub:
                del self._od_subscriptions[uid]

    def _od_plane_callback(self, uid: str, chunks: tuple[int, ...]):
        """``chunks``: ``od``'s chunk sizes along the energy axis, to place a block write (``write_block``, what
        the worker does when ``num_points`` is known: ``offset`` None, ``block`` (k, 0, 0))."""
        def on_plane(update) -> None:
            patch, block = getattr(update, "patch", None), getattr(update, "block", None)
            offset = getattr(update, "offset", None) or (patch.offset if patch is not None else None)
            shape = patch.shape if patch is not None else getattr(update, "shape", None)
            start = int(offset[0]) if offset else _block_start(int(block[0]), chunks) if block else 0
            count = int(shape[0]) if shape is not None and len(shape) == 3 else 1
            with self._lock:
                run = self.runs.get(uid)
                if run is None:
                    return
                run.od_planes = max(run.od_planes, start + count)
                run.od_version += 1
                run.received_at = time.time()
            self._tell("run", self.summary(uid))

        self._od_callbacks[uid] = on_plane  # the registry holds callbacks weakly
        return on_plane

    def _unfollow(self, uid: str) -> None:
        with self._lock:
            sub = self._od_subscriptions.pop(uid, None)
            self._od_callbacks.pop(uid, None)
            live = self._live_maps.get(uid)
        if sub is not None:
            threading.Thread(target=sub.disconnect, daemon=True).start()
        if live is not None:  # kept a while: the final maps are drawn from it
            timer = threading.Timer(MAPS_LINGER_S, self._drop_live_maps, args=(uid, live))
            timer.daemon = True
            timer.start()

    def _drop_live_maps(self, uid: str, live: LiveMaps) -> None:
        with self._lock:
            if self._live_maps.get(uid) is live:
                del self._live_maps[uid]
        live.close()

    def _expected(self, uid: str) -> int | None:
        """The energies result ``uid`` will see: the raw run's ``num_points`` (TiledWriter keeps the start
        document), divided by the run's number of fields for a field's result (docs/contract.md, "Fields");
        None when unknown."""
        run_uid, fields = uid, 1
        parsed = parse_field_key(uid)
        if parsed is not None:
            run_uid = parsed[0]
            with self._lock:
                field_md = self.runs[uid].metadata.get("field") if uid in self.runs else None
            fields = field_md.get("count") if isinstance(field_md, dict) else None
            if not isinstance(fields, int) or isinstance(fields, bool) or fields < 1:
                return None
        try:
            value = (self.client[run_uid].metadata.get("start") or {}).get("num_points")
        except Exception:  # noqa: BLE001 - no raw run in this catalog: the count is unknown
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % fields:
            return None
        return value // fields

    # -- reading arrays for the images ----------------------------------------------------------

    def image_shape(self, uid: str) -> tuple[int, int] | None:
        """Result ``uid``'s ``image_shape`` (Y, X) as its metadata says, None when unknown."""
        with self._lock:
            run = self.runs.get(uid)
            return None if run is None else image_shape_of(run.metadata)

    def read_arrays(self, uid: str, names: tuple[str, ...]) -> dict[str, Any]:
        """The arrays ``names`` of result ``uid`` that exist, checked before they are read (``arrays.py``)."""
        return read_arrays(self.client, f"{self.root}/{uid}", names, self.image_shape(uid), self._readers)

    def pixel(self, uid: str, y: int, x: int) -> dict[str, Any]:
        """What result ``uid`` holds at pixel ``(y, x)``, checked (``pixel.py``); KeyError when it is not followed."""
        with self._lock:
            md = dict(self.runs[uid].metadata)
        return pixel_spectrum(self.client, f"{self.root}/{uid}", md, y, x, self._readers)

    def read_od_plane(self, uid: str, index: int):
        """OD plane ``index`` of result ``uid``, checked (``arrays.py``), or None when there is none."""
        return read_od_plane(self.client, f"{self.root}/{uid}", index, self.image_shape(uid))


def _block_start(index: int, chunks: tuple[int, ...]) -> int:
    """The first plane of block ``index`` along an axis of ``chunks`` (blocks past them: as large as the last)."""
    return sum(chunks[:index]) + max(0, index - len(chunks)) * (chunks[-1] if chunks else 1)


def _newest_first(row: dict) -> tuple:
    """Most recently updated first (a running result is touched regularly, so it leads)."""
    return (-(row["updated_at"] or 0.0), row["uid"])
