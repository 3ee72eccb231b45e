"""Does refinement as shipped help on sets it was never tuned on? PCC versus refinement, printed as JSON.

Everything goes the way it goes at a beamline (docs/models.md, "Refinement"):

1. **Scans.** For each reference set, simulated scans run through a bluesky RunEngine with the
   project's plan (:func:`phasestream.sim.plans.energy_stack_scan`, ophyd sim devices); TiledWriter
   stores the raw runs and the live :class:`~phasestream.callbacks.phase_map.PhaseMapCallback`
   stores each run's result (OD cube, PCC maps, phases, reliability) in an embedded Tiled server.
   Training scans: every state of the set at both doses (the training geometry of
   :func:`phasestream.sim.training.synthetic_training_set`). Held-out scans: another particle
   geometry (fewer and thinner particles, wider domain transitions, another field size) and other
   seeds, at each dose, state and seed.
2. **Training.** ``phasestream train gmvae --tiled URI --runs ...`` (the CLI itself) trains one
   GMVAE per set and supervision (``none``: unsupervised; ``pcc``: confident PCC labels supervise the
   mixture components) from the training runs' results; its training report (cluster purity, the
   held-out gain on the last two runs given) is read from the manifest.
3. **Refinement.** A model server (``phasestream serve-models``, a subprocess) serves the trained
   models, and ``phasestream reprocess --refine-only`` (the CLI; the refinement job
   :mod:`phasestream.jobs.refine`, ``--strategy auto`` with its held-out check) refines each
   held-out run's result in Tiled. ``shipped`` is what that job wrote (``refined_phase``, or PCC's
   phases where it abstained); the job's record gives the check's choice or its reason to abstain.
   The blind ``knn``, ``mahalanobis``, ... columns apply each strategy unchecked to the same
   result, with latent points from the same model server (that part runs in this process).

Accuracy is against the simulator's truth away from domain boundaries, on PCC's ambiguous pixels and
overall. Nothing is trained or refined in process: there is no in-process path.

Sets (they differ in how close their phases are):

* ``nvpf``: the synthetic NVPF set (Na2.0 and Na1.0 close);
* ``kedge``: a synthetic K-edge set, rigid 1.2 eV edge shifts (far apart; low doses);
* ``ledge-close``: a synthetic L-edge multiplet set whose B and C are very close (issue 21's case);
* ``fe-k-edge``: measured Fe K-edge standards (``tests/data``, as in ``benchmarks/phase_id.py``;
  written to a reference folder of the live callback as a CSV file).

Usage: ``python benchmarks/refinement.py [--sets nvpf kedge ledge-close fe-k-edge] [--seeds 2]
[--size 128] [--train-size 96] [--epochs 15] [--supervision pcc] [--quick]``
(``--quick``: nvpf only, one seed, small fields, 5 epochs: a check that it runs).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from bluesky import RunEngine

from phasestream.app.cli import main as cli_main
from phasestream.app.cli.train import TILED_SUPERVISION
from phasestream.app.process import ModelServerProcess
from phasestream.callbacks.phase_map import PhaseMapCallback
from phasestream.jobs.training import SUPERVISIONS
from phasestream.models.refine import STRATEGIES, refine_ambiguous
from phasestream.models.spatial import pcc_reliability
from phasestream.modelserver.client import ModelClient
from phasestream.references import ReferenceSet, load_references, select_energies, write_references
from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.tiled import raw_run_writer, tiled_session

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
#: set -> (reference source, doses in counts/px, states evaluated)
SETS = {
    "nvpf": ("nvpf-synthetic", (2000.0, 5000.0), (2.0, 1.0)),
    "kedge": ("kedge-synthetic", (300.0, 1000.0), (2.0, 1.0)),
    "ledge-close": ("ledge-close-synthetic", (2000.0, 5000.0), (2.0, 1.0)),
    "fe-k-edge": ("fe-k-edge", (300.0, 1000.0), (1.0, 2.0)),
}
KEYS = ("pcc", *STRATEGIES, "shipped")


def references(source: str, folder: Path) -> tuple[ReferenceSet, str]:
    """The set, and the name a start document gives for it: a registered name, or for the measured
    standards of ``tests/data/<source>`` (ordered for the simulator) a CSV file in ``folder``."""
    if (DATA / source).is_dir():
        refs = load_references(sorted((DATA / source).glob("ref_*.txt")))
        order = {p: {"na_content": float(len(refs.phases) - 1 - i)} for i, p in enumerate(refs.phases)}
        refs = ReferenceSet(refs.energies, refs.phases, refs.spectra, source, order, dict(refs.attrs))
        return refs, write_references(refs, folder / f"{source}.csv").name
    return load_references(source), source


class Beamline:
    """A RunEngine whose runs TiledWriter stores and the live PhaseMapCallback analyses into ``client``."""

    def __init__(self, client, reference_folder: Path):
        self.RE = RunEngine({})
        self.RE.subscribe(raw_run_writer(client))
        # final maps only: partial maps cost time and change nothing in the final result
        self.callback = PhaseMapCallback(client, backend="numba", reference_folders=[reference_folder],
                                         update_every=10_000, update_seconds=1e6)
        self.RE.subscribe(self.callback)

    def scan(self, sample, refs_name: str, energies, dose: float, seed: int) -> str:
        energy = make_energy()
        det = TransmissionDetector(sample, energy, name="det", i0=dose, seed=seed)
        (uid,) = self.RE(energy_stack_scan([det], energy, energies, sample=sample, references=refs_name,
                                           i0_key=det.i0_key))
        if not self.callback.flush(120):
            raise RuntimeError(f"the live result of run {uid} was not written within 120 s")
        return uid

    def close(self) -> None:
        self.callback.close()


def scan_set(beamline: Beamline, refs: ReferenceSet, refs_name: str, energies, doses, states, seeds: int,
             size: int, train_size: int) -> tuple[list[str], list[dict]]:
    """Training runs (every state at both doses; the last two, the report's validation runs, at the middle
    states and the lowest dose) and held-out runs (``{"uid", "sample", "soc", "dose", "seed"}``)."""
    all_states = sorted({m["na_content"] for m in refs.metadata.values()})
    middle = all_states[len(all_states) // 2 - 1: len(all_states) // 2 + 1]
    order = sorted(((soc, dose) for soc in all_states for dose in doses),
                   key=lambda sd: (sd[1] == min(doses) and sd[0] in middle, sd))
    training = []
    for k, (soc, dose) in enumerate(order):
        sample = make_sample((train_size, train_size), state_of_charge=soc, references=refs,
                             seed=1000 + all_states.index(soc))
        training.append(beamline.scan(sample, refs_name, energies, dose, seed=2000 + k))
    held_out = []
    for dose in doses:
        for soc in states:
            for seed in range(seeds):
                # held-out geometry: not the training's (3 particles, thickness 1.2, transition 2 px)
                sample = make_sample((size, size), state_of_charge=soc, references=refs, seed=seed, n_particles=2,
                                     max_thickness=1.0, transition_px=3.0)
                uid = beamline.scan(sample, refs_name, energies, dose, seed=seed + 1000)
                held_out.append({"uid": uid, "sample": sample, "soc": soc, "dose": dose, "seed": seed})
    return training, held_out


def cli(*argv: str) -> tuple[int, str]:
    """A ``phasestream`` command, as a user types it; its exit status and what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_main(list(argv))
    return code, out.getvalue()


def train(uri: str, runs: list[str], folder: str, name: str, supervision: str, epochs: int) -> dict:
    """``phasestream train gmvae --tiled URI --runs ...``; what the manifest says of the model."""
    t0 = time.perf_counter()
    code, printed = cli("train", "gmvae", "--tiled", uri, "--runs", *runs, "--out", folder, "--name", name,
                        "--version", "0.0.1", "--epochs", str(epochs), "--supervision", supervision, "--seed", "0")
    if code != 0:
        raise RuntimeError(f"train gmvae {name} exited with {code}:\n{printed}")
    manifest = json.loads((Path(folder) / f"{name}-0.0.1" / "manifest.json").read_text())
    report = manifest["report"]
    return {"name": name, "supervision": manifest["training"]["supervision"],
            "spectra": manifest["training"]["n_spectra"], "runs": len(runs), "epochs": epochs,
            "seconds": round(time.perf_counter() - t0, 1),
            "cluster_purity": report["cluster_purity"], "per_phase_purity": report["per_phase_purity"],
            "model_gain": report.get("model_gain"), "best_strategy": report.get("best_strategy"),
            "warnings": report["warnings"]}


def refine(uri: str, address: str, model: str, runs: list[dict]) -> float:
    """``phasestream reprocess --refine-only`` of the held-out runs with ``model``; seconds taken."""
    t0 = time.perf_counter()
    code, printed = cli("reprocess", "--tiled", uri, "--refine-only", "--in-process", "--models", address,
                        "--model", model, *[r["uid"] for r in runs])
    if code not in (0, 3):  # 3: a refinement abstained (recorded on the result)
        raise RuntimeError(f"reprocess --refine-only exited with {code}:\n{printed}")
    return time.perf_counter() - t0


def score_run(client, models: ModelClient, model: str, run: dict) -> dict:
    """The run's result as the job left it, scored against the truth, with each strategy applied blindly."""
    node = client["phasestream"][run["uid"]]
    md = node.metadata
    sample = run["sample"]
    n = int(md["n_energies_seen"])
    od = node["od"][:n]
    phase, amb = node["phase"].read(), node["ambiguous"].read().astype(bool)
    mask, pcc = node["mask"].read().astype(bool), node["pcc"].read()
    order = np.argsort(md["energies_eV"][:n])  # the model's energies are sorted
    full = od[order][:, mask].T
    usable = np.isfinite(full).all(axis=1)
    latent = np.full((*mask.shape, 3), np.nan, np.float32)
    rows, cols = np.nonzero(mask)
    latent[rows[usable], cols[usable]] = models.encode(model, full[usable].astype(np.float32)).latent
    ref_values = np.asarray(md["reference_values"], np.float64)[:, :n][:, order]
    anchors = models.encode(model, ref_values.astype(np.float32)).latent
    good = mask & sample.particle & ~sample.boundary
    sel = good & amb

    def scored(refined):
        return {"ambiguous_right": int(np.sum(refined[sel] == sample.phase[sel])),
                "overall_right": int(np.sum(refined[good] == sample.phase[good]))}

    row = {"soc": run["soc"], "dose": run["dose"], "seed": run["seed"], "uid": run["uid"],
           "ambiguous_fraction": round(float(amb[mask].mean()), 4), "ambiguous_scored": int(sel.sum()),
           "overall_scored": int(good.sum()), "pcc": scored(phase)}
    for strategy in STRATEGIES:
        r = refine_ambiguous(latent, phase, amb, mask & np.isfinite(latent).all(axis=-1), strategy, pcc=pcc,
                             anchors=anchors, reliability=pcc_reliability(pcc))
        row[strategy] = scored(r.refined_phase)
    record = dict(md.get("refinement") or {})
    applied = record.get("strategy") if record.get("status") == "complete" else None
    shipped = node["refined_phase"].read() if applied else phase
    row["shipped"] = scored(shipped)
    held = record.get("held_out") or (record.get("details") or {}).get("held_out") or {}
    row["check"] = {"applied": applied, "status": record.get("status"), "reason": record.get("reason"),
                    "model": record.get("model"), **{k: held.get(k) for k in ("pixels", "pcc", "strategies", "gain")}}
    return row


def summarize(rows: list[dict]) -> dict:
    """Pooled accuracies (right pixels over scored pixels of all runs) and the check's choices."""
    n_amb = max(sum(r["ambiguous_scored"] for r in rows), 1)
    n_all = max(sum(r["overall_scored"] for r in rows), 1)
    out = {k: {"ambiguous": round(sum(r[k]["ambiguous_right"] for r in rows) / n_amb, 4),
               "overall": round(sum(r[k]["overall_right"] for r in rows) / n_all, 4)} for k in KEYS}
    out["runs"] = len(rows)
    out["ambiguous_fraction"] = round(float(np.mean([r["ambiguous_fraction"] for r in rows])), 4)
    out["applied"] = dict(Counter(r["check"]["applied"] or "abstained" for r in rows))
    out["gain_ambiguous"] = round(out["shipped"]["ambiguous"] - out["pcc"]["ambiguous"], 4)
    out["gain_overall"] = round(out["shipped"]["overall"] - out["pcc"]["overall"], 4)
    out["abstained_because"] = [r["check"]["reason"] for r in rows if r["check"]["applied"] is None]
    return out


def acceptance(summaries: list[dict], rows: list[dict]) -> dict:
    return {
        "worst_overall_loss_points": round(-100 * min(v["gain_overall"] for v in summaries), 2),
        "never_worse_than_pcc_by_0.5_points": all(v["gain_overall"] >= -0.005 for v in summaries),
        "sets_gaining_5_points_on_ambiguous": sorted({v["set"] for v in summaries if v["gain_ambiguous"] >= 0.05}),
        "runs_worse_than_pcc_overall": sum(r["shipped"]["overall_right"] < r["pcc"]["overall_right"] for r in rows),
        "abstentions": sum(r["check"]["applied"] is None for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--seeds", type=int, default=2, help="held-out runs per set, dose and state")
    parser.add_argument("--size", type=int, default=128, help="held-out field size (px)")
    parser.add_argument("--train-size", type=int, default=96, help="training field size (px)")
    parser.add_argument("--epochs", type=int, default=15, help="GMVAE epochs (the CLI's default)")
    parser.add_argument("--supervision", nargs="+", default=[TILED_SUPERVISION], choices=SUPERVISIONS,
                        help=f"train gmvae --supervision values compared (default {TILED_SUPERVISION}, the CLI's "
                             "default for Tiled runs; 'none pcc' compares both, on the same runs)")
    parser.add_argument("--quick", action="store_true", help="nvpf, one seed, 96/64 px, 5 epochs")
    args = parser.parse_args()
    if args.quick:
        args.sets, args.seeds, args.size, args.train_size, args.epochs = ["nvpf"], 1, 96, 64, 5
    started = time.perf_counter()
    report = {"benchmark": "refinement", "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "arguments": vars(args),
              "path": {"scans": "RunEngine + energy_stack_scan; TiledWriter raw runs and the live PhaseMapCallback's "
                                "results in an embedded Tiled server",
                       "training": "phasestream train gmvae --tiled URI --runs ... (the CLI)",
                       "refinement": "phasestream reprocess --refine-only --strategy auto (the CLI; model server "
                                     "subprocess)",
                       "blind strategies": "latent points from the same model server, applied in this process",
                       "in_process_training": False},
              "sets": {}, "runs": [], "seconds_by_step": {}}
    with tempfile.TemporaryDirectory() as tmp, tiled_session() as (client, uri):
        folder, ref_folder = Path(tmp, "models"), Path(tmp, "references")
        ref_folder.mkdir()
        beamline = Beamline(client, ref_folder)
        plan = {}
        t0 = time.perf_counter()
        for name in args.sets:
            source, doses, states = SETS[name]
            refs, refs_name = references(source, ref_folder)
            energies = select_energies(refs, 12, method="score")
            training, held_out = scan_set(beamline, refs, refs_name, energies, doses, states, args.seeds,
                                          args.size, args.train_size)
            plan[name] = (training, held_out, doses)
            report["sets"][name] = {"phases": list(refs.phases), "training_runs": len(training),
                                    "held_out_runs": len(held_out), "models": {}, "doses": {}}
        beamline.close()
        report["seconds_by_step"]["scans"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        for name, (training, _, _) in plan.items():
            for supervision in args.supervision:
                report["sets"][name]["models"][supervision] = train(uri, training, str(folder),
                                                                    f"gmvae-{name}-{supervision}", supervision,
                                                                    args.epochs)
        report["seconds_by_step"]["training"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        with ModelServerProcess(args=("--models-dir", str(folder))) as server:
            models = ModelClient(server.address, timeout=120.0)
            for supervision in args.supervision:
                summaries, rows_all = [], []
                for name, (_, held_out, doses) in plan.items():
                    model = f"gmvae-{name}-{supervision}"
                    refine(uri, server.address, model, held_out)
                    for dose in doses:
                        rows = [{"set": name, "supervision": supervision, **score_run(client, models, model, run)}
                                for run in held_out if run["dose"] == dose]
                        summary = summarize(rows)
                        report["sets"][name]["doses"].setdefault(f"{dose:g}", {})[supervision] = summary
                        summaries.append({"set": name, **summary})
                        rows_all.extend(rows)
                report["runs"].extend(rows_all)
                report.setdefault("acceptance", {})[supervision] = acceptance(summaries, rows_all)
            models.close()
        report["seconds_by_step"]["refinement"] = round(time.perf_counter() - t0, 1)
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
