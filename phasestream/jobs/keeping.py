"""A post-scan job whose complete record survives a re-run that does not complete (the refinement, the denoising).

Such a job writes arrays of fixed names beside its record (``refinement`` and ``refined_phase``, ...) and
metadata fields derived from them (``refined_fractions``). :func:`run_keeping` runs one on a result:

1. It refuses while another run of the job on this result is alive, and finalizes one left ``running`` by a
   job that stopped (:func:`~phasestream.jobs.heartbeat.ensure_not_running`).
2. An earlier ``complete`` record (or the complete one a record keeps) stays, with its arrays, while the job
   works: the record says ``running`` with ``kept``. Anything else of an earlier run is removed first. Between
   writing ``running`` and anything else, the job reads its record back after a moment
   (:meth:`~phasestream.jobs.heartbeat.JobHeartbeat.confirm`): of two runs that began at the same moment, the
   one whose record stands runs, the other is refused.
3. The job calls ``ready()`` once it has its arrays: the kept ones go only then (record first, then arrays:
   no record describes removed arrays).
4. The job's record is written by :func:`~phasestream.jobs.record.recorded_job`, with a heartbeat while it
   works (:class:`~phasestream.jobs.heartbeat.JobHeartbeat`). When it does not complete, the record keeps the
   earlier complete one (``kept``) if its arrays are still there, and otherwise none of the job's arrays stay.

docs/contract.md, "Post-scan job records", is the rule; the jobs differ only in what :class:`KeptJob` says.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from phasestream.jobs.heartbeat import JobHeartbeat, ensure_not_running
from phasestream.jobs.record import earlier_records, recorded_job, write_held
from phasestream.store.results import ResultWriter

__all__ = ["KeptJob", "clear_earlier", "remove_arrays", "run_keeping"]

Work = Callable[[ResultWriter, Any, Callable[[], ResultWriter], JobHeartbeat], dict[str, Any]]
"""``work(writer, model_client, ready, beat)``: the job's record (``status`` included); ``ready()`` gives the
writer of its arrays, the earlier ones removed; metadata it writes while it beats goes through ``beat.paused()``."""


@dataclass(frozen=True)
class KeptJob:
    """What differs between the jobs: the record's ``name``, the ``arrays`` the job writes (fixed names of the
    contract, never a document field) and the metadata ``cleared`` with them (field -> its empty value)."""

    name: str
    arrays: tuple[str, ...]
    cleared: Mapping[str, Any]


def remove_arrays(writer: ResultWriter, job: KeptJob) -> None:
    """Remove the job's arrays that are in the result."""
    present = set(writer.container)
    for name in job.arrays:
        if name in present:
            writer.container.delete_contents(name, external_only=False)


def clear_earlier(writer: ResultWriter, job: KeptJob, running: Mapping[str, Any],
                  confirm: Callable[[], None] | None = None) -> None:
    """Remove an earlier run's arrays, derived fields and model entry. The record says ``running`` (the fields
    of ``running``: who runs it, its heartbeat; the earlier model unless it names one) before the arrays go, and
    ``confirm()`` (raising when the record is no longer this job's) runs between the two."""
    earlier, kept, models = earlier_records(writer.metadata, job.name)
    earlier = kept or earlier  # a run at work keeps the complete one it replaces
    gone = [earlier["model"]] if (earlier.get("status") == "complete" and isinstance(earlier.get("model"), str)
                                  and earlier["model"] in models) else []
    # the earlier model's entry alone: what other jobs added to models meanwhile stays
    writer.update_entries({}, removed={"models": gone}, **dict(job.cleared),
                          **{job.name: {"status": "running", "model": earlier.get("model"), **running}})
    if confirm is not None:
        confirm()
    remove_arrays(writer, job)


def run_keeping(tiled_client, run_uid: str, job: KeptJob, work: Work, *, root: str, retry: str,
                model: str | None, heartbeat_seconds: float, stale_after: float,
                models: contextlib.AbstractContextManager, skipped: tuple[type[BaseException], ...],
                failed: tuple[type[BaseException], ...], extra: dict[str, Any]) -> dict[str, Any]:
    """Run ``work`` on the result of ``run_uid`` as the module docstring says; the record written.

    ``model``: the model the running record names (None: the earlier record's); ``models``: the context that
    gives the model-server client ``work`` gets; ``skipped``, ``failed``, ``extra``: as for ``recorded_job``.
    Raises ``KeyError`` (no result) and ``JobRunningError`` (another run at work), nothing written.
    """
    writer = ResultWriter.open(tiled_client, run_uid, root=root)
    ensure_not_running(writer, job.name, job.arrays, stale_after=stale_after)
    beat = JobHeartbeat(tiled_client, writer.path, job.name, every=heartbeat_seconds)

    def running() -> dict[str, Any]:
        return beat.running(**({} if model is None else {"model": model}), retry=retry)

    earlier, kept_before, _ = earlier_records(writer.metadata, job.name)
    earlier = earlier if earlier.get("status") == "complete" else kept_before  # kept by a re-run
    kept = [earlier] if earlier else []
    if kept:
        writer.update_metadata(**{job.name: {"model": earlier.get("model"), **running(), "kept": earlier}})
        beat.confirm(writer)  # another run that began at the same moment: the one whose record stands runs
    else:
        clear_earlier(writer, job, running(), confirm=lambda: beat.confirm(writer))
        writer = ResultWriter.open(tiled_client, run_uid, root=root)  # opened again: without the removed arrays

    def ready() -> ResultWriter:
        """The writer of the new run's arrays: an earlier complete one's removed only now."""
        if not kept:
            return writer
        with beat.paused():
            clear_earlier(writer, job, running())
            kept.clear()
            return ResultWriter.open(tiled_client, run_uid, root=root)

    record: dict[str, Any] | None = None
    try:
        with models as client:
            def beating() -> dict[str, Any]:
                with beat:  # the record's heartbeat, stopped before the final record is written
                    return work(writer, client, ready, beat)

            record = recorded_job(writer, job.name, beating, skipped=skipped, failed=failed, retry=retry,
                                  extra=extra)
    finally:
        if kept:  # not completed: the arrays beside this record are the earlier run's, `kept`
            record = {**(writer.metadata.get(job.name) or {}), "kept": kept[0]}
            write_held(writer, {job.name: record})  # read back, as the record it amends
        elif record is None or record["status"] != "complete":  # none of its arrays beside a record saying so
            remove_arrays(writer, job)
    return record
