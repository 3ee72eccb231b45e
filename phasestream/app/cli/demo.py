"""``phasestream demo``: simulated scans at several states of charge through the live stack."""

from __future__ import annotations

import argparse
import json
import sys
import time

from phasestream.app.demo import DemoConfig, RunSummary, run_demo
from phasestream.kernels.backend import BACKENDS
from phasestream.models.refine import AUTO, STRATEGY_CHOICES

__all__ = ["add_parser", "run"]


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


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser("demo", help="simulated scans at 5 states of charge through the live stack")
    demo.add_argument("--states", type=_states, default=(3.0, 2.4, 2.0, 1.0, 0.8),
                      help="states of charge (Na content x), e.g. '3.0,2.0' (default: 3.0,2.4,2.0,1.0,0.8)")
    demo.add_argument("--size", type=_shape, default=(256, 256), help="image size N or YxX (default 256)")
    demo.add_argument("--energies", type=int, default=13, help="energies per scan incl. pre-edge (default 13)")
    demo.add_argument("--dose", type=float, default=5000.0, help="open-beam counts per pixel (default 5000)")
    demo.add_argument("--particles", type=int, default=3, help="particles per field of view (default 3)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--backend", choices=("auto", *BACKENDS), default=None,
                      help="kernel backend (default: $PHASESTREAM_BACKEND or auto)")
    demo.add_argument("--topology", choices=("zmq", "inprocess"), default="zmq",
                      help="zmq: worker process behind a 0MQ proxy (default); inprocess: callback on the RunEngine")
    demo.add_argument("--out", default="demo-output", help="folder for figures and the demo catalog")
    demo.add_argument("--tiled", metavar="URI", default=None, help="use this Tiled server instead of an embedded one")
    demo.add_argument("--no-figures", action="store_true")
    demo.add_argument("--no-refine", action="store_true", help="no model server, no GMVAE refinement")
    demo.add_argument("--strategy", choices=STRATEGY_CHOICES, default=AUTO,
                      help="latent-space assignment of ambiguous pixels (default auto: the winner of each run's "
                           "held-out check)")
    demo.add_argument("--view-port", type=int, default=8010,
                      help="the live view while the demo runs, http://127.0.0.1:PORT/ (default 8010; a free port "
                           "when taken; 0: any)")
    demo.add_argument("--no-view", action="store_true", help="no live view")
    demo.add_argument("--view", action="store_true",
                      help="keep the live view (and the embedded Tiled) open after the scans, until Ctrl-C")
    demo.add_argument("--json", action="store_true", help="also print the results as JSON")


def run(args: argparse.Namespace) -> int:
    cfg = DemoConfig(states=args.states, shape=args.size, n_energies=args.energies - 1, dose=args.dose,
                     n_particles=args.particles, seed=args.seed, backend=args.backend, topology=args.topology,
                     out_dir=args.out, tiled=args.tiled, figures=not args.no_figures, refine=not args.no_refine,
                     strategy=args.strategy, view_port=None if args.no_view else args.view_port)
    if args.view and args.no_view:
        print("phasestream demo: error: --view and --no-view exclude each other", file=sys.stderr)
        return 2
    cfg.validate()
    where = "RunEngine -> 0MQ proxy -> worker process" if cfg.topology == "zmq" else "RunEngine -> callback"
    print(f"phasestream demo: {len(cfg.states)} simulated STXM scans, {cfg.shape[0]}x{cfg.shape[1]} px, "
          f"{args.energies} energies, I0 = {cfg.dose:g} counts/px, backend {cfg.backend}")
    print(f"topology: {where} -> Tiled ({args.tiled or f'embedded, catalog in {cfg.catalog}'})")
    print("references: nvpf-synthetic (SYNTHETIC NaxV2(PO4)2F3-like spectra, phasestream.sim)")
    t0 = time.perf_counter()
    summaries = run_demo(cfg, progress=_ResultTable(), on_view=_print_view,
                         hold=_hold_view if args.view else None)
    print("\nfractions: particle pixels per phase (PCC argmax); ambig: reliability < 0.005; reliab: mean "
          "best-minus-second PCC; acc*: agreement with the simulated ground truth away from domain boundaries; "
          "latency: last image -> final result in Tiled; GMVAE rows: fractions after the ambiguous pixels were "
          "resolved in the latent space of the pretrained GMVAE (model server), and how long that took")
    print(f"{len(summaries)} scans in {time.perf_counter() - t0:.1f} s; figures and summary.json in {cfg.out_dir}/")
    if args.tiled:
        print(f"results in Tiled at {args.tiled.split('?')[0]} under 'phasestream'")
        print(f"try: phasestream query --tiled {args.tiled.split('?')[0]} --soc 2.0")
    else:
        print(f"results in the embedded Tiled catalog {cfg.catalog} (the server stopped with the demo)")
        print(f"try: .venv/bin/phasestream query --catalog {cfg.catalog} --soc 2.0")
    if args.json:
        rows = [s.as_dict() for s in summaries]
        print(json.dumps(rows, indent=2))
    return 0 if all(s.status == "complete" for s in summaries) else 1


def _print_view(url: str) -> None:
    print(f"live view: {url}  (open it in a browser; it follows each scan as it runs)", flush=True)


def _hold_view() -> None:
    print("the live view stays open until Ctrl-C", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print()


class _ResultTable:
    """The demo's progress: a table row per scan (and one per GMVAE refinement), the header before the first."""

    def __init__(self) -> None:
        self.header_done = False

    def __call__(self, s: RunSummary) -> None:
        if not self.header_done:
            names = "  ".join(f"{p:>6}" for p in s.phases)
            print(f"\n{'SoC':>5}  {names}  {'ambig':>6}  {'reliab':>6}  {'acc*':>6}  {'latency':>8}  status")
            self.header_done = True
        fr = "  ".join(f"{100 * f:5.1f}%" for f in s.fractions)
        latency = "n/a" if s.latency_s is None else f"{1e3 * s.latency_s:.0f} ms"
        print(f"{s.state_of_charge:5.1f}  {fr}  {100 * s.ambiguous_fraction:5.1f}%  {s.mean_reliability:6.3f}  "
              f"{100 * s.accuracy:5.1f}%  {latency:>8}  {s.status}")
        if s.refined_fractions is not None:
            rf = "  ".join(f"{100 * f:5.1f}%" for f in s.refined_fractions)
            print(f"{'GMVAE':>5}  {rf}  {'':>6}  {'':>6}  {100 * s.refined_accuracy:5.1f}%  "
                  f"{1e3 * s.refinement.get('seconds', 0):6.0f} ms  refined ({s.refinement.get('strategy')})")
        elif s.refinement:
            print(f"{'GMVAE':>5}  refinement {s.refinement.get('status')}: {s.refinement.get('reason')}")
