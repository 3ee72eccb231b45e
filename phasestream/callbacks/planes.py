"""What goes to Tiled during a scan, and when: OD planes (pooled buffers, one request for all the
planes that queued up) and partial maps (:class:`PartialMapPolicy`).

While the sink thread is busy (a partial-map upload, say), planes of later frames wait here; the
next write job takes them all, as runs of consecutive planes up to :data:`OD_REQUEST_BYTES` each.
The queue also measures how fast Tiled takes bytes, which prices partial maps
(:mod:`phasestream.callbacks.analysis`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from phasestream.callbacks.settings import AnalysisConfig

__all__ = ["OD_POOL_BYTES", "OD_REQUEST_BYTES", "PartialMapPolicy", "PlanePool", "PlaneQueue"]

# largest OD write request (bytes) when planes queued up: Tiled ingests larger bodies no faster
# per byte (slower, past ~16 MiB)
OD_REQUEST_BYTES = 16 << 20
#: bytes of OD plane buffers kept for reuse while planes wait for the sink (per run): as many
#: as queue up behind a partial-map upload at 2048^2 and 20 frames/s
OD_POOL_BYTES = 512 << 20


class PlanePool:
    """Reusable image buffers for the OD planes that wait for the sink.

    A plane that outlives its frame (queued for writing) would otherwise be a fresh allocation
    every frame; large ones come from the kernel as new, untouched pages, and faulting 16 MB
    in (a 2048^2 float32 plane) costs more than the OD kernel itself (about 40 ms on a VM).
    Buffers handed back after writing are already mapped. At most ``keep_bytes`` are kept.
    """

    def __init__(self, keep_bytes: int = OD_POOL_BYTES):
        self.keep_bytes = int(keep_bytes)
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def copy(self, plane: np.ndarray) -> np.ndarray:
        """A pooled buffer holding a copy of ``plane`` (a new one when none of its shape is free)."""
        with self._lock:
            buffer = next((b for b in self._free if b.shape == plane.shape and b.dtype == plane.dtype), None)
            if buffer is not None:
                self._free.remove(buffer)
        if buffer is None:
            buffer = np.empty_like(plane)
        np.copyto(buffer, plane)
        return buffer

    def release(self, buffer: np.ndarray) -> None:
        """Hand a buffer back once nothing refers to it any more."""
        with self._lock:
            if (len(self._free) + 1) * buffer.nbytes <= self.keep_bytes:
                self._free.append(buffer)


class PlaneQueue:
    """OD planes waiting for the sink; ``schedule()`` queues one write job when the first plane arrives.

    ``write(writer)`` (the job) writes every plane queued by then; ``write_s_per_byte`` is Tiled's
    measured write speed (moving average; None until a request was timed).
    """

    def __init__(self, schedule: Callable[[], None], pool: PlanePool | None = None):
        self.schedule = schedule
        self.pool = pool or PlanePool()
        self.write_s_per_byte: float | None = None
        self._pending: list[tuple[int, np.ndarray]] = []
        self._lock = threading.Lock()
        self._queued = False

    def put(self, index: int, plane: np.ndarray) -> None:
        """Queue the OD plane of energy number ``index`` (a pooled buffer, handed back once written)."""
        with self._lock:
            self._pending.append((index, plane))
            if self._queued:
                return
            self._queued = True
        self.schedule()

    def take(self, *, merge: bool = True) -> list[tuple[int, np.ndarray]]:
        """Runs of consecutive pending OD planes as (start, (n, Y, X) block), at most OD_REQUEST_BYTES each.

        ``merge=False``: the pending (index, (Y, X) plane) as they are, for a writer that writes
        files directly (no request to save; stacking would only copy); hand each plane back to
        the pool (``pool.release``) once written.
        """
        with self._lock:
            pending, self._pending = self._pending, []
            self._queued = False
        if not merge:
            return pending
        runs: list[tuple[int, list[np.ndarray]]] = []
        for index, plane in pending:
            fits = (len(runs[-1][1]) + 1) * plane.nbytes <= OD_REQUEST_BYTES if runs else False
            if fits and runs[-1][0] + len(runs[-1][1]) == index:
                runs[-1][1].append(plane)
            else:
                runs.append((index, [plane]))
        blocks = [(start, np.stack(planes)) for start, planes in runs]
        for _, plane in pending:
            self.pool.release(plane)
        return blocks

    def write(self, writer) -> None:
        """Write the planes queued by now; then, when none came meanwhile, read back what was written (the
        final status waits for that read-back, docs/contract.md#status: done while the sink is idle, at a
        detector's pace it is all but done when the scan ends)."""
        if writer.od_external:  # a file write says nothing about Tiled's upload speed: not measured
            pending = self.take(merge=False)
            try:
                for index, plane in pending:
                    writer.write_od_planes(index, plane[np.newaxis])
            finally:
                for _, plane in pending:
                    self.pool.release(plane)
        else:
            for start, block in self.take():
                t = time.perf_counter()
                writer.write_od_planes(start, block)
                self.measured(block.nbytes, time.perf_counter() - t)
        with self._lock:
            idle = not self._pending
        if idle:
            writer.read_back_od_written()

    def measured(self, nbytes: int, seconds: float) -> None:
        """Track how fast Tiled takes our bytes (s/byte, moving average): it prices partial maps."""
        rate = seconds / max(nbytes, 1)
        self.write_s_per_byte = rate if self.write_s_per_byte is None else 0.7 * self.write_s_per_byte + 0.3 * rate


class PartialMapPolicy:
    """When a run publishes partial maps during the scan.

    After ``update_every`` images or ``update_seconds``, but at most once per ``min_update_seconds``;
    with a ``partial_budget`` they take at most about that fraction of the time: the interval grows
    with their cost (compute here plus write on the sink: the last measured, else their bytes at the
    measured write speed), none starts while one is being written, and none when it could not be
    written well before the last expected image. None either when the final maps are due within
    half an update interval: a write started then would only delay the final result.
    """

    def __init__(self, config: AnalysisConfig):
        self.config = config
        self.since_update = 0  # images since the last partial maps
        self.last_update = time.monotonic()
        self.cost_s = 0.0  # compute + write of the last partial maps
        self.busy = False  # partial maps are being written
        self.n_written = 0

    def cost(self, map_bytes: int, write_s_per_byte: float | None) -> float:
        if self.cost_s or write_s_per_byte is None:
            return self.cost_s
        return map_bytes * write_s_per_byte

    def due(self, n: int, num_points: int | None, image_interval: float, map_bytes: int,
            write_s_per_byte: float | None) -> bool:
        """Whether to publish partial maps now, after the ``n``-th image of ``num_points`` expected."""
        c = self.config
        elapsed = time.monotonic() - self.last_update
        budget = c.partial_budget
        cost = self.cost(map_bytes, write_s_per_byte) if budget is not None else 0.0
        min_gap = c.min_update_seconds if budget is None else max(c.min_update_seconds, cost / budget)
        due = (self.since_update >= c.update_every or elapsed >= c.update_seconds) and elapsed >= min_gap \
            and not (budget is not None and self.busy)
        ending = num_points is not None and num_points - n < max(1, c.update_every // 2)
        if budget is not None and num_points is not None and n >= 2 and not ending:
            ending = (num_points - n) * image_interval < 2 * cost
        return due and n >= 2 and not ending

    def started(self) -> None:
        self.since_update = 0
        self.last_update = time.monotonic()
