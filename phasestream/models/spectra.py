"""The spectral side of the denoiser, free of TensorFlow: the spectral components of an (E, Y, X) OD
stack that hold signal (found across scan lines), and the spectral-shape averaging of its weak components
(``phasestream.models.denoise`` puts the blind-row network between the two; docs/models.md#denoising).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from phasestream.kernels.guided import guided_sums

__all__ = ["SHAPE_ITERATIONS", "SHAPE_RADIUS", "SHAPE_THICKNESS_TOLERANCE", "SHAPE_TOLERANCE", "SIGNAL_LAGS",
           "SIGNAL_RATIO", "SpectralComponents", "across_line_covariance", "line_noise_level", "shape_average",
           "shape_averaging_settings", "spectral_components"]

#: Spectral-shape averaging of the weak components (:func:`shape_average`): the disc (px), the
#: tolerance of the guide (noise units of the thickness-normalized weak components, and a share of
#: the typical particle thickness) and the rounds of re-weighting. Chosen on NVPF samples at 300
#: counts/px (seeds 920-922; the thickness tolerance, 0.6 until 2026-12-06, on 920-925, where 0.2
#: keeps a core's spectra out of its shell's averages) that ``benchmarks/denoise.py`` never scores
#: (docs/models.md#denoising).
SHAPE_RADIUS = 12
SHAPE_TOLERANCE = 0.4
SHAPE_THICKNESS_TOLERANCE = 0.2
SHAPE_ITERATIONS = 3

#: A spectral component is signal when its across-line covariance (rows 1..``SIGNAL_LAGS`` apart,
#: :func:`spectral_components`) exceeds ``SIGNAL_RATIO`` times the largest negative one, the size
#: noise alone reaches. Measured on simulated NVPF stacks, 12 energies, line-correlated noise at 300
#: and 1000 counts/px (192 stacks each): a one-phase field passes a false second component in 3.1%,
#: a second phase present is found in 93% (the rest: minority domains of a few hundred pixels); with
#: one lag and 1.3, 7.8% and 91% (docs/models.md#denoising).
SIGNAL_RATIO = 1.6
SIGNAL_LAGS = 3


def shape_averaging_settings() -> dict[str, float | int]:
    """The settings :func:`shape_average` runs with by default, as a denoised result records them: a
    model version alone does not say how its output was averaged (the thickness tolerance changed on
    2026-12-06 under the same shipped model)."""
    return {"radius": SHAPE_RADIUS, "tolerance": SHAPE_TOLERANCE,
            "thickness_tolerance": SHAPE_THICKNESS_TOLERANCE, "rounds": SHAPE_ITERATIONS}


def line_noise_level(image: np.ndarray) -> float:
    """Noise standard deviation of an image whose noise is independent between rows (scan lines).

    ``1.4826 * MAD(y[r] - (y[r-1] + y[r+1]) / 2) / sqrt(1.5)``: the second difference across lines
    cancels smooth structure and any noise shared along a line is kept (it differs between lines).
    """
    a = np.asarray(image, np.float64)
    d = a[1:-1] - 0.5 * (a[:-2] + a[2:])
    d = d[np.isfinite(d)]
    if d.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(1.5))


@dataclass(frozen=True)
class SpectralComponents:
    """Whitened spectral components of a stack: ``od ~ mean + scale * (basis @ components)``.

    Attributes
    ----------
    mean : (E,) mean OD per energy; scale : (E,) noise level per energy (the whitening)
    basis : (E, K) orthonormal spectral components of the whitened stack
    components : (K, Y, X) component images; noise : (K,) their noise levels
    eigenvalues : (E,) of the whitened covariance, descending; noise_floor : their noise level
    variance : (K,) variance of each kept component (whitened units; noise alone gives about the floor)
    signal : (E,) eigenvalues of the across-line covariance, descending (the basis's first K)
    """

    mean: np.ndarray
    scale: np.ndarray
    basis: np.ndarray
    components: np.ndarray
    noise: np.ndarray
    eigenvalues: np.ndarray
    noise_floor: float
    variance: np.ndarray
    signal: np.ndarray

    def project(self, od: np.ndarray) -> np.ndarray:
        """(K, Y, X) component images of any (E, Y, X) OD stack in this basis (the inverse of
        :meth:`reconstruct` on the basis's span), e.g. the simulator's noiseless OD."""
        x = np.asarray(od, np.float64)
        z = (x - self.mean[:, None, None]) / self.scale[:, None, None]
        return (self.basis.T @ z.reshape(len(self.mean), -1)).reshape(-1, *x.shape[1:])

    def reconstruct(self, components: np.ndarray | None = None) -> np.ndarray:
        """(E, Y, X) OD from (K, Y, X) component images (default: the noisy ones)."""
        c = self.components if components is None else np.asarray(components, np.float64)
        k, h, w = c.shape
        return (self.mean[:, None] + self.scale[:, None] * (self.basis @ c.reshape(k, -1))).reshape(-1, h, w)


def across_line_covariance(z: np.ndarray, lags: int) -> np.ndarray:
    """(E, E) mean of the symmetrized covariances between rows 1..``lags`` apart of a (E, Y, X) stack."""
    n_e = z.shape[0]
    total = np.zeros((n_e, n_e))
    for lag in range(1, lags + 1):
        a, b = z[:, :-lag].reshape(n_e, -1), z[:, lag:].reshape(n_e, -1)
        total += (a @ b.T + b @ a.T) / (2 * a.shape[1])
    return total / lags


def spectral_components(od: np.ndarray, *, components: int | None = None, ratio: float = SIGNAL_RATIO,
                        lags: int = SIGNAL_LAGS, max_components: int = 8) -> SpectralComponents:
    """The spectral components of the whitened OD stack (E, Y, X) that hold signal.

    Each energy is divided by its :func:`line_noise_level`; NaN pixels take the energy's median.
    The components are the eigenvectors of the *across-line* covariance (:func:`across_line_covariance`,
    rows 1..``lags`` apart): noise independent between scan lines (Poisson, dark, read, a line's I0
    and its along-line correlation) adds nothing to it on average, whereas structure spanning lines
    adds nearly its full covariance. So a weak phase contrast that the ordinary covariance cannot tell
    from the noise's largest eigenvalues (a minority domain at PCC 0.99: 1.13 times the floor, against
    noise at up to 1.11 with line-correlated noise) still stands out. Noise spreads the across-line
    eigenvalues about zero, so the largest negative one gives their size, and the components above
    ``ratio`` times it are kept (at least one, at most ``max_components``), unless ``components``
    fixes their number. ``eigenvalues`` and ``noise_floor`` are those of the ordinary covariance (the
    floor: the median of its smaller half), ``variance`` each kept component's. A stack of fewer than
    4 rows falls back to the ordinary covariance (components above ``ratio`` times the floor).
    """
    x = np.asarray(od, np.float64)
    if x.ndim != 3 or x.shape[0] < 2:
        raise ValueError(f"od must be an (E, Y, X) stack with E >= 2, got shape {x.shape}")
    n_e, h, w = x.shape
    x = np.where(np.isfinite(x), x, np.nan)
    if not np.isfinite(x).any(axis=(1, 2)).all():
        raise ValueError("every energy image needs at least one finite pixel")
    x = np.where(np.isfinite(x), x, np.nanmedian(x, axis=(1, 2), keepdims=True))
    scale = np.array([line_noise_level(img) for img in x])
    scale = np.where(scale > 0, scale, max(scale.max(), 1e-6))
    mean = x.mean(axis=(1, 2))
    z = ((x - mean[:, None, None]) / scale[:, None, None]).reshape(n_e, -1)
    covariance = z @ z.T / z.shape[1]
    eigenvalues, vectors = np.linalg.eigh(covariance)
    eigenvalues, vectors = eigenvalues[::-1], vectors[:, ::-1]
    floor = float(np.median(eigenvalues[n_e // 2:]))
    signal, lags = eigenvalues, min(lags, h - 3)
    if lags >= 1:
        signal, vectors = np.linalg.eigh(across_line_covariance(z.reshape(n_e, h, w), lags))
        signal, vectors = signal[::-1], vectors[:, ::-1]
    if components is None:
        noise_size = max(-float(signal.min()), 1e-12) if lags >= 1 else floor
        components = int(np.clip((signal > ratio * noise_size).sum(), 1, min(max_components, n_e)))
    basis = vectors[:, :components]
    basis = basis * np.where(basis[np.argmax(np.abs(basis), axis=0), range(components)] < 0, -1.0, 1.0)
    comps = (basis.T @ z).reshape(components, h, w)
    noise = np.array([max(line_noise_level(c), 1e-6) for c in comps])
    variance = np.einsum("ek,ef,fk->k", basis, covariance, basis)
    return SpectralComponents(mean, scale, basis, comps, noise, eigenvalues, floor, variance, signal)


def shape_average(sc: SpectralComponents, pilot: np.ndarray, weak: Sequence[bool], *,
                  radius: int = SHAPE_RADIUS, tolerance: float = SHAPE_TOLERANCE,
                  thickness_tolerance: float = SHAPE_THICKNESS_TOLERANCE,
                  iterations: int = SHAPE_ITERATIONS) -> tuple[np.ndarray, int]:
    """The ``weak`` components re-estimated as averages of the *noisy* spectra of the pixels whose
    spectral shape, in the ``pilot``, is that of the pixel: (K, Y, X) components.

    ``od = thickness x shape``, and phases differ in shape alone, so within a phase domain the
    weak components divided by the thickness (the uncentred first component, ``T``) are constant
    however the thickness varies. For each pixel ``p`` the neighbours ``q`` within ``radius`` are
    weighted by ``exp(-d^2 / 2)``, ``d^2`` the squared difference of their pilot shapes (the weak
    components times ``T_ref / T``, in units of ``tolerance`` times the component's noise) plus that of
    their thicknesses (in units of ``thickness_tolerance`` times ``T_ref``, the typical particle
    thickness); a weak component is then ``T(p) * sum_q w W(q) / sum_q w T(q)`` (``W``: the noisy
    uncentred component), the shape of the neighbours at the pixel's own thickness (a ratio
    estimator: averaging spectra of one phase at different thicknesses keeps its shape). The result
    is the next round's pilot (``iterations``): the weights sharpen, the values averaged stay the noisy
    ones, never the pilot's; those intermediate pilots leave the pixel's own scan line out. The
    neighbours' weighted thickness is floored at a tenth of ``T_ref``, so that over the background
    (``T ~ 0``) the result tends to zero OD. A denoised spectrum is a weighted mean of measured
    spectra: it cannot make a shape the stack does not hold, nor shrink a contrast between domains
    that the weights separate. The first component (the thickness) is not changed; when it is weak
    itself, or no other component is, the pilot is returned as it is. Nothing here is trained.
    Returns the (K, Y, X) components and how many of them were averaged.
    """
    k = sc.basis.shape[1]
    weak = np.broadcast_to(np.asarray(weak, bool), (k,))
    out = np.array(pilot, np.float64)
    offsets = sc.basis.T @ (sc.mean / sc.scale)  # uncentred component = centred + offset
    thickness = out[0] + offsets[0]
    top = float(np.percentile(thickness, 99))
    refine = [j for j in range(1, k) if weak[j]]
    if weak[0] or not refine or top <= 0 or iterations < 1:
        return out, 0
    t_ref = float(np.median(thickness[thickness > 0.3 * top]))
    t_floor = np.maximum(thickness, 0.5 * t_ref)
    noisy = np.stack([sc.components[j] + offsets[j] for j in refine] + [thickness, np.ones_like(thickness)])
    for it in range(iterations):
        shapes = [(out[j] + offsets[j]) * (t_ref / t_floor) / (tolerance * sc.noise[j]) for j in range(1, k)]
        guide = np.stack([*shapes, thickness / (thickness_tolerance * t_ref)])
        # the pilots of the next round leave the pixel's own scan line out: its line noise, shared by
        # the whole line, would otherwise make whole lines join the wrong side of an edge along them
        sums = guided_sums(guide, noisy, radius, skip_row=it < iterations - 1)
        # the neighbours' thickness, floored at a tenth of T_ref: over the background (T ~ 0) the
        # result tends to T(p) times a bounded mean, zero OD, never to noise over noise
        denominator = np.maximum(sums[-2], 0.1 * t_ref * sums[-1])
        # a pixel whose pilot shape no neighbour shares (outside its own line, all weights underflow
        # to zero) gets no evidence from them: it keeps its current estimate, never 0 / 0
        weighted = denominator > 0
        ratio = np.divide(sums[:-2], denominator, out=np.zeros_like(sums[:-2]), where=weighted)
        for i, j in enumerate(refine):
            out[j] = np.where(weighted, thickness * ratio[i] - offsets[j], out[j])
    return out, len(refine)
