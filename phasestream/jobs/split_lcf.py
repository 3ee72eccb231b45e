"""LCF of one large result split by row bands across Dask workers (``phasestream.jobs.split``).

:func:`submit_split_lcf` sends one task per row band ``[y0, y1)``: each reads ``od[:, y0:y1, :]`` (a Tiled
slice, not the whole cube), fits it (:func:`~phasestream.jobs.methods.lcf_arrays`) and writes its band's
blocks of ``fractions_lcf`` (K, Y, X), ``fit_error``, ``reduced_chi2`` and ``scale_lcf`` (Y, X) into the
staging container of its submission (:mod:`phasestream.jobs.staging`); the result's arrays are replaced only
once every block read back as written, and a re-run that does not complete keeps the earlier complete record
(``kept``) and its arrays. While it replaces them, ``methods.lcf`` says ``running`` with ``staging`` and a
heartbeat (:class:`~phasestream.jobs.heartbeat.JobHeartbeat`): a submitter killed meanwhile leaves a record that
the live worker's sweep, or the next split LCF, records ``failed`` (interrupted); a split LCF that finds a live
one is not run.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, replace
from typing import Any

import numpy as np

from phasestream.contract import MAP_LAYOUT
from phasestream.contract.metadata import recorded_energies, recorded_map
from phasestream.jobs.cluster import dask_task, gather_all, submit_tasks
from phasestream.jobs.heartbeat import (
    HEARTBEAT_SECONDS,
    STALE_AFTER,
    JobHeartbeat,
    JobRunningError,
    ensure_not_running,
    job_record,
)
from phasestream.jobs.methods import _references, lcf_arrays
from phasestream.jobs.methods_options import MethodsOptions
from phasestream.jobs.methods_record import LCF_RECORD, METHOD_ARRAYS, earlier_complete, record_methods, settled_entry
from phasestream.jobs.split_parts import SplitJobError, od_image_shape, split_ranges
from phasestream.jobs.staging import (
    ArrayLayout,
    Digests,
    Staging,
    StagingError,
    block_digest,
    check_staging_key,
    merged_digests,
)
from phasestream.store.results import ResultWriter
from phasestream.store.tiled import connect, separate_api_key

__all__ = ["LCF_ARRAYS", "lcf_band", "submit_split_lcf"]

logger = logging.getLogger(__name__)

LCF_ARRAYS = METHOD_ARRAYS["lcf"]


class _Superseded(RuntimeError):
    """Another submission began replacing the same arrays (its record names another staging key)."""


@dask_task
def lcf_band(tiled_uri: str, run_uid: str, root: str, staging: str, band: int, rows: tuple[int, int],
             order: np.ndarray, energies: np.ndarray, references: np.ndarray, options: dict,
             api_key: str | None = None) -> dict:
    """Dask task: LCF of rows ``[y0, y1)`` of the OD cube; writes block ``band`` of the LCF arrays staged
    in the result's container ``staging`` and returns their digests (``{"digests": {name: {block: sha256}}}``).

    ``order`` sorts the stored energies increasingly, ``energies`` are the sorted ones and
    ``references`` (K, E) the reference spectra at them.
    """
    t0 = time.perf_counter()
    node = connect(tiled_uri, api_key=api_key)[f"{root}/{run_uid}"]
    staged = node[check_staging_key(staging)]
    y0, y1 = rows
    od = np.asarray(node["od"][: len(order), y0:y1, :], np.float64)[np.asarray(order)]
    arrays = lcf_arrays(od, references, energies, MethodsOptions(**options))
    digests: Digests = {}
    for name in LCF_ARRAYS:
        array = np.ascontiguousarray(arrays[name], dtype=MAP_LAYOUT[name][0])
        block = (0, band, 0) if array.ndim == 3 else (band, 0)
        staged[name].write_block(array, block=block)
        digests[name] = {block: block_digest(array)}
    return {"band": band, "rows": [y0, y1], "seconds": round(time.perf_counter() - t0, 3), "digests": digests}


def _lcf_inputs(client, writer: ResultWriter, run_uid: str, opts: MethodsOptions) -> tuple:
    """``(order, energies, references, phases, used)`` of the split LCF, each checked (a ValueError else)."""
    md = writer.metadata
    if opts.lcf_input != "od":
        raise ValueError("split LCF fits the OD cube (lcf_input='od'); run the normalized input unsplit")
    if "od" not in writer.container:
        raise ValueError(f"the result of run {run_uid} has no OD cube 'od' (the worker ran with --no-od)")
    n, seen = recorded_energies(writer.path, md)
    stored = np.asarray(seen, np.float64)
    if n < 2 or stored.size != n:
        raise ValueError(f"the result of run {run_uid} has {n} OD planes and {stored.size} energies_eV")
    od_image_shape(writer, n)
    order = np.argsort(stored, kind="stable")
    refs, used = _references(client, run_uid, md, opts)  # a references option that does not load: failed
    if list(refs.phases) != writer.phases:
        raise ValueError(f"references {list(refs.phases)} differ from the result's phases {writer.phases}")
    energies = stored[order]
    return order, energies, refs.interpolate(energies), list(refs.phases), used


def _lcf_layouts(k: int, rows: tuple[int, ...], nx: int) -> dict[str, ArrayLayout]:
    """The LCF arrays of ``k`` phases, chunked by the row bands ``rows`` (their heights)."""
    layouts = {}
    for name in LCF_ARRAYS:
        dtype, dims = MAP_LAYOUT[name]
        shape, chunks = ((sum(rows), nx), (rows, (nx,)))
        if len(dims) == 3:
            shape, chunks = (k, *shape), ((k,), *chunks)
        layouts[name] = ArrayLayout(shape, chunks, np.dtype(dtype), tuple(dims))
    return layouts


def _keep_lcf_claim(writer: ResultWriter, beat: JobHeartbeat, running: Mapping[str, Any],
                    error: Exception | None = None) -> None:
    """Make sure ``methods.lcf`` is still this submission's ``running`` record (Tiled has no lock): the record of
    its ``staging`` key, whatever its heartbeat says. Another split LCF's ``running`` record, written since, wins:
    a :class:`_Superseded` (that one copies last and records). A record written over this one by a job that had
    not seen it is written over again (``running``'s fields, ``beat``'s identity and a heartbeat of now): this one
    copies last."""
    writer.container.refresh()
    lcf = job_record(writer.metadata, LCF_RECORD)
    if lcf.get("staging") == running["staging"]:
        return
    if lcf.get("status") == "running" and lcf.get("staging"):
        why = f" ({type(error).__name__}: {error})" if error is not None else ""
        raise _Superseded(f"another split LCF ({lcf['staging']}) began replacing the arrays while this one "
                          f"({running['staging']}) did: its record stands{why}") from error
    with beat.paused():
        record_methods(writer, {"lcf": beat.running(**running)})


def _replace_lcf_arrays(writer: ResultWriter, staging: Staging, digests: Digests, beat: JobHeartbeat,
                        running: dict[str, Any]) -> None:
    """Record that the arrays are being replaced (``running``: ``beat``'s identity, and a heartbeat that beats until
    they are in), then copy each from ``staging``, read every block back and remove the staging container. A
    failure once another submission holds the record is its doing: :class:`_Superseded`."""
    record_methods(writer, {"lcf": beat.running(**running)})
    with beat:
        try:
            present = set(writer.container)
            for name in LCF_ARRAYS:
                _keep_lcf_claim(writer, beat, running)
                if name in present:
                    writer.container.delete_contents(name, external_only=False)
                staging.copy(name, writer.container, name, digests)
            for name in LCF_ARRAYS:
                staging.verify_copy(name, writer.container[name], digests)
        except _Superseded:
            raise
        except Exception as exc:
            _keep_lcf_claim(writer, beat, running, exc)
            raise
        staging.remove()
        _keep_lcf_claim(writer, beat, running)


def submit_split_lcf(dask, tiled_uri: str, run_uid: str, options: dict | MethodsOptions | None = None, *,
                     parts: int = 4, api_key: str | None = None, retries: int = 2,
                     heartbeat_seconds: float = HEARTBEAT_SECONDS, stale_after: float = STALE_AFTER) -> dict[str, Any]:
    """LCF of ``run_uid``'s OD cube in ``parts`` row bands on Dask, stitched in its result in Tiled.

    Parameters
    ----------
    dask : a ``distributed.Client``
    tiled_uri, api_key : the Tiled server (the key may be in the URI instead)
    options : :class:`MethodsOptions` (the LCF ones are used; ``lcf_input`` must be ``"od"``)
    parts : row bands, one task each (at most the number of rows)
    retries : Dask retries of a band
    heartbeat_seconds : seconds between two heartbeats of the ``running`` record while the arrays are replaced
    stale_after : seconds without a heartbeat after which another split LCF's ``running`` record counts as
        interrupted (:func:`~phasestream.jobs.heartbeat.ensure_not_running`)

    Returns
    -------
    The ``methods.lcf`` record written into the result (``status`` complete or failed, ``errors``,
    ``split: {parts, ranges}``); bad input is recorded as failed, as by ``run_methods``. A record that is
    not complete keeps an earlier complete one (``kept``) whose arrays are untouched, unless the failure
    came while the arrays were being replaced: then the LCF arrays are removed. A submission that finds
    another one replacing the same arrays returns a failed record without writing it; one that finds another
    one's live ``running`` record when it starts returns a skipped record (``reason``) without writing it.
    """
    opts = options if isinstance(options, MethodsOptions) else MethodsOptions(**(options or {}))
    opts = replace(opts, methods=("lcf",)).validate()
    uri, api_key = separate_api_key(tiled_uri, api_key)
    client = connect(uri, api_key=api_key)
    writer = ResultWriter.open(client, run_uid, root=opts.root)
    t0 = time.perf_counter()
    entry: dict[str, Any] = {"status": "complete", "parameters": {}, "arrays": [], "errors": []}
    try:
        ensure_not_running(writer, LCF_RECORD, LCF_ARRAYS, stale_after=stale_after, job="split LCF")
    except JobRunningError as exc:
        logger.warning("run %s: split LCF not run: %s", run_uid, exc)
        return {**entry, "status": "skipped", "reason": str(exc), "seconds": round(time.perf_counter() - t0, 3)}
    beat = JobHeartbeat(client, writer.path, LCF_RECORD, every=heartbeat_seconds)
    earlier = earlier_complete(recorded_map(writer.metadata, "methods"), "lcf")
    staging, replacing = None, False
    try:
        order, energies, references, phases, used = _lcf_inputs(client, writer, run_uid, opts)
        ranges = split_ranges(writer.shape[0], parts)
        staging = Staging(writer.container, _lcf_layouts(len(phases), tuple(b - a for a, b in ranges),
                                                         writer.shape[1]),
                          job=f"split LCF of {writer.path}")
        staging.create()
        futures = submit_tasks(dask, lcf_band, [(uri, run_uid, opts.root, staging.key, i, r, order, energies,
                                                 references, asdict(opts), api_key) for i, r in enumerate(ranges)],
                               retries=retries, tag=f"lcf-{run_uid}")
        bands = gather_all(futures, [f"LCF band part {i}" for i in range(len(ranges))], SplitJobError)
        digests = merged_digests(b["digests"] for b in bands)
        staging.read_back(digests)
        entry.update(parameters={"method": opts.lcf_method, "input": opts.lcf_input, "sum_to_one": opts.lcf_sum_to_one,
                                 "background_order": opts.background_order, "phases": phases},
                     arrays=sorted(LCF_ARRAYS), references=used,
                     split={"parts": len(ranges), "ranges": [list(r) for r in ranges],
                            "seconds": [b["seconds"] for b in bands]})
        replacing = True
        running = {**entry, "staging": staging.key,  # its status made `running` by beat.running
                   "reason": "replacing the LCF arrays with the staged ones (read back as written)"}
        _replace_lcf_arrays(writer, staging, digests, beat, running)
    except _Superseded as exc:
        logger.warning("run %s: split LCF stopped: %s", run_uid, exc)
        return {**entry, "status": "failed", "errors": [f"superseded: {exc}"],
                "seconds": round(time.perf_counter() - t0, 3)}
    except (ValueError, FileNotFoundError, SplitJobError, StagingError) as exc:
        logger.warning("run %s: split LCF failed: %s", run_uid, exc)
        entry.update(status="failed", errors=[f"{type(exc).__name__}: {exc}"])
    except Exception as exc:  # a bug or Tiled gone: raised on, but a replacement begun is recorded as failed
        if replacing:
            with contextlib.suppress(Exception):
                entry.update(status="failed", errors=[f"internal error: {type(exc).__name__}: {exc}"])
                record_methods(writer, {"lcf": settled_entry(writer, "lcf", entry, None, LCF_ARRAYS)})
        raise
    finally:
        if staging is not None:
            staging.remove()
    entry["seconds"] = round(time.perf_counter() - t0, 3)
    # arrays untouched: an earlier complete record is kept; else no LCF array stays beside a failed record
    kept = None if replacing else earlier
    entry = settled_entry(writer, "lcf", entry, kept, LCF_ARRAYS if kept is None else ())
    record_methods(writer, {"lcf": entry})
    return entry


