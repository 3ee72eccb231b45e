"""Scan-energy selection for PCC phase identification under count noise (docs/methods.md).

PCC compares each pixel's OD spectrum with each reference after centring and scaling both over
the scanned energies, so a useful criterion must be blind to each reference's offset and scale
*over the energies that are chosen*, not over the whole reference grid. The criterion here is
the predicted probability that a pixel of one phase correlates better with another reference,
under Poisson noise on the transmitted counts; energies are added greedily (forward selection)
and then exchanged one at a time while that improves the prediction.

Noise model: a pixel of phase ``i`` has OD ``od_range * u_i(E)`` above its pre-edge baseline,
where ``u_i`` is reference ``i`` minus its value at the pre-edge energy, divided by its range
(max - min over the grid), so the model is the same for any offset and scale of a reference.
With ``dose`` open-beam counts per pixel, the variance of the measured OD is
``exp(OD) / dose`` (delta method on ``-ln(I / I0)``, ``I ~ Poisson(dose * exp(-OD))``).

For energies S and references centred and scaled over S to unit vectors ``z_k``, a pixel of
phase ``i`` has PCC(i) - PCC(j) proportional to ``<x, z_i - z_j>``, whose mean is
``A_i (1 - c_ij)`` (``A_i`` the centred signal norm, ``c_ij`` the PCC of the references over S)
and whose standard deviation is ``sqrt(sum_E var_i(E) (z_i - z_j)(E)^2)``. Their ratio is the
pair's separation (in noise standard deviations); the loss is the mean over phases of the sum
over the other phases of ``Phi(-separation)`` (a union bound on the misassignment rate).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import log_ndtr, logsumexp, ndtr

from phasestream.references.spectra import ReferenceSet, discrimination_score

__all__ = ["DEFAULT_DOSE", "SELECTION_METHODS", "Separation", "edge_region", "flat_energies",
           "predicted_separation", "select_energies"]

# Open-beam counts per pixel assumed when the caller gives no dose (a modest STXM/TXM dwell).
DEFAULT_DOSE = 300.0

SELECTION_METHODS = ("pcc", "score")

# Candidates for the first two picks, searched jointly (one pick alone cannot separate anything).
_MAX_PAIR_CANDIDATES = 160


@dataclass(frozen=True)
class Separation:
    """Predicted separation of every ordered pair of references on a set of energies.

    Attributes
    ----------
    phases : K phase names
    pcc : (K, K) noiseless PCC between the references over the energies
    snr : (K, K) ``snr[i, j]``: mean over noise std of PCC(i) - PCC(j) for a pure pixel of
        phase i (inf on the diagonal)
    error : (K, K) ``Phi(-snr)``, the predicted rate at which a phase-i pixel prefers j
    """

    phases: tuple[str, ...]
    pcc: np.ndarray
    snr: np.ndarray
    error: np.ndarray


def _relative(references: ReferenceSet, baseline: int) -> np.ndarray:
    """(K, E) each reference minus its value at ``baseline``, over its range (offset/scale free)."""
    s = references.spectra
    span = s.max(axis=1, keepdims=True) - s.min(axis=1, keepdims=True)
    return (s - s[:, baseline:baseline + 1]) / np.where(span > 0, span, 1.0)


def _od_sigma(u: np.ndarray, dose: float, od_range: float) -> np.ndarray:
    """Noise std of the OD at relative values ``u`` (any shape)."""
    return np.sqrt(np.exp(np.clip(od_range * u, -5.0, 20.0)) / dose)


def _baseline_index(references: ReferenceSet, pre_edge_eV: float | None) -> int:
    if pre_edge_eV is None:
        return 0
    e = float(references.check_energies(pre_edge_eV)[0])
    return int(np.argmin(np.abs(references.energies - e)))


def flat_energies(
    references: ReferenceSet,
    *,
    dose: float = DEFAULT_DOSE,
    od_range: float = 1.0,
    pre_edge_eV: float | None = None,
) -> np.ndarray:
    """(E,) bool: energies where every reference is flat within the noise.

    A reference is flat at E when its value differs from its value at the pre-edge energy
    (default the first of the grid) by less than one noise standard deviation of a single
    measurement there (``od_range`` OD over the reference's range, ``dose`` counts per pixel).
    """
    u = _relative(references, _baseline_index(references, pre_edge_eV))
    return np.all(np.abs(od_range * u) < _od_sigma(u, dose, od_range), axis=0)


def edge_region(
    references: ReferenceSet,
    *,
    dose: float = DEFAULT_DOSE,
    od_range: float = 1.0,
    fraction: float = 0.9,
) -> tuple[float, float]:
    """``(low, high)`` eV: the energies where the references can be told apart.

    ``low`` is the first energy where some reference is not flat (:func:`flat_energies`);
    ``high`` is where ``fraction`` of the pairwise differences (references scaled to the same
    mean above ``low``, squared differences over the noise variance, summed from ``low``) is
    reached.
    """
    e = references.energies
    flat = flat_energies(references, dose=dose, od_range=od_range)
    rising = np.flatnonzero(~flat)
    if rising.size == 0:
        raise ValueError(f"references {references.name!r} are flat within the noise at dose {dose:g}")
    lo = int(rising[0])
    u = _relative(references, 0)[:, lo:]
    level = np.abs(u.mean(axis=1, keepdims=True))
    scaled = u / np.where(level > 0, level, 1.0)
    var = _od_sigma(u, dose, od_range).mean(axis=0) ** 2 / od_range**2
    d2 = sum(((scaled[i] - scaled[j]) ** 2) for i in range(len(u)) for j in range(i + 1, len(u)))
    cum = np.cumsum(d2 / var) if len(u) > 1 else np.cumsum(np.ones(u.shape[1]))
    hi = lo + int(np.searchsorted(cum, fraction * cum[-1]))
    return float(e[lo]), float(e[min(hi, e.size - 1)])


def _pair_snr(u: np.ndarray, dose: float, od_range: float) -> tuple[np.ndarray, np.ndarray]:
    """PCC (..., K, K) and separation (..., K, K) for relative spectra ``u`` (..., K, m)."""
    c = u - u.mean(axis=-1, keepdims=True)
    norm = np.sqrt(np.einsum("...km,...km->...k", c, c))
    safe = np.where(norm > 0, norm, 1.0)
    z = c / safe[..., None]
    pcc = np.einsum("...im,...jm->...ij", z, z)
    var = _od_sigma(u, dose, od_range) ** 2  # (..., K, m), OD units
    w2 = (z[..., :, None, :] - z[..., None, :, :]) ** 2  # (..., K, K, m)
    noise = np.sqrt(np.einsum("...im,...ijm->...ij", var, w2))
    signal = (od_range * norm)[..., :, None] * (1.0 - pcc)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(noise > 0, signal / noise, 0.0)
    k = u.shape[-2]
    eye = np.eye(k, dtype=bool)
    snr = np.where(eye, np.inf, snr)
    return pcc, snr


def _loss(u: np.ndarray, dose: float, od_range: float) -> np.ndarray:
    """Log of the predicted misassignment rate (union bound) for each set in ``u`` (..., K, m)."""
    _, snr = _pair_snr(u, dose, od_range)
    k = u.shape[-2]
    off = ~np.eye(k, dtype=bool)
    terms = log_ndtr(-snr[..., off])  # (..., K(K-1))
    return logsumexp(terms, axis=-1) - np.log(k)


def predicted_separation(
    references: ReferenceSet,
    energies,
    *,
    dose: float = DEFAULT_DOSE,
    od_range: float = 1.0,
) -> Separation:
    """The noise model's pairwise separation of the references when scanned at ``energies`` (eV)."""
    values = references.interpolate(energies)
    span = references.spectra.max(axis=1) - references.spectra.min(axis=1)
    u = (values - values[:, :1]) / np.where(span > 0, span, 1.0)[:, None]
    pcc, snr = _pair_snr(u, dose, od_range)
    return Separation(references.phases, pcc, snr, ndtr(-snr))


def _best_pair(u: np.ndarray, seed: list[int], candidates: np.ndarray, dose: float, od_range: float) -> list[int]:
    stride = max(1, int(np.ceil(candidates.size / _MAX_PAIR_CANDIDATES)))
    pool = candidates[::stride]
    a, b = np.triu_indices(pool.size, k=1)
    idx = np.column_stack([np.tile(seed, (a.size, 1)), pool[a], pool[b]]).astype(int)
    losses = _loss(np.moveaxis(u[:, idx], 0, 1), dose, od_range)
    best = int(np.argmin(losses))
    return [int(pool[a[best]]), int(pool[b[best]])]


def _best_addition(u, chosen, candidates, dose, od_range) -> tuple[int, float]:
    idx = np.column_stack([np.tile(chosen, (candidates.size, 1)), candidates]).astype(int)
    losses = _loss(np.moveaxis(u[:, idx], 0, 1), dose, od_range)
    best = int(np.argmin(losses))
    return int(candidates[best]), float(losses[best])


def _pcc_selection(references, n, baseline, sep, dose, od_range, keep_baseline) -> list[int]:
    e = references.energies
    u = _relative(references, baseline)
    flat = flat_energies(references, dose=dose, od_range=od_range, pre_edge_eV=float(e[baseline]))
    allowed = ~flat
    allowed[baseline] = False
    candidates = np.flatnonzero(allowed)

    def free(chosen: list[int], skip: int | None = None) -> np.ndarray:
        ok = np.ones(candidates.size, bool)
        for c in chosen:
            if c != skip:
                ok &= np.abs(e[candidates] - e[c]) >= sep
                ok &= candidates != c
        return candidates[ok]

    if candidates.size < n:
        raise ValueError(
            f"only {candidates.size} energies of references {references.name!r} are not flat within the "
            f"noise at dose {dose:g}; lower n or raise dose"
        )
    chosen = _best_pair(u, [baseline], candidates, dose, od_range) if n >= 2 else []
    while len(chosen) < n:
        pool = free(chosen)
        if pool.size == 0:
            raise ValueError(
                f"could only place {len(chosen)} of {n} energies {sep:.3f} eV apart where references "
                f"{references.name!r} are not flat; lower n or min_separation_eV"
            )
        chosen.append(_best_addition(u, [baseline, *chosen], pool, dose, od_range)[0])
    for _ in range(3):  # exchange passes: replace one pick at a time while the loss falls
        improved = False
        for slot in range(len(chosen)):
            rest = [baseline, *chosen[:slot], *chosen[slot + 1:]]
            current = float(_loss(u[:, [*rest, chosen[slot]]][None], dose, od_range)[0])
            pool = free(chosen, skip=chosen[slot])
            if pool.size == 0:
                continue
            pick, loss = _best_addition(u, rest, pool, dose, od_range)
            if loss < current - 1e-9:
                chosen[slot] = pick
                improved = True
        if not improved:
            break
    return [baseline, *chosen] if keep_baseline else chosen


def _score_selection(references, n, sep, taken: list[float]) -> list[float]:
    e = references.energies
    low, high = references.energy_range
    chosen: list[float] = []
    for idx in np.argsort(discrimination_score(references))[::-1]:
        if all(abs(e[idx] - c) >= sep for c in chosen + taken):
            chosen.append(float(e[idx]))
            if len(chosen) == n:
                break
    if len(chosen) < n:
        raise ValueError(
            f"could only place {len(chosen)} of {n} energies {sep:.3f} eV apart in "
            f"{low:.1f}-{high:.1f} eV; lower n or min_separation_eV"
        )
    return chosen


def select_energies(
    references: ReferenceSet,
    n: int,
    *,
    pre_edge: bool = True,
    pre_edge_eV: float | None = None,
    min_separation_eV: float | None = None,
    dose: float = DEFAULT_DOSE,
    od_range: float = 1.0,
    method: str = "pcc",
) -> np.ndarray:
    """Choose ``n`` energies that best tell the references apart by PCC, plus one pre-edge energy.

    ``method="pcc"`` (default): forward selection with exchange passes that minimizes the
    predicted PCC misassignment rate under Poisson count noise (module docstring,
    docs/methods.md), computed after centring and scaling every reference over the chosen
    energies, so the choice is unchanged by adding a constant to a reference or scaling it.
    Energies where every reference is flat within the noise (:func:`flat_energies`) are
    never chosen. ``method="score"``: the earlier ranking by :func:`discrimination_score`
    (standardized over the whole grid), each pick at least ``range / (4 n)`` apart; kept for
    scans that must repeat energies chosen that way (the pretrained GMVAE's).

    Parameters
    ----------
    references : ReferenceSet
    n : number of discriminating energies
    pre_edge : add one pre-edge energy (OD baseline; thickness) to the selection
    pre_edge_eV : the pre-edge energy; default the first energy of the reference grid
    min_separation_eV : minimum spacing between picks; default 0 for ``pcc`` (distinct grid
        energies), ``range / (4 n)`` for ``score``
    dose : open-beam counts per pixel at each energy (``pcc``); lower dose favours energies
        with large differences over fine features
    od_range : OD of a typical particle across the range of a reference (``pcc``)
    method : ``pcc`` or ``score``

    Returns
    -------
    (n + pre_edge,) float64, sorted, eV, all on the reference grid.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if method not in SELECTION_METHODS:
        raise ValueError(f"method must be one of {SELECTION_METHODS}, got {method!r}")
    if dose <= 0 or od_range <= 0:
        raise ValueError(f"dose and od_range must be > 0, got {dose} and {od_range}")
    e = references.energies
    low, high = references.energy_range
    baseline = _baseline_index(references, pre_edge_eV)
    if method == "score":
        sep = (high - low) / (4 * n) if min_separation_eV is None else float(min_separation_eV)
        taken = [float(e[baseline]) if pre_edge_eV is None else float(pre_edge_eV)] if pre_edge else []
        return np.array(sorted(taken + _score_selection(references, n, sep, taken)))
    sep = 0.0 if min_separation_eV is None else float(min_separation_eV)
    picks = _pcc_selection(references, n, baseline, sep, float(dose), float(od_range), pre_edge)
    out = [float(e[i]) for i in picks]
    if pre_edge and pre_edge_eV is not None:
        out[0] = float(references.check_energies(pre_edge_eV)[0])
    return np.array(sorted(out))
