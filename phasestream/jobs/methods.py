"""Post-scan classic XANES methods on a run's result in Tiled (LCF, edge maps, masks, RUM).

:func:`run_methods` reads the OD cube ``od`` (E, Y, X) and ``energies_eV`` of the result
``<root>/<run uid>``, the references of the run, runs the requested methods of
:mod:`phasestream.methods` and writes their arrays into the same result container, with
``methods: {name: {status, parameters, seconds, arrays, errors, reason}}`` in its metadata. Each
method runs on its own: one that fails records ``status: failed`` and its error and the others
still run; one that does not fit the scan (too few energies in its window) records
``status: skipped`` and the reason. A re-run that does not complete keeps the method's earlier complete
record (``kept``) and its arrays (:mod:`phasestream.jobs.methods_record`).

Methods (``METHODS``) and the arrays they write (see ``MAP_LAYOUT`` in store/results.py):

* ``normalize``: edge normalization -> ``normalized`` (E, Y, X), ``thickness`` (Y, X) (edge jump);
  the edge fit with xraylarch's default windows when the scan covers them, else (a sparse scan)
  the reference fit (:func:`~phasestream.methods.normalize_by_references`), the path and the
  reason recorded in its parameters
* ``lcf``: LCF of every pixel's OD (or normalized) spectrum with a constant background term
  (default) -> ``fractions_lcf`` (K, Y, X), ``fit_error`` (RSS), ``reduced_chi2``, ``scale_lcf``
  (sum of the weights) (Y, X); with ``lcf_sum_to_one`` (default, NNLS on OD) the weights are
  divided by their sum
* ``edge50`` / ``peak``: edge-50 energy and peak-position maps (eV) -> ``edge50``, ``peak_position``
* ``masks``: thresholds on ``thickness`` and ``fit_error`` combined -> ``threshold_mask`` (uint8)
* ``kmeans``: k-means on the edge-normalized spectra of the particle pixels
  (:func:`~phasestream.kernels.particle_mask`), optionally without the first principal component
  -> ``cluster_mask`` (int16, -1 outside), ``cluster_spectra``
* ``rum_tv`` / ``rum_pnp``: robust unmixing -> ``fractions_rum_tv`` (K, Y, X), ``scale_rum_tv``
  (Y, X) (and ``_pnp``), the convergence history in the metadata

Requested in the start document (``phasestream: {methods: [lcf, rum_tv]}`` or
``{methods: {names: [...], <option>: value}}``) or with ``phasestream reprocess --method lcf UID``.
"""

from __future__ import annotations

import logging
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from phasestream import methods as m
from phasestream.contract import JobOutcome, JobStatus
from phasestream.contract.metadata import recorded_energies, shown
from phasestream.jobs.context import JobContext
from phasestream.jobs.heartbeat import STALE_AFTER, JobRunningError, ensure_not_running
from phasestream.jobs.methods_options import MethodsOptions
from phasestream.jobs.methods_record import LCF_RECORD, METHOD_ARRAYS, earlier_complete, record_methods, settled_entry
from phasestream.kernels import particle_mask
from phasestream.references import ReferenceSet, load_document_references, reference_folders_from_env
from phasestream.store.readback import read_back
from phasestream.store.results import ResultWriter

__all__ = ["StepSkipped", "kmeans_arrays", "lcf_arrays", "run", "run_methods"]

logger = logging.getLogger(__name__)

def _references(client, run_uid: str, md: Mapping[str, Any], opts: MethodsOptions
                ) -> tuple[ReferenceSet, dict[str, str]]:
    """The run's references and which they are, ``{name, source, from}``: the option (``from: option``), the
    run's start document (``start document``), or the result's reference name (``result``).

    An option that does not load is a ValueError naming it and why (not found, outside the reference
    folders, unreadable), never replaced by the run's own references.
    """
    folders = reference_folders_from_env()
    if opts.references is not None:
        try:
            refs = load_document_references(opts.references, folders=folders)
        except (OSError, ValueError) as exc:
            raise ValueError(f"references override {shown(opts.references)} (phasestream.methods.references) "
                             f"cannot be loaded: {exc}") from None
        return refs, _used(refs, opts.references, "option")
    tried = []
    candidates = []
    try:  # only the references are needed here: a start without image and energy keys will do
        candidates.append((client[run_uid].metadata["start"]["phasestream"]["references"], "start document"))
    except (KeyError, TypeError):
        tried.append(f"no raw run {run_uid} with start.phasestream.references")
    recorded = md.get("references")
    candidates.append(((recorded if isinstance(recorded, Mapping) else {}).get("name"), "result"))
    for source, where in candidates:
        if source:
            try:
                refs = load_document_references(source, folders=folders)
            except (OSError, ValueError) as exc:
                tried.append(str(exc))
            else:
                return refs, _used(refs, source, where)
    raise FileNotFoundError(f"no loadable references for run {run_uid}: {'; '.join(tried)}")


def _used(refs: ReferenceSet, source: Any, where: str) -> dict[str, str]:
    return {"name": refs.name, "source": str(source)[:500], "from": where}


class StepSkipped(Exception):
    """A method that does not fit the scan (e.g. too few energies in its window): recorded as skipped."""


class _Context:
    """The inputs and intermediate results shared by the methods of one job."""

    def __init__(self, od: np.ndarray, energies: np.ndarray, refs: ReferenceSet, opts: MethodsOptions,
                 references_used: dict[str, str]):
        self.od, self.energies, self.opts, self.references_used = od, energies, opts, references_used
        self.phases = list(refs.phases)
        self.references = refs.interpolate(energies)  # (K, E); out-of-range energies are an error
        self.reference_set = refs
        self.normalization_reason = ""
        self._normalization: m.EdgeNormalization | None = None
        self._lcf: m.LCFResult | None = None

    @property
    def normalization(self) -> m.EdgeNormalization:
        if self._normalization is None:
            self._normalization = self._normalize()
        return self._normalization

    def _normalize(self) -> m.EdgeNormalization:
        """The edge fit when windows are given or the scan covers larch's defaults, else the reference fit."""
        o = self.opts
        if o.pre_edge is None or o.post_edge is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN planes
                mean = np.nanmean(self.od.reshape(self.energies.size, -1), axis=1)
            e0 = m.find_edge_energy(self.energies, mean)
            reason = m.edge_fit_coverage(self.energies, e0)
            if reason is not None and o.pre_edge is None and o.post_edge is None:
                self.normalization_reason = f"sparse scan, edge fit not possible: {reason}"
                return m.normalize_by_references(self.od, self.energies, self.references, self.reference_jumps())
        return m.normalize_edge(self.od, self.energies, pre_edge=o.pre_edge, post_edge=o.post_edge)

    def reference_jumps(self) -> np.ndarray:
        """(K,) edge jumps of the references on their own (full) energy grids; 1 where that fails."""
        refs = self.reference_set
        try:
            jumps = m.normalize_edge(np.asarray(refs.spectra, np.float64).T, refs.energies).thickness
        except ValueError:
            return np.ones(len(self.phases))
        return np.where(np.isfinite(jumps) & (jumps > 0), jumps, 1.0).astype(np.float64)

    @property
    def lcf(self) -> m.LCFResult:
        if self._lcf is None:
            data = self.od if self.opts.lcf_input == "od" else np.nan_to_num(self.normalization.normalized)
            self._lcf = m.linear_combination_fit(data, self.references, method=self.opts.lcf_method,
                                                 energies=self.energies, background_order=self.opts.background_order)
        return self._lcf

    def window(self, which: str) -> tuple[float, float]:
        given = self.opts.edge_window if which == "edge" else self.opts.peak_window
        if given is not None:
            return given
        mean = np.nanmean(self.normalization.normalized.reshape(self.energies.size, -1), axis=1)
        centre = self.energies[np.argmax(np.gradient(mean, self.energies))] if which == "edge" \
            else self.energies[np.argmax(mean)]
        return float(centre - 15.0), float(centre + 15.0)

    def check_curve_window(self, window: tuple[float, float]) -> None:
        """Raise StepSkipped when the window holds too few energies for the curve fit."""
        o = self.opts
        need = (o.curve_order + 1 if o.curve_fit == "polynomial" else 4) + 1
        n = int(((self.energies >= window[0]) & (self.energies <= window[1])).sum())
        if n < need:
            raise StepSkipped(f"the window {window[0]:.1f}-{window[1]:.1f} eV holds {n} energies; a {o.curve_fit} "
                              f"fit of order {o.curve_order} needs {need}: the scan is too sparse here")


def lcf_arrays(od: np.ndarray, references: np.ndarray, energies: np.ndarray, opts: MethodsOptions,
               result: m.LCFResult | None = None) -> dict[str, np.ndarray]:
    """The arrays the ``lcf`` method writes, from the OD (or normalized) cube and the (K, E) references."""
    fit = result or m.linear_combination_fit(od, references, method=opts.lcf_method, energies=energies,
                                             background_order=opts.background_order)
    weights = fit.fractions.astype(np.float64)
    total = weights.sum(axis=0)
    fractions = weights
    if opts.lcf_sum_to_one and opts.lcf_method != "fcls":
        fractions = np.where(total > 0, weights / np.where(total > 0, total, 1.0), np.nan)
    return {"fractions_lcf": fractions.astype(np.float32), "fit_error": fit.fit_error,
            "reduced_chi2": fit.reduced_chi2, "scale_lcf": total.astype(np.float32)}


def kmeans_arrays(od: np.ndarray, normalized: np.ndarray, opts: MethodsOptions) -> tuple[dict, dict]:
    """The arrays and parameters of the ``kmeans`` method: k-means of the particle pixels' spectra."""
    mask = particle_mask(od) if opts.kmeans_mask == "particle" else None
    data = np.asarray(normalized if opts.kmeans_input == "normalized" else od, np.float64)
    if mask is not None and int(mask.sum()) < opts.n_clusters:
        raise StepSkipped(f"{int(mask.sum())} particle pixels, fewer than n_clusters={opts.n_clusters}")
    res = m.kmeans_clusters(data, opts.n_clusters, mask=mask, remove_components=1 if opts.kmeans_remove_pc1 else 0)
    return ({"cluster_mask": res.labels, "cluster_spectra": res.mean_spectra.astype(np.float32)},
            {"n_clusters": opts.n_clusters, "counts": res.counts.tolist(), "inertia": res.inertia,
             "input": opts.kmeans_input, "mask": opts.kmeans_mask, "remove_pc1": opts.kmeans_remove_pc1})


def _normalize(ctx: _Context) -> tuple[dict, dict]:
    n = ctx.normalization
    return ({"normalized": n.normalized, "thickness": n.thickness},
            {"edge_energy": n.edge_energy, "pre_edge": list(n.pre_window), "post_edge": list(n.post_window),
             "post_order": n.post_order, "path": n.method, "reason": ctx.normalization_reason})


def _lcf(ctx: _Context) -> tuple[dict, dict]:
    o = ctx.opts
    arrays = lcf_arrays(ctx.od, ctx.references, ctx.energies, o, ctx.lcf)
    return arrays, {"method": o.lcf_method, "input": o.lcf_input, "sum_to_one": o.lcf_sum_to_one,
                    "background_order": o.background_order, "phases": ctx.phases}


def _edge50(ctx: _Context) -> tuple[dict, dict]:
    window = ctx.window("edge")
    ctx.check_curve_window(window)
    e50 = m.edge50_map(ctx.normalization.normalized, ctx.energies, window, fit=ctx.opts.curve_fit,
                       order=ctx.opts.curve_order)
    return {"edge50": e50}, {"window": list(window), "fit": ctx.opts.curve_fit, "order": ctx.opts.curve_order}


def _peak(ctx: _Context) -> tuple[dict, dict]:
    window = ctx.window("peak")
    ctx.check_curve_window(window)
    peak = m.peak_position_map(ctx.normalization.normalized, ctx.energies, window, fit=ctx.opts.curve_fit,
                               order=ctx.opts.curve_order)
    return {"peak_position": peak}, {"window": list(window), "fit": ctx.opts.curve_fit, "order": ctx.opts.curve_order}


def _masks(ctx: _Context) -> tuple[dict, dict]:
    o = ctx.opts
    parts = []
    if o.thickness_min is not None:
        parts.append(m.threshold_mask(ctx.normalization.thickness, low=o.thickness_min))
    if o.fit_error_max is not None:
        parts.append(m.threshold_mask(ctx.lcf.fit_error, high=o.fit_error_max))
    if not parts:
        raise ValueError("the masks method needs thickness_min and/or fit_error_max")
    mask = m.combine_masks(*parts)
    return {"threshold_mask": mask}, {"thickness_min": o.thickness_min, "fit_error_max": o.fit_error_max,
                                      "fraction": float(mask.mean())}


def _kmeans(ctx: _Context) -> tuple[dict, dict]:
    normalized = ctx.normalization.normalized if ctx.opts.kmeans_input == "normalized" else ctx.od
    return kmeans_arrays(ctx.od, normalized, ctx.opts)


def _rum(prior: str) -> Callable[[_Context], tuple[dict, dict]]:
    def run(ctx: _Context) -> tuple[dict, dict]:
        o = ctx.opts
        res = m.robust_unmixing(ctx.od, ctx.references, prior=prior, lam=o.rum_lam, strength=o.rum_strength,
                                rho=o.rum_rho, max_iter=o.rum_max_iter, denoiser=o.denoiser)
        name = f"rum_{prior}"
        history = {k: [float(f"{v:.6g}") for v in vals] for k, vals in res.history.items()}
        return ({f"fractions_{name}": res.fractions, f"scale_{name}": res.scale},
                {**res.parameters, "iterations": res.iterations, "converged": res.converged, "history": history})
    return run


_RUNNERS: dict[str, Callable[[_Context], tuple[dict, dict]]] = {
    "normalize": _normalize, "lcf": _lcf, "edge50": _edge50, "peak": _peak, "masks": _masks, "kmeans": _kmeans,
    "rum_tv": _rum("tv"), "rum_pnp": _rum("pnp"),
}


def run_methods(client, uid: str, options: MethodsOptions | None = None) -> dict[str, Any]:
    """Run the requested methods on the result of run ``uid`` and write their arrays into it.

    Parameters
    ----------
    client : Tiled client with write access
    uid : run uid (its result is at ``<options.root>/<uid>``)
    options : which methods and their parameters (default: LCF)

    Returns
    -------
    The ``methods`` record written into the result metadata, ``{name: {status: complete | skipped |
    failed, parameters, seconds, arrays, errors}}`` (``reason`` with skipped; with complete ``references:
    {name, source, from}``, the references used). Bad input (no OD cube, a references option that does not
    load, references not covering the energies) fails every method, recorded, not raised. While a split LCF
    replaces the LCF arrays (its ``methods.lcf`` ``running`` and alive), the LCF is not run: ``skipped`` in the
    record returned, its reason naming that job, whose record stays in Tiled. Raises ``KeyError``
    (``TypeError``) when the run has no result (a node that is not a result): there is nothing to record it on.
    """
    opts = (options or MethodsOptions()).validate()
    t0 = time.perf_counter()
    writer = ResultWriter.open(client, uid, root=opts.root)  # KeyError: no result to record anything on
    busy = _split_lcf_at_work(writer) if "lcf" in opts.methods else ""
    names = [name for name in opts.methods if not (name == "lcf" and busy)]  # the split LCF writes methods.lcf
    md = writer.metadata
    record: dict[str, Any] = dict(md["methods"]) if isinstance(md.get("methods"), Mapping) else {}
    try:
        ctx = _load(client, uid, writer, md, opts)
    except Exception as exc:  # noqa: BLE001 - any bad input is recorded on the result, never raised
        error = f"{type(exc).__name__}: {exc}"
        logger.warning("run %s: methods not run: %s", uid, error)
        for name in names:  # an earlier complete record and its arrays are kept
            entry = {"status": "failed", "parameters": {}, "seconds": 0.0, "arrays": [], "errors": [error]}
            record[name] = settled_entry(writer, name, entry, earlier_complete(record, name))
        return _split_lcf_skipped(record_methods(writer, {name: record[name] for name in names}), busy)
    for name in names:
        t = time.perf_counter()
        arrays: dict[str, Any] = {}
        try:
            arrays, params = _RUNNERS[name](ctx)
            writer.write_maps(**arrays)
            digests = read_back(writer, arrays)  # complete only when every array reads back as written
            entry = {"status": "complete", "parameters": params, "arrays": sorted(arrays), "errors": [],
                     "references": ctx.references_used, "array_sha256": digests}
        except StepSkipped as exc:
            logger.info("run %s: method %s skipped: %s", uid, name, exc)
            entry = {"status": "skipped", "parameters": {}, "arrays": [], "errors": [], "reason": str(exc)}
        except Exception as exc:  # noqa: BLE001 - one method failing never stops the others
            logger.warning("run %s: method %s failed: %s", uid, name, exc)
            logger.debug("%s", traceback.format_exc())
            entry = {"status": "failed", "parameters": {}, "arrays": [], "errors": [f"{type(exc).__name__}: {exc}"]}
        entry["seconds"] = round(time.perf_counter() - t, 3)
        record[name] = settled_entry(writer, name, entry, earlier_complete(record, name), written=arrays)
        record = record_methods(writer, {name: record[name]})
    writer.update_entries({"timings": {"methods": round(time.perf_counter() - t0, 3)}})  # the live run's stay
    return _split_lcf_skipped(record, busy)


def _split_lcf_skipped(record: dict[str, Any], busy: str) -> dict[str, Any]:
    """The ``methods`` record returned: the LCF ``skipped`` with the reason ``busy`` when a split LCF was at work
    (its own ``running`` record, not this, stays in Tiled)."""
    if busy:
        logger.info("method lcf not run: %s", busy)
        record = {**record, "lcf": {"status": "skipped", "parameters": {}, "arrays": [], "errors": [], "reason": busy}}
    return record


def _split_lcf_at_work(writer: ResultWriter) -> str:
    """Why the LCF may not run now: a split LCF is replacing its arrays, its ``methods.lcf`` record ``running`` and
    alive ("" when none is; one left by a submitter that stopped is finalized ``failed`` here, interrupted)."""
    try:
        ensure_not_running(writer, LCF_RECORD, METHOD_ARRAYS["lcf"], stale_after=STALE_AFTER, job="split LCF")
    except JobRunningError as exc:
        return str(exc)
    return ""


def _load(client, uid: str, writer: ResultWriter, md: Mapping[str, Any], opts: MethodsOptions) -> _Context:
    if "od" not in writer.container:
        raise ValueError(f"the result of run {uid} has no OD cube 'od' (the worker ran with --no-od)")
    n, seen = recorded_energies(writer.path, md)
    energies = np.asarray(seen, np.float64)
    if n < 2 or energies.size != n:
        raise ValueError(f"the result of run {uid} has {n} OD planes and {energies.size} energies_eV; "
                         "need >= 2 of both")
    od = np.asarray(writer.container["od"][:n], np.float64)
    order = np.argsort(energies, kind="stable")  # the methods need increasing energies
    refs, used = _references(client, uid, md, opts)
    return _Context(od[order], energies[order], refs, opts, used)


def run(context: JobContext, run_uid: str, options: dict) -> JobOutcome:
    """The ``methods`` job: the classic methods asked for, on the result of ``run_uid``.

    ``details`` is the ``methods`` record written into the result; the job is complete when every
    method asked for is complete or skipped (with its reason), else failed with each failed method's
    errors as the reason.
    """
    opts = MethodsOptions(**options)
    t0 = time.perf_counter()
    record = run_methods(context.tiled(), run_uid, opts)
    failed = [f"{name}: {'; '.join(record[name].get('errors') or [])}" for name in opts.methods
              if record.get(name, {}).get("status") not in ("complete", "skipped")]
    return JobOutcome(run_uid, "methods", JobStatus.FAILED if failed else JobStatus.COMPLETE,
                      reason="; ".join(failed), seconds=round(time.perf_counter() - t0, 3),
                      retry=f"phasestream reprocess --methods {','.join(opts.methods)} {run_uid}" if failed else "",
                      details=record)
