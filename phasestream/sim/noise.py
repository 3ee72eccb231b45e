"""STXM-realistic noise for simulated energy stacks: counting, dark, line-correlated noise and drift.

A scanning microscope builds each image line by line: the sample moves under a focused beam along
the fast axis (X, a *scan line*), then steps along Y. Besides counting statistics this leaves
noise that is correlated along the lines and independent between them: the incident flux (I0)
changes from line to line (beam-position and top-up fluctuations, a slow wobble of the zone
plate) and drifts smoothly within a line. Each energy is a separate scan, so none of it is
correlated between energies, except the slow mechanical drift of the sample between energies.
The paper "Deep learning denoising unlocks quantitative insights in operando materials microscopy"
identifies such spatially correlated noise in STXM data; its consequences for denoising are in
docs/models.md.

The model, per energy ``e``, line ``y`` and pixel ``x`` (``dose`` the nominal open-beam counts per
pixel, ``OD`` the sample's optical density, shifted by the drift ``d_e``)::

    beam[e, y, x] = (1 + a[e, y]) * (1 + b[e, y, x])
    a[e, y] ~ N(0, line_i0^2)                                   per-line I0 factor
    b[e, y, x] = r b[e, y, x-1] + sqrt(1 - r^2) N(0, along_line^2),  r = exp(-1 / along_line_px)
    counts = Poisson(dose * beam * exp(-OD(x - d_e))) + Poisson(dark_counts) + N(0, read_sigma^2)
    measured OD = -ln((counts - dark_counts) / dose)            NaN where counts - dark <= 0
    d_e = d_{e-1} + N(0, drift_px^2) in Y and X, d_0 = 0        slow sample drift

``b`` is a stationary AR(1) process along each line (variance ``along_line^2``, autocorrelation
``r^k`` at lag ``k`` pixels). The analysis normalizes by the nominal ``dose`` (one I0 per energy,
as the live path does), so the beam fluctuations stay in the OD: ``-ln(beam)``, about ``-a - b``,
is added to every pixel of the line whatever the sample. :class:`STXMNoise` with its defaults is
Poisson counting noise alone, the noise of :meth:`SimulatedSample.transmitted`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from phasestream.sim.samples import SimulatedSample

__all__ = ["LINE_CORRELATED", "STXMNoise", "SimulatedStack", "beam_fluctuation", "sample_drift", "simulate_stack"]


@dataclass(frozen=True)
class STXMNoise:
    """Parameters of the STXM noise model (module docstring). Defaults: Poisson counting noise only.

    Attributes
    ----------
    poisson : draw Poisson counts (False: expected counts, the other terms still apply)
    dark_counts : mean detector dark counts per pixel (Poisson); subtracted as a known dark level
    read_sigma : standard deviation of Gaussian detector (read-out) noise, counts
    line_i0 : relative standard deviation of the per-scan-line I0 factor ``a``
    along_line : relative standard deviation of the I0 fluctuation ``b`` correlated along a line
    along_line_px : correlation length (px) of ``b``: lag-1 autocorrelation ``exp(-1 / along_line_px)``;
        0 makes ``b`` white
    drift_px : standard deviation (px, per axis) of each energy's step of the sample's random-walk drift
    """

    poisson: bool = True
    dark_counts: float = 0.0
    read_sigma: float = 0.0
    line_i0: float = 0.0
    along_line: float = 0.0
    along_line_px: float = 0.0
    drift_px: float = 0.0

    def __post_init__(self) -> None:
        for name in ("dark_counts", "read_sigma", "line_i0", "along_line", "along_line_px", "drift_px"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"STXMNoise.{name} must be a finite number >= 0, got {value!r}")

    @property
    def line_correlated(self) -> bool:
        """True when the beam fluctuates along or between scan lines."""
        return self.line_i0 > 0 or self.along_line > 0

    @property
    def along_line_correlation(self) -> float:
        """Lag-1 autocorrelation ``r`` of ``b`` along a line."""
        return float(np.exp(-1.0 / self.along_line_px)) if self.along_line_px > 0 else 0.0


#: the line-correlated noise of the denoising benchmark and tests: 2% line-to-line I0 noise, 2%
#: along-line fluctuation with a 10 px correlation length, 1 dark count, 1 count of read noise
LINE_CORRELATED = STXMNoise(dark_counts=1.0, read_sigma=1.0, line_i0=0.02, along_line=0.02, along_line_px=10.0)


@dataclass
class SimulatedStack:
    """A simulated STXM energy stack with its truth.

    Attributes
    ----------
    energies : (E,) eV
    counts : (E, Y, X) float64 detector counts (dark included)
    od : (E, Y, X) float64 measured OD ``-ln((counts - dark_counts) / dose)``, NaN where not positive
    clean_od : (E, Y, X) float64 noiseless OD of the (drifted) sample: the truth of ``od``
    beam : (E, Y, X) float64 relative beam ``(1 + a)(1 + b)`` (ones without line noise)
    shifts : (E, 2) sample drift (dy, dx) in px at each energy
    dose : nominal open-beam counts per pixel
    noise : the noise parameters
    """

    energies: np.ndarray
    counts: np.ndarray
    od: np.ndarray
    clean_od: np.ndarray
    beam: np.ndarray
    shifts: np.ndarray
    dose: float
    noise: STXMNoise


def beam_fluctuation(shape: tuple[int, int], noise: STXMNoise, rng: np.random.Generator) -> np.ndarray:
    """Relative beam ``(1 + a[y]) (1 + b[y, x])`` (Y, X) of one scan (module docstring).

    ``b`` starts each line from its stationary distribution, so its variance is ``along_line^2``
    at every pixel. Ones (and no random numbers drawn) without line noise.
    """
    h, w = shape
    beam = np.ones(shape)
    if noise.line_i0 > 0:
        beam *= 1.0 + rng.normal(0.0, noise.line_i0, (h, 1))
    if noise.along_line > 0:
        r = noise.along_line_correlation
        innovations = rng.normal(0.0, noise.along_line, (h, w))
        innovations[:, 1:] *= np.sqrt(1.0 - r * r)
        b = np.empty((h, w))
        b[:, 0] = innovations[:, 0]
        for x in range(1, w):  # AR(1) along the line
            b[:, x] = r * b[:, x - 1] + innovations[:, x]
        beam *= 1.0 + b
    return beam


def sample_drift(n_energies: int, drift_px: float, rng: np.random.Generator) -> np.ndarray:
    """(E, 2) random-walk drift (dy, dx) in px: 0 at the first energy, steps ``N(0, drift_px^2)``."""
    shifts = np.zeros((n_energies, 2))
    if drift_px > 0 and n_energies > 1:
        shifts[1:] = np.cumsum(rng.normal(0.0, drift_px, (n_energies - 1, 2)), axis=0)
    return shifts


def simulate_stack(
    sample: SimulatedSample,
    energies: Sequence[float],
    *,
    dose: float,
    noise: STXMNoise | None = None,
    rng: np.random.Generator | int | None = None,
) -> SimulatedStack:
    """Simulate the STXM energy stack of ``sample`` at ``energies`` (eV) and ``dose`` counts/px.

    With the default ``noise`` (Poisson only) the counts are those of
    ``[sample.transmitted(e, i0=dose, rng=rng) for e in energies]`` drawn from the same generator.
    The drift moves the sample by linear interpolation (edge values outside), so ``clean_od`` is
    the truth of each energy's image as scanned.
    """
    noise = STXMNoise() if noise is None else noise
    if not dose > 0:
        raise ValueError(f"dose must be > 0 counts per pixel, got {dose!r}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    energies = np.asarray(energies, np.float64)
    shifts = sample_drift(len(energies), noise.drift_px, rng)
    shape = sample.shape
    counts, clean, beams = (np.empty((len(energies), *shape)) for _ in range(3))
    for i, energy in enumerate(energies):
        od = sample.optical_density(float(energy))
        if shifts[i].any():
            od = ndimage.shift(od, shifts[i], order=1, mode="nearest")
        beam = beam_fluctuation(shape, noise, rng)
        expected = dose * beam * np.exp(-od)
        signal = rng.poisson(expected).astype(np.float64) if noise.poisson else expected
        if noise.dark_counts > 0:
            signal += rng.poisson(noise.dark_counts, shape) if noise.poisson else noise.dark_counts
        if noise.read_sigma > 0:
            signal += rng.normal(0.0, noise.read_sigma, shape)
        counts[i], clean[i], beams[i] = signal, od, beam
    with np.errstate(divide="ignore", invalid="ignore"):
        net = counts - noise.dark_counts
        measured = np.where(net > 0, -np.log(net / dose), np.nan)
    return SimulatedStack(energies, counts, measured, clean, beams, shifts, float(dose), noise)
