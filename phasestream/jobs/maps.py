"""The PCC phase maps of a stored result, recomputed from another OD cube (a denoised one).

The arithmetic is the live analysis's (``phasestream/callbacks/analysis.py``): the OD planes are
folded into a :class:`~phasestream.kernels.PearsonAccumulator` with the run's reference values,
and :func:`~phasestream.kernels.assign_phases` gives phase, reliability and ambiguity inside the
particle mask. Only the OD differs, so the maps can be compared with the live ones pixel by pixel.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from phasestream.kernels import PearsonAccumulator, assign_phases, to_numpy
from phasestream.kernels.phases import DEFAULT_AMBIGUITY
from phasestream.references import load_document_references, reference_folders_from_env

__all__ = ["pcc_phase_maps", "result_reference_values"]

logger = logging.getLogger(__name__)


def result_reference_values(md: dict[str, Any], energies: list[float]) -> np.ndarray | None:
    """(K, E) reference values at the run's energies: stored in the result, else loaded by name
    (a registered name or a file in the configured reference folders); None when neither works."""
    k = len((md.get("references") or {}).get("phases") or [])
    stored = md.get("reference_values")
    if stored is not None:
        try:
            values = np.asarray(stored, dtype=np.float64)
        except (TypeError, ValueError):  # not a (K, E) table of numbers (edited by hand): load them by name
            values = np.empty(0)
        if values.shape == (k, len(energies)) or (values.ndim == 2 and values.shape[0] == k
                                                   and values.shape[1] >= len(energies)):
            return values[:, : len(energies)]
    try:
        refs = load_document_references((md.get("references") or {}).get("name"),
                                        folders=reference_folders_from_env())
        return refs.interpolate(energies)
    except (ValueError, TypeError) as error:
        logger.info("references of %s not resolvable: %s", md.get("run_uid"), error)
        return None


def pcc_phase_maps(od: np.ndarray, ref_values: np.ndarray, mask: np.ndarray, *,
                   ambiguity: float = DEFAULT_AMBIGUITY, backend: str | None = None) -> dict[str, np.ndarray]:
    """PCC maps of an OD stack as the live analysis makes them.

    Parameters
    ----------
    od : (E, Y, X) OD; a pixel non-finite at any energy is left out (NaN PCC, phase -1)
    ref_values : (K, E) reference values at the stack's energies
    mask : (Y, X) particle mask (the live result's ``mask``)
    ambiguity : reliability below this marks a pixel ambiguous
    backend : kernel backend (default ``PHASESTREAM_BACKEND``)

    Returns
    -------
    ``pcc`` (K, Y, X) float32, ``phase`` (Y, X) int16, ``reliability`` (Y, X) float32, ``ambiguous`` (Y, X) bool
    """
    od = np.asarray(od, np.float32)
    refs = np.asarray(ref_values, np.float64)
    if od.ndim != 3 or refs.ndim != 2 or refs.shape[1] != od.shape[0]:
        raise ValueError(f"od (E, Y, X) {od.shape} and reference values (K, E) {refs.shape} do not match")
    acc = PearsonAccumulator(od.shape[1:], refs.shape[0], backend=backend)
    for i, plane in enumerate(od):
        acc.update(plane, refs[:, i], np.isfinite(plane))
    pcc = to_numpy(acc.maps())
    phase, reliability, ambiguous = assign_phases(pcc, np.asarray(mask, bool), ambiguity, backend=backend)
    return {"pcc": pcc, "phase": phase, "reliability": reliability, "ambiguous": ambiguous}
