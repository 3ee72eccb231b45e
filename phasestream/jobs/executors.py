"""Post-scan jobs on Dask distributed: one task per run, retries, a summary of successes and failures.

A job is a plain function of (tiled uri, run uid, options) that returns a small JSON-able summary
(:data:`JOBS`: ``reprocess``, ``refine``, ``enhance`` and, when the methods module is installed,
``methods``). No client, socket or array crosses a process boundary: each task connects to Tiled
itself, reads the run, writes its result there and returns the summary.

:func:`submit_jobs` runs a list of :class:`Job` on a ``distributed.Client`` (an existing
scheduler, ``tcp://HOST:8786``, or the :func:`dask_client` default, a ``LocalCluster`` on
127.0.0.1) with retries; a run that fails is reported and never stops the others.
:func:`run_jobs` runs the same list in this process, the reference the Dask path is tested
against.

Example::

    jobs = [Job(uid, (("reprocess", {"backend": "numba"}),)) for uid in uids]
    with dask_client(n_workers=2) as client:
        report = submit_jobs(client, jobs, tiled_uri, api_key=key)
    report.failures   # [{"run_uid": ..., "error": "KeyError: ...", ...}]
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from phasestream.store.tiled import api_key_scope, separate_api_key

__all__ = [
    "DEFAULT_SCHEDULER_ENV",
    "JOBS",
    "WORKER_CONFIG",
    "WORKER_ENV",
    "Job",
    "JobReport",
    "dask_client",
    "dask_task",
    "gather_all",
    "run_job",
    "run_jobs",
    "submit_jobs",
    "submit_tasks",
]

logger = logging.getLogger(__name__)

#: environment variable naming an existing Dask scheduler (``tcp://HOST:8786``)
DEFAULT_SCHEDULER_ENV = "PHASESTREAM_DASK_SCHEDULER"


def _reprocess(tiled_uri: str, run_uid: str, options: dict) -> dict:
    from phasestream.jobs.reprocess import reprocess

    return reprocess(tiled_uri, run_uid, options)


def _refine(tiled_uri: str, run_uid: str, options: dict) -> dict:
    from phasestream.jobs.refine import refine

    summary = refine(tiled_uri, run_uid, options)
    return {**summary, "status": summary["refinement"]["status"]}


def _enhance(tiled_uri: str, run_uid: str, options: dict) -> dict:
    from phasestream.jobs.enhance import enhance

    summary = enhance(tiled_uri, run_uid, options)
    return {**summary, "status": summary["enhancement"]["status"]}


def _methods_job() -> Callable[[str, str, dict], dict] | None:
    """The ``methods`` job (LCF, unmixing) when ``phasestream.jobs.methods`` provides it."""
    try:
        from phasestream.jobs.methods import MethodsOptions, run_methods  # noqa: F401
    except ImportError:
        return None

    def _methods(tiled_uri: str, run_uid: str, options: dict) -> dict:
        from phasestream.jobs.methods import MethodsOptions, run_methods
        from phasestream.store.tiled import connect

        opts = MethodsOptions(**options)
        record = run_methods(connect(tiled_uri), run_uid, opts)
        failed = {name: entry for name, entry in record.items()
                  if (name in opts.methods or name == "_job") and entry.get("status") != "complete"}
        status = "complete" if not failed else "failed"
        errors = [f"{name}: {'; '.join(entry.get('errors') or [])}" for name, entry in failed.items()]
        return {"run_uid": run_uid, "status": status, "methods": record, "errors": errors}

    return _methods


def _registry() -> dict[str, Callable[[str, str, dict], dict]]:
    jobs: dict[str, Callable[[str, str, dict], dict]] = {
        "reprocess": _reprocess,
        "refine": _refine,
        "enhance": _enhance,
    }
    methods = _methods_job()
    if methods is not None:
        jobs["methods"] = methods
    return jobs


#: job name -> function of (tiled uri, run uid, options dict) returning a JSON-able summary with ``status``
JOBS: dict[str, Callable[[str, str, dict], dict]] = _registry()


@dataclass(frozen=True)
class Job:
    """The post-scan work for one run: steps ``(job name, options dict)`` run in order in one task.

    Steps of one run stay in one task because they build on each other (reprocess, then enhance,
    then refine); different runs are independent tasks.
    """

    run_uid: str
    steps: tuple[tuple[str, dict], ...] = (("reprocess", {}),)

    def validate(self) -> Job:
        if not self.run_uid:
            raise ValueError("a job needs a run uid")
        if not self.steps:
            raise ValueError(f"job for run {self.run_uid} has no steps")
        for name, _ in self.steps:
            if name not in JOBS:
                raise ValueError(f"unknown job {name!r} for run {self.run_uid}; known: {sorted(JOBS)}")
        return self


@dataclass
class JobReport:
    """What became of a list of jobs: one summary per successful run, one error per failed run."""

    successes: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict:
        return {"successes": self.successes, "failures": self.failures, "seconds": self.seconds,
                "n_runs": len(self.successes) + len(self.failures)}


def dask_task(fn: Callable) -> Callable:
    """Decorate a function that runs as a Dask task: the dask arrays it computes stay in its process.

    Tiled's client reads arrays through dask, and dask inside a task hands such computations to
    the cluster by default: the chunks would travel between workers, and the task would hold its
    worker's only thread while waiting for them (a deadlock once every thread does, seen as a
    job that never ends). Here they run on this process's threads.
    """

    @functools.wraps(fn)
    def task(*args: Any, **kwargs: Any) -> Any:
        import dask

        with dask.config.set(scheduler="threads"):
            return fn(*args, **kwargs)

    return task


def submit_tasks(dask, fn: Callable, args_list: Sequence[tuple], *, retries: int, tag: str) -> list:
    """``fn(*args)`` as one Dask task per tuple of ``args_list``, each retried ``retries`` times.

    Keys ``phasestream-<tag>-<i>-<ns>``: recognizable on the cluster, and never a cached result.
    """
    return [dask.submit(fn, *args, retries=retries, pure=False, key=f"phasestream-{tag}-{i}-{time.monotonic_ns()}")
            for i, args in enumerate(args_list)]


def gather_all(futures: Sequence, labels: Sequence[str], error: type[Exception] = RuntimeError,
               prefix: str = "") -> list:
    """Results of ``futures`` in order, each waited for; one ``error`` naming every failed one.

    The message is ``prefix`` then ``"<label>: <Type>: <message>"`` per failure, joined by ``"; "``.
    """
    results, errors = [], []
    for label, future in zip(labels, futures, strict=True):
        try:
            results.append(future.result())
        except Exception as exc:  # noqa: BLE001 - every failure is reported together
            errors.append(f"{label}: {type(exc).__name__}: {exc}")
        finally:
            future.release()
    if errors:
        raise error(prefix + "; ".join(errors))
    return results


@dask_task
def run_job(job: Job, tiled_uri: str, api_key: str | None = None) -> dict:
    """Run the steps of ``job`` here; the summary of each step under ``steps``.

    ``status`` is ``complete`` when every step completed, else the first other step status (e.g.
    ``partial``, ``skipped``). Exceptions propagate (Dask retries the task, then reports it).
    The steps connect to ``tiled_uri`` with ``api_key`` (or the URI's key) sent in a header.
    """
    job.validate()
    uri, api_key = separate_api_key(tiled_uri, api_key)
    t0 = time.perf_counter()
    steps: dict[str, dict] = {}
    status = "complete"
    with api_key_scope(api_key):
        for name, options in job.steps:
            summary = JOBS[name](uri, job.run_uid, dict(options or {}))
            steps[name] = summary
            if status == "complete" and summary.get("status") != "complete":
                status = str(summary.get("status"))
    return {"run_uid": job.run_uid, "status": status, "steps": steps, "seconds": time.perf_counter() - t0}


def _failure(job: Job, error: BaseException | str) -> dict:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return {"run_uid": job.run_uid, "status": "failed", "error": text}


def _step_reason(step: dict) -> str:
    record = step.get("refinement") or step.get("enhancement") or {}
    return str(record.get("reason") or "; ".join(step.get("errors") or []))


def _record(report: JobReport, summary: dict) -> None:
    """A summary whose status is not ``complete`` (partial, failed, skipped) counts as a failure."""
    if summary["status"] == "complete":
        report.successes.append(summary)
        return
    reasons = [f"{name} {step.get('status')}" + (f": {_step_reason(step)}" if _step_reason(step) else "")
               for name, step in summary["steps"].items() if step.get("status") != "complete"]
    report.failures.append({**summary, "error": "; ".join(reasons)})


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="run", disable=not enabled or total < 2)


def run_jobs(jobs: Sequence[Job], tiled_uri: str, *, api_key: str | None = None, progress: bool = False,
             on_done: Callable[[dict], None] | None = None) -> JobReport:
    """Run ``jobs`` one after the other in this process (the reference for :func:`submit_jobs`)."""
    jobs = [job.validate() for job in jobs]
    report = JobReport()
    t0 = time.perf_counter()
    with _progress(len(jobs), progress, "reprocess") as bar:
        for job in jobs:
            try:
                summary = run_job(job, tiled_uri, api_key)
            except Exception as exc:  # noqa: BLE001 - one failed run never stops the others
                logger.warning("run %s failed: %s", job.run_uid, exc)
                summary = _failure(job, exc)
                report.failures.append(summary)
            else:
                _record(report, summary)
            if on_done is not None:
                on_done(summary)
            bar.update(1)
    report.seconds = time.perf_counter() - t0
    return report


#: Dask configuration of phasestream's workers: no statistical profiler. It samples every thread
#: with ``sys._current_frames()`` every 10 ms, which on CPython 3.11 before 3.11.9 can deadlock the
#: whole worker process against the garbage collector (python/cpython#106883, dask/distributed#8616;
#: seen here as a reprocess job that never ended). ``dask worker`` processes get it through the
#: environment: :data:`WORKER_ENV`.
WORKER_CONFIG = {"distributed.worker.profile.enabled": False}
WORKER_ENV = {"DASK_" + key.upper().replace(".", "__").replace("-", "_"): str(value)
              for key, value in WORKER_CONFIG.items()}


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, *, n_workers: int | None = None,
                threads_per_worker: int = 1, set_as_default: bool = True) -> Iterator[Any]:
    """A ``distributed.Client``: to ``scheduler`` (or ``$PHASESTREAM_DASK_SCHEDULER``) when given,
    else to a ``LocalCluster`` on 127.0.0.1 (worker processes, no dashboard) closed on exit.

    Parameters
    ----------
    scheduler : address of an existing scheduler, e.g. ``tcp://10.0.0.5:8786``
    n_workers : LocalCluster only; default the number of cores (at most 4)
    threads_per_worker : LocalCluster only; 1 because the kernels use every core of a process
    set_as_default : make it Dask's default scheduler in this process; False keeps this process's own
        Dask computations (the Tiled client reads arrays with dask) here, as a live worker wants
    """
    from distributed import Client, LocalCluster

    address = scheduler or os.environ.get(DEFAULT_SCHEDULER_ENV) or None
    if address:
        client = Client(address, timeout="10s", set_as_default=set_as_default)
        try:
            yield client
        finally:
            client.close()
        return
    import dask

    workers = n_workers or max(1, min(4, os.cpu_count() or 1))
    env = {"NUMBA_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}
    # the nannies hand this configuration to their worker processes
    with dask.config.set(WORKER_CONFIG), \
            LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                         host="127.0.0.1", dashboard_address=None, env=env) as cluster, \
            Client(cluster, set_as_default=set_as_default) as client:
        yield client


def submit_jobs(client_or_address, jobs: Iterable[Job], tiled_uri: str, *, api_key: str | None = None,
                retries: int = 2, progress: bool = True,
                on_done: Callable[[dict], None] | None = None) -> JobReport:
    """Run ``jobs`` on Dask, one task per run, each retried up to ``retries`` times on an exception.

    Parameters
    ----------
    client_or_address : a ``distributed.Client`` or a scheduler address
    jobs : the runs and their steps
    tiled_uri, api_key : the Tiled server every worker connects to (the key travels in Dask's
        own protocol beside the URI, never in a result, a URI or a log)
    progress : a tqdm bar on stderr
    on_done : called with each run's summary (success or failure) as it finishes

    Returns
    -------
    :class:`JobReport`; failures carry ``error`` (``"KeyError: no raw run ..."``).
    """
    from distributed import Client, as_completed

    jobs = [job.validate() for job in jobs]
    tiled_uri, api_key = separate_api_key(tiled_uri, api_key)  # a task's arguments show in Dask's logs
    own = not isinstance(client_or_address, Client)
    client = Client(client_or_address, timeout="10s") if own else client_or_address
    report = JobReport()
    t0 = time.perf_counter()
    try:
        futures = {}
        for job in jobs:
            future = client.submit(run_job, job, tiled_uri, api_key, retries=retries, pure=False,
                                   key=f"phasestream-{job.run_uid}-{time.monotonic_ns()}")
            futures[future] = job
        with _progress(len(jobs), progress, "reprocess") as bar:
            for future in as_completed(futures):
                job = futures[future]
                if future.status == "error":
                    error = future.exception()
                    logger.warning("run %s failed after %d retries: %s", job.run_uid, retries, error)
                    summary = _failure(job, error)
                    report.failures.append(summary)
                else:
                    summary = future.result()
                    _record(report, summary)
                if on_done is not None:
                    on_done(summary)
                bar.update(1)
                future.release()
    finally:
        if own:
            client.close()
    report.seconds = time.perf_counter() - t0
    return report
