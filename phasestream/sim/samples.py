"""Simulated samples: particles with thickness maps and multiphase domains, with ground truth.

A :class:`SimulatedSample` holds a field of view with several particles. Each particle has
an ellipsoidal thickness profile on a randomly perturbed outline and one of three domain
layouts (single phase, core-shell, random Voronoi domains); neighbouring domains blend over a
transition zone of a few pixels. The optical density at energy E is Beer-Lambert,

    OD(E, y, x) = thickness(y, x) * sum_k w_k(y, x) * mu_k(E) + substrate_od,

with ``mu_k`` the reference spectra (OD per unit thickness) and ``w_k`` the phase weights.
Transmitted images add Poisson counting noise at a chosen dose (counts per pixel in the
open beam); TXM adds a flat-field illumination pattern and a dark level.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from phasestream.references import ReferenceSet, load_references

__all__ = ["SimulatedSample", "dominant_phases", "flat_field", "make_sample"]

LAYOUTS = ("single", "core-shell", "domains")


@dataclass
class SimulatedSample:
    """A simulated field of view with known ground truth.

    Attributes
    ----------
    references : the spectra the sample is made of (OD per unit thickness)
    thickness : (Y, X) thickness in units of the references' OD scale
    weights : (K, Y, X) phase weights, summing to 1 inside particles, 0 outside
    phase : (Y, X) int16 ground-truth phase (dominant weight), -1 outside particles
    particle : (Y, X) bool, inside a particle
    boundary : (Y, X) bool, within ``margin`` pixels of a domain boundary or particle edge
    substrate_od : OD of the support film (energy independent)
    state_of_charge : nominal Na content x of the sample
    """

    references: ReferenceSet
    thickness: np.ndarray
    weights: np.ndarray
    phase: np.ndarray
    particle: np.ndarray
    boundary: np.ndarray
    substrate_od: float = 0.02
    state_of_charge: float = float("nan")
    layouts: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return self.thickness.shape

    def optical_density(self, energy: float) -> np.ndarray:
        """Noiseless OD (Y, X) float64 at ``energy`` (eV)."""
        mu = self.references.interpolate(energy)[:, 0]
        return self.thickness * np.tensordot(mu, self.weights, axes=1) + self.substrate_od

    def transmitted(
        self,
        energy: float,
        *,
        i0: float | np.ndarray = 5000.0,
        rng: np.random.Generator | None = None,
        noise: bool = True,
    ) -> np.ndarray:
        """Transmitted counts (Y, X) float64: ``Poisson(i0 * exp(-OD))`` (expected value if not ``noise``).

        ``i0`` is the open-beam count per pixel (a scalar, or an image for TXM illumination).
        """
        expected = np.asarray(i0, dtype=np.float64) * np.exp(-self.optical_density(energy))
        if not noise:
            return expected
        rng = np.random.default_rng() if rng is None else rng
        return rng.poisson(expected).astype(np.float64)

    def accuracy(self, phase: np.ndarray, *, exclude_boundary: bool = True) -> float:
        """Fraction of particle pixels (away from boundaries by default) where ``phase`` equals the truth."""
        region = self.particle & ~self.boundary if exclude_boundary else self.particle
        return float(np.mean(phase[region] == self.phase[region])) if region.any() else float("nan")

    def true_fractions(self) -> np.ndarray:
        """(K,) fraction of particle pixels per ground-truth phase."""
        k = len(self.references.phases)
        counts = np.bincount(self.phase[self.particle], minlength=k)
        return counts / max(1, int(self.particle.sum()))


def dominant_phases(references: ReferenceSet, state_of_charge: float) -> tuple[int, list[int]]:
    """Index of the phase whose Na content is nearest ``state_of_charge``, and its neighbours.

    Phases are ordered by the ``na_content`` of their metadata (or their order in the set).
    """
    content = [references.metadata.get(p, {}).get("na_content", -i) for i, p in enumerate(references.phases)]
    order = list(np.argsort(content)[::-1])
    main = int(np.argmin([abs(c - state_of_charge) for c in content]))
    pos = order.index(main)
    neighbours = [int(order[i]) for i in (pos - 1, pos + 1) if 0 <= i < len(order)]
    return main, neighbours


def _outline(shape, center, radius, rng) -> tuple[np.ndarray, np.ndarray]:
    """Normalized radius rho (<1 inside) of a blob with a randomly perturbed outline."""
    yy, xx = np.indices(shape, dtype=np.float64)
    dy, dx = yy - center[0], xx - center[1]
    theta = np.arctan2(dy, dx)
    r = np.full(shape, float(radius))
    for m in (2, 3, 4):
        r *= 1.0 + rng.uniform(0.0, 0.12 / (m - 1)) * np.cos(m * theta + rng.uniform(0, 2 * np.pi))
    rho = np.hypot(dy, dx) / r
    return rho, theta


def _domains(layout, rho, theta, inside, main, neighbours, rng) -> np.ndarray:
    labels = np.full(rho.shape, main, dtype=np.int16)
    if layout == "single" or not neighbours:
        return labels
    if layout == "core-shell":
        # desodiation starts at the surface: the shell is the neighbour with less Na when there is one
        shell = neighbours[-1]
        labels[inside & (rho > rng.uniform(0.55, 0.75))] = shell
        return labels
    # random domains: Voronoi cells over the particle, each main or a neighbour
    pts = np.flatnonzero(inside)
    seeds = rng.choice(pts, size=min(len(pts), int(rng.integers(4, 8))), replace=False)
    sy, sx = np.unravel_index(seeds, rho.shape)
    yy, xx = np.indices(rho.shape)
    nearest = np.argmin((yy[..., None] - sy) ** 2 + (xx[..., None] - sx) ** 2, axis=-1)
    cell_phase = rng.choice([main] * 2 + neighbours, size=len(seeds))
    cell_phase[0] = main
    return np.asarray(cell_phase[nearest], dtype=np.int16)


def make_sample(
    shape: tuple[int, int] = (128, 128),
    *,
    state_of_charge: float = 2.0,
    references: ReferenceSet | str = "nvpf-synthetic",
    n_particles: int = 3,
    max_thickness: float = 1.2,
    transition_px: float = 2.0,
    margin: int = 2,
    layouts: tuple[str, ...] = LAYOUTS,
    substrate_od: float = 0.02,
    seed: int = 0,
) -> SimulatedSample:
    """Simulate a field of view with ``n_particles`` non-overlapping particles.

    Parameters
    ----------
    shape : (Y, X) pixels
    state_of_charge : nominal Na content; picks each particle's main phase (nearest
        ``na_content``) and the neighbouring phases used for its minority domains
    references : ReferenceSet or registered name
    max_thickness : peak thickness (OD units of the references)
    transition_px : Gaussian width (px) of the blend between neighbouring domains
    margin : pixels from a domain boundary or particle edge counted as ``boundary``
    layouts : domain layouts drawn from (``single``, ``core-shell``, ``domains``)
    seed : ``numpy.random.default_rng`` seed; same seed, same sample
    """
    refs = load_references(references)
    rng = np.random.default_rng(seed)
    k = len(refs.phases)
    main, neighbours = dominant_phases(refs, state_of_charge)
    thickness = np.zeros(shape)
    labels = np.full(shape, -1, dtype=np.int16)
    chosen_layouts = []
    size = min(shape)
    placed = 0
    for _ in range(200 * n_particles):
        if placed == n_particles:
            break
        radius = rng.uniform(0.12, 0.22) * size * (1.6 / np.sqrt(n_particles + 1))
        center = rng.uniform(radius + 2, np.array(shape) - radius - 2)
        rho, theta = _outline(shape, center, radius, rng)
        inside = rho < 1.0
        if not inside.any() or (labels[ndimage.binary_dilation(inside, iterations=3)] >= 0).any():
            continue
        layout = str(rng.choice(layouts))
        dom = _domains(layout, rho, theta, inside, main, neighbours, rng)
        labels[inside] = dom[inside]
        profile = np.sqrt(np.clip(1.0 - rho**2, 0.0, None)) ** 0.5  # flatter top than an ellipsoid
        thickness[inside] = max_thickness * rng.uniform(0.7, 1.0) * profile[inside]
        chosen_layouts.append(layout)
        placed += 1
    if placed < n_particles:
        raise ValueError(f"could not place {n_particles} particles in {shape}; use a larger field")
    particle = labels >= 0
    onehot = np.stack([(labels == i).astype(np.float64) for i in range(k)])
    if transition_px > 0:
        soft = np.stack([ndimage.gaussian_filter(w, transition_px) for w in onehot])
        soft *= particle
        total = soft.sum(axis=0)
        weights = np.where(total > 0, soft / np.where(total > 0, total, 1.0), 0.0)
    else:
        weights = onehot
    interior = ndimage.binary_erosion(particle, iterations=margin)
    edges = np.zeros(shape, dtype=bool)
    for i in range(k):
        region = labels == i
        if region.any():
            edges |= ndimage.binary_dilation(region, iterations=margin) & particle & ~region
    boundary = particle & (~interior | edges | (weights.max(axis=0) < 0.98))
    return SimulatedSample(
        references=refs,
        thickness=thickness,
        weights=weights,
        phase=labels,
        particle=particle,
        boundary=boundary,
        substrate_od=substrate_od,
        state_of_charge=float(state_of_charge),
        layouts=chosen_layouts,
    )


def flat_field(shape: tuple[int, int], *, i0: float = 5000.0, variation: float = 0.2, seed: int = 0) -> np.ndarray:
    """A smooth TXM illumination pattern (Y, X): ``i0`` times a broad bump with ``variation`` relative amplitude."""
    rng = np.random.default_rng(seed)
    yy, xx = np.indices(shape, dtype=np.float64)
    cy, cx = rng.uniform(0.3, 0.7, 2) * np.array(shape)
    s = 0.6 * max(shape)
    return i0 * (1.0 - variation + variation * np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))) * 1.0)
