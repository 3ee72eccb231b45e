"""One large result split across Dask workers: InDI enhancement by chunks of energies, LCF by row bands.

A single run whose OD cube is large (a 2048^2 x 100 stack) is one task in
:func:`~phasestream.jobs.executors.submit_jobs`. Here its work is split instead:

* :func:`submit_split_enhance` sends one task per range of OD planes ``[i0, i1)``: each reads its
  planes from Tiled, enhances them through the model server and writes them, one block per plane, into
  an (E, Y*s, X*s) array that becomes ``enhanced/<model>/<version>/<steps>``;
* :func:`submit_split_lcf` sends one task per row band ``[y0, y1)``: each reads ``od[:, y0:y1, :]`` (a
  Tiled slice, not the whole cube), fits it (:func:`~phasestream.jobs.methods.lcf_arrays`) and writes its
  band's blocks of ``fractions_lcf`` (K, Y, X), ``fit_error``, ``reduced_chi2`` and ``scale_lcf`` (Y, X).

Every task writes its own blocks only, so the stitched arrays equal the unsplit job's
(:func:`~phasestream.jobs.enhance.enhance_result`, :func:`~phasestream.jobs.methods.run_methods`), into a
staging container of its submission (:mod:`phasestream.jobs.staging`), never into the result's arrays: a
re-run that does not complete leaves an earlier complete result as it was, its record as ``kept``. Only
once every staged block read back as written does the submitting process record the replacement
(``status: running``, ``staging``), copy the blocks in, read them back, and write the complete record
(``enhancement``, ``methods.lcf``, with ``split: {parts, ranges}``; docs/deployment.md).

The LCF is in :mod:`phasestream.jobs.split_lcf`, the enhancement in :mod:`phasestream.jobs.split_enhance`, what
they share in :mod:`phasestream.jobs.split_parts`; here, which steps of a reprocess run split
(:func:`split_steps`) and running them on every result of a run (:func:`run_split_steps`).

Example::

    with dask_client(n_workers=4) as dask:
        submit_split_lcf(dask, tiled_uri, uid, parts=8, api_key=key)
        submit_split_enhance(dask, tiled_uri, uid, {"address": "tcp://gpu1:5579"}, parts=4, api_key=key)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from phasestream.contract import USABLE_STATUSES, JobOutcome, JobStatus
from phasestream.jobs.executors import Job, JobReport
from phasestream.jobs.split_enhance import enhance_planes, submit_split_enhance
from phasestream.jobs.split_lcf import LCF_ARRAYS, lcf_band, submit_split_lcf
from phasestream.jobs.split_parts import SplitJobError, split_ranges

__all__ = ["LCF_ARRAYS", "SplitJobError", "SplitStep", "enhance_planes", "lcf_band", "run_split_steps", "split_ranges",
           "split_steps", "submit_split_enhance", "submit_split_lcf"]

logger = logging.getLogger(__name__)


SplitStep = tuple[str, str, dict]  # (run uid, "enhance" or "lcf", the step's options)


def split_steps(jobs: list[Job]) -> tuple[list[Job], list[SplitStep]]:
    """Take the steps a split spreads over workers (``enhance``, the ``lcf`` method) out of ``jobs``."""
    kept, split = [], []
    for job in jobs:
        steps = []
        for name, options in job.steps:
            if name == "enhance":
                split.append((job.run_uid, "enhance", options))
            elif name == "methods" and "lcf" in options["methods"]:
                split.append((job.run_uid, "lcf", options))
                rest = tuple(m for m in options["methods"] if m != "lcf")
                if rest:
                    steps.append((name, {**options, "methods": rest}))
            else:
                steps.append((name, options))
        if steps:
            kept.append(replace(job, steps=tuple(steps)))
    return kept, split


def run_split_steps(dask, split: list[SplitStep], tiled_uri: str, report: JobReport, *, parts: int,
                    api_key: str | None = None, retries: int = 2,
                    on_done: Callable[[dict], None] | None = None) -> None:
    """After the per-run jobs: each split step of each run whose result is usable, ``parts`` tasks at once.

    A run whose job was ``complete`` or ``partial`` (a usable result, ``USABLE_STATUSES``) gets its split
    steps; one of several fields (the reprocess step's ``details.fields``) gets them on each field's
    result. A run whose job failed or was skipped, or whose earlier split step failed, gets a ``skipped``
    step record naming why. Each step's record joins its run's outcome in ``report`` (``details["steps"]``,
    as ``"<kind> (split N)"``, ``"<kind> (split N) <field key>"`` for a field); a step that raises is
    recorded as failed, and a step that does not complete moves its run to the failures, while the other
    runs go on.
    """
    t0 = time.perf_counter()
    outcomes = {o["run_uid"]: o for o in [*report.successes, *report.failures]}
    split_failed: set[str] = set()
    for uid, kind, options in split:
        outcome = outcomes.get(uid)
        created = outcome is None
        if created:
            outcome = outcomes[uid] = JobOutcome(uid, kind, JobStatus.COMPLETE, details={"steps": {}}).as_dict()
        steps = outcome.setdefault("details", {}).setdefault("steps", {})
        label = f"{kind} (split {parts})"
        if uid in split_failed or outcome["status"] not in USABLE_STATUSES:
            why = "an earlier split step failed" if uid in split_failed else f"the run's job was {outcome['status']}"
            steps[label] = {"status": JobStatus.SKIPPED.value, "reason": f"not run: {why}"}
            continue
        before = outcome["status"]
        fields = _field_keys(steps)
        failures = []
        for target in fields or [uid]:
            record = _split_step(dask, kind, tiled_uri, target, options, parts, api_key, retries)
            steps[label if not fields else f"{label} {target}"] = record
            if record["status"] != JobStatus.COMPLETE:
                reason = record.get("reason") or "; ".join(record.get("errors") or [])
                failures.append(f"split {kind}{'' if not fields else ' ' + target} {record['status']}: {reason}")
        if failures:
            split_failed.add(uid)
            earlier = outcome.get("reason") if before != JobStatus.COMPLETE else ""
            outcome.update(status=JobStatus.FAILED.value, reason="; ".join([r for r in [earlier] if r] + failures))
        _file_outcome(report, outcome)
        if on_done is not None and (created or outcome["status"] != before):
            on_done(outcome)
    report.seconds += time.perf_counter() - t0


def _field_keys(steps: dict) -> list[str]:
    """The result keys of a run of several fields (``details.fields`` of its reprocess step), else []."""
    fields = ((steps.get("reprocess") or {}).get("details") or {}).get("fields")
    return list(fields) if isinstance(fields, dict) and len(fields) > 1 else []


def _split_step(dask, kind: str, tiled_uri: str, target: str, options: dict, parts: int, api_key: str | None,
                retries: int) -> dict[str, Any]:
    """One split step on one result: its record, or a failed record naming the error it raised."""
    submit = submit_split_enhance if kind == "enhance" else submit_split_lcf
    try:
        return submit(dask, tiled_uri, target, options, parts=parts, api_key=api_key, retries=retries)
    except Exception as exc:
        logger.exception("result %s: split %s raised", target, kind)
        return {"status": JobStatus.FAILED.value, "reason": f"{target}: {type(exc).__name__}: {exc}", "errors": []}


def _file_outcome(report: JobReport, outcome: dict) -> None:
    """``outcome`` in the report list its status says (complete: successes; else failures), once."""
    report.successes = [o for o in report.successes if o is not outcome]
    report.failures = [o for o in report.failures if o is not outcome]
    (report.successes if outcome["status"] == JobStatus.COMPLETE else report.failures).append(outcome)
