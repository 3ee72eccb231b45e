"""Does the shipped refinement help? PCC versus refinement on simulated runs, printed as JSON.

For each reference set, state of charge, dose and seed: a simulated run (the simulator's truth
known), its PCC maps, the shipped GMVAE's latent points (in process), the refinement job's
held-out check (:func:`phasestream.jobs.refine.held_out_check`, the same code as the job) and, against
the truth (away from domain boundaries), the accuracy on the ambiguous pixels and overall of: PCC
argmax, every strategy, and ``shipped`` (what ``--strategy auto`` writes: the winner of the check,
or PCC's phases when the check abstains).

Sets: ``nvpf`` (the shipped model as it is); ``nvpf-blind``: the same runs, but every spectrum is
encoded with its component along the difference of the Na2.0 and Na1.0 references removed, so the
latent space cannot separate those two phases while PCC still can: the check should abstain.

Usage: ``python benchmarks/refinement.py [--doses 2000 5000] [--seeds 2] [--size 192]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from types import SimpleNamespace

import numpy as np

from phasestream.jobs.refine import RefinementSkipped, RefineOptions, held_out_check
from phasestream.kernels.pearson import pearson_maps
from phasestream.kernels.phases import assign_phases, particle_mask
from phasestream.models.refine import STRATEGIES, refine_ambiguous
from phasestream.models.registry import ModelRegistry
from phasestream.references import load_references, select_energies
from phasestream.sim.samples import make_sample

MODEL = "gmvae-nvpf-synthetic"


class InProcessEncoder:
    """The model server's ``encode`` on a model loaded here."""

    def __init__(self, model):
        self.model = model

    def encode(self, name, spectra, version=None):
        return SimpleNamespace(latent=self.model.encode(np.asarray(spectra, np.float32))[0])


class BlindEncoder(InProcessEncoder):
    """Encodes spectra without their component along ``direction`` (E,): blind to that difference."""

    def __init__(self, model, direction):
        super().__init__(model)
        self.u = np.asarray(direction, np.float64) / np.linalg.norm(direction)

    def encode(self, name, spectra, version=None):
        s = np.asarray(spectra, np.float64)
        return super().encode(name, s - np.outer(s @ self.u, self.u), version)


def one_run(encoder, art, refs, soc, dose, seed, size) -> dict:
    energies = select_energies(refs, 12)
    ref_values = refs.interpolate(energies)
    planes = np.abs(np.asarray(energies)[None, :] - np.asarray(art.energies)[:, None]).argmin(axis=1)
    sample = make_sample((size, size), state_of_charge=soc, seed=seed)
    rng = np.random.default_rng(seed + 1000)
    counts = np.stack([sample.transmitted(e, i0=dose, rng=rng) for e in energies])
    with np.errstate(divide="ignore"):
        od = -np.log(np.where(counts > 0, counts, np.nan) / dose)
    pcc = pearson_maps(od, ref_values)
    mask = particle_mask(od)
    phase, _, amb = assign_phases(pcc, mask)
    full = od[:, mask].T
    usable = np.isfinite(full).all(axis=1)
    flat = np.full((len(full), 3), np.nan, np.float32)
    flat[usable] = encoder.encode(MODEL, full[usable][:, planes]).latent
    latent = np.full((*mask.shape, 3), np.nan, np.float32)
    latent[mask] = flat
    anchors = encoder.encode(MODEL, ref_values[:, planes]).latent
    good = mask & sample.particle & ~sample.boundary
    sel = good & amb
    row = {"soc": soc, "dose": dose, "seed": seed, "ambiguous_fraction": round(float(amb[mask].mean()), 4),
           "ambiguous_scored": int(sel.sum()),
           "pcc": {"ambiguous": float(np.mean(phase[sel] == sample.phase[sel])), "overall": sample.accuracy(phase)}}
    refined = {}
    for strategy in STRATEGIES:
        r = refine_ambiguous(latent, phase, amb, mask & np.isfinite(latent).all(axis=-1), strategy, pcc=pcc,
                             anchors=anchors)
        refined[strategy] = r.refined_phase
        row[strategy] = {"ambiguous": float(np.mean(r.refined_phase[sel] == sample.phase[sel])),
                         "overall": sample.accuracy(r.refined_phase)}
    t0 = time.perf_counter()
    try:
        chosen, record = held_out_check(RefineOptions(), encoder, {"version": None}, od, mask, phase, amb, full,
                                        usable, flat, planes, ref_values, anchors, list(refs.phases))
        shipped = refined[chosen]
        row["check"] = {"applied": chosen, **record}
    except RefinementSkipped as skip:
        shipped = phase
        row["check"] = {"applied": None, "reason": str(skip), **skip.details.get("held_out", {})}
    row["check"]["seconds"] = round(time.perf_counter() - t0, 3)
    row["shipped"] = {"ambiguous": float(np.mean(shipped[sel] == sample.phase[sel])),
                      "overall": sample.accuracy(shipped)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doses", type=float, nargs="+", default=[2000.0, 5000.0])
    parser.add_argument("--states", type=float, nargs="+", default=[2.0, 1.0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--sets", nargs="+", default=["nvpf", "nvpf-blind"])
    args = parser.parse_args()
    art, model = ModelRegistry().load(MODEL)
    refs = load_references("nvpf-synthetic")
    model_refs = refs.interpolate(art.energies)
    blind = model_refs[refs.phases.index("Na2.0")] - model_refs[refs.phases.index("Na1.0")]
    sets = {"nvpf": InProcessEncoder(model), "nvpf-blind": BlindEncoder(model, blind)}
    runs = []
    for name in args.sets:
        for soc in args.states:
            for dose in args.doses:
                for seed in range(args.seeds):
                    runs.append({"set": name, **one_run(sets[name], art, refs, soc, dose, seed, args.size)})
    summary = {}
    for name in args.sets:
        rows = [r for r in runs if r["set"] == name]
        summary[name] = {key: {"ambiguous_mean": round(float(np.mean([r[key]["ambiguous"] for r in rows])), 4),
                               "overall_mean": round(float(np.mean([r[key]["overall"] for r in rows])), 4)}
                         for key in ("pcc", *STRATEGIES, "shipped")}
        summary[name]["applied"] = sum(r["check"]["applied"] is not None for r in rows)
        summary[name]["runs"] = len(rows)
        summary[name]["shipped_worse_than_pcc_overall"] = sum(r["shipped"]["overall"] < r["pcc"]["overall"]
                                                              for r in rows)
    print(json.dumps({"benchmark": "refinement", "machine": {"platform": platform.platform(),
                                                             "cpus": os.cpu_count()},
                      "model": {"name": art.name, "version": art.version}, "summary": summary, "runs": runs},
                     indent=2))


if __name__ == "__main__":
    main()
