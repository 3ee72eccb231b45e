"""Training sets for the GMVAE and the ``phasestream train gmvae`` job.

A training set is the particle-pixel OD spectra of many scans at one set of energies, with their
PCC labels (for the cluster-purity metric) and where they came from:

* :func:`synthetic_training_set`: simulated scans (``phasestream.sim``) at every state of charge
  and several doses, analysed with the same kernels as the live path (OD, PCC, particle mask);
* :func:`tiled_training_set`: results already in Tiled (``od``, ``mask``, ``phase``), found by
  state of charge or by run uid.

:func:`train_artifact` trains on a set and writes a versioned artifact (registry format).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TrainingSet", "synthetic_training_set", "tiled_training_set", "train_artifact"]

logger = logging.getLogger(__name__)

SYNTHETIC_STATES = (3.0, 2.4, 2.0, 1.0, 0.8)


@dataclass
class TrainingSet:
    """Spectra (N, E) at ``energies_eV``, PCC labels (N,), the reference phases and the provenance."""

    spectra: np.ndarray
    labels: np.ndarray
    energies_eV: np.ndarray
    phases: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)


def _analysed(od: np.ndarray, references: np.ndarray):
    from phasestream.kernels.pearson import pearson_maps
    from phasestream.kernels.phases import assign_phases, particle_mask

    mask = particle_mask(od)
    phase, _, _ = assign_phases(pearson_maps(od, references), mask)
    return mask, phase


def synthetic_training_set(
    *,
    seed: int = 0,
    n_samples: int = 3,
    states: Sequence[float] = SYNTHETIC_STATES,
    doses: Sequence[float] = (2000.0, 5000.0, 20000.0),
    shape: tuple[int, int] = (192, 192),
    n_energies: int = 12,
    references: str = "nvpf-synthetic",
    max_spectra: int | None = 200_000,
) -> TrainingSet:
    """Particle-pixel spectra of simulated STXM scans (Poisson noise) with their PCC labels.

    Energies are ``select_energies(references, n_energies)`` (the demo's: n_energies + 1 with the
    pre-edge energy). Samples use seeds ``seed * 1000 + i`` so a training seed never reuses the
    demo's or the tests' samples (seeds < 1000) unless asked to.
    """
    from phasestream.references import load_references, select_energies
    from phasestream.sim.samples import make_sample

    refs = load_references(references)
    energies = np.asarray(select_energies(refs, n_energies))
    ref_spectra = refs.interpolate(energies)
    rng = np.random.default_rng(seed)
    spectra, labels = [], []
    for soc in states:
        for i in range(n_samples):
            sample = make_sample(shape, state_of_charge=soc, references=refs, seed=1000 * (seed + 1) + i)
            for dose in doses:
                counts = np.stack([sample.transmitted(e, i0=dose, rng=rng) for e in energies])
                with np.errstate(divide="ignore"):
                    od = -np.log(np.where(counts > 0, counts, np.nan) / dose)
                mask, phase = _analysed(od, ref_spectra)
                x = od[:, mask].T
                keep = np.isfinite(x).all(axis=1)
                spectra.append(x[keep].astype(np.float32))
                labels.append(phase[mask][keep])
    x, y = np.concatenate(spectra), np.concatenate(labels).astype(np.int16)
    if max_spectra is not None and len(x) > max_spectra:
        pick = np.sort(rng.choice(len(x), max_spectra, replace=False))
        x, y = x[pick], y[pick]
    provenance = {"source": "synthetic", "seed": seed, "references": refs.name, "states": list(states),
                  "doses": list(doses), "samples_per_state": n_samples, "shape": list(shape),
                  "n_spectra": len(x)}
    return TrainingSet(x, y, energies, list(refs.phases), provenance)


def tiled_training_set(
    client,
    *,
    state_of_charge: Sequence[float] = (),
    runs: Sequence[str] = (),
    tolerance: float = 0.05,
    energy_tolerance_eV: float = 0.05,
    root: str = "phasestream",
    tiled_uri: str | None = None,
) -> TrainingSet:
    """Particle-pixel spectra of complete results in Tiled, by state of charge and/or run uid.

    Every run must have been measured at the same energies (within ``energy_tolerance_eV``) as the
    first one; runs that were not are refused with an error naming them.
    """
    from phasestream.catalog import find

    results = {}
    for soc in state_of_charge:
        for uid, node in find(client, state_of_charge=soc, tolerance=tolerance, status="complete", root=root).items():
            results[uid] = node
    for uid in runs:
        try:
            results[uid] = client[root][uid]
        except KeyError:
            raise KeyError(f"no phasestream result for run {uid} in Tiled under {root!r}") from None
    if not results:
        raise ValueError(f"no complete results match state_of_charge={list(state_of_charge)} runs={list(runs)}")
    spectra, labels, energies, phases, used = [], [], None, None, []
    for uid, node in results.items():
        md = node.metadata
        if "od" not in node:
            raise ValueError(f"result {uid} has no OD cube: reprocess it first (phasestream reprocess {uid})")
        n = int(md.get("n_energies_seen") or 0)
        run_energies = np.asarray(md["energies_eV"][:n], dtype=np.float64)
        if energies is None:
            energies, phases = run_energies, list(md["references"]["phases"])
        elif run_energies.shape != energies.shape or np.abs(run_energies - energies).max() > energy_tolerance_eV:
            raise ValueError(f"run {uid} was measured at other energies ({run_energies.round(2).tolist()} eV) than "
                             f"the first run ({energies.round(2).tolist()} eV): train on one energy set at a time")
        mask = node["mask"].read().astype(bool)
        od = node["od"][:n]
        x = od[:, mask].T
        keep = np.isfinite(x).all(axis=1)
        spectra.append(x[keep].astype(np.float32))
        labels.append(node["phase"].read()[mask][keep])
        used.append(uid)
    order = np.argsort(energies)
    x = np.concatenate(spectra)[:, order]
    provenance = {"source": "tiled", "tiled": (tiled_uri or "").split("?")[0] or None, "runs": used,
                  "query": {"state_of_charge": list(state_of_charge), "tolerance": tolerance, "root": root},
                  "n_spectra": len(x)}
    return TrainingSet(x, np.concatenate(labels).astype(np.int16), energies[order], phases, provenance)


def train_artifact(
    data: TrainingSet,
    directory: str | Path,
    *,
    name: str,
    version: str,
    overwrite: bool = False,
    **train_options: Any,
):
    """Train a GMVAE on ``data`` and save it as the artifact ``<directory>/<name>-<version>``.

    ``train_options`` go to :func:`phasestream.models.gmvae.train_gmvae`. Returns ``(artifact, result)``.
    """
    from phasestream.models.gmvae import train_gmvae
    from phasestream.models.registry import save_artifact

    result = train_gmvae(data.spectra, labels=data.labels, n_components=len(data.phases), **train_options)
    training = {**data.provenance, "split": result.split,
                "options": {k: v for k, v in train_options.items() if k != "progress"}}
    artifact = save_artifact(result.model, directory, name=name, version=version, kind="gmvae",
                             energies_eV=data.energies_eV, phases=data.phases, training=training,
                             metrics=result.metrics, overwrite=overwrite)
    return artifact, result
