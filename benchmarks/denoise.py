"""Self-supervised denoising of STXM energy stacks: PSNR of OD, phase identification, variability (JSON).

Protocol (issue 22). Held-out simulated NVPF samples (``phasestream.sim``; seeds below 1000, never
used to train the shipped model) imaged at the demo's 13 energies with line-correlated STXM noise
(``phasestream.sim.noise.LINE_CORRELATED``: Poisson counts, dark and read noise, 2% per-line I0
noise, 2% along-line I0 fluctuation with a 10 px correlation length).

* ``psnr``: PSNR (dB) of the whole OD stack against the simulator's noiseless OD (data range: the
  clean OD's), at ``--doses`` counts/px, for: ``raw``; ``pca`` (the principal components above the
  noise floor only, no spatial step); ``learned`` (the shipped ``denoise-stxm-synthetic`` as it
  is); ``learned_finetuned`` (fine-tuned on the scan itself for ``--fine-tune-steps``, self-supervised);
  ``tv`` (scikit-image ``denoise_tv_chambolle`` on every energy image); ``bm3d`` (the ``bm3d``
  package on every energy image, ``sigma_psd`` = a factor times that image's noise level estimated
  across scan lines, ``line_noise_level``; when ``bm3d`` is not installed the row says so). Their
  strengths are chosen on a separate sample (another seed) at the same dose: the best PSNR over
  ``TV_WEIGHTS`` (whole stack) / ``BM3D_FACTORS`` (centre 128^2 of every third energy: BM3D is slow).
* ``phase_id``: PCC phase identification (``pearson_maps``, ``assign_phases``) of the noiseless
  (``truth``: the floor any denoiser can reach), raw and denoised OD of ``--phase-samples`` samples
  at ``--phase-dose``: accuracy on the particle pixels (``all``; ``interior``: away from domain
  boundaries and particle edges), the ambiguous fraction of the particle pixels (also per true
  phase, and over the pixels the noiseless OD leaves unambiguous: the ambiguity noise adds; noise
  also turns truly ambiguous mixtures at domain boundaries into decided pixels, so a noisy map can
  score under the noiseless fraction) and the median PCC gap of interior pixels, against the
  simulator's truth.
  ``ambiguous_vs_dose``: the raw stack's ambiguous fraction at higher doses (the line noise does
  not fall with the dose).
* ``variability``: ``--realisations`` noise realisations of each phase sample at ``--phase-dose``:
  the standard deviation over realisations of each particle's phase fractions (share of its pixels
  per phase; particles: connected parts of the particle mask; the mean over particles and the
  phases present), raw and denoised (learned, TV; BM3D left out for time), per sample and the mean
  over samples; ``reduction`` is ``1 - std / std_raw``. Per pixel as well (the paper's sense of
  noise-induced variability, supplementary): ``pixel_od_std``, the OD's standard deviation over
  realisations (mean over particle pixels and energies), and ``pixel_flip``, the probability that
  two realisations give a particle pixel different phases, with their reductions. Two bounds from
  the simulator's truth beside them (``truth_bounds``; diagnostics, not methods): ``truth_in_basis``
  (the noiseless OD in each realisation's spectral basis) and ``guided_by_truth`` (the denoiser's
  spectral-shape averaging guided by the noiseless components): how far a perfect pilot would take
  this denoiser. Where the fractions vary (``by_region``): the particle's ``rim`` (within
  ``RIM_PX`` of its edge), its domain ``transition`` pixels (the rest of the simulator's
  ``boundary``: mixtures and the pixels beside a domain boundary) and its ``interior``;
  ``variance_share_by_region``, the share of the variance each carries, and ``std_by_region``, the
  standard deviation of each one's part of the fractions (per sample, and the mean over samples).
* ``standards``: the real-standards phantoms of ``benchmarks/phase_id.py`` (stripes of the
  measured references of ``tests/data`` over the top three quarters, a two-phase mixture ramp
  below) as ``--standards-size``^2 images (smooth thickness 0.7-1.0), their 13 energies
  ``select_energies(refs, 12, dose=dose)``, ``LINE_CORRELATED`` noise at ``--phase-dose``: PSNR
  and the phase measures of ``phase_id`` (accuracy over the pure stripes away from their edges,
  ambiguous over all pixels). TV's weight is tuned on the same phantom with another thickness
  and noise seed; BM3D's factor (in units of the noise level, so it carries over) is the NVPF one.
* ``training``: seconds to fine-tune (``--fine-tune-steps``) and to train from scratch
  (``--scratch-steps``) on one 13 x ``--timing-size``^2 stack, the machine noted.

Usage: python benchmarks/denoise.py [--size 256] [--doses 300 1000] [--fine-tune-steps 200]
       python benchmarks/denoise.py --quick   # small images, one dose, 3 realisations: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from types import SimpleNamespace

import numpy as np
from phase_id import DATA, SETS, phantom  # benchmarks/phase_id.py: the real-standards phantoms
from scipy import ndimage
from skimage.restoration import denoise_tv_chambolle

from phasestream.kernels import assign_phases, pearson_maps
from phasestream.methods.unmixing import bm3d_available
from phasestream.metrics import psnr
from phasestream.models.denoise import POSTERIOR_SNR, denoise_stack, line_noise_level, train_denoiser
from phasestream.models.registry import ModelRegistry
from phasestream.models.spectra import shape_average, spectral_components
from phasestream.references import load_references, select_energies
from phasestream.sim import LINE_CORRELATED, SimulatedSample, make_sample, simulate_stack

TV_WEIGHTS = (0.02, 0.04, 0.06, 0.08, 0.1, 0.13, 0.16, 0.2, 0.25)
BM3D_FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0)
BM3D_MISSING = "not installed (pip install 'phasestream[methods]')"
BOUNDS = ("truth_in_basis", "guided_by_truth")  # variability diagnostics from the truth (truth_bounds)
COMPARED = ("learned", "tv", *BOUNDS)  # variability: each compared with raw (its reductions)
RIM_PX = 3  # variability's variance shares: particle pixels this close to the particle's edge are its rim
MEASURES = ("accuracy", "accuracy_interior", "ambiguous", "ambiguous_where_truth_decided", "median_gap_interior")


def per_energy(fn, od: np.ndarray) -> np.ndarray:
    return np.stack([fn(np.nan_to_num(img)) for img in od])


def tv(od, weight):
    return per_energy(lambda img: denoise_tv_chambolle(img, weight=weight), od)


def bm3d(od, factor):
    """BM3D of every energy image, ``sigma_psd`` = ``factor`` times the image's noise level."""
    import bm3d as _bm3d

    return per_energy(lambda img: np.asarray(_bm3d.bm3d(img, sigma_psd=factor * line_noise_level(img))), od)


def score(stack, estimate) -> float:
    clean = stack.clean_od
    return round(psnr(clean, np.nan_to_num(estimate), data_range=float(clean.max() - clean.min())), 2)


def stack_of(energies, refs, size, seed, dose, soc=2.0, rng=None):
    sample = make_sample((size, size), state_of_charge=soc, references=refs, n_particles=6, seed=seed)
    return sample, simulate_stack(sample, energies, dose=dose, noise=LINE_CORRELATED,
                                  rng=seed + 17 if rng is None else rng)


def tuned(method, grid, stack) -> float:
    return max(grid, key=lambda p: score(stack, method(stack.od, p)))


def bm3d_tuning_view(stack, size: int = 128):
    """The centre ``size``^2 of every third energy image: BM3D's strength is tuned on it (speed)."""
    h, w = stack.od.shape[1:]
    r, c = max(0, (h - size) // 2), max(0, (w - size) // 2)
    window = (slice(None, None, 3), slice(r, r + size), slice(c, c + size))
    return SimpleNamespace(od=stack.od[window], clean_od=stack.clean_od[window])


def interior_gap(reliability, region) -> float:
    return round(float(np.nanmedian(reliability[region])), 4) if region.any() else float("nan")


def phase_scores(sample, od, mu, phases, decided=None) -> dict:
    """PCC phase measures of ``od`` against ``sample``'s truth; ``decided``: the particle pixels that
    the noiseless OD leaves unambiguous (``ambiguous_where_truth_decided``: the ambiguity noise adds)."""
    phase, reliability, ambiguous = assign_phases(pearson_maps(np.nan_to_num(od), mu), backend="numpy")
    inside = sample.particle
    present = [k for k in range(len(phases)) if (inside & (sample.phase == k)).any()]
    extra = {} if decided is None else {
        "ambiguous_where_truth_decided": round(float(ambiguous[inside & decided].mean()), 4)}
    return {"accuracy": round(sample.accuracy(phase, exclude_boundary=False), 4),
            "accuracy_interior": round(sample.accuracy(phase), 4),
            "ambiguous": round(float(ambiguous[inside].mean()), 4), **extra,
            "median_gap_interior": interior_gap(reliability, inside & ~sample.boundary),
            "ambiguous_by_phase": {phases[k]: round(float(ambiguous[inside & (sample.phase == k)].mean()), 4)
                                   for k in present}}


def estimates(stack, model, weight, factor) -> dict:
    """The noiseless, raw and denoised OD of ``stack`` by every method (``bm3d`` when ``factor``)."""
    out = {"truth": stack.clean_od, "raw": stack.od, "pca": denoise_stack(None, stack.od).od,
           "learned": denoise_stack(model, stack.od).od, "tv": tv(stack.od, weight)}
    if factor is not None:
        out["bm3d"] = bm3d(stack.od, factor)
    return out


def means(samples: list[dict], methods) -> dict:
    return {m: {k: round(float(np.mean([s[m][k] for s in samples])), 4) for k in MEASURES} for m in methods}


def particle_fractions(phase: np.ndarray, labels: np.ndarray, n_labels: int, k: int) -> np.ndarray:
    """(particles, K) share of each particle's pixels assigned to each phase."""
    out = np.zeros((n_labels, k))
    for j in range(n_labels):
        values = phase[labels == j + 1]
        out[j] = np.bincount(values[values >= 0], minlength=k)[:k] / max(1, values.size)
    return out


def pixel_flip_probability(phases: np.ndarray, region: np.ndarray, k: int) -> float:
    """Mean over ``region`` of the probability that two realisations (R, Y, X) give a pixel different phases."""
    r = phases.shape[0]
    counts = np.stack([(phases == j).sum(axis=0) for j in range(k)])[:, region].astype(float)
    return float(np.mean(1.0 - (counts * (counts - 1)).sum(axis=0) / (r * (r - 1))))


def particle_regions(sample, rim: int = RIM_PX) -> dict[str, np.ndarray]:
    """The particle pixels in three parts: ``rim`` (within ``rim`` px of the particle's edge),
    ``transition`` (the rest of ``sample.boundary``: mixtures and the 2 px beside a domain boundary)
    and ``interior`` (one phase, away from both)."""
    edge = sample.particle & (ndimage.distance_transform_edt(sample.particle) <= rim)
    transition = sample.particle & ~edge & sample.boundary
    return {"rim": edge, "transition": transition, "interior": sample.particle & ~edge & ~transition}


def by_region(phases: np.ndarray, labels: np.ndarray, present: np.ndarray,
              regions: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Where the particles' phase fractions vary over realisations (R, Y, X), by region of the particle.

    ``variance_share``: the share of the fractions' variance each region's pixels carry (summed over
    particles and the phases present; the shares add up to 1): a fraction ``S = mean_p I_p``
    (``I_p``: the pixel is given the phase) has ``var(S) = mean_p cov(I_p, S)``, each pixel's
    covariance with its particle's fraction is its part. ``std``: the standard deviation over
    realisations of each region's own part of the fractions (its pixels given the phase, over all the
    particle's pixels), the mean over particles and phases present, like the benchmark's ``std``.
    """
    r = phases.shape[0]
    parts, stds = dict.fromkeys(regions, 0.0), {name: [] for name in regions}
    for j, k in np.argwhere(present):
        inside = labels == j + 1
        hits = (phases[:, inside] == k).astype(float)  # (R, pixels of the particle)
        fraction = hits.mean(axis=1)
        cov = ((hits - hits.mean(axis=0)) * (fraction - fraction.mean())[:, None]).sum(axis=0) / (r - 1)
        for name, region in regions.items():
            parts[name] += float(cov[region[inside]].sum()) / inside.sum()
            stds[name].append(float(hits[:, region[inside]].sum(axis=1).std(ddof=1)) / inside.sum())
    total = sum(parts.values())
    return {"variance_share": {name: round(v / total, 3) if total > 0 else float("nan") for name, v in parts.items()},
            "std": {name: round(float(np.mean(v)), 4) for name, v in stds.items()}}


def truth_bounds(stack) -> dict[str, np.ndarray]:
    """Diagnostics from the simulator's truth, not methods (``BOUNDS``): ``truth_in_basis``, the
    noiseless OD in the spectral basis the denoiser finds on this noisy stack (what the basis alone
    decides); ``guided_by_truth``, the denoiser's spectral-shape averaging of the noisy stack with the
    noiseless components as its guide (one round) and the strong components taken from the truth:
    what the ratio estimator gives with a perfect pilot, the floor of this denoiser's variability."""
    sc = spectral_components(stack.od)
    clean = sc.project(stack.clean_od)
    weak = sc.variance < POSTERIOR_SNR * sc.noise_floor
    guided, _ = shape_average(sc, clean, weak, iterations=1)
    return {"truth_in_basis": sc.reconstruct(clean), "guided_by_truth": sc.reconstruct(guided)}


def variability(sample, energies, mu, model, dose, realisations, weight) -> dict:
    """Standard deviation over noise realisations of each particle's phase fractions, raw and denoised;
    and per pixel: the OD's standard deviation over realisations and the probability of a phase flip."""
    labels, n = ndimage.label(sample.particle)
    k = mu.shape[0]
    fractions: dict[str, list[np.ndarray]] = {m: [] for m in ("raw", *COMPARED)}
    phases: dict[str, list[np.ndarray]] = {m: [] for m in fractions}
    sums = {m: [0.0, 0.0] for m in fractions}  # per pixel: sum and sum of squares of the OD
    for r in range(realisations):
        stack = simulate_stack(sample, energies, dose=dose, noise=LINE_CORRELATED, rng=5000 + r)
        for method, od in (("raw", stack.od), ("learned", denoise_stack(model, stack.od).od),
                           ("tv", tv(stack.od, weight)), *truth_bounds(stack).items()):
            phase = assign_phases(pearson_maps(np.nan_to_num(od), mu), backend="numpy")[0]
            fractions[method].append(particle_fractions(phase, labels, n, k))
            phases[method].append(phase.astype(np.int8))
            od = np.asarray(od, np.float64)[:, sample.particle]
            sums[method][0] = sums[method][0] + od
            sums[method][1] = sums[method][1] + od**2
    truth = particle_fractions(np.where(sample.particle, sample.phase, -1), labels, n, k)
    present = truth > 0
    regions = particle_regions(sample)
    out = {"state_of_charge": sample.state_of_charge, "particles": n,
           "pixels": {name: int(region.sum()) for name, region in regions.items()}}
    for method, runs in fractions.items():
        a, maps = np.stack(runs), np.stack(phases[method])
        total, squares = sums[method]
        od_var = (squares - total**2 / realisations) / (realisations - 1)
        out[method] = {"std": round(float(a.std(axis=0, ddof=1)[present].mean()), 4),
                       "mean_abs_error": round(float(np.abs(a.mean(axis=0) - truth)[present].mean()), 4),
                       "pixel_od_std": round(float(np.nanmean(np.sqrt(np.maximum(od_var, 0.0)))), 5),
                       "pixel_flip": round(pixel_flip_probability(maps, sample.particle, k), 4),
                       **{f"{measure}_by_region": value
                          for measure, value in by_region(maps, labels, present, regions).items()}}
    for method in COMPARED:
        for measure, name in (("std", "reduction"), ("pixel_od_std", "pixel_od_reduction"),
                              ("pixel_flip", "pixel_flip_reduction")):
            out[method][name] = round(1.0 - out[method][measure] / out["raw"][measure], 3)
    return out


def standards_sample(refs, size: int, seed: int) -> SimulatedSample:
    """The phase_id phantom of ``refs`` as a (size, size) sample with a smooth thickness of 0.7-1.0."""
    k = len(refs.phases)
    weights, pure = phantom(k, size)
    weights, pure = weights.reshape(k, size, size), pure.reshape(size, size)
    field = ndimage.gaussian_filter(np.random.default_rng(seed).random((size, size)), size / 8)
    thickness = 0.7 + 0.3 * (field - field.min()) / max(float(np.ptp(field)), 1e-12)
    phase = np.argmax(weights, axis=0).astype(np.int16)
    edges = ndimage.binary_dilation(np.diff(phase, axis=1, prepend=phase[:, :1]) != 0, iterations=2)
    return SimulatedSample(references=refs, thickness=thickness, weights=weights, phase=phase,
                           particle=np.ones((size, size), bool), boundary=~pure | edges)


def standards(model, size: int, dose: float, factor: float | None) -> dict:
    out = {}
    for name in SETS:
        refs = load_references(sorted((DATA / name).glob("ref_*.txt")))
        energies = np.asarray(select_energies(refs, 12, dose=dose))
        mu = refs.interpolate(energies)
        tune = simulate_stack(standards_sample(refs, size, 1), energies, dose=dose, noise=LINE_CORRELATED, rng=11)
        sample = standards_sample(refs, size, 0)
        test = simulate_stack(sample, energies, dose=dose, noise=LINE_CORRELATED, rng=10)
        weight = tuned(tv, TV_WEIGHTS, tune)
        est = estimates(test, model, weight, factor)
        row = {"phases": list(refs.phases), "tv_weight": weight, "bm3d_factor": factor,
               "psnr": {m: score(test, od) for m, od in est.items() if m != "truth"}, "phase_id": {}}
        for method, od in est.items():
            phase, reliability, ambiguous = assign_phases(pearson_maps(np.nan_to_num(od), mu), backend="numpy")
            row["phase_id"][method] = {"accuracy": round(sample.accuracy(phase), 4),
                                       "ambiguous": round(float(ambiguous.mean()), 4),
                                       "median_gap_pure": interior_gap(reliability, ~sample.boundary)}
        if factor is None:
            row["psnr"]["bm3d"] = BM3D_MISSING
        out[name] = row
    return out


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--doses", type=float, nargs="+", default=[300.0, 1000.0])
    parser.add_argument("--fine-tune-steps", type=int, default=200)
    parser.add_argument("--phase-dose", type=float, default=300.0)
    parser.add_argument("--phase-samples", type=int, default=3)
    parser.add_argument("--realisations", type=int, default=10)
    parser.add_argument("--standards-size", type=int, default=128)
    parser.add_argument("--timing-size", type=int, default=512)
    parser.add_argument("--scratch-steps", type=int, default=400)
    parser.add_argument("--model", default="denoise-stxm-synthetic")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 128^2 images, one dose, 1 phase sample, 3 realisations, short training")
    args = parser.parse_args()
    if args.quick:
        args.size, args.doses, args.fine_tune_steps, args.phase_samples = 128, [args.phase_dose], 20, 1
        args.realisations, args.standards_size, args.timing_size, args.scratch_steps = 3, 64, 128, 20
    return args


def main() -> None:
    args = arguments()
    started = time.perf_counter()
    refs = load_references("nvpf-synthetic")
    energies = np.asarray(select_energies(refs, 12, method="score"))
    mu = refs.interpolate(energies)
    artifact, model = ModelRegistry().load(args.model)
    bm3d_on = bm3d_available()
    report = {"benchmark": "denoise", "quick": args.quick,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "model": {"name": artifact.name, "version": artifact.version, "sha256": artifact.sha256},
              "noise": LINE_CORRELATED.__dict__, "size": args.size, "energies": len(energies),
              "bm3d": "installed, per energy image" if bm3d_on else BM3D_MISSING, "psnr": {}}
    tuning = {}
    for dose in args.doses:
        _, tune = stack_of(energies, refs, args.size, 901, dose)
        _, test = stack_of(energies, refs, args.size, 902, dose)
        weight = tuned(tv, TV_WEIGHTS, tune)
        factor = tuned(bm3d, BM3D_FACTORS, bm3d_tuning_view(tune)) if bm3d_on else None
        tuning[dose] = (weight, factor)
        row = {"raw": score(test, test.od), "pca": score(test, denoise_stack(None, test.od).od),
               "learned": score(test, denoise_stack(model, test.od).od)}
        fine = denoise_stack(model, test.od, fine_tune_steps=args.fine_tune_steps, learning_rate=5e-4)
        row["learned_finetuned"] = score(test, fine.od)
        row["tv"], row["tv_weight"] = score(test, tv(test.od, weight)), weight
        if bm3d_on:
            row["bm3d"], row["bm3d_factor"] = score(test, bm3d(test.od, factor)), factor
        else:
            row["bm3d"] = BM3D_MISSING
        best_learned = max(row["learned"], row["learned_finetuned"])
        row["gain_over_raw_dB"] = round(best_learned - row["raw"], 2)
        row["gain_over_tv_dB"] = round(best_learned - row["tv"], 2)
        if bm3d_on:
            row["gain_over_bm3d_dB"] = round(best_learned - row["bm3d"], 2)
        report["psnr"][f"{dose:g}"] = row
        print(json.dumps({f"psnr_{dose:g}": row}), flush=True)
    weight, factor = tuning.get(args.phase_dose) or (0.1, 1.0 if bm3d_on else None)
    phase = {"dose": args.phase_dose, "samples": []}
    for i in range(args.phase_samples):
        sample, stack = stack_of(energies, refs, args.size, 910 + i, args.phase_dose, soc=(2.0, 1.0, 2.4)[i % 3])
        decided = ~assign_phases(pearson_maps(stack.clean_od, mu), backend="numpy")[2].astype(bool)
        scores = {m: phase_scores(sample, od, mu, refs.phases, decided)
                  for m, od in estimates(stack, model, weight, factor).items()}
        phase["samples"].append({"seed": 910 + i, "state_of_charge": sample.state_of_charge, **scores})
    methods = [m for m in phase["samples"][0] if m not in ("seed", "state_of_charge")]
    phase["means"] = means(phase["samples"], methods)
    raw_ambiguous = phase["means"]["raw"]["ambiguous"]
    phase["target_ambiguous_half_of_raw"] = round(raw_ambiguous / 2, 4)
    phase["ambiguous_vs_dose"] = {}
    for dose in (args.phase_dose, 3 * args.phase_dose, 10 * args.phase_dose, 1e6):
        values = []
        for i in range(args.phase_samples):
            sample, stack = stack_of(energies, refs, args.size, 910 + i, dose, soc=(2.0, 1.0, 2.4)[i % 3])
            values.append(phase_scores(sample, stack.od, mu, refs.phases)["ambiguous"])
        phase["ambiguous_vs_dose"][f"{dose:g}"] = round(float(np.mean(values)), 4)
    report["phase_id"] = phase
    print(json.dumps({"phase_id_means": phase["means"]}), flush=True)
    report["variability"] = {"dose": args.phase_dose, "realisations": args.realisations, "samples": {}}
    for i in range(args.phase_samples):
        sample, _ = stack_of(energies, refs, args.size, 910 + i, args.phase_dose, soc=(2.0, 1.0, 2.4)[i % 3])
        report["variability"]["samples"][str(910 + i)] = variability(sample, energies, mu, model, args.phase_dose,
                                                                      args.realisations, weight)
    samples = report["variability"]["samples"].values()
    for method in ("raw", *COMPARED):
        report["variability"][method] = round(float(np.mean([v[method]["std"] for v in samples])), 4)
        for measure in ("pixel_od_std", "pixel_flip"):
            values = [v[method][measure] for v in samples]
            report["variability"][f"{method}_{measure}"] = round(float(np.mean(values)), 5)
        for measure in ("variance_share_by_region", "std_by_region"):
            parts = [v[method][measure] for v in samples]
            report["variability"][f"{method}_{measure}"] = {
                name: round(float(np.mean([part[name] for part in parts])), 4) for name in parts[0]}
    for method in COMPARED:
        report["variability"][f"{method}_reduction"] = round(
            1.0 - report["variability"][method] / report["variability"]["raw"], 3)
        for measure in ("pixel_od_std", "pixel_flip"):
            report["variability"][f"{method}_{measure}_reduction"] = round(
                1.0 - report["variability"][f"{method}_{measure}"] / report["variability"][f"raw_{measure}"], 3)
    print(json.dumps({"variability": report["variability"]}), flush=True)
    report["standards"] = {"size": args.standards_size, "dose": args.phase_dose,
                           "sets": standards(model, args.standards_size, args.phase_dose, factor)}
    _, timing = stack_of(energies, refs, args.timing_size, 903, 300.0)
    t0 = time.perf_counter()
    denoise_stack(model, timing.od, fine_tune_steps=args.fine_tune_steps, learning_rate=5e-4)
    fine_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    inference = denoise_stack(model, timing.od)
    infer_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_denoiser([timing.od], steps=args.scratch_steps)
    report["training"] = {"stack": [len(energies), args.timing_size, args.timing_size],
                          "fine_tune_steps": args.fine_tune_steps, "fine_tune_and_denoise_s": round(fine_s, 1),
                          "denoise_only_s": round(infer_s, 1), "components": inference.components,
                          "scratch_steps": args.scratch_steps, "scratch_train_s": round(time.perf_counter() - t0, 1)}
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
