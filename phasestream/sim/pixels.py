"""Noisy pixel spectra of known phase, for measuring phase identification without images.

A pixel of phase ``k`` and thickness ``t`` has OD ``t * mu_k(E) + substrate``; its transmitted
counts are ``Poisson(dose * exp(-OD))`` and its measured OD is ``-ln(counts / dose)`` (NaN where
no count arrives, as :func:`phasestream.kernels.optical_density` masks it). This is the
:class:`~phasestream.sim.SimulatedSample` noise model without the geometry: fast enough to score
hundreds of energy sets in a test.
"""

from __future__ import annotations

import numpy as np

from phasestream.kernels import assign_phases, pearson_maps
from phasestream.references import ReferenceSet

__all__ = ["noisy_pixel_od", "pcc_accuracy"]


def noisy_pixel_od(
    references: ReferenceSet,
    energies,
    labels: np.ndarray,
    *,
    dose: float,
    rng: np.random.Generator,
    thickness: tuple[float, float] = (0.7, 1.0),
    substrate_od: float = 0.02,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """(E, N) measured OD of N pixels at ``energies`` (eV).

    ``labels`` (N,) are the pixels' phases; ``weights`` (K, N), if given, mixes the references
    instead (columns summing to 1). Thickness is uniform in ``thickness`` (units of the
    references' values: about an OD of 1 above the edge for normalized spectra).
    """
    mu = references.interpolate(energies)  # (K, E)
    n = len(labels)
    w = np.eye(len(references.phases))[:, labels] if weights is None else np.asarray(weights, dtype=np.float64)
    t = rng.uniform(*thickness, size=n)
    od = t[None, :] * (mu.T @ w) + substrate_od
    counts = rng.poisson(dose * np.exp(-od)).astype(np.float64)
    with np.errstate(divide="ignore"):
        measured = -np.log(counts / dose)
    measured[~np.isfinite(measured)] = np.nan
    return measured


def pcc_accuracy(references: ReferenceSet, energies, od: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(accuracy, ambiguous fraction) of PCC phase assignment of pixel spectra ``od`` (E, N).

    PCC by :func:`phasestream.kernels.pearson_maps`, phases by
    :func:`phasestream.kernels.assign_phases` (its default ambiguity threshold).
    """
    pcc = pearson_maps(od[:, None, :], references.interpolate(energies))
    phase, _, ambiguous = assign_phases(pcc, backend="numpy")
    return float(np.mean(phase[0] == labels)), float(np.mean(ambiguous[0]))
