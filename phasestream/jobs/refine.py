"""Post-scan GMVAE refinement of a phase-map result in Tiled.

After a run's PCC result is final, :func:`refine_result` reads its OD cube, phase, ambiguity and
mask maps back from Tiled, encodes the particle pixels' spectra through the model server
(:class:`~phasestream.modelserver.client.ModelClient`; no TensorFlow in this process), resolves
the ambiguous pixels in the latent space (:func:`~phasestream.models.refine.refine_ambiguous`) and
writes ``refined_phase``, ``latent``, ``false_positive`` and the metadata ``refined_fractions``,
``models`` and ``refinement`` into the same result.

Refinement never spoils the PCC result: when it cannot run (model server down, the run's
energies not those of the model, no OD cube in the result) the result keeps its PCC maps and
status and records ``refinement: {status: "skipped", reason}``; ``phasestream reprocess
--refine-only UID`` does it later (the recorded ``retry`` is the whole command). :func:`refine` is
the plain post-scan job (tiled uri, run uid, options).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from phasestream.contract import USABLE_STATUSES, JobOutcome
from phasestream.jobs.context import JobContext
from phasestream.jobs.record import model_client as jobs_model_client
from phasestream.jobs.record import recorded_job
from phasestream.kernels.phases import DEFAULT_AMBIGUITY, phase_fractions
from phasestream.models.refine import STRATEGIES, refine_ambiguous
from phasestream.modelserver.client import ModelClient
from phasestream.modelserver.protocol import DEFAULT_MODEL_ADDRESS, ModelServerError, ModelServerUnavailable
from phasestream.store.results import ResultWriter

__all__ = ["DEFAULT_MODEL", "RefineOptions", "RefinementSkipped", "match_energies", "refine_result", "run"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "gmvae-nvpf-synthetic"
FINAL_REFINEMENT = ("complete", "skipped", "failed")


class RefinementSkipped(RuntimeError):
    """Refinement cannot run for this run (the reason is recorded on the result)."""


@dataclass
class RefineOptions:
    """Options of the refinement job (validated by :meth:`validate`).

    model, version : the GMVAE artifact (default: the highest version of ``model``)
    strategy : one of :data:`phasestream.models.refine.STRATEGIES`; ``knn`` by default, the most
        accurate on the simulated particles (``benchmarks/models.py``); ``mahalanobis`` is the paper's
    candidates : ambiguous pixels choose among the phases within ``ambiguity`` of their best PCC
        (the phases in question) rather than among every phase
    address : the model server
    timeout : seconds to wait for each model-server reply
    energy_tolerance_eV : how far a run energy may be from the model's to count as the same
    """

    model: str = DEFAULT_MODEL
    version: str | None = None
    strategy: str = "knn"
    candidates: bool = True
    address: str = DEFAULT_MODEL_ADDRESS
    root: str = "phasestream"
    timeout: float = 60.0
    retries: int = 1
    energy_tolerance_eV: float = 0.05
    ambiguity: float = DEFAULT_AMBIGUITY

    def validate(self) -> RefineOptions:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.energy_tolerance_eV <= 0 or self.timeout <= 0:
            raise ValueError("energy_tolerance_eV and timeout must be > 0")
        return self


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
            "(phasestream train gmvae)")
    return index


def _model_info(client: ModelClient, opts: RefineOptions) -> dict[str, Any]:
    # a short first request: a server that is down is found out in seconds, not after a full timeout
    models = [m for m in client.list_models(timeout=min(5.0, opts.timeout)) if m["name"] == opts.model
              and (opts.version is None or m["version"] == opts.version)]
    if not models:
        what = opts.model + (f" {opts.version}" if opts.version else "")
        raise RefinementSkipped(f"the model server at {opts.address} has no model {what!r}")
    return models[-1]  # highest version, as the server picks it


def refine_result(tiled_client, run_uid: str, options: RefineOptions | None = None, *,
                  model_client: ModelClient | None = None) -> dict[str, Any]:
    """Refine the result of ``run_uid`` in Tiled; returns the ``refinement`` metadata it wrote.

    Never raises for a run that cannot be refined: the reason is recorded (``status: skipped``
    or ``failed``) and returned. Raises ``KeyError`` when the run has no result at all.
    """
    opts = (options or RefineOptions()).validate()
    writer = ResultWriter.open(tiled_client, run_uid, root=opts.root)
    with jobs_model_client(opts, model_client) as client:
        return recorded_job(writer, "refinement", lambda: _refine(writer, client, opts),
                            skipped=(RefinementSkipped, ModelServerUnavailable), failed=(ModelServerError, ValueError),
                            retry=(f"phasestream reprocess --refine-only --models {opts.address} --model {opts.model} "
                                   f"--strategy {opts.strategy} {run_uid}"),
                            extra={"strategy": opts.strategy, "model": opts.model})


def _refine(writer: ResultWriter, client: ModelClient, opts: RefineOptions) -> dict[str, Any]:
    md = writer.metadata
    if md.get("status") not in USABLE_STATUSES:
        raise RefinementSkipped(f"the PCC result is {md.get('status')!r}, not complete")
    arrays = writer.container
    missing = [k for k in ("phase", "ambiguous", "mask", "pcc") if k not in arrays]
    if missing:
        raise RefinementSkipped(f"the result lacks the maps {missing}")
    if "od" not in arrays:
        raise RefinementSkipped("the result has no OD cube (the worker ran with --no-od)")
    info = _model_info(client, opts)
    n_seen = int(md.get("n_energies_seen") or 0)
    energies = list(md.get("energies_eV") or [])[:n_seen]
    planes = match_energies(energies, info["energies_eV"], opts.energy_tolerance_eV)
    phase = arrays["phase"].read()
    ambiguous = arrays["ambiguous"].read().astype(bool)
    mask = arrays["mask"].read().astype(bool)
    pcc = arrays["pcc"].read() if opts.candidates else None
    od = arrays["od"][:n_seen]
    spectra = od[planes][:, mask].T  # (N, E) in the model's energy order
    usable = np.isfinite(spectra).all(axis=1)
    encoded = client.encode(opts.model, spectra[usable], version=info["version"]) if usable.any() else None
    latent = np.full((*mask.shape, 3 if encoded is None else encoded.latent.shape[1]), np.nan, np.float32)
    if encoded is not None:
        rows, cols = np.nonzero(mask)
        latent[rows[usable], cols[usable]] = encoded.latent
    anchors = None
    if opts.strategy == "anchor":
        from phasestream.references import load_document_references, reference_folders_from_env

        # a name from the result's metadata, which came from a start document: registered names and
        # files in the configured reference folders only
        refs = load_document_references(md["references"]["name"], folders=reference_folders_from_env())
        anchors = client.encode(opts.model, refs.interpolate(info["energies_eV"]).astype(np.float32),
                                version=info["version"]).latent
    result = refine_ambiguous(latent, phase, ambiguous, mask & np.isfinite(latent).all(axis=-1), opts.strategy,
                              pcc=pcc, ambiguity=opts.ambiguity, anchors=anchors)
    phases = writer.phases
    fractions = phase_fractions(result.refined_phase, mask, n_phases=len(phases))
    writer.write_maps(refined_phase=result.refined_phase, latent=latent,
                      false_positive=result.false_positive.astype(np.uint8))
    n_mask = max(int(mask.sum()), 1)
    models = dict(md.get("models") or {})
    models[info["name"]] = {"version": info["version"], "sha256": info["sha256"]}
    writer.update_metadata(refined_fractions=fractions.as_dict(phases), models=models)
    return {
        "status": "complete",
        "candidates": bool(opts.candidates),
        "version": info["version"],
        "reassigned_fraction": float(result.reassigned.sum() / n_mask),
        "false_positive_fraction": float(result.false_positive.sum() / n_mask),
        "unencoded_pixels": int((~usable).sum()),
    }


def run(context: JobContext, run_uid: str, options: dict) -> JobOutcome:
    """The ``refine`` job: GMVAE refinement of the result of ``run_uid`` (its ``refinement`` record)."""
    record = refine_result(context.tiled(), run_uid, RefineOptions(**options))
    return JobOutcome.from_record(run_uid, "refine", record)
