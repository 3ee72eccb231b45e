"""The ``phasestream`` command.

Subcommands so far: ``demo`` (simulated scans through the kernels) and ``references``
(inspect a reference set and choose scan energies). The live service commands of DESIGN.md
(serve, serve-models, reprocess, query, train) arrive with the issues that build them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import numpy as np

from phasestream.kernels.backend import BACKENDS

__all__ = ["main"]


def _states(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"states must be numbers like '3.0,2.4,2.0', got {text!r}") from None


def _shape(text: str) -> tuple[int, int]:
    parts = text.lower().replace("x", " ").split()
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or YxX, got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"size must be N or YxX, got {text!r}")
    return values


def _cmd_demo(args: argparse.Namespace) -> int:
    from phasestream.demo import DemoConfig, run_demo

    cfg = DemoConfig(states=args.states, shape=args.size, n_energies=args.energies - 1, dose=args.dose,
                     n_particles=args.particles, seed=args.seed, backend=args.backend)
    cfg.validate()
    print(f"phasestream demo: {len(cfg.states)} simulated STXM scans, {cfg.shape[0]}x{cfg.shape[1]} px, "
          f"{args.energies} energies, I0 = {cfg.dose:g} counts/px, backend {cfg.backend}")
    print("references: nvpf-synthetic (SYNTHETIC NaxV2(PO4)2F3-like spectra, phasestream.sim)")
    header_done = []

    def show(s) -> None:
        if not header_done:
            names = "  ".join(f"{p:>6}" for p in s.phases)
            print(f"\n{'SoC':>5}  {names}  {'ambig':>6}  {'reliab':>6}  {'acc*':>6}  {'sec':>5}")
            header_done.append(True)
        fr = "  ".join(f"{100 * f:5.1f}%" for f in s.fractions)
        print(f"{s.state_of_charge:5.1f}  {fr}  {100 * s.ambiguous_fraction:5.1f}%  {s.mean_reliability:6.3f}  "
              f"{100 * s.accuracy:5.1f}%  {s.seconds:5.2f}")

    t0 = time.perf_counter()
    summaries = run_demo(cfg, progress=show)
    print("\nfractions are of particle pixels (PCC argmax); ambig: reliability < 0.005; "
          "acc*: agreement with the simulated ground truth away from domain boundaries")
    print(f"{len(summaries)} scans in {time.perf_counter() - t0:.1f} s")
    if args.json:
        rows = [{"state_of_charge": s.state_of_charge, "uid": s.uid,
                 "phase_fractions": dict(zip(s.phases, map(float, s.fractions), strict=True)),
                 "true_fractions": dict(zip(s.phases, map(float, s.true_fractions), strict=True)),
                 "ambiguous_fraction": s.ambiguous_fraction, "mean_reliability": s.mean_reliability,
                 "accuracy": s.accuracy, "seconds": s.seconds} for s in summaries]
        print(json.dumps(rows, indent=2))
    return 0


def _cmd_references(args: argparse.Namespace) -> int:
    from phasestream.references import load_references, select_energies

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phasestream", description="Streaming phase mapping for X-ray "
                                     "spectromicroscopy (STXM / TXM-XANES).")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="simulated scans at 5 states of charge through the kernels")
    demo.add_argument("--states", type=_states, default=(3.0, 2.4, 2.0, 1.0, 0.8),
                      help="states of charge (Na content x), e.g. '3.0,2.0' (default: 3.0,2.4,2.0,1.0,0.8)")
    demo.add_argument("--size", type=_shape, default=(256, 256), help="image size N or YxX (default 256)")
    demo.add_argument("--energies", type=int, default=13, help="energies per scan incl. pre-edge (default 13)")
    demo.add_argument("--dose", type=float, default=5000.0, help="open-beam counts per pixel (default 5000)")
    demo.add_argument("--particles", type=int, default=3, help="particles per field of view (default 3)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--backend", choices=("auto", *BACKENDS), default=None,
                      help="kernel backend (default: $PHASESTREAM_BACKEND or auto)")
    demo.add_argument("--json", action="store_true", help="also print the results as JSON")
    demo.set_defaults(func=_cmd_demo)

    refs = sub.add_parser("references", help="inspect reference spectra and choose scan energies")
    refs.add_argument("source", nargs="+", help="CSV file, two-column file(s) or a registered name (nvpf-synthetic)")
    refs.add_argument("--select", type=int, default=0, metavar="N", help="choose N discriminating energies")
    refs.add_argument("--pre-edge", type=float, default=None, help="pre-edge energy (eV) to add")
    refs.set_defaults(func=_cmd_references)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"phasestream {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
