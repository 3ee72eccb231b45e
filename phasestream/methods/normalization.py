"""Edge normalization of XANES spectra: pre-edge line, post-edge polynomial, edge jump (thickness).

The classic normalization (Athena; xraylarch ``pre_edge``; PyXAS, Ge & Lee 2020, section 5): a
straight line is fitted to the pre-edge region and a polynomial to the post-edge region of every
pixel's spectrum; the pre-edge line is subtracted, and the result is divided by the edge jump, the
difference of the two curves at the edge energy ``E0``. With ``flatten`` the post-edge curve's
departure from the jump is removed above ``E0`` as well, so that the post-edge oscillates about 1.
The edge jump is proportional to the amount of the absorbing element along the beam (the
"thickness" map).

The defaults are xraylarch's (``larch.xafs.pre_edge``, version 2026.3; M. Newville, "Larch: an
analysis package for XAFS and related spectroscopies", J. Phys.: Conf. Ser. 430 (2013) 012007,
doi:10.1088/1742-6596/430/1/012007), relative to E0:

* E0 (:func:`find_edge_energy`): the maximum of the derivative of the mean spectrum, first raw, then
  smoothed (Lorentzian of one energy step) within 75 points of the first estimate, where the
  neighbours' derivatives are high as well (a glitch is one point);
* pre-edge window: from the second energy to half way to E0 (``pre1 = E[1] - E0`` rounded to 5 eV,
  ``pre2 = pre1 / 2``); a constant instead of a line when it holds fewer than 3 energies;
* post-edge window: ``norm1 = min(25, norm2 / 15)`` to ``norm2 = max(E) - E0`` (rounded to 5 eV);
  polynomial order 2 when the window spans 300 eV or more, 1 from 30 eV, 0 below; lowered when
  the window holds few energies.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from phasestream.methods.lcf import linear_combination_fit

__all__ = [
    "EdgeNormalization",
    "default_windows",
    "edge_fit_coverage",
    "find_edge_energy",
    "normalize_by_references",
    "normalize_edge",
]


@dataclass(frozen=True)
class EdgeNormalization:
    """Per-pixel edge normalization; ``...`` are the pixel axes of the input.

    Attributes
    ----------
    normalized : (E, ...) float32, 0 on the pre-edge line, 1 at the post-edge line (NaN where the
        edge jump is below ``min_jump``)
    thickness : (...) float32, edge jump ``post(E0) - pre(E0)``
    pre_edge : (2, ...) float64, offset and slope (per eV, about ``E0``) of the pre-edge line
    post_edge : (P + 1, ...) float64, coefficients of the post-edge curve of the data in powers of
        ``E - E0`` (eV): offset, slope, curvature, ...
    edge_energy : E0, eV
    pre_window, post_window : the fitted energy windows, eV (absolute)
    post_order : P, the order of the post-edge polynomial
    method : ``"edge fit"`` (:func:`normalize_edge`) or ``"reference fit"``
        (:func:`normalize_by_references`, sparse scans)
    """

    normalized: np.ndarray
    thickness: np.ndarray
    pre_edge: np.ndarray
    post_edge: np.ndarray
    edge_energy: float
    pre_window: tuple[float, float]
    post_window: tuple[float, float]
    post_order: int = 1
    method: str = "edge fit"


def _round5(value: float) -> float:
    return 5.0 * round(value / 5.0)


def _lorentzian_smooth(energies: np.ndarray, values: np.ndarray, step: float) -> np.ndarray:
    """``values`` convolved with a unit-area Lorentzian of half width ``step`` eV on a uniform grid."""
    grid = np.arange(energies[0], energies[-1] + 0.5 * step, step)
    if grid.size < 3 or grid.size > 50 * energies.size:
        return values
    on_grid = np.interp(grid, energies, values)
    half = grid.size
    x = np.arange(-half, half + 1)
    window = 1.0 / (1.0 + x**2)
    padded = np.concatenate([on_grid[:0:-1], on_grid, on_grid[-2::-1]])  # mirrored ends
    smooth = np.convolve(padded, window / window.sum(), mode="same")[grid.size - 1 : 2 * grid.size - 1]
    return np.interp(energies, grid, smooth)


def _steepest_rise(energies: np.ndarray, spectrum: np.ndarray, step: float | None) -> int:
    """Index of the highest derivative whose neighbours are high too (larch ``_finde0``)."""
    deriv = np.gradient(spectrum, energies)
    if step is not None:
        deriv = _lorentzian_smooth(energies, deriv, step)
    deriv = np.where(np.isfinite(deriv), deriv, -1.0)
    n = energies.size
    edge = max(3, int(0.02 * n)) if n > 8 else 1
    inner = deriv[edge:n - edge] if n - 2 * edge >= 3 else deriv
    scaled = (deriv - inner.min()) / max(1e-10, float(np.ptp(inner)))
    high = 0.6 if n > 20 else 0.3
    for _ in range(3):
        above = scaled > high
        if above.sum() >= 3:
            break
        high *= 0.5
    best, best_value = int(np.argmax(np.where(np.arange(n) >= edge, scaled, -np.inf)[: n - edge + 1])), -np.inf
    for i in np.flatnonzero(above):
        if edge <= i < n - edge and above[i - 1] and i + 1 < n and above[i + 1] and scaled[i] > best_value:
            best, best_value = int(i), scaled[i]
    return best


def find_edge_energy(energies: np.ndarray, spectrum: np.ndarray) -> float:
    """E0 (eV): the energy of the maximum derivative of ``spectrum`` (E,), as xraylarch ``find_e0``.

    A first estimate from the raw derivative; then, within 75 energies of it, the maximum of the
    derivative smoothed by a Lorentzian of about one energy step, where the neighbouring energies'
    derivatives are high as well (a single-point glitch is not an edge). The result is one of
    ``energies``. Non-finite values are dropped first.
    """
    e = np.asarray(energies, np.float64)
    mu = np.asarray(spectrum, np.float64)
    keep = np.isfinite(e) & np.isfinite(mu)
    e, mu = e[keep], mu[keep]
    if e.size < 3:
        raise ValueError(f"finding E0 needs at least 3 finite energies, got {e.size}")
    i1 = _steepest_rise(e, mu, None)
    lo, hi = max(0, i1 - 75), min(e.size, i1 + 76)
    if i1 < 0.05 * e.size:  # an edge in the first 5 % of the points is usually a glitch
        lo, hi = 0, e.size
    steps = np.diff(e)
    typical = float(np.median(steps[steps > 0])) if (steps > 0).any() else 1.0
    step = 0.5 * (min(1.0, max(0.01, typical)) + min(1.0, max(0.01, e[i1] / 25000.0)))
    sub_e, sub_mu = e[lo:hi], mu[lo:hi]
    if sub_e.size < 3:
        return float(e[i1])
    return float(sub_e[_steepest_rise(sub_e, sub_mu, step)])


def default_windows(energies: np.ndarray, edge_energy: float
                    ) -> tuple[tuple[float, float], tuple[float, float], int]:
    """xraylarch's default windows (absolute eV) and post-edge order for a scan with edge E0.

    Returns ``((pre lo, pre hi), (post lo, post hi), post order)``: the pre-edge window runs from
    the second energy (rounded to 5 eV relative to E0) to half way to E0, the post-edge window from
    ``min(25, norm2 / 15)`` eV above E0 to the last energy; the order is 2 for a post-edge window of
    300 eV or more, 1 from 30 eV, else 0.
    """
    e = np.sort(np.asarray(energies, np.float64))
    e0 = float(edge_energy)
    below = int(np.searchsorted(e, e0))
    start = e[1] if e.size > 1 else e[0]
    pre1 = (_round5 if below > 20 else (lambda v: 2.0 * round(v / 2.0)))(start - e0)
    pre1 = max(pre1, e[0] - e0)
    pre2 = 0.5 * pre1
    pre1, pre2 = min(pre1, pre2), max(pre1, pre2)
    norm2 = min(_round5(e[-1] - e0), e[-1] - e0)
    norm1 = min(25.0, _round5(norm2 / 15.0))
    norm1 = min(norm1, norm2 - 2)
    span = norm2 - norm1
    order = 2 if span >= 300 else 1 if span >= 30 else 0
    return (e0 + pre1, e0 + pre2), (e0 + norm1, e0 + norm2), order


def _pre_edge_fit(energies: np.ndarray, flat: np.ndarray, window: tuple[float, float], centre: float) -> np.ndarray:
    """(2, N) offset and slope about ``centre`` of the pre-edge lines (a constant below 3 energies)."""
    inside = (energies >= window[0]) & (energies <= window[1])
    n = int(inside.sum())
    if n < 1:
        raise ValueError(f"the pre-edge window {window} eV holds no energy; it needs at least 1")
    coef = np.full((2, flat.shape[1]), np.nan)
    data = flat[inside]
    finite = np.isfinite(data).all(axis=0)
    if n < 3:
        coef[0, finite], coef[1, finite] = data[:, finite].mean(axis=0), 0.0
        return coef
    design = np.stack([np.ones(n), energies[inside] - centre], axis=1)
    coef[:, finite] = np.linalg.lstsq(design, data[:, finite], rcond=None)[0]
    return coef


def _post_edge_fit(energies: np.ndarray, residual: np.ndarray, window: tuple[float, float], centre: float,
                   order: int) -> np.ndarray:
    """(order + 1, N) coefficients in powers of ``E - centre`` of the post-edge polynomials."""
    inside = (energies >= window[0]) & (energies <= window[1])
    n = int(inside.sum())
    if n < 1:
        raise ValueError(f"the post-edge window {window} eV holds no energy; it needs at least 1")
    order = min(order, n - 1, 1 if n < 5 else order)
    de = energies[inside] - centre
    scale = max(float(np.abs(de).max()), 1.0)
    design = np.stack([(de / scale) ** p for p in range(order + 1)], axis=1)
    data = residual[inside]
    finite = np.isfinite(data).all(axis=0)
    coef = np.full((order + 1, residual.shape[1]), np.nan)
    coef[:, finite] = np.linalg.lstsq(design, data[:, finite], rcond=None)[0]
    return coef / (scale ** np.arange(order + 1))[:, None]


def normalize_edge(
    spectra: np.ndarray,
    energies: np.ndarray,
    *,
    pre_edge: tuple[float, float] | None = None,
    post_edge: tuple[float, float] | None = None,
    edge_energy: float | None = None,
    post_order: int | None = None,
    flatten: bool = True,
    min_jump: float = 0.0,
) -> EdgeNormalization:
    """Normalize every pixel's spectrum to a unit edge jump (xraylarch ``pre_edge`` defaults).

    Parameters
    ----------
    spectra : (E, ...) OD or absorption stack, energies first, e.g. (E, Y, X)
    energies : (E,) eV, increasing
    pre_edge, post_edge : (low, high) eV windows of the fits (inclusive, absolute energies);
        default :func:`default_windows` relative to E0
    edge_energy : E0, eV, where the jump is measured; default :func:`find_edge_energy` of the
        mean spectrum
    post_order : order of the post-edge polynomial; default from the window (see
        :func:`default_windows`), lowered when the window holds few energies
    flatten : subtract the post-edge curve's departure from the jump above E0 (post-edge about 1)
    min_jump : pixels with a jump at or below this (background, holes) get NaN normalized spectra

    Returns
    -------
    EdgeNormalization

    Raises
    ------
    ValueError
        when a window holds no energy (a sparse scan: see docs/methods.md, "Sparse scans").
    """
    e = np.asarray(energies, np.float64)
    y = np.asarray(spectra)
    if e.ndim != 1 or y.shape[0] != e.size:
        raise ValueError(f"spectra have {y.shape[0]} energies but {e.size} energies were given")
    flat = y.reshape(e.size, -1).astype(np.float64, copy=False)
    if edge_energy is None:
        with warnings.catch_warnings():  # an all-NaN energy plane is dropped by find_edge_energy
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(flat, axis=1)
        edge_energy = find_edge_energy(e, mean)
    e0 = float(edge_energy)
    default_pre, default_post, default_order = default_windows(e, e0)
    pre_w = tuple(float(v) for v in (pre_edge or default_pre))
    post_w = tuple(float(v) for v in (post_edge or default_post))
    if pre_w[1] >= post_w[0]:
        raise ValueError(f"the pre-edge window {pre_w} must end below the post-edge window {post_w}")
    pre = _pre_edge_fit(e, flat, pre_w, e0)
    de = (e - e0)[:, None]
    pre_line = pre[0] + pre[1] * de
    order = default_order if post_order is None else int(post_order)
    poly = _post_edge_fit(e, flat - pre_line, post_w, e0, order)
    jump = poly[0]
    out = flat - pre_line
    if flatten:
        above = sum(poly[p] * de**p for p in range(1, poly.shape[0])) if poly.shape[0] > 1 else 0.0
        out = out - np.where(de >= 0, above, 0.0)
    ok = jump > min_jump
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(ok, out / np.where(ok, jump, 1.0), np.nan)
    post = poly.copy()  # the post-edge curve of the data: polynomial plus the pre-edge line
    post[0] += pre[0]
    if post.shape[0] > 1:
        post[1] += pre[1]
    else:
        post = np.concatenate([post, pre[1:2]])
    pixels = y.shape[1:]
    return EdgeNormalization(out.reshape(y.shape).astype(np.float32), jump.reshape(pixels).astype(np.float32),
                             pre.reshape(2, *pixels), post.reshape(post.shape[0], *pixels), e0, pre_w, post_w,
                             poly.shape[0] - 1)


def edge_fit_coverage(energies: np.ndarray, edge_energy: float) -> str | None:
    """Why the scan cannot be edge-fitted with the default windows, or None when it can.

    The edge fit needs at least 2 energies in the default pre-edge window and a post-edge window
    (:func:`default_windows`) of at least 30 eV holding at least 3 energies; a sparse scan (one
    pre-edge energy and a dozen near the edge) has neither and is normalized with
    :func:`normalize_by_references` instead.
    """
    e = np.sort(np.asarray(energies, np.float64))
    (p_lo, p_hi), (n_lo, n_hi), _ = default_windows(e, edge_energy)
    n_pre = int(((e >= p_lo) & (e <= p_hi)).sum())
    n_post = int(((e >= n_lo) & (e <= n_hi)).sum())
    problems = []
    if n_pre < 2:
        problems.append(f"{n_pre} energies in the pre-edge window {p_lo:.1f}-{p_hi:.1f} eV (need 2)")
    if n_hi - n_lo < 30 or n_post < 3:
        problems.append(f"a post-edge window {n_lo:.1f}-{n_hi:.1f} eV with {n_post} energies (need >= 30 eV and 3)")
    return "; ".join(problems) or None


def normalize_by_references(
    spectra: np.ndarray,
    energies: np.ndarray,
    references: np.ndarray,
    reference_jumps: np.ndarray | None = None,
    *,
    min_jump: float = 0.0,
) -> EdgeNormalization:
    """Normalization of a sparse scan from the reference fit (no post-edge region needed).

    Each pixel's spectrum is fitted as ``sum_k x_k r_k(E) + b`` (NNLS with a free constant,
    :func:`~phasestream.methods.linear_combination_fit`) on the scan's own energies: ``b`` is the
    pre-edge level (set by the pre-edge energy, where the references are about 0) and the edge jump
    is ``sum_k x_k J_k`` with ``J_k`` the edge jump of reference k (1 for edge-normalized
    references). ``normalized = (spectrum - b) / jump``.

    Parameters
    ----------
    spectra : (E, ...) OD stack
    energies : (E,) eV
    references : (K, E) reference spectra at the same energies
    reference_jumps : (K,) edge jumps of the references (default 1: edge-normalized references)
    min_jump : pixels with a jump at or below this get NaN normalized spectra

    Returns
    -------
    EdgeNormalization with ``method="reference fit"``, ``pre_edge`` ``[b, 0]``, ``post_edge``
    ``[b + jump, 0]``, ``post_order`` 0, E0 from :func:`find_edge_energy` of the mean spectrum
    """
    e = np.asarray(energies, np.float64)
    y = np.asarray(spectra, np.float64)
    refs = np.atleast_2d(np.asarray(references, np.float64))
    jumps = np.ones(refs.shape[0]) if reference_jumps is None else np.asarray(reference_jumps, np.float64)
    fit = linear_combination_fit(y, refs, method="nnls", energies=e, background_order=0)
    pixels = y.shape[1:]
    level = fit.background[0].astype(np.float64)
    jump = np.tensordot(jumps, fit.fractions.astype(np.float64), axes=1)
    ok = jump > min_jump
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(ok, (y - level) / np.where(ok, jump, 1.0), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(y.reshape(e.size, -1), axis=1)
    e0 = find_edge_energy(e, mean)
    zeros = np.zeros(pixels)
    return EdgeNormalization(out.astype(np.float32), jump.astype(np.float32), np.stack([level, zeros]),
                             np.stack([level + jump, zeros]), e0, (float(e[0]), float(e[0])),
                             (float(e0), float(e[-1])), 0, "reference fit")
