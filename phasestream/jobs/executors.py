"""Post-scan jobs and the executors that run them: one job model, one outcome record.

A job is one function ``run(context, run_uid, options) -> JobOutcome`` (:data:`JOBS`:
``reprocess``, ``refine``, ``enhance``, ``methods``, ``denoise``). It reads the run from Tiled through its
:class:`JobContext`, writes its result there and returns a
:class:`~phasestream.contract.JobOutcome`: status, reason, seconds, retry command, details. No
client, socket or array crosses a process boundary: on Dask each task connects to Tiled itself.

A :class:`Job` is the post-scan work of one run: steps run in order in one task, because they
build on each other (reprocess, then enhance, then refine). :func:`run_job` runs them and folds
their outcomes into one. An executor runs jobs and hands each outcome to a callback:

* :class:`InlineExecutor`: a thread of this process (the live worker without a scheduler);
* :class:`DaskExecutor`: one Dask task per run, retried (an address, ``"local"`` or a client).

Both report a job that raised as the same ``failed`` outcome, so whoever submits records the same
shape either way. :func:`run_jobs` and :func:`submit_jobs` run a list of jobs to a
:class:`JobReport` (``phasestream reprocess``).

Example::

    jobs = [Job(uid, (("reprocess", {"backend": "numba"}),)) for uid in uids]
    with dask_client(n_workers=2) as client:
        report = submit_jobs(client, jobs, tiled_uri, api_key=key)
    report.failures   # [{"run_uid": ..., "status": "failed", "reason": "KeyError: ...", ...}]
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from phasestream.contract import JobOutcome, JobStatus
from phasestream.jobs import denoise, enhance, methods, refine, reprocess
from phasestream.jobs.cluster import dask_client, dask_task
from phasestream.jobs.context import JobContext
from phasestream.store.tiled import separate_api_key

__all__ = ["JOBS", "DaskExecutor", "Executor", "InlineExecutor", "Job", "JobContext", "JobReport", "run_job",
           "run_jobs", "submit_jobs"]

logger = logging.getLogger(__name__)

#: job name -> ``run(context, run_uid, options dict) -> JobOutcome``
JOBS: dict[str, Callable[[JobContext, str, dict], JobOutcome]] = {
    "reprocess": reprocess.run,
    "refine": refine.run,
    "enhance": enhance.run,
    "methods": methods.run,
    "denoise": denoise.run,
}


@dataclass(frozen=True)
class Job:
    """The post-scan work for one run: steps ``(job name, options dict)`` run in order in one task."""

    run_uid: str
    steps: tuple[tuple[str, dict], ...] = (("reprocess", {}),)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.steps]

    def validate(self) -> Job:
        if not self.run_uid:
            raise ValueError("a job needs a run uid")
        if not self.steps:
            raise ValueError(f"job for run {self.run_uid} has no steps")
        for name, _ in self.steps:
            if name not in JOBS:
                raise ValueError(f"unknown job {name!r} for run {self.run_uid}; known: {sorted(JOBS)}")
        return self

    def failed(self, error: BaseException | str) -> JobOutcome:
        """The outcome of this job when it raised (after its retries): every executor reports this."""
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        return JobOutcome(self.run_uid, "+".join(self.names), JobStatus.FAILED, reason=text)


_SEVERITY = (JobStatus.COMPLETE, JobStatus.SKIPPED, JobStatus.PARTIAL, JobStatus.FAILED)


def run_job(job: Job, context: JobContext) -> JobOutcome:
    """Run the steps of ``job`` here, in order; one outcome whose ``details["steps"]`` holds each step's.

    After a ``reprocess`` step that wrote one result per field (a run imaged at several positions), each
    later step runs on every field's result (``<uid>.f<index>``), reported as ``"<step> <key>"``.
    ``status`` is ``complete`` when every step completed, else the worst step status (failed, then
    partial, then skipped);
    ``reason`` names each step that did not complete. An exception before any step has finished propagates (an
    executor turns it into :meth:`Job.failed`; Dask retries first); one raised by a later step is that step's
    ``failed`` outcome (``internal error: ...``) and the steps after it still run, so that what the earlier
    steps did (a reprocessed result) is reported as it is, not as failed, and not done again by a retry.
    """
    job.validate()
    t0 = time.perf_counter()
    steps: dict[str, dict] = {}
    status, reasons, retry = JobStatus.COMPLETE.value, [], ""
    targets = [job.run_uid]
    for name, options in job.steps:
        for target in targets:
            try:
                outcome = JOBS[name](context, target, dict(options or {}))
            except Exception as exc:
                if not steps:
                    raise
                logger.exception("run %s: post-scan step %s on %s raised", job.run_uid, name, target)
                outcome = JobOutcome(target, name, JobStatus.FAILED,
                                     reason=f"internal error: {type(exc).__name__}: {exc}")
            label = name if target == job.run_uid else f"{name} {target}"
            steps[label] = outcome.as_dict()
            if not outcome.ok:
                reasons.append(f"{label} {outcome.status}" + (f": {outcome.reason}" if outcome.reason else ""))
                retry = retry or outcome.retry
                if _SEVERITY.index(outcome.status) > _SEVERITY.index(status):
                    status = outcome.status  # a failed step outranks a skipped one, whatever the order
        if name == "reprocess" and outcome.details.get("fields"):
            targets = list(outcome.details["fields"])  # a run of several fields: later steps work on each one
    return JobOutcome(job.run_uid, "+".join(job.names), status, reason="; ".join(reasons),
                      seconds=round(time.perf_counter() - t0, 3), retry=retry, details={"steps": steps})


@dask_task
def _job_task(job: Job, tiled_uri: str, api_key: str | None) -> dict:
    """One Dask task: the job's outcome as a plain dict (JSON types only)."""
    return run_job(job, JobContext(tiled_uri, api_key)).as_dict()


class Executor(Protocol):
    """Runs jobs; each one's :class:`JobOutcome` reaches ``on_done`` (on a thread of the executor)."""

    def submit(self, job: Job, on_done: Callable[[JobOutcome], None]) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...

    def close(self, timeout: float = 600.0) -> None: ...


class _Tracked:
    """What both executors share: the jobs still running, and handing an outcome to its callback."""

    def __init__(self) -> None:
        self._running = 0
        self._idle = threading.Condition()

    def _started(self) -> None:
        with self._idle:
            self._running += 1

    def _finish(self, job: Job, on_done: Callable[[JobOutcome], None], outcome: JobOutcome) -> None:
        try:
            on_done(outcome)
        except Exception:  # a bookkeeping error never stops the other jobs
            logger.exception("run %s: handling the outcome of job %s failed", job.run_uid, outcome.job)
        finally:
            with self._idle:
                self._running -= 1
                self._idle.notify_all()

    @property
    def n_running(self) -> int:
        with self._idle:
            return self._running

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted job has finished and been handled; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._running == 0, timeout)


class InlineExecutor(_Tracked):
    """Runs jobs one after the other on a thread of this process, with ``context``'s Tiled client."""

    def __init__(self, context: JobContext, *, threads: int = 1):
        super().__init__()
        self.context = context
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="post-scan")

    def submit(self, job: Job, on_done: Callable[[JobOutcome], None]) -> None:
        job.validate()
        self._started()
        self._pool.submit(self._run, job, on_done)

    def _run(self, job: Job, on_done: Callable[[JobOutcome], None]) -> None:
        try:
            outcome = run_job(job, self.context)
        except Exception as exc:
            logger.exception("run %s: job %s failed", job.run_uid, job.names)
            outcome = job.failed(exc)
        self._finish(job, on_done, outcome)

    def close(self, timeout: float = 600.0) -> None:
        if not self.wait(timeout):
            logger.warning("%d post-scan jobs still running after %.0f s", self.n_running, timeout)
        self._pool.shutdown(wait=False)


class DaskExecutor(_Tracked):
    """Runs jobs on a Dask cluster, one task per run, each retried ``retries`` times.

    Parameters
    ----------
    scheduler : a ``distributed.Client`` (kept open), a scheduler address (``tcp://HOST:8786``) or
        ``"local"``: a ``LocalCluster`` of ``n_workers`` processes on 127.0.0.1 (both closed by :meth:`close`)
    tiled_uri, api_key : the Tiled server the Dask workers connect to (the key travels in Dask's
        own protocol beside the URI, hidden from the task's repr in Dask's logs)
    """

    def __init__(self, scheduler: Any, tiled_uri: str, *, api_key: str | None = None, retries: int = 2,
                 n_workers: int | None = 1):
        from distributed import Client

        super().__init__()
        self.tiled_uri, self.api_key = separate_api_key(tiled_uri, api_key)
        self.retries = int(retries)
        self._stack = contextlib.ExitStack()
        if isinstance(scheduler, Client):
            self.client = scheduler
        elif str(scheduler).lower() == "local":  # never the configured scheduler ($PHASESTREAM_DASK_SCHEDULER)
            self.client = self._stack.enter_context(dask_client("local", n_workers=n_workers, set_as_default=False))
        else:  # not the default scheduler: the live worker's own Tiled reads stay in its process
            self.client = self._stack.enter_context(dask_client(str(scheduler), set_as_default=False))
        self.address = self.client.scheduler.address

    def submit(self, job: Job, on_done: Callable[[JobOutcome], None]) -> None:
        job.validate()
        self._started()
        future = self.client.submit(_job_task, job, self.tiled_uri, self.api_key, retries=self.retries, pure=False,
                                    key=f"phasestream-{job.run_uid}-{time.monotonic_ns()}")
        logger.info("run %s: job %s submitted to Dask at %s", job.run_uid, job.names, self.address)

        def finished(fut) -> None:
            try:
                if fut.status == "finished":
                    outcome = JobOutcome.from_dict(fut.result())
                else:
                    error = fut.exception() if fut.status == "error" else None
                    logger.warning("run %s failed on Dask after %d retries: %s", job.run_uid, self.retries, error)
                    outcome = job.failed(error if error is not None else f"task {fut.status}")
            except Exception as exc:  # noqa: BLE001 - the result could not be fetched
                outcome = job.failed(exc)
            finally:
                fut.release()
            self._finish(job, on_done, outcome)

        future.add_done_callback(finished)

    def close(self, timeout: float = 600.0) -> None:
        """Wait up to ``timeout`` seconds for the running jobs, then close what this object opened."""
        if not self.wait(timeout):
            logger.warning("%d post-scan jobs still running on Dask after %.0f s; leaving them",
                           self.n_running, timeout)
        self._stack.close()


# ---------------------------------------------------------------------------------------------- batches


@dataclass
class JobReport:
    """What became of a list of jobs: the outcome (as a dict) of each run, complete or not."""

    successes: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def add(self, outcome: JobOutcome) -> None:
        """A run whose outcome is not ``complete`` (partial, failed, skipped) counts as a failure."""
        (self.successes if outcome.ok else self.failures).append(outcome.as_dict())

    def as_dict(self) -> dict:
        return {"successes": self.successes, "failures": self.failures, "seconds": self.seconds,
                "n_runs": len(self.successes) + len(self.failures)}


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="run", disable=not enabled or total < 2)


def _run_all(executor: Executor, jobs: Sequence[Job], progress: bool,
             on_done: Callable[[dict], None] | None) -> JobReport:
    report, lock = JobReport(), threading.Lock()
    t0 = time.perf_counter()
    with _progress(len(jobs), progress, "reprocess") as bar:
        def done(outcome: JobOutcome) -> None:
            with lock:
                report.add(outcome)
                bar.update(1)
            if on_done is not None:
                on_done(outcome.as_dict())

        for job in jobs:
            executor.submit(job, done)
        executor.wait()
    report.seconds = time.perf_counter() - t0
    return report


def run_jobs(jobs: Sequence[Job], tiled_uri: str, *, api_key: str | None = None, progress: bool = False,
             on_done: Callable[[dict], None] | None = None) -> JobReport:
    """Run ``jobs`` one after the other in this process (the reference for :func:`submit_jobs`)."""
    jobs = [job.validate() for job in jobs]
    executor = InlineExecutor(JobContext(tiled_uri, api_key))
    try:
        return _run_all(executor, jobs, progress, on_done)
    finally:
        executor.close()


def submit_jobs(client_or_address, jobs: Iterable[Job], tiled_uri: str, *, api_key: str | None = None,
                retries: int = 2, progress: bool = True, on_done: Callable[[dict], None] | None = None) -> JobReport:
    """Run ``jobs`` on Dask, one task per run, each retried up to ``retries`` times on an exception.

    ``client_or_address``: a ``distributed.Client`` or a scheduler address; ``on_done`` gets each
    run's outcome dict as it finishes. A run that fails is reported and never stops the others.
    """
    from distributed import Client

    jobs = [job.validate() for job in jobs]
    client = client_or_address if isinstance(client_or_address, Client) else \
        Client(client_or_address, timeout="10s", set_as_default=False)
    executor = DaskExecutor(client, tiled_uri, api_key=api_key, retries=retries)
    try:
        return _run_all(executor, jobs, progress, on_done)
    finally:
        executor.close()
        if client is not client_or_address:
            client.close()
