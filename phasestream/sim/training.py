"""Simulated training sets: GMVAE spectra and InDI pairs from ``phasestream.sim``, with a known truth.

:func:`synthetic_training_set`: simulated scans at every state of charge and several doses, analysed
with the same kernels as the live path (OD, PCC, particle mask). :func:`synthetic_indi_pairs`:
particle phantoms and their degraded scans. Both return the sets :mod:`phasestream.jobs.training`
trains on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from phasestream.jobs.training import PairSet, TrainingSet, ValidationRun, analysed_labels
from phasestream.kernels.pearson import pearson_maps
from phasestream.kernels.phases import assign_phases, particle_mask
from phasestream.models.domain import SYNTHETIC_DOMAIN

__all__ = ["SYNTHETIC_STATES", "synthetic_denoise_stacks", "synthetic_indi_pairs", "synthetic_training_set"]

SYNTHETIC_STATES = (3.0, 2.4, 2.0, 1.0, 0.8)


def synthetic_training_set(
    *,
    seed: int = 0,
    n_samples: int = 3,
    states: Sequence[float] = SYNTHETIC_STATES,
    doses: Sequence[float] = (2000.0, 5000.0, 20000.0),
    shape: tuple[int, int] = (192, 192),
    n_energies: int = 12,
    references: str = "nvpf-synthetic",
    max_spectra: int | None = 200_000,
    n_validation: int = 2,
) -> TrainingSet:
    """Particle-pixel spectra of simulated STXM scans (Poisson noise) with their PCC labels.

    Energies are ``select_energies(references, n_energies, method="score")`` (the demo's: n_energies + 1 with the
    pre-edge energy). Samples use seeds ``seed * 1000 + i`` so a training seed never reuses the
    demo's or the tests' samples (seeds < 1000) unless asked to. ``n_validation`` more scans (seeds
    ``seed * 1000 + 500 + i``, the middle states, the lowest dose) are the training report's validation runs.
    """
    from phasestream.references import load_references, select_energies
    from phasestream.sim.samples import make_sample

    refs = load_references(references)
    energies = np.asarray(select_energies(refs, n_energies, method="score"))
    ref_spectra = refs.interpolate(energies)
    rng = np.random.default_rng(seed)
    spectra, labels, reliabilities = [], [], []
    for soc in states:
        for i in range(n_samples):
            sample = make_sample(shape, state_of_charge=soc, references=refs, seed=1000 * (seed + 1) + i)
            for dose in doses:
                counts = np.stack([sample.transmitted(e, i0=dose, rng=rng) for e in energies])
                with np.errstate(divide="ignore"):
                    od = -np.log(np.where(counts > 0, counts, np.nan) / dose)
                mask, phase, reliability = analysed_labels(od, ref_spectra)
                x = od[:, mask].T
                keep = np.isfinite(x).all(axis=1)
                spectra.append(x[keep].astype(np.float32))
                labels.append(phase[mask][keep])
                reliabilities.append(reliability[mask][keep].astype(np.float32))
    x, y, r = np.concatenate(spectra), np.concatenate(labels).astype(np.int16), np.concatenate(reliabilities)
    if max_spectra is not None and len(x) > max_spectra:
        pick = np.sort(rng.choice(len(x), max_spectra, replace=False))
        x, y, r = x[pick], y[pick], r[pick]
    validation = []
    middle = sorted(states)[len(states) // 2 - 1: len(states) // 2 + 1] or list(states)
    for i in range(n_validation):
        sample = make_sample(shape, state_of_charge=middle[i % len(middle)], references=refs,
                             seed=1000 * (seed + 1) + 500 + i)
        counts = np.stack([sample.transmitted(e, i0=min(doses), rng=rng) for e in energies])
        with np.errstate(divide="ignore"):
            od = -np.log(np.where(counts > 0, counts, np.nan) / min(doses))
        pcc = pearson_maps(od, ref_spectra)
        mask = particle_mask(od)
        phase, _, ambiguous = assign_phases(pcc, mask)
        validation.append(ValidationRun(f"simulated-{i}", od, mask, phase, ambiguous, pcc, ref_spectra))
    provenance = {"source": "synthetic", "seed": seed, "references": refs.name, "states": list(states),
                  "doses": list(doses), "samples_per_state": n_samples, "shape": list(shape),
                  "n_spectra": len(x)}
    return TrainingSet(x, y, energies, list(refs.phases), provenance, validation, r)


def synthetic_indi_pairs(*, seed: int = 0, n_pairs: int = 24, shape: tuple[int, int] = (256, 256),
                         blur_sigma: float = 1.5, noise: float = 0.03) -> PairSet:
    """Simulated particle phantoms (``phasestream.sim.phantoms``): HQ at full resolution, LQ = blur +
    2x down-sampling + noise, upscaled back by bicubic interpolation (registered by construction)."""
    from phasestream.sim.phantoms import phantom_pairs, upscale

    hq, lq = phantom_pairs(n_pairs, shape, seed=seed + 1, blur_sigma=blur_sigma, noise=noise)
    provenance = {"source": "synthetic", "seed": seed, "n_pairs": n_pairs, "shape": list(shape),
                  "degradation": {"blur_sigma_px": blur_sigma, "downsample": 2, "noise_std": noise}}
    return PairSet(list(hq), [upscale(x) for x in lq], 2, {"lq": 2.0, "hq": 1.0, "unit": "px"}, provenance,
                   dict(SYNTHETIC_DOMAIN))


def synthetic_denoise_stacks(*, seed: int = 0, n_stacks: int = 10, shape: tuple[int, int] = (192, 192),
                             doses: Sequence[float] = (200.0, 300.0, 500.0, 1000.0, 3000.0),
                             states: Sequence[float] = SYNTHETIC_STATES, n_energies: int = 12,
                             references: str = "nvpf-synthetic") -> tuple[list[np.ndarray], dict]:
    """Noisy OD stacks (E, Y, X) of simulated STXM scans with line-correlated noise
    (:data:`phasestream.sim.noise.LINE_CORRELATED`), for training the denoiser, and their provenance.

    Stack ``i`` is a sample at ``states[i % len(states)]`` and ``doses[i % len(doses)]`` counts/px,
    seed ``1000 * (seed + 1) + 500 + i`` (never a test's or benchmark's sample, < 1000), at the
    demo's energies.
    """
    from phasestream.references import load_references, select_energies
    from phasestream.sim.noise import LINE_CORRELATED, simulate_stack
    from phasestream.sim.samples import make_sample

    refs = load_references(references)
    energies = np.asarray(select_energies(refs, n_energies, method="score"))
    rng = np.random.default_rng(seed)
    stacks = []
    for i in range(n_stacks):
        sample = make_sample(shape, state_of_charge=states[i % len(states)], references=refs,
                             n_particles=int(rng.integers(3, 7)), seed=1000 * (seed + 1) + 500 + i)
        stacks.append(simulate_stack(sample, energies, dose=doses[i % len(doses)], noise=LINE_CORRELATED, rng=rng).od)
    provenance = {"source": "synthetic", "seed": seed, "references": refs.name, "n_stacks": n_stacks,
                  "shape": list(shape), "doses": list(doses), "states": list(states),
                  "energies_eV": [float(e) for e in energies], "noise": "LINE_CORRELATED"}
    return stacks, provenance
