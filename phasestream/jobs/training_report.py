"""What a newly trained GMVAE will do for refinement: the training report of ``phasestream train gmvae``.

Two measures, both stored in the artifact's manifest (``report``) and printed by the CLI:

* per-phase cluster purity: for each phase, the fraction of its training spectra whose mixture
  component's majority label is that phase (:func:`phasestream.models.gmvae.per_phase_purity`);
  a phase far below 1 shares its components with another one;
* the held-out refinement gain on validation runs: the refinement job's own held-out check
  (:func:`phasestream.jobs.refine.held_out_check`) run on a few whole runs of the training data,
  for each latent-space strategy and for ``spatial`` (which needs no model) for comparison.

When the model's best latent-space strategy does not beat PCC there by the job's ``min_gain``, the
report warns in words: the refinement job would abstain with this model. A phase with a purity
below :data:`MIN_PURITY` is named too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from phasestream.jobs.refine import RefinementSkipped, RefineOptions, held_out_check
from phasestream.models.refine import SPATIAL, STRATEGIES

__all__ = ["LATENT_STRATEGIES", "MIN_HELD_OUT", "MIN_PURITY", "ValidationRun", "training_report"]

logger = logging.getLogger(__name__)

#: the strategies that use the model (the report's gain is theirs)
LATENT_STRATEGIES = tuple(s for s in STRATEGIES if s not in SPATIAL)
#: a phase with a purity below this is named in a warning
MIN_PURITY = 0.5
#: held-out pixels a validation run needs for its gain to count (the job needs 100 by default)
MIN_HELD_OUT = 20


@dataclass
class ValidationRun:
    """One whole run for the report, at the training set's energies (in its order): ``od`` (E, Y, X),
    ``mask``, ``phase``, ``ambiguous`` (Y, X), ``pcc`` (K, Y, X) and ``reference_values`` (K, E)."""

    name: str
    od: np.ndarray
    mask: np.ndarray
    phase: np.ndarray
    ambiguous: np.ndarray
    pcc: np.ndarray
    reference_values: np.ndarray


class _Encoder:
    """The model server's ``encode`` on the model just trained."""

    def __init__(self, model):
        self.model = model

    def encode(self, name, spectra, version=None):
        return SimpleNamespace(latent=self.model.encode(np.asarray(spectra, np.float32))[0])


def _run_gains(encoder: _Encoder, run: ValidationRun, phases: list[str], min_gain: float) -> dict[str, Any]:
    full = run.od[:, run.mask].T
    usable = np.isfinite(full).all(axis=1)
    flat = np.full((len(full), encoder.model.latent_dim), np.nan, np.float32)
    if usable.any():
        flat[usable] = encoder.encode("", full[usable]).latent
    anchors = encoder.encode("", run.reference_values).latent
    planes = np.arange(run.od.shape[0])
    entry: dict[str, Any] = {"run": run.name, "gain": {}, "accuracy": {}}
    for strategy in (*LATENT_STRATEGIES, "spatial"):
        # measure, never abstain on the gain; small validation fields hold few pixels near the decision boundary
        opts = RefineOptions(strategy=strategy, min_gain=-1.0, min_held_out=MIN_HELD_OUT)
        try:
            _, record = held_out_check(opts, encoder, {"version": None}, run.od, run.mask, run.phase, run.ambiguous,
                                       full, usable, flat, planes, run.reference_values, anchors, phases, pcc=run.pcc)
        except RefinementSkipped as skip:
            entry["skipped"] = str(skip)
            break
        entry["pixels"], entry["pcc"] = record["pixels"], record["pcc"]
        entry["gain"][strategy] = record["gain"]
        entry["accuracy"][strategy] = record["strategies"][strategy]
    return entry


def training_report(model, spectra: np.ndarray, labels: np.ndarray, phases: list[str],
                    validation: list[ValidationRun], *, min_gain: float = RefineOptions.min_gain,
                    max_spectra: int = 20_000, seed: int = 0) -> dict[str, Any]:
    """Per-phase purity on (up to ``max_spectra`` of) the training spectra (N, E) with their PCC
    ``labels``, the held-out refinement gain on the ``validation`` runs, and ``warnings`` in words."""
    from phasestream.models.gmvae import cluster_purity, per_phase_purity  # TensorFlow: only when training

    rng = np.random.default_rng(seed)
    pick = rng.choice(len(spectra), min(max_spectra, len(spectra)), replace=False)
    components = model.encode(np.asarray(spectra, np.float32)[pick])[1]
    purity = per_phase_purity(components, np.asarray(labels)[pick])
    report: dict[str, Any] = {
        "cluster_purity": round(cluster_purity(components, np.asarray(labels)[pick]), 4),
        "per_phase_purity": {phases[k]: round(v, 4) for k, v in purity.items()},
        "min_gain": min_gain, "validation_runs": [], "warnings": [],
    }
    encoder = _Encoder(model)
    runs = [_run_gains(encoder, run, phases, min_gain) for run in validation]
    report["validation_runs"] = runs
    measured = [r for r in runs if len(r["gain"]) == len(LATENT_STRATEGIES) + 1]
    warnings = report["warnings"]
    if measured:
        mean = {s: float(np.mean([r["gain"][s] for r in measured])) for s in (*LATENT_STRATEGIES, "spatial")}
        best = max(LATENT_STRATEGIES, key=lambda s: mean[s])
        report.update(best_strategy=best, model_gain=round(mean[best], 4), spatial_gain=round(mean["spatial"], 4))
        if mean[best] < min_gain:
            spatial = (f"; the image neighbours alone gain {mean['spatial']:+.3f} (--strategy spatial needs no model)"
                       if mean["spatial"] >= min_gain else "")
            warnings.append(
                f"this model will not help refinement: on {len(measured)} validation run(s) its best latent-space "
                f"strategy ({best}) gains {mean[best]:+.3f} over PCC on held-out pixels (the refinement job needs "
                f"{min_gain:+.3f}), so refinement with it will abstain and keep PCC's phases{spatial}")
    else:
        reasons = "; ".join(r.get("skipped", "") for r in runs) or "no validation runs"
        warnings.append(f"the refinement gain of this model could not be measured ({reasons}): check it on a run "
                        "with phasestream reprocess --refine-only before relying on it")
    unlabelled = [p for p in phases if p not in report["per_phase_purity"]]
    if unlabelled:
        warnings.append(f"no training spectrum is labelled {', '.join(unlabelled)} by PCC: the model cannot learn "
                        "these phases (not in the training runs, or their spectra tie with another phase's at these "
                        "energies)")
    for phase, value in report["per_phase_purity"].items():
        if value < MIN_PURITY:
            warnings.append(f"the latent space does not keep {phase} apart: only {value:.0%} of its training spectra "
                            "fall in a mixture component where it is the majority")
    for text in warnings:
        logger.warning("training report: %s", text)
    return report
