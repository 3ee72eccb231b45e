"""Post-scan GMVAE refinement of a phase-map result in Tiled.

After a run's PCC result is final, :func:`refine_result` reads its OD cube, phase, ambiguity and
mask maps back from Tiled, encodes the particle pixels' spectra through the model server
(:class:`~phasestream.modelserver.client.ModelClient`; no TensorFlow in this process), checks on
held-out confident pixels that the latent space resolves ambiguity better than PCC does
(:mod:`phasestream.models.heldout`), resolves the ambiguous pixels in the latent space
(:func:`~phasestream.models.refine.refine_ambiguous`) and writes ``refined_phase``, ``latent``,
``false_positive`` and the metadata ``refined_fractions``, ``models`` and ``refinement`` into the
same result.

Refinement never spoils the PCC result: when it cannot run (model server down, the run's
energies not those of the model, no OD cube in the result) or cannot show that it helps (no
strategy beats PCC on the held-out pixels by ``min_gain``), the result keeps its PCC maps and
status and records ``refinement: {status: "skipped", reason, retry}``, and the arrays of an
earlier refinement are removed first, so that ``refined_phase`` always belongs to the
``refinement`` record beside it. While it works, its ``running`` record carries a heartbeat
(:mod:`phasestream.jobs.heartbeat`: a killed job's record ends ``failed``, a second refinement of the same
result is refused meanwhile), and ``complete`` means every array it wrote read back from Tiled as written
(:mod:`phasestream.store.readback`). :func:`refine` is the plain post-scan job (tiled uri, run uid, options).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from phasestream.contract import USABLE_STATUSES, JobOutcome
from phasestream.contract.metadata import recorded_energies
from phasestream.jobs.context import JobContext
from phasestream.jobs.heartbeat import HEARTBEAT_SECONDS, STALE_AFTER, JobHeartbeat, JobRunningError
from phasestream.jobs.keeping import KeptJob, run_keeping
from phasestream.jobs.maps import result_reference_values
from phasestream.jobs.record import model_client as jobs_model_client
from phasestream.kernels.phases import DEFAULT_AMBIGUITY, phase_fractions
from phasestream.models.heldout import (
    NOISE_SCALES,
    HeldOut,
    od_noise_level,
    perturb_confident,
    score_spatial,
    score_strategies,
)
from phasestream.models.refine import AUTO, MODEL_FREE, SPATIAL, STRATEGIES, STRATEGY_CHOICES, refine_ambiguous
from phasestream.models.spatial import pcc_reliability
from phasestream.modelserver.client import ModelClient
from phasestream.modelserver.protocol import DEFAULT_MODEL_ADDRESS, ModelServerError, ModelServerUnavailable
from phasestream.store.readback import read_back
from phasestream.store.results import ResultWriter

__all__ = [
    "DEFAULT_MODEL",
    "REFINEMENT",
    "REFINEMENT_ARRAYS",
    "RefineOptions",
    "RefinementSkipped",
    "held_out_check",
    "match_energies",
    "refine_result",
    "run",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "gmvae-nvpf-synthetic"
FINAL_REFINEMENT = ("complete", "skipped", "failed")
#: the arrays a refinement writes; removed before every refinement (never left from an earlier one)
REFINEMENT_ARRAYS = ("refined_phase", "latent", "false_positive")
#: the refinement as a job that keeps its complete record through a re-run (jobs/keeping.py)
REFINEMENT = KeptJob("refinement", REFINEMENT_ARRAYS, {"refined_fractions": {}})


class RefinementSkipped(RuntimeError):
    """Refinement cannot run, or cannot show that it helps, for this run (the reason is recorded on the
    result; ``details`` are recorded beside it, e.g. the held-out accuracies)."""

    def __init__(self, reason: str, details: dict[str, Any] | None = None):
        super().__init__(reason)
        self.details = dict(details or {})


@dataclass
class RefineOptions:
    """Options of the refinement job (validated by :meth:`validate`).

    model, version : the GMVAE artifact (default: the highest version of ``model``)
    strategy : ``auto`` (default: the strategy that wins the run's held-out check) or one of
        :data:`phasestream.models.refine.STRATEGIES`; ``mahalanobis`` is the paper's
    candidates : ambiguous pixels choose among the phases within ``ambiguity`` of their best PCC
        (the phases in question) rather than among every phase
    check : run the held-out check and refine only when the strategy beats PCC there by ``min_gain``
        (accuracy, 0.01 = 1 point); without it the strategy is applied blindly (``auto`` needs it)
    held_out : at most this many confident pixels are made ambiguous for the check
    min_held_out : fewer held-out pixels than this and refinement is skipped (it cannot show it helps)
    address : the model server
    timeout : seconds to wait for each model-server reply
    energy_tolerance_eV : how far a run energy may be from the model's to count as the same
    tiled : the Tiled URI written into the retry command (``phasestream reprocess --tiled``)
    heartbeat_seconds : how often the ``running`` record's ``heartbeat_at`` is touched while the job works
    stale_after : a ``running`` record found without a heartbeat for this long (its job stopped) is recorded
        ``failed`` and this refinement runs; a younger one refuses it (:mod:`phasestream.jobs.heartbeat`)
    """

    model: str = DEFAULT_MODEL
    version: str | None = None
    strategy: str = AUTO
    candidates: bool = True
    check: bool = True
    min_gain: float = 0.01
    held_out: int = 2000
    min_held_out: int = 100
    seed: int = 0
    address: str = DEFAULT_MODEL_ADDRESS
    root: str = "phasestream"
    timeout: float = 60.0
    retries: int = 1
    energy_tolerance_eV: float = 0.05
    ambiguity: float = DEFAULT_AMBIGUITY
    tiled: str | None = None
    heartbeat_seconds: float = HEARTBEAT_SECONDS
    stale_after: float = STALE_AFTER

    def validate(self) -> RefineOptions:
        if self.strategy not in STRATEGY_CHOICES:
            raise ValueError(f"strategy must be one of {STRATEGY_CHOICES}, got {self.strategy!r}")
        if self.strategy == AUTO and not self.check:
            raise ValueError("strategy 'auto' picks the winner of the held-out check: it cannot run without it")
        if self.energy_tolerance_eV <= 0 or self.timeout <= 0 or self.heartbeat_seconds <= 0 or self.stale_after <= 0:
            raise ValueError("energy_tolerance_eV, timeout, heartbeat_seconds and stale_after must be > 0")
        if self.held_out < 1 or self.min_held_out < 1 or not -1.0 <= self.min_gain <= 1.0:
            raise ValueError("held_out and min_held_out must be >= 1, min_gain within [-1, 1]")
        return self

    def retry_command(self, run_uid: str) -> str:
        """The whole ``phasestream reprocess`` command that repeats this refinement."""
        tiled = f"--tiled {self.tiled} " if self.tiled else ""
        check = f"--min-gain {self.min_gain} " if self.check else "--no-check "
        return (f"phasestream reprocess {tiled}--root {self.root} --refine-only --models {self.address} "
                f"--model {self.model}{f' --model-version {self.version}' if self.version else ''} "
                f"--strategy {self.strategy} {check}{run_uid}")


def match_energies(run_energies, model_energies, tolerance: float) -> np.ndarray:
    """Index into ``run_energies`` of each model energy (model order); raises RefinementSkipped if one is missing."""
    run = np.asarray(run_energies, dtype=np.float64)
    model = np.asarray(model_energies, dtype=np.float64)
    if run.size == 0:
        raise RefinementSkipped("the run has no energies")
    index = np.abs(run[None, :] - model[:, None]).argmin(axis=1)
    missing = [f"{e:.2f}" for e, i in zip(model, index, strict=True) if abs(run[i] - e) > tolerance]
    if missing:
        raise RefinementSkipped(
            f"the run's energies do not match the model's: model energies {missing} eV are not among the run's "
            f"{[round(float(e), 2) for e in run]} (tolerance {tolerance} eV); train a model for these energies "
            "(phasestream train gmvae --tiled URI --runs UID --out DIR, then reprocess with --model NAME)")
    return index


def _model_info(client: ModelClient, opts: RefineOptions) -> dict[str, Any]:
    # a short first request: a server that is down is found out in seconds, not after a full timeout
    models = [m for m in client.list_models(timeout=min(5.0, opts.timeout)) if m["name"] == opts.model
              and (opts.version is None or m["version"] == opts.version)]
    if not models:
        what = opts.model + (f" {opts.version}" if opts.version else "")
        raise RefinementSkipped(f"the model server at {opts.address} has no model {what!r}")
    return models[-1]  # highest version, as the server picks it


def _tiled_uri(tiled_client) -> str | None:
    try:
        return str(tiled_client.context.api_uri).rstrip("/")
    except AttributeError:
        return None


def refine_result(tiled_client, run_uid: str, options: RefineOptions | None = None, *,
                  model_client: ModelClient | None = None) -> dict[str, Any]:
    """Refine the result of ``run_uid`` in Tiled; returns the ``refinement`` metadata it wrote.

    Never raises for a run that cannot be refined: the reason is recorded (``status: skipped``
    or ``failed``) and returned. Raises ``KeyError`` when the run has no result at all, and
    :class:`~phasestream.jobs.heartbeat.JobRunningError` (nothing written) when another refinement of it is
    at work (its ``running`` record has a heartbeat younger than ``stale_after``).
    """
    opts = (options or RefineOptions()).validate()
    if opts.tiled is None:
        opts = replace(opts, tiled=_tiled_uri(tiled_client))
    def work(writer: ResultWriter, client: ModelClient, ready: Callable[[], ResultWriter],
             beat: JobHeartbeat) -> dict[str, Any]:
        return _refine(writer, client, opts, ready, beat)

    return run_keeping(tiled_client, run_uid, REFINEMENT, work, root=opts.root, retry=opts.retry_command(run_uid),
                       model=None,
                       heartbeat_seconds=opts.heartbeat_seconds, stale_after=opts.stale_after,
                       models=jobs_model_client(opts, model_client),
                       skipped=(RefinementSkipped, ModelServerUnavailable), failed=(ModelServerError, ValueError),
                       extra={"strategy": opts.strategy, "requested_strategy": opts.strategy,
                              "model": None if opts.strategy in MODEL_FREE else opts.model})


def _refine(writer: ResultWriter, client: ModelClient, opts: RefineOptions,
            ready: Callable[[], ResultWriter], beat: JobHeartbeat) -> dict[str, Any]:
    md = writer.metadata
    if md.get("status") not in USABLE_STATUSES:
        raise RefinementSkipped(f"the PCC result is {md.get('status')!r}, not complete")
    arrays = writer.container
    missing = [k for k in ("phase", "ambiguous", "mask", "pcc") if k not in arrays]
    if missing:
        raise RefinementSkipped(f"the result lacks the maps {missing}")
    if "od" not in arrays:
        raise RefinementSkipped("the result has no OD cube (the worker ran with --no-od)")
    model_free = opts.strategy in MODEL_FREE
    info = None if model_free else _model_info(client, opts)
    n_seen, energies = recorded_energies(writer.path, md)
    planes = np.arange(len(energies)) if model_free else match_energies(energies, info["energies_eV"],
                                                                         opts.energy_tolerance_eV)
    phase = arrays["phase"].read()
    ambiguous = arrays["ambiguous"].read().astype(bool)
    mask = arrays["mask"].read().astype(bool)
    pcc_maps = arrays["pcc"].read()
    pcc = pcc_maps if opts.candidates else None
    od = arrays["od"][:n_seen]
    full = od[:, mask].T  # (N, E_run): the spectra PCC saw
    usable = np.isfinite(full).all(axis=1)
    ref_values = result_reference_values(md, energies)
    latent = flat_latent = anchors = None
    if not model_free:
        latent, flat_latent = _encode_pixels(client, opts, info, full[:, planes], usable, mask)
        if ref_values is not None:
            anchors = client.encode(opts.model, ref_values[:, planes].astype(np.float32),
                                    version=info["version"]).latent
        elif opts.strategy == "anchor":
            raise RefinementSkipped(f"strategy 'anchor' needs the run's reference spectra: the result holds none "
                                    f"and {(md.get('references') or {}).get('name')!r} is neither registered nor a "
                                    "file in the reference folders (PHASESTREAM_REFERENCES)")
    strategy, held_record = opts.strategy, None
    if opts.check:
        try:
            strategy, held_record = held_out_check(opts, client, info, od, mask, phase, ambiguous, full, usable,
                                                    flat_latent, planes, ref_values, anchors, writer.phases,
                                                    pcc=pcc_maps)
        except RefinementSkipped as skip:
            # repeating the command would skip again: the retry is the one that refines anyway, unchecked
            named = opts.strategy if opts.strategy != AUTO else "knn"
            forced = replace(opts, strategy=skip.details.get("strategy") or named, check=False)
            skip.details["retry"] = forced.retry_command(writer.run_uid)
            raise
    inside = mask if latent is None else mask & np.isfinite(latent).all(axis=-1)
    result = refine_ambiguous(latent, phase, ambiguous, inside, strategy, pcc=pcc, ambiguity=opts.ambiguity,
                              anchors=anchors, reliability=pcc_reliability(pcc_maps))
    phases = writer.phases
    fractions = phase_fractions(result.refined_phase, mask, n_phases=len(phases))
    maps = {"refined_phase": result.refined_phase, "false_positive": result.false_positive.astype(np.uint8),
            **({} if latent is None else {"latent": latent})}
    writer = ready()
    writer.write_maps(**maps)
    digests = read_back(writer, maps)  # complete only when every array reads back as written (ReadBackError: failed)
    n_mask = max(int(mask.sum()), 1)
    model = {} if info is None else {info["name"]: {"version": info["version"], "sha256": info["sha256"]}}
    with beat.paused():  # the model entry alone: what other jobs added to models meanwhile stays
        writer.update_entries({"models": model}, refined_fractions=fractions.as_dict(phases))
    return {
        "status": "complete",
        "array_sha256": digests,
        "strategy": strategy,
        "candidates": bool(opts.candidates),
        "model": None if info is None else info["name"],
        "version": None if info is None else info["version"],
        "held_out": held_record,
        "reassigned_fraction": float(result.reassigned.sum() / n_mask),
        "false_positive_fraction": float(result.false_positive.sum() / n_mask),
        "unencoded_pixels": 0 if model_free else int((~usable).sum()),
    }


def _encode_pixels(client: ModelClient, opts: RefineOptions, info: dict[str, Any], spectra: np.ndarray,
                   usable: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Latent points of the particle pixels: the (Y, X, D) map and the (N, D) rows in mask order (NaN where
    a spectrum is not finite)."""
    encoded = client.encode(opts.model, spectra[usable], version=info["version"]) if usable.any() else None
    d = 3 if encoded is None else encoded.latent.shape[1]
    latent = np.full((*mask.shape, d), np.nan, np.float32)
    flat_latent = np.full((len(spectra), d), np.nan, np.float32)
    if encoded is not None:
        rows, cols = np.nonzero(mask)
        latent[rows[usable], cols[usable]] = encoded.latent
        flat_latent[usable] = encoded.latent
    return latent, flat_latent


def held_out_check(opts, client, info, od, mask, phase, ambiguous, full, usable, flat_latent, planes,
                   ref_values, anchors, phases, *, pcc=None) -> tuple[str, dict[str, Any]]:
    """The strategy to apply and the ``held_out`` record; raises RefinementSkipped when none beats PCC.

    ``od`` (E_run, Y, X), ``mask``, ``phase`` and ``ambiguous`` (Y, X) are the result's maps, ``pcc``
    (K, Y, X) its PCC maps (the image strategies' candidates and vote weights); ``full`` (N, E_run) the
    particle spectra (mask order), ``usable`` (N,) those encoded, ``flat_latent`` (N, D) their latent
    points (None without a model: only :data:`~phasestream.models.refine.MODEL_FREE` strategies are
    tried), ``planes`` the run energies of the model's, ``ref_values`` (K, E_run) and ``anchors`` (K, D)
    the references, ``phases`` their names. ``client.encode`` encodes the perturbed spectra (a
    ModelClient, or anything with its ``encode``).
    """
    if ref_values is None:
        raise RefinementSkipped("cannot check that refinement helps: the run's reference spectra are neither in "
                                "the result nor resolvable by name (rerun with --no-check to refine unchecked)")
    if opts.strategy != AUTO:
        tried = (opts.strategy,)
    else:
        tried = STRATEGIES if flat_latent is not None else MODEL_FREE
    labels = phase[mask]
    sure = usable & ~ambiguous[mask] & (labels >= 0)
    if flat_latent is not None:
        sure &= np.isfinite(flat_latent).all(axis=1)
    sure_idx = np.flatnonzero(sure)
    sigma = od_noise_level(od, mask)
    held: HeldOut = perturb_confident(full[sure_idx], labels[sure_idx], ref_values, sigma, ambiguity=opts.ambiguity,
                                      n_max=opts.held_out, seed=opts.seed)
    pcc_acc = held.pcc_accuracy
    record: dict[str, Any] = {"pixels": len(held), "pcc": None if not len(held) else round(pcc_acc, 4),
                              "strategies": {}, "min_gain": opts.min_gain,
                              "noise_scales": sorted({float(x) for x in held.scale})}
    if len(held) < opts.min_held_out:
        raise RefinementSkipped(
            f"cannot check that refinement helps: only {len(held)} confident pixels became ambiguous with up to "
            f"{max(NOISE_SCALES)}x the run's noise added (at least {opts.min_held_out} needed)", {"held_out": record})
    latent_held = None
    if flat_latent is not None:
        latent_held = client.encode(opts.model, held.spectra[:, planes].astype(np.float32),
                                    version=info["version"]).latent
    scores = {}
    in_latent = tuple(s for s in tried if s not in SPATIAL)
    if in_latent:
        scores.update(score_strategies(flat_latent[sure_idx], labels[sure_idx], held.index, latent_held, held,
                                       in_latent, ambiguity=opts.ambiguity, candidates=opts.candidates,
                                       anchors=anchors))
    in_image = tuple(s for s in tried if s in SPATIAL)
    if in_image:
        latent = None
        if flat_latent is not None:
            latent = np.full((*mask.shape, flat_latent.shape[1]), np.nan)
            latent[mask] = flat_latent
        held_pixels = np.flatnonzero(mask)[sure_idx[held.index]]
        scores.update(score_spatial(phase, ambiguous, mask, pcc, held_pixels, held, in_image, latent=latent,
                                    latent_held=latent_held, ambiguity=opts.ambiguity, candidates=opts.candidates,
                                    seed=opts.seed))
    scores = {k: scores[k] for k in tried if k in scores}
    record["strategies"] = {k: round(v, 4) for k, v in scores.items()}
    best = max(scores, key=lambda k: (scores[k], -tried.index(k)))
    record["gain"] = round(scores[best] - pcc_acc, 4)
    if scores[best] - pcc_acc < opts.min_gain:
        pair = held.confused_pair()
        what = f"{phases[pair[0]]} from {phases[pair[1]]}" if pair else "the phases"
        by = ("neither the latent space nor the image neighbours separate" if in_latent and in_image else
              "the image neighbours do not separate" if in_image else "latent space does not separate")
        raise RefinementSkipped(
            f"{by} {what} on this run: {best} {scores[best]:.3f} vs PCC {pcc_acc:.3f} on "
            f"{len(held):,} held-out pixels (needs a gain of {opts.min_gain:.3f}); PCC phases kept",
            {"held_out": record, "strategy": best})
    logger.info("held-out check: %s %.3f vs PCC %.3f on %d pixels", best, scores[best], pcc_acc, len(held))
    return best, record


def run(context: JobContext, run_uid: str, options: dict) -> JobOutcome:
    """The ``refine`` job: GMVAE refinement of the result of ``run_uid`` (its ``refinement`` record); ``skipped``,
    nothing written, while another refinement of it is at work."""
    client, opts = context.tiled(), RefineOptions(**options)
    try:
        record = refine_result(client, run_uid, opts)
    except JobRunningError as exc:
        retry = replace(opts, tiled=opts.tiled or _tiled_uri(client)).retry_command(run_uid)
        return JobOutcome(run_uid, "refine", "skipped", reason=str(exc), retry=retry)
    return JobOutcome.from_record(run_uid, "refine", record)
