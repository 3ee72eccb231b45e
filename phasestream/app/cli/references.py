"""``phasestream references``: inspect reference spectra and choose scan energies."""

from __future__ import annotations

import argparse

import numpy as np

from phasestream.references import load_references, select_energies

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    refs = subparsers.add_parser("references", help="inspect reference spectra and choose scan energies")
    refs.add_argument("source", nargs="+", help="CSV file, two-column file(s) or a registered name (nvpf-synthetic)")
    refs.add_argument("--select", type=int, default=0, metavar="N", help="choose N discriminating energies")
    refs.add_argument("--pre-edge", type=float, default=None, help="pre-edge energy (eV) to add")


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
        energies = select_energies(refs, args.select, pre_edge_eV=args.pre_edge)
        print(f"{len(energies)} energies (eV): " + ", ".join(f"{e:.2f}" for e in energies))
    return 0
