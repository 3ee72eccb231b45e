"""Edge normalization of XANES spectra: pre-edge and post-edge lines, edge jump (thickness).

The classic normalization (Athena; PyXAS, Ge & Lee 2020, section 5): a straight line is fitted
to the pre-edge region and one to the post-edge region of every pixel's spectrum; the pre-edge
line is subtracted, and the result is divided by the edge jump, the difference of the two lines
at the edge energy ``E0``. With ``flatten`` the difference in slope of the two lines is removed
above ``E0`` as well, so that the post-edge oscillates about 1. The edge jump is proportional to
the amount of the absorbing element along the beam (the "thickness" map).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["EdgeNormalization", "default_windows", "normalize_edge"]


@dataclass(frozen=True)
class EdgeNormalization:
    """Per-pixel edge normalization; ``...`` are the pixel axes of the input.

    Attributes
    ----------
    normalized : (E, ...) float32, 0 on the pre-edge line, 1 at the post-edge line (NaN where the
        edge jump is below ``min_jump``)
    thickness : (...) float32, edge jump ``post(E0) - pre(E0)``
    pre_edge : (2, ...) float64, offset and slope (per eV, about ``E0``) of the pre-edge line
    post_edge : (2, ...) float64, offset and slope of the post-edge line
    edge_energy : E0, eV
    pre_window, post_window : the fitted energy windows, eV
    """

    normalized: np.ndarray
    thickness: np.ndarray
    pre_edge: np.ndarray
    post_edge: np.ndarray
    edge_energy: float
    pre_window: tuple[float, float]
    post_window: tuple[float, float]


def default_windows(energies: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    """The first 15 % and the last 25 % of the energy range: ((pre lo, pre hi), (post lo, post hi))."""
    e = np.asarray(energies, np.float64)
    lo, hi = float(e.min()), float(e.max())
    span = hi - lo
    return (lo, lo + 0.15 * span), (hi - 0.25 * span, hi)


def _line_fit(energies: np.ndarray, flat: np.ndarray, window: tuple[float, float], centre: float,
              name: str) -> np.ndarray:
    """(2, N) offset and slope of the least-squares lines through the window's energies."""
    inside = (energies >= window[0]) & (energies <= window[1])
    if inside.sum() < 2:
        raise ValueError(f"the {name} window {window} eV holds {inside.sum()} energies; it needs at least 2")
    design = np.stack([np.ones(inside.sum()), energies[inside] - centre], axis=1)
    data = flat[inside]
    finite = np.isfinite(data).all(axis=0)
    coef = np.full((2, flat.shape[1]), np.nan)
    coef[:, finite] = np.linalg.lstsq(design, data[:, finite], rcond=None)[0]
    return coef


def normalize_edge(
    spectra: np.ndarray,
    energies: np.ndarray,
    *,
    pre_edge: tuple[float, float] | None = None,
    post_edge: tuple[float, float] | None = None,
    edge_energy: float | None = None,
    flatten: bool = True,
    min_jump: float = 0.0,
) -> EdgeNormalization:
    """Normalize every pixel's spectrum to a unit edge jump.

    Parameters
    ----------
    spectra : (E, ...) OD or absorption stack, energies first, e.g. (E, Y, X)
    energies : (E,) eV
    pre_edge, post_edge : (low, high) eV windows of the line fits (inclusive); default
        :func:`default_windows`
    edge_energy : E0, eV, where the jump is measured; default the energy of the steepest rise of
        the mean spectrum between the two windows
    flatten : subtract the post-edge minus pre-edge line difference above E0 (post-edge about 1)
    min_jump : pixels with a jump at or below this (background, holes) get NaN normalized spectra

    Returns
    -------
    EdgeNormalization
    """
    e = np.asarray(energies, np.float64)
    y = np.asarray(spectra)
    if e.ndim != 1 or y.shape[0] != e.size:
        raise ValueError(f"spectra have {y.shape[0]} energies but {e.size} energies were given")
    default_pre, default_post = default_windows(e)
    pre_w = tuple(float(v) for v in (pre_edge or default_pre))
    post_w = tuple(float(v) for v in (post_edge or default_post))
    if pre_w[1] >= post_w[0]:
        raise ValueError(f"the pre-edge window {pre_w} must end below the post-edge window {post_w}")
    flat = y.reshape(e.size, -1).astype(np.float64, copy=False)
    if edge_energy is None:
        between = (e > pre_w[1]) & (e < post_w[0])
        if between.sum() < 2:
            edge_energy = 0.5 * (pre_w[1] + post_w[0])
        else:
            mean = np.nanmean(flat, axis=1)
            slope = np.gradient(mean, e)
            edge_energy = float(e[between][np.argmax(slope[between])])
    e0 = float(edge_energy)
    pre = _line_fit(e, flat, pre_w, e0, "pre-edge")
    post = _line_fit(e, flat, post_w, e0, "post-edge")
    jump = post[0] - pre[0]
    de = (e - e0)[:, None]
    out = flat - (pre[0] + pre[1] * de)
    if flatten:
        out = out - np.where(de >= 0, (post[1] - pre[1]) * de, 0.0)  # the lines meet jump apart at E0
    ok = jump > min_jump
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(ok, out / np.where(ok, jump, 1.0), np.nan)
    pixels = y.shape[1:]
    return EdgeNormalization(out.reshape(y.shape).astype(np.float32), jump.reshape(pixels).astype(np.float32),
                             pre.reshape(2, *pixels), post.reshape(2, *pixels), e0, pre_w, post_w)
