"""Synthetic NaxV2(PO4)2F3-like reference spectra (V L2,3 and O K edges). SYNTHETIC.

These are not measurements. They imitate the features described in
the PCC-GMVAE paper (doi:10.48550/arXiv.2603.07666, section 3.2; docs/methods.md) so that every algorithm can be
tested against a known truth:

* V L3 and L2 white lines near 517.5 and 525.0 eV whose spectral weight moves to higher
  energy as sodium is removed (vanadium oxidation), modelled as a low-energy and a
  high-energy component per edge whose weights trade with the oxidation fraction ``f``;
* arctangent edge steps under the L3, L2 and O K edges;
* an O K pre-edge peak near 530.3 eV that grows on charge, and a broader O K peak at 532.5 eV;
* a flat pre-edge region starting at 505 eV.

The oxidation fraction of each phase is ``f = (3 - x) / (3 - 0.8)`` except that Na2.0 and
Na1.0 are pulled close together on purpose (``f = 0.58`` and ``0.66``), as the measured
spectra in the paper are close, so that PCC leaves ambiguous pixels.
"""

from __future__ import annotations

import numpy as np

from phasestream.references.spectra import ReferenceSet

__all__ = ["KEDGE_SHIFT_EV", "LEDGE_MIX", "NVPF_NA_CONTENT", "NVPF_OXIDATION", "NVPF_PHASES", "kedge_references",
           "ledge_close_references", "nvpf_references", "nvpf_spectrum"]

NVPF_PHASES = ("Na3.0", "Na2.4", "Na2.0", "Na1.0", "Na1-y")
NVPF_NA_CONTENT = {"Na3.0": 3.0, "Na2.4": 2.4, "Na2.0": 2.0, "Na1.0": 1.0, "Na1-y": 0.8}
NVPF_OXIDATION = {"Na3.0": 0.0, "Na2.4": 0.27, "Na2.0": 0.58, "Na1.0": 0.66, "Na1-y": 1.0}


def _gauss(e: np.ndarray, center: float, fwhm: float) -> np.ndarray:
    sigma = fwhm / 2.3548
    return np.exp(-0.5 * ((e - center) / sigma) ** 2)


def _step(e: np.ndarray, center: float, width: float) -> np.ndarray:
    return 0.5 + np.arctan((e - center) / width) / np.pi


def nvpf_spectrum(energies: np.ndarray, f: float, *, jitter: np.ndarray | None = None) -> np.ndarray:
    """OD per unit thickness of a synthetic NVPF phase with oxidation fraction ``f`` in [0, 1].

    ``jitter`` (6 numbers around 0) perturbs peak amplitudes by a few percent (seeded sets).
    """
    e = np.asarray(energies, dtype=np.float64)
    j = np.zeros(6) if jitter is None else np.asarray(jitter)
    od = 0.25 + 0.004 * (e - 505.0)  # non-resonant absorption, gently rising
    od += 0.18 * _step(e, 516.5, 0.6) + 0.12 * _step(e, 523.5, 0.6) + 0.22 * _step(e, 531.5, 0.8)
    # V L3: reduced (516.6/517.5) vs oxidized (518.7) components
    od += (0.55 * (1 - f) * (1 + j[0])) * _gauss(e, 516.6, 1.2)
    od += (0.95 - 0.25 * f) * (1 + j[1]) * _gauss(e, 517.5 + 0.9 * f, 1.5)
    od += (0.15 + 0.65 * f) * (1 + j[2]) * _gauss(e, 518.9, 1.3)
    # V L2: broader, weaker, same trade
    od += (0.55 - 0.2 * f) * (1 + j[3]) * _gauss(e, 525.0 + 0.8 * f, 2.2)
    od += (0.1 + 0.35 * f) * _gauss(e, 526.6, 1.8)
    # O K: pre-edge at 530.3 eV grows on charge; main peak
    od += (0.08 + 0.55 * f) * (1 + j[4]) * _gauss(e, 530.3, 1.0)
    od += 0.45 * (1 + j[5]) * _gauss(e, 532.5 + 0.3 * f, 2.0)
    return od


def nvpf_references(
    *,
    seed: int | None = None,
    energies: np.ndarray | None = None,
    jitter: float = 0.02,
) -> ReferenceSet:
    """The synthetic five-phase NVPF reference set, labelled synthetic.

    Parameters
    ----------
    seed : None gives the canonical set (no jitter); an integer perturbs each phase's peak
        amplitudes by ``jitter`` (relative, normal) with ``numpy.random.default_rng(seed)``.
    energies : grid in eV; default 505-540 eV in 0.1 eV steps.
    jitter : relative amplitude jitter for seeded sets.
    """
    grid = np.round(np.arange(505.0, 540.0 + 1e-9, 0.1), 3) if energies is None else np.asarray(energies)
    rng = None if seed is None else np.random.default_rng(seed)
    spectra = []
    for phase in NVPF_PHASES:
        j = None if rng is None else rng.normal(0.0, jitter, 6)
        spectra.append(nvpf_spectrum(grid, NVPF_OXIDATION[phase], jitter=j))
    return ReferenceSet(
        grid,
        NVPF_PHASES,
        np.stack(spectra),
        name="nvpf-synthetic",
        metadata={p: {"na_content": NVPF_NA_CONTENT[p], "oxidation_fraction": NVPF_OXIDATION[p]}
                  for p in NVPF_PHASES},
        attrs={"synthetic": True, "seed": seed, "units": "OD per unit thickness",
               "description": "synthetic NaxV2(PO4)2F3-like V L2,3 / O K references (phasestream.sim)"},
    )


# ------------------------------------------------------------------ two more shapes, for the refinement benchmark

#: K-edge-like set: the edge and white line move 1.2 eV per oxidation step; well separated phases
KEDGE_SHIFT_EV = {"M0": 0.0, "M1": 1.2, "M2": 2.4, "M3": 3.6}
#: L-edge multiplet set: the weight of the high-energy multiplet; ``B`` and ``C`` close on purpose
LEDGE_MIX = {"A": 0.0, "B": 0.45, "C": 0.52, "D": 1.0}


def kedge_references(*, energies: np.ndarray | None = None) -> ReferenceSet:
    """A synthetic four-phase transition-metal K-edge set (arctangent edge, pre-edge peak, white line)
    whose phases differ by a rigid 1.2 eV shift per oxidation step: far apart for PCC. SYNTHETIC."""
    grid = np.round(np.arange(7100.0, 7160.0 + 1e-9, 0.25), 3) if energies is None else np.asarray(energies)
    spectra = []
    for i, shift in enumerate(KEDGE_SHIFT_EV.values()):
        e0 = 7120.0 + shift
        od = 0.3 + 1.0 * _step(grid, e0, 1.5) + (0.05 + 0.04 * i) * _gauss(grid, 7113.0 + 0.5 * shift, 1.5)
        od += (0.55 - 0.08 * i) * _gauss(grid, e0 + 4.0, 4.0) - 0.12 * _gauss(grid, e0 + 18.0, 8.0)
        spectra.append(od)
    return _ordered_set(grid, tuple(KEDGE_SHIFT_EV), spectra, "kedge-synthetic",
                        "synthetic K-edge set, rigid 1.2 eV edge shifts")


def ledge_close_references(*, energies: np.ndarray | None = None) -> ReferenceSet:
    """A synthetic four-phase L2,3-edge multiplet set (Lorentzian-broadened lines) in which phases ``B``
    and ``C`` mix the low- and high-energy multiplets almost equally: close for PCC, as in issue 21's
    set. SYNTHETIC."""
    grid = np.round(np.arange(636.0, 660.0 + 1e-9, 0.1), 3) if energies is None else np.asarray(energies)

    def lorentz(center: float, width: float) -> np.ndarray:
        return 1.0 / (1.0 + ((grid - center) / (width / 2)) ** 2)

    spectra = []
    for m in LEDGE_MIX.values():
        od = 0.2 + 0.3 * _step(grid, 641.0, 0.8) + 0.15 * _step(grid, 652.0, 0.8)
        od += (1 - m) * (0.9 * lorentz(640.2, 1.0) + 0.35 * lorentz(642.0, 1.4) + 0.3 * lorentz(651.2, 2.0))
        od += m * (0.45 * lorentz(640.6, 1.0) + 0.85 * lorentz(641.9, 1.2) + 0.35 * lorentz(652.4, 2.0))
        spectra.append(od)
    return _ordered_set(grid, tuple(LEDGE_MIX), spectra, "ledge-close-synthetic",
                        "synthetic L-edge multiplet set, B and C close")


def _ordered_set(grid: np.ndarray, phases: tuple[str, ...], spectra: list[np.ndarray], name: str,
                 description: str) -> ReferenceSet:
    """A synthetic set whose phases the simulator orders by a made-up ``na_content`` (the first the highest)."""
    return ReferenceSet(grid, phases, np.stack(spectra), name=name,
                        metadata={p: {"na_content": float(len(phases) - 1 - i)} for i, p in enumerate(phases)},
                        attrs={"synthetic": True, "units": "OD per unit thickness",
                               "description": f"{description} (phasestream.references.synthetic); na_content is "
                                              "only the simulator's ordering of the phases"})
