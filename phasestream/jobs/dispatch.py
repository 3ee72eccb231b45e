"""Post-scan jobs of the live worker on Dask: submit one job per run, collect its summary by callback.

:class:`DaskPostScan` is what :class:`~phasestream.app.live.LiveService` hands each finished
run's post-scan :class:`~phasestream.jobs.executors.Job` to when it runs with a scheduler. Submitting
never blocks (the document stream goes on); the summary, or the error after ``retries``, reaches
the caller's callbacks on a thread of Dask's client. :meth:`DaskPostScan.close` waits for the jobs
still running.

Example::

    post = DaskPostScan("tcp://10.0.0.5:8786", tiled_uri, api_key=key)
    post.submit(Job(uid, (("refine", {}),)), on_done=print, on_error=print)
    post.close()
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from phasestream.jobs.executors import Job, dask_client, run_job
from phasestream.store.tiled import separate_api_key

__all__ = ["DaskPostScan"]

logger = logging.getLogger(__name__)


class DaskPostScan:
    """Runs post-scan jobs on a Dask cluster, one task per run, each retried ``retries`` times.

    Parameters
    ----------
    scheduler : a ``distributed.Client`` (kept open), a scheduler address (``tcp://HOST:8786``) or
        ``"local"``: a ``LocalCluster`` of ``n_workers`` processes on 127.0.0.1 (both closed by :meth:`close`)
    tiled_uri, api_key : the Tiled server the Dask workers connect to (the key travels in Dask's
        own protocol with each task)
    retries : Dask retries of a task that raised
    n_workers : LocalCluster workers
    """

    def __init__(self, scheduler: Any, tiled_uri: str, *, api_key: str | None = None, retries: int = 2,
                 n_workers: int | None = 1):
        from distributed import Client

        # the key goes beside the URI, hidden from the task's repr in Dask's logs
        self.tiled_uri, self.api_key = separate_api_key(tiled_uri, api_key)
        self.retries = int(retries)
        self._stack = contextlib.ExitStack()
        if isinstance(scheduler, Client):
            self.client = scheduler
        elif scheduler == "local":
            self.client = self._stack.enter_context(dask_client(None, n_workers=n_workers, set_as_default=False))
        else:  # not the default scheduler: the live worker's own Tiled reads stay in its process
            self.client = self._stack.enter_context(dask_client(str(scheduler), set_as_default=False))
        self.address = self.client.scheduler.address
        self._running: set = set()
        self._idle = threading.Condition()

    def submit(self, job: Job, on_done: Callable[[dict], None], on_error: Callable[[str], None]) -> None:
        """Start ``job``; later ``on_done(summary)`` or ``on_error("Type: message")`` on a Dask client thread."""
        job.validate()
        future = self.client.submit(run_job, job, self.tiled_uri, self.api_key, retries=self.retries, pure=False,
                                    key=f"phasestream-live-{job.run_uid}-{time.monotonic_ns()}")
        with self._idle:
            self._running.add(future)
        logger.info("run %s: post-scan job %s submitted to Dask at %s", job.run_uid,
                    [name for name, _ in job.steps], self.address)

        def finished(fut) -> None:
            try:
                if fut.status == "finished":
                    on_done(fut.result())
                else:
                    error = fut.exception() if fut.status == "error" else None
                    on_error(f"{type(error).__name__}: {error}" if error else f"task {fut.status}")
            except Exception:  # a bookkeeping error never stops the other jobs
                logger.exception("run %s: handling the post-scan job's outcome failed", job.run_uid)
            finally:
                with self._idle:
                    self._running.discard(fut)
                    self._idle.notify_all()
                fut.release()

        future.add_done_callback(finished)

    @property
    def n_running(self) -> int:
        with self._idle:
            return len(self._running)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted job has finished and been handled; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._running, timeout)

    def close(self, timeout: float = 600.0) -> None:
        """Wait up to ``timeout`` seconds for the running jobs, then close what this object opened."""
        if not self.wait(timeout):
            logger.warning("%d post-scan jobs still running on Dask after %.0f s; leaving them",
                           self.n_running, timeout)
        self._stack.close()
