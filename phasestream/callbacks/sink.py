"""A background thread that writes results to Tiled, so the document hot path never waits on HTTP.

Jobs are callables. Ordered jobs (OD planes, final results) run in submission order;
"latest" jobs carry a key and only the most recent one per key runs (partial maps that are
superseded before they are written are dropped, not queued).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["ResultSink"]

logger = logging.getLogger(__name__)

_STOP = object()


class ResultSink:
    """Runs write jobs on one background thread.

    Parameters
    ----------
    on_error : called as ``on_error(key, exception)`` when a job raises; the thread goes on
    name : thread name
    """

    def __init__(self, *, on_error: Callable[[Any, BaseException], None] | None = None, name: str = "result-sink"):
        self._queue: queue.Queue = queue.Queue()
        self._latest: dict[Any, Callable[[], None]] = {}
        self._lock = threading.Lock()
        self._on_error = on_error
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None], *, key: Any = None) -> None:
        """Queue ``job`` (in order)."""
        self._queue.put((key, job))

    def submit_latest(self, key: Any, job: Callable[[], None]) -> None:
        """Queue ``job`` under ``key``; if an earlier job with this key has not started, it is replaced."""
        with self._lock:
            pending = key in self._latest
            self._latest[key] = job
        if not pending:
            self._queue.put((key, None))

    def cancel_latest(self, key: Any) -> bool:
        """Drop the not-yet-started job queued under ``key`` (superseded); True if there was one."""
        with self._lock:
            return self._latest.pop(key, None) is not None

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                key, job = item
                if job is None:
                    with self._lock:
                        job = self._latest.pop(key, None)
                if job is not None:
                    job()
            except Exception as exc:
                logger.exception("result write failed (%s)", item[0] if isinstance(item, tuple) else item)
                if self._on_error is not None:
                    self._on_error(item[0], exc)
            finally:
                self._queue.task_done()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued job has run; False on timeout."""
        done = threading.Event()
        self.submit(done.set)
        return done.wait(timeout)

    def close(self, timeout: float | None = 30.0) -> None:
        """Run what is queued, then stop the thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)
