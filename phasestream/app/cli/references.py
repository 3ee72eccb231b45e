"""``phasestream references``: inspect reference spectra and choose scan energies."""

from __future__ import annotations

import argparse

import numpy as np

from phasestream.references import (
    DEFAULT_DOSE,
    SELECTION_METHODS,
    load_references,
    predicted_separation,
    select_energies,
)

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    refs = subparsers.add_parser("references", help="inspect reference spectra and choose scan energies")
    refs.add_argument("source", nargs="+", help="CSV file, two-column file(s) or a registered name (nvpf-synthetic)")
    refs.add_argument("--select", type=int, default=0, metavar="N", help="choose N discriminating energies")
    refs.add_argument("--pre-edge", type=float, default=None, help="pre-edge energy (eV) to add")
    refs.add_argument("--dose", type=float, default=DEFAULT_DOSE, metavar="D",
                      help=f"open-beam counts per pixel the selection plans for (default {DEFAULT_DOSE:g})")
    refs.add_argument("--method", choices=SELECTION_METHODS, default="pcc",
                      help="pcc: best predicted PCC separation under count noise (default); score: the earlier ranking")


def run(args: argparse.Namespace) -> int:
    refs = load_references(args.source if len(args.source) > 1 else args.source[0])
    low, high = refs.energy_range
    print(f"{refs.name}: {len(refs.phases)} phases {list(refs.phases)}, {refs.energies.size} energies "
          f"{low:.2f}-{high:.2f} eV")
    if refs.attrs.get("synthetic"):
        print("  (synthetic)")
    if len(refs.phases) > 1:
        c = np.corrcoef(refs.spectra)
        print("PCC between references (full grid):")
        for name, row in zip(refs.phases, c, strict=True):
            print(f"  {name:>10} " + " ".join(f"{v:6.3f}" for v in row))
    if args.select:
        energies = select_energies(refs, args.select, pre_edge_eV=args.pre_edge, dose=args.dose,
                                   method=args.method)
        print(f"{len(energies)} energies (eV): " + ", ".join(f"{e:.2f}" for e in energies))
        if len(refs.phases) > 1:
            _print_separation(refs, energies, args.dose)
    return 0


def _print_separation(refs, energies, dose: float) -> None:
    sep = predicted_separation(refs, energies, dose=dose)
    print(f"predicted separation at {dose:g} counts/px (PCC of the references at these energies; "
          "separation of PCC(own) - PCC(other) in noise sd, the worse of the two directions; "
          "predicted misassignment rate):")
    for i, a in enumerate(sep.phases):
        for j in range(i + 1, len(sep.phases)):
            worst = min(sep.snr[i, j], sep.snr[j, i])
            rate = max(sep.error[i, j], sep.error[j, i])
            print(f"  {a:>10} / {sep.phases[j]:<10} PCC {sep.pcc[i, j]:6.3f}  separation {worst:6.2f}  "
                  f"misassigned {rate:.3f}")
