"""The live analysis service: PhaseMapCallback plus recovery of runs with lost documents.

When the transport reports lost documents for a run (sequence gap, run without stop), the run
is marked ``partial`` by the callback, and the run is queued here for reprocessing from the raw
run that TiledWriter stored independently: as soon as the raw run is complete in Tiled (its stop
document has arrived), :func:`~phasestream.services.reprocess.reprocess_run` recomputes the
result from the full data. Reprocessing runs on its own thread so the document stream goes on.
"""

from __future__ import annotations

import logging
import threading
import time

from phasestream.callbacks.phase_map import PhaseMapCallback
from phasestream.services.reprocess import ReprocessOptions, reprocess_run
from phasestream.services.tiled import ResultWriter, raw_run_complete

__all__ = ["LiveService"]

logger = logging.getLogger(__name__)


class LiveService:
    """Owns the live callback and the reprocessing of runs that lost documents.

    Parameters
    ----------
    tiled_client : writable Tiled client (raw runs and results)
    recover_after : seconds to wait for a raw run to become complete in Tiled before giving up
    poll_seconds : how often to check whether a raw run is complete
    **callback_options : passed to :class:`PhaseMapCallback`
    """

    def __init__(self, tiled_client, *, recover_after: float = 600.0, poll_seconds: float = 1.0, **callback_options):
        self.client = tiled_client
        self.callback = PhaseMapCallback(tiled_client, **callback_options)
        self.recover_after = float(recover_after)
        self.poll_seconds = float(poll_seconds)
        self.recovered: dict[str, str] = {}  # run uid -> status after reprocessing (or why it was not)
        self._pending: dict[str, float] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._recover_loop, name="reprocess-lost", daemon=True)
        self._thread.start()

    def __call__(self, name: str, doc: dict) -> None:
        self.callback(name, doc)

    def run_incomplete(self, run_uid: str, reason: str) -> None:
        """Transport listener: documents of ``run_uid`` were lost; mark partial, reprocess later."""
        self.callback.run_incomplete(run_uid, reason)
        with self._lock:
            self._pending.setdefault(run_uid, time.monotonic())
        self._wake.set()

    def _recover_loop(self) -> None:
        while not self._closing.is_set():
            self._wake.wait(self.poll_seconds)
            self._wake.clear()
            with self._lock:
                pending = dict(self._pending)
            for uid, since in pending.items():
                if uid in self.callback.active:
                    continue  # the stop may still come; the callback finalizes first
                try:
                    ready = raw_run_complete(self.client, uid)
                except Exception as exc:  # noqa: BLE001 - Tiled unreachable or run not there yet
                    logger.debug("raw run %s not readable yet: %s", uid, exc)
                    ready = False
                if ready:
                    self._reprocess(uid)
                elif time.monotonic() - since > self.recover_after:
                    logger.error("run %s: raw run still incomplete in Tiled after %.0f s; giving up",
                                 uid, self.recover_after)
                    self._done(uid, "raw run incomplete")

    def _reprocess(self, uid: str) -> None:
        options = ReprocessOptions(root=self.callback.root, backend=self.callback.backend)
        try:
            self.callback.flush(60.0)  # the partial result is written before it is replaced
            live_errors = list(self.callback.results[uid].errors) if uid in self.callback.results else []
            result = reprocess_run(self.client, uid, options)
            ResultWriter.open(self.client, uid, root=self.callback.root).update_metadata(
                recovered={"from": "raw run in Tiled", "live_errors": live_errors})
            logger.info("run %s reprocessed from the raw run after lost documents: %s", uid, result.status)
            self._done(uid, result.status)
        except Exception as exc:  # recorded; the service goes on
            logger.exception("run %s: reprocessing after lost documents failed", uid)
            self._done(uid, f"failed: {exc}")

    def _done(self, uid: str, status: str) -> None:
        with self._lock:
            self._pending.pop(uid, None)
            self.recovered[uid] = status

    def wait_recovered(self, uid: str, timeout: float = 60.0) -> str | None:
        """Block until ``uid`` has been reprocessed (or given up); its status, None on timeout."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if uid in self.recovered:
                return self.recovered[uid]
            time.sleep(0.05)
        return None

    def close(self) -> None:
        self._closing.set()
        self._wake.set()
        self._thread.join(10.0)
        self.callback.flush(60.0)
        self.callback.close()
