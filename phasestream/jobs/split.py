"""One large result split across Dask workers: InDI enhancement by chunks of energies, LCF by row bands.

A single run whose OD cube is large (a 2048^2 x 100 stack) is one task in
:func:`~phasestream.jobs.executors.submit_jobs`. Here its work is split instead:

* :func:`submit_split_enhance` creates the ``enhanced`` array (E, Y*s, X*s) in the result, one
  chunk per energy plane, and sends one task per range of planes ``[i0, i1)``: each reads its OD
  planes from Tiled, enhances them through the model server and writes them with ``write_block``;
* :func:`submit_split_lcf` creates ``fractions_lcf`` (K, Y, X), ``fit_error``, ``reduced_chi2`` and
  ``scale_lcf`` (Y, X), chunked by row band, and sends one task per band ``[y0, y1)``: each reads
  ``od[:, y0:y1, :]`` (a Tiled slice, not the whole cube), fits it
  (:func:`~phasestream.jobs.methods.lcf_arrays`) and writes its band's blocks.

Every task writes its own chunks only, so the tasks never touch the same stored block and the
stitched arrays equal the unsplit job's (:func:`~phasestream.jobs.enhance.enhance_result`,
:func:`~phasestream.jobs.methods.run_methods`). The metadata (``enhancement``,
``methods.lcf``) is written once by the submitting process, with ``split: {parts, ranges}``.

Example::

    with dask_client(n_workers=4) as dask:
        submit_split_lcf(dask, tiled_uri, uid, parts=8, api_key=key)
        submit_split_enhance(dask, tiled_uri, uid, {"address": "tcp://gpu1:5579"}, parts=4, api_key=key)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import numpy as np
from tiled.structures.array import ArrayStructure, BuiltinDtype
from tiled.structures.core import StructureFamily
from tiled.structures.data_source import DataSource

from phasestream.contract import MAP_LAYOUT, USABLE_STATUSES, JobOutcome, JobStatus
from phasestream.contract.metadata import recorded_energies, recorded_map
from phasestream.jobs.cluster import dask_task, gather_all, submit_tasks
from phasestream.jobs.enhance import (
    EnhanceOptions,
    enhanced_node,
    enhanced_path,
    marked,
    od_images_to_enhance,
    record_enhancement,
)
from phasestream.jobs.executors import Job, JobReport
from phasestream.jobs.methods import MethodsOptions, _references, lcf_arrays
from phasestream.jobs.record import recorded_job
from phasestream.modelserver.client import ModelClient
from phasestream.modelserver.protocol import ModelRefused, ModelServerError, ModelServerUnavailable
from phasestream.store.results import ResultWriter
from phasestream.store.tiled import connect, separate_api_key

__all__ = ["SplitJobError", "SplitStep", "enhance_planes", "lcf_band", "run_split_steps", "split_ranges",
           "split_steps", "submit_split_enhance", "submit_split_lcf"]

logger = logging.getLogger(__name__)

LCF_ARRAYS = ("fractions_lcf", "fit_error", "reduced_chi2", "scale_lcf")


class SplitJobError(RuntimeError):
    """Tasks of a split job failed after their retries (their errors in the message)."""


def split_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges cutting ``range(n)`` into at most ``parts`` pieces of equal length
    (the last one shorter): Zarr, behind Tiled, stores regular chunks only."""
    if n < 1 or parts < 1:
        raise ValueError(f"need n >= 1 and parts >= 1, got n={n}, parts={parts}")
    step = -(-n // parts)
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def _create_chunked(container, key: str, shape: tuple[int, ...], chunks: tuple[tuple[int, ...], ...],
                    dtype: np.dtype, dims: tuple[str, ...]):
    """A new (zero) array ``key`` in ``container`` with the given chunks, replacing any old one."""
    if key in container:
        container.delete_contents(key, external_only=False)
    structure = ArrayStructure(shape=shape, chunks=chunks, dims=dims,
                               data_type=BuiltinDtype.from_numpy_dtype(np.dtype(dtype)))
    return container.new(StructureFamily.array, [DataSource(structure=structure,
                                                            structure_family=StructureFamily.array)], key=key)


# --------------------------------------------------------------------------- LCF by row bands


@dask_task
def lcf_band(tiled_uri: str, run_uid: str, root: str, band: int, rows: tuple[int, int], order: np.ndarray,
             energies: np.ndarray, references: np.ndarray, options: dict, api_key: str | None = None) -> dict:
    """Dask task: LCF of rows ``[y0, y1)`` of the OD cube; writes block ``band`` of the LCF arrays.

    ``order`` sorts the stored energies increasingly, ``energies`` are the sorted ones and
    ``references`` (K, E) the reference spectra at them.
    """
    t0 = time.perf_counter()
    node = connect(tiled_uri, api_key=api_key)[f"{root}/{run_uid}"]
    y0, y1 = rows
    od = np.asarray(node["od"][: len(order), y0:y1, :], np.float64)[np.asarray(order)]
    arrays = lcf_arrays(od, references, energies, MethodsOptions(**options))
    for name in LCF_ARRAYS:
        array = np.ascontiguousarray(arrays[name], dtype=MAP_LAYOUT[name][0])
        node[name].write_block(array, block=(0, band, 0) if array.ndim == 3 else (band, 0))
    return {"band": band, "rows": [y0, y1], "seconds": round(time.perf_counter() - t0, 3)}


def submit_split_lcf(dask, tiled_uri: str, run_uid: str, options: dict | MethodsOptions | None = None, *,
                     parts: int = 4, api_key: str | None = None, retries: int = 2) -> dict[str, Any]:
    """LCF of ``run_uid``'s OD cube in ``parts`` row bands on Dask, stitched in its result in Tiled.

    Parameters
    ----------
    dask : a ``distributed.Client``
    tiled_uri, api_key : the Tiled server (the key may be in the URI instead)
    options : :class:`MethodsOptions` (the LCF ones are used; ``lcf_input`` must be ``"od"``)
    parts : row bands, one task each (at most the number of rows)
    retries : Dask retries of a band

    Returns
    -------
    The ``methods.lcf`` record written into the result (``status`` complete or failed, ``errors``,
    ``split: {parts, ranges}``); bad input is recorded as failed, as by ``run_methods``.
    """
    opts = options if isinstance(options, MethodsOptions) else MethodsOptions(**(options or {}))
    opts = replace(opts, methods=("lcf",)).validate()
    uri, api_key = separate_api_key(tiled_uri, api_key)
    client = connect(uri, api_key=api_key)
    writer = ResultWriter.open(client, run_uid, root=opts.root)
    md = writer.metadata
    t0 = time.perf_counter()
    entry: dict[str, Any] = {"status": "complete", "parameters": {}, "arrays": [], "errors": []}
    try:
        if opts.lcf_input != "od":
            raise ValueError("split LCF fits the OD cube (lcf_input='od'); run the normalized input unsplit")
        if "od" not in writer.container:
            raise ValueError(f"the result of run {run_uid} has no OD cube 'od' (the worker ran with --no-od)")
        n, seen = recorded_energies(writer.path, md)
        stored = np.asarray(seen, np.float64)
        if n < 2 or stored.size != n:
            raise ValueError(f"the result of run {run_uid} has {n} OD planes and {stored.size} energies_eV")
        order = np.argsort(stored, kind="stable")
        refs, used = _references(client, run_uid, md, opts)  # a references option that does not load: failed
        if list(refs.phases) != writer.phases:
            raise ValueError(f"references {list(refs.phases)} differ from the result's phases {writer.phases}")
        energies = stored[order]
        references = refs.interpolate(energies)
        (ny, nx), k = writer.shape, len(refs.phases)
        ranges = split_ranges(ny, parts)
        rows = tuple(b - a for a, b in ranges)
        for name in LCF_ARRAYS:
            dtype, dims = MAP_LAYOUT[name]
            if len(dims) == 3:
                _create_chunked(writer.container, name, (k, ny, nx), ((k,), rows, (nx,)), dtype, dims)
            else:
                _create_chunked(writer.container, name, (ny, nx), (rows, (nx,)), dtype, dims)
        futures = submit_tasks(dask, lcf_band, [(uri, run_uid, opts.root, i, r, order, energies, references,
                                                 asdict(opts), api_key) for i, r in enumerate(ranges)],
                               retries=retries, tag=f"lcf-{run_uid}")
        bands = gather_all(futures, [f"LCF band part {i}" for i in range(len(ranges))], SplitJobError)
        entry.update(parameters={"method": opts.lcf_method, "input": opts.lcf_input, "sum_to_one": opts.lcf_sum_to_one,
                                 "background_order": opts.background_order, "phases": list(refs.phases)},
                     arrays=sorted(LCF_ARRAYS), references=used,
                     split={"parts": len(ranges), "ranges": [list(r) for r in ranges],
                            "seconds": [b["seconds"] for b in bands]})
    except (ValueError, FileNotFoundError, SplitJobError) as exc:
        logger.warning("run %s: split LCF failed: %s", run_uid, exc)
        entry.update(status="failed", errors=[f"{type(exc).__name__}: {exc}"])
    entry["seconds"] = round(time.perf_counter() - t0, 3)
    writer.update_metadata(methods={**recorded_map(md, "methods"), "lcf": entry})
    return entry


# --------------------------------------------------------------------------- enhancement by energies


@dask_task
def enhance_planes(tiled_uri: str, run_uid: str, root: str, planes: tuple[int, int], options: dict,
                   api_key: str | None = None) -> dict:
    """Dask task: enhance OD planes ``[i0, i1)`` through the model server into planes ``[i0, i1)`` of
    ``enhanced/<model>/<version>/<steps>`` (version and steps fixed in ``options``)."""
    opts = EnhanceOptions(**options)
    node = connect(tiled_uri, api_key=api_key)[f"{root}/{run_uid}"]
    od, out = node["od"], node[enhanced_path(opts.model, opts.version, opts.steps)]
    info: dict = {}
    with ModelClient(opts.address, timeout=opts.timeout, retries=opts.retries) as models:
        for i in range(*planes):
            reply = models.enhance(opts.model, np.asarray(od[i], np.float32), domain="od", version=opts.version,
                                   steps=opts.steps, allow_low_gain=opts.allow_low_gain)
            out.write_block(np.ascontiguousarray(reply["array"][np.newaxis], np.float32), block=(i, 0, 0))
            info = {k: reply[k] for k in ("model", "version", "sha256", "steps")}
    return {"planes": list(planes), **info}


def submit_split_enhance(dask, tiled_uri: str, run_uid: str, options: dict | EnhanceOptions | None = None, *,
                         parts: int = 4, api_key: str | None = None, retries: int = 2) -> dict[str, Any]:
    """InDI enhancement of ``run_uid``'s OD planes in ``parts`` chunks of energies on Dask, stitched in Tiled.

    The model version is fixed before the tasks start (one probe request), so every chunk uses the
    same artifact. Returns the ``enhancement`` record written into the result, as
    :func:`~phasestream.jobs.enhance.enhance_result` does (``skipped`` when the model server
    is down or there is no OD cube, ``failed`` when a chunk failed after its retries).
    """
    opts = options if isinstance(options, EnhanceOptions) else EnhanceOptions(**(options or {}))
    opts = opts.validate()
    uri, api_key = separate_api_key(tiled_uri, api_key)
    writer = ResultWriter.open(connect(uri, api_key=api_key), run_uid, root=opts.root)

    def work() -> dict[str, Any]:
        n, skipped = od_images_to_enhance(writer)
        if skipped is not None:
            return skipped
        with ModelClient(opts.address, timeout=opts.timeout, retries=opts.retries) as models:
            models.health(timeout=min(5.0, opts.timeout))
            probe = models.enhance(opts.model, np.zeros((8, 8), np.float32), domain="od", version=opts.version,
                                   steps=opts.steps, allow_low_gain=opts.allow_low_gain)
        scale = probe["array"].shape[-1] // 8
        ny, nx = writer.container["od"].shape[1:]
        shape = (n, ny * scale, nx * scale)
        path = enhanced_path(probe["model"], probe["version"], probe["steps"])
        parent, key, note = enhanced_node(writer, path)
        _create_chunked(parent, key, shape, ((1,) * n, (shape[1],), (shape[2],)), np.float32, ("energy", "y", "x"))
        ranges = split_ranges(n, parts)
        task_opts = {**asdict(opts), "version": probe["version"], "steps": probe["steps"]}
        futures = submit_tasks(dask, enhance_planes, [(uri, run_uid, opts.root, r, task_opts, api_key)
                                                      for r in ranges],
                               retries=retries, tag=f"enhance-{run_uid}")
        chunks = gather_all(futures, [f"enhancement part {i}" for i in range(len(ranges))], SplitJobError)
        if {c["sha256"] for c in chunks} != {probe["sha256"]}:
            raise SplitJobError(f"chunks were enhanced by different artifacts: {sorted({c['sha256'] for c in chunks})}")
        record = {"status": "complete", "version": probe["version"], "sha256": probe["sha256"],
                  "steps": chunks[0]["steps"], "scale": float(scale), "shape": list(shape), "source": "od",
                  "domain": "od", "path": path, "split": {"parts": len(ranges), "ranges": [list(r) for r in ranges]}}
        if note:
            record["note"] = note
        return record_enhancement(writer, probe, marked(record, probe, opts))

    return recorded_job(writer, "enhancement", work, skipped=(ModelServerUnavailable, ModelRefused),
                        failed=(ModelServerError, ValueError, SplitJobError),
                        retry=f"phasestream reprocess --enhance --split {parts} {run_uid}",
                        extra={"model": opts.model, "source": "od"})


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
