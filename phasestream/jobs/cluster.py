"""Dask for phasestream's jobs: a client (an existing scheduler or a LocalCluster on 127.0.0.1), tasks
that keep their own Tiled reads in their process, and fan-out helpers for split jobs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["DEFAULT_SCHEDULER_ENV", "WORKER_CONFIG", "WORKER_ENV", "dask_client", "dask_task", "gather_all",
           "submit_tasks"]

#: environment variable naming an existing Dask scheduler (``tcp://HOST:8786``)
DEFAULT_SCHEDULER_ENV = "PHASESTREAM_DASK_SCHEDULER"


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

    address = None if scheduler == "local" else scheduler or os.environ.get(DEFAULT_SCHEDULER_ENV) or None
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
