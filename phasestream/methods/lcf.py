"""Linear combination fitting (LCF) of every pixel's spectrum against reference spectra.

The classic 2D-XANES fit (PyXAS, Ge & Lee 2020, section 6; MANTiS; aXis2000): each pixel's
spectrum ``y`` (E,) is modelled as ``A x + B b`` with ``A`` (E, K) the references interpolated to
the scan energies, ``x`` (K,) the reference weights and ``B`` (E, P) optional polynomial
background terms in energy with free coefficients ``b``. Three fits:

* ``"lstsq"``: unconstrained least squares;
* ``"nnls"``: ``x >= 0`` (non-negative least squares, Lawson & Hanson);
* ``"fcls"``: ``x >= 0`` and ``sum(x) == 1`` (fully constrained least squares, Heinz & Chang 2001;
  the LCF of the robust-unmixing paper, eq. 3).

The constrained fits are exact, vectorized over pixels: with the background eliminated by
projection (``min_b ||y - Ax - Bb||^2 = ||P(y - Ax)||^2``, ``P`` the projector off ``span(B)``), the
problem is a K-variable quadratic program ``min x'Gx - 2h'x`` per pixel (``G = A'PA``, ``h = A'Py``).
Its solution is the unconstrained (or sum-to-one) minimiser on its support; enumerating every
support S (2^K - 1 of them, K <= ``MAX_ENUMERATED``) in closed form and keeping the feasible one of
lowest objective is the exact optimum, for all pixels at once with small matrix products.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

import numba
import numpy as np

__all__ = ["FIT_METHODS", "MAX_ENUMERATED", "LCFResult", "linear_combination_fit", "polynomial_background"]

FIT_METHODS = ("lstsq", "nnls", "fcls")
#: Largest number of references the exact active-set enumeration handles (2^K - 1 supports).
MAX_ENUMERATED = 8


@dataclass(frozen=True)
class LCFResult:
    """Per-pixel LCF results; ``...`` are the pixel axes of the input (e.g. (Y, X)).

    Attributes
    ----------
    fractions : (K, ...) float32, reference weights (fractions for ``fcls``)
    background : (P, ...) float32, polynomial background coefficients (P = 0 without background),
        in powers of the energy scaled to [-1, 1] over the fitted energies
    fit_error : (...) float32, residual sum of squares ``||y - A x - B b||^2``

    A pixel with a non-finite value at any energy gets NaN in every output (all three methods).
    reduced_chi2 : (...) float32, ``fit_error / ((E - n_free) * sigma^2)``; n_free = K + P for
        ``lstsq`` / ``nnls``, K + P - 1 for ``fcls``; sigma = ``noise_sigma`` (1 when not given,
        so it is the residual variance estimate)
    method : the fit used
    """

    fractions: np.ndarray
    background: np.ndarray
    fit_error: np.ndarray
    reduced_chi2: np.ndarray
    method: str


def polynomial_background(energies: np.ndarray, order: int | None) -> np.ndarray:
    """(E, order + 1) float64 design columns ``t**p`` with ``t`` the energies scaled to [-1, 1]; (E, 0) for None."""
    e = np.asarray(energies, np.float64)
    if order is None:
        return np.zeros((e.size, 0))
    if order < 0:
        raise ValueError(f"background order must be >= 0 or None, got {order}")
    span = e.max() - e.min()
    t = (2 * (e - e.min()) / span - 1) if span > 0 else np.zeros_like(e)
    return np.stack([t**p for p in range(order + 1)], axis=1)


def linear_combination_fit(
    spectra: np.ndarray,
    references: np.ndarray,
    *,
    method: str = "nnls",
    energies: np.ndarray | None = None,
    background_order: int | None = None,
    noise_sigma: float | np.ndarray | None = None,
) -> LCFResult:
    """Fit every pixel's spectrum as a linear combination of references (plus a polynomial background).

    Parameters
    ----------
    spectra : (E, ...) stack, e.g. (E, Y, X) edge-normalized absorption or OD; E energies first
    references : (K, E) reference spectra at the same E energies
        (``ReferenceSet.interpolate(energies)``)
    method : ``"lstsq"`` (unconstrained), ``"nnls"`` (x >= 0) or ``"fcls"`` (x >= 0, sum x = 1)
    energies : (E,) eV, needed only for ``background_order``
    background_order : None (no background) or the degree of a polynomial background in energy
        (0: constant offset, 1: linear, ...) with free (unconstrained) coefficients
    noise_sigma : noise standard deviation of the spectra (scalar or (...) map), for ``reduced_chi2``

    Returns
    -------
    LCFResult

    References
    ----------
    M. Ge and W.-K. Lee, "PyXAS", J. Synchrotron Rad. 27 (2020) 567; D. C. Heinz and C.-I. Chang,
    "Fully constrained least squares linear spectral mixture analysis", IEEE TGRS 39 (2001) 529.
    """
    if method not in FIT_METHODS:
        raise ValueError(f"method must be one of {FIT_METHODS}, got {method!r}")
    y = np.asarray(spectra)
    a = np.atleast_2d(np.asarray(references, np.float64)).T  # (E, K)
    n_e, k = a.shape
    if y.shape[0] != n_e:
        raise ValueError(f"spectra have {y.shape[0]} energies but the references {n_e}")
    if background_order is not None and energies is None:
        raise ValueError("background_order needs the energies")
    b = polynomial_background(energies if energies is not None else np.arange(n_e), background_order)
    p = b.shape[1]
    n_free = k + p - (1 if method == "fcls" else 0)
    if n_free >= n_e:
        raise ValueError(f"{n_free} free parameters need more than {n_e} energies")
    if method != "lstsq" and k > MAX_ENUMERATED:
        raise ValueError(f"constrained LCF handles at most {MAX_ENUMERATED} references, got {k}")
    design = np.concatenate([a, b], axis=1)  # (E, K + P)
    if np.linalg.matrix_rank(design) < k + p:
        raise ValueError("the references (and background terms) are linearly dependent at these energies")

    pixel_shape = y.shape[1:]
    flat = y.reshape(n_e, -1)
    if flat.dtype not in (np.float32, np.float64):
        flat = flat.astype(np.float64)
    solver = _Solver(design.T @ design, k, method)
    coef, rss = solver.fit(flat, design)
    rss = rss.reshape(pixel_shape)
    sigma2 = 1.0 if noise_sigma is None else np.square(np.asarray(noise_sigma, np.float64))
    chi2 = (rss / ((n_e - n_free) * sigma2)).astype(np.float32)
    coef = coef.reshape(k + p, *pixel_shape)
    return LCFResult(coef[:k], coef[k:], rss, chi2, method)


class _Solver:
    """Closed-form per-pixel solutions of ``min c'Gc - 2h'c`` under the method's constraints on c[:K].

    Precomputes, for every support S of the fractions, ``G_S^-1`` of the background-reduced Gram
    matrix ``G = A'A - A'B (B'B)^-1 B'A``; the numba kernel then solves each pixel from
    ``h = [A B]' y`` alone.
    """

    def __init__(self, gram: np.ndarray, k: int, method: str):
        self.k, self.method, self.gram = k, method, gram
        self.inverse = np.linalg.inv(gram)
        p = gram.shape[0] - k
        gab = gram[:k, k:]
        back = np.linalg.inv(gram[k:, k:]) if p else np.zeros((0, 0))
        reduced = gram[:k, :k] - gab @ back @ gab.T if p else gram
        # ha = h_a - gab back h_b; b = back (h_b - gab' x)
        self.reduce = np.concatenate([np.eye(k), -gab @ back], axis=1) if p else np.eye(k)
        self.back, self.back_gab = back, (back @ gab.T if p else np.zeros((0, k)))
        supports = [list(s) for size in range(1, k + 1) for s in itertools.combinations(range(k), size)]
        if method == "lstsq":
            supports = []
        n_s = len(supports)
        self.index = np.full((max(n_s, 1), k), -1, np.int64)
        self.inverses = np.zeros((max(n_s, 1), k, k))
        self.ones = np.zeros((max(n_s, 1), k))
        self.totals = np.ones(max(n_s, 1))
        for i, idx in enumerate(supports):
            g_inv = np.linalg.inv(reduced[np.ix_(idx, idx)])
            m = len(idx)
            self.index[i, :m] = idx
            self.inverses[i, :m, :m] = g_inv
            self.ones[i, :m] = g_inv.sum(axis=1)
            self.totals[i] = g_inv.sum()
        self.sizes = (self.index >= 0).sum(axis=1)
        self.n_supports = n_s

    def fit(self, flat: np.ndarray, design: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coefficients (K + P, N) float32 and RSS (N,) float32 of the (E, N) spectra."""
        n = flat.shape[1]
        coef = np.empty((design.shape[1], n), np.float32)
        rss = np.empty(n, np.float32)
        mode = FIT_METHODS.index(self.method)
        with _LOCK:
            _lcf_kernel(flat, np.ascontiguousarray(design.T), self.gram, self.inverse, self.reduce, self.back,
                        self.back_gab, self.index, self.sizes, self.inverses, self.ones, self.totals, self.n_supports,
                        mode, coef, rss)
        return coef, rss


_LOCK = threading.Lock()  # numba's default threading layer is not thread-safe
_BLOCK = 256  # pixels per inner block: the (P, block) accumulators stay in cache


@numba.njit(parallel=True, cache=True, fastmath=False)
def _lcf_kernel(flat, design_t, gram, inverse, reduce, back, back_gab, index, sizes, inverses, ones, totals,
                n_supports, mode, coef, rss):  # pragma: no cover - compiled
    n_e, n = flat.shape
    n_p = design_t.shape[0]
    k = reduce.shape[0]
    n_b = n_p - k
    n_blocks = (n + _BLOCK - 1) // _BLOCK
    for blk in numba.prange(n_blocks):
        lo = blk * _BLOCK
        hi = min(lo + _BLOCK, n)
        m = hi - lo
        h = np.zeros((n_p, m))
        yy = np.zeros(m)
        row = np.empty(m)
        for e in range(n_e):  # one pass over the data, row by row (contiguous in pixels)
            for j in range(m):
                row[j] = flat[e, lo + j]
            for j in range(m):
                yy[j] += row[j] * row[j]
            for q in range(n_p):
                d = design_t[q, e]
                for j in range(m):
                    h[q, j] += d * row[j]
        c = np.zeros(n_p)
        ha = np.zeros(k)
        x = np.zeros(k)
        xs = np.zeros(k)
        for j in range(m):
            if not np.isfinite(yy[j]):  # NaN (or inf) at any energy: no fit, NaN out for every method
                for q in range(n_p):
                    coef[q, lo + j] = np.nan
                rss[lo + j] = np.nan
                continue
            if mode == 0:
                for q in range(n_p):
                    acc = 0.0
                    for r in range(n_p):
                        acc += inverse[q, r] * h[r, j]
                    c[q] = acc
            else:
                for a in range(k):
                    acc = 0.0
                    for r in range(n_p):
                        acc += reduce[a, r] * h[r, j]
                    ha[a] = acc
                    x[a] = 0.0
                best = 0.0 if mode == 1 else np.inf  # nnls: x = 0 is feasible with objective 0
                # the full support (last) first: when feasible it is the unconstrained optimum, hence optimal
                for t in range(n_supports):
                    s = n_supports - 1 if t == 0 else t - 1
                    size = sizes[s]
                    mu = 0.0
                    if mode == 2:
                        for a in range(size):
                            mu += ones[s, a] * ha[index[s, a]]
                        mu = (mu - 1.0) / totals[s]
                    feasible = True
                    objective = -mu if mode == 2 else 0.0
                    for a in range(size):
                        acc = 0.0
                        for b in range(size):
                            acc += inverses[s, a, b] * ha[index[s, b]]
                        acc -= mu * ones[s, a]
                        xs[a] = acc
                        objective -= acc * ha[index[s, a]]
                        if acc < -1e-12:
                            feasible = False
                    if feasible and objective < best:
                        best = objective
                        for a in range(k):
                            x[a] = 0.0
                        for a in range(size):
                            x[index[s, a]] = max(xs[a], 0.0)
                    if t == 0 and feasible:
                        break
                for a in range(k):
                    c[a] = x[a]
                for q in range(n_b):
                    acc = 0.0
                    for r in range(n_b):
                        acc += back[q, r] * h[k + r, j]
                    for a in range(k):
                        acc -= back_gab[q, a] * x[a]
                    c[k + q] = acc
            # ||y - Dc||^2 = y'y - 2 h'c + c'Gc, in float64
            res = yy[j]
            for q in range(n_p):
                gc = 0.0
                for r in range(n_p):
                    gc += gram[q, r] * c[r]
                res += c[q] * (gc - 2.0 * h[q, j])
                coef[q, lo + j] = c[q]
            rss[lo + j] = max(res, 0.0)
