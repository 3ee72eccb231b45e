"""The ``phasestream`` command.

Every command that talks to Tiled takes ``--tiled URI`` (an existing server; ``TILED_API_KEY``
is honoured) or else starts an embedded server for the command, over ``--catalog DIR`` when
given (a catalog that outlives the command) or a temporary one.
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
                     n_particles=args.particles, seed=args.seed, backend=args.backend, topology=args.topology,
                     out_dir=args.out, tiled=args.tiled, figures=not args.no_figures)
    cfg.validate()
    where = "RunEngine -> 0MQ proxy -> worker process" if cfg.topology == "zmq" else "RunEngine -> callback"
    print(f"phasestream demo: {len(cfg.states)} simulated STXM scans, {cfg.shape[0]}x{cfg.shape[1]} px, "
          f"{args.energies} energies, I0 = {cfg.dose:g} counts/px, backend {cfg.backend}")
    print(f"topology: {where} -> Tiled ({args.tiled or f'embedded, catalog in {cfg.catalog}'})")
    print("references: nvpf-synthetic (SYNTHETIC NaxV2(PO4)2F3-like spectra, phasestream.sim)")
    header_done = []

    def show(s) -> None:
        if not header_done:
            names = "  ".join(f"{p:>6}" for p in s.phases)
            print(f"\n{'SoC':>5}  {names}  {'ambig':>6}  {'reliab':>6}  {'acc*':>6}  {'latency':>8}  status")
            header_done.append(True)
        fr = "  ".join(f"{100 * f:5.1f}%" for f in s.fractions)
        latency = "n/a" if s.latency_s is None else f"{1e3 * s.latency_s:.0f} ms"
        print(f"{s.state_of_charge:5.1f}  {fr}  {100 * s.ambiguous_fraction:5.1f}%  {s.mean_reliability:6.3f}  "
              f"{100 * s.accuracy:5.1f}%  {latency:>8}  {s.status}")

    t0 = time.perf_counter()
    summaries = run_demo(cfg, progress=show)
    print("\nfractions: particle pixels per phase (PCC argmax); ambig: reliability < 0.005; reliab: mean "
          "best-minus-second PCC; acc*: agreement with the simulated ground truth away from domain boundaries; "
          "latency: last image -> final result in Tiled")
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


def tiled_client(args: argparse.Namespace, *, readable_storage=None):
    """``(client, uri)`` for the command: ``--tiled URI`` or an embedded server (``--catalog DIR``)."""
    from phasestream.services.tiled import tiled_session

    return tiled_session(args.tiled, directory=args.catalog, readable_storage=readable_storage)


def _add_tiled_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiled", metavar="URI", default=None,
                        help="Tiled server URI (default: an embedded server started for this command)")
    parser.add_argument("--catalog", metavar="DIR", default=None,
                        help="directory of the embedded server's catalog (persists between commands)")


def _print_rows(rows: list[dict]) -> None:
    if not rows:
        print("no results")
        return
    phases = rows[0]["phases"]
    header = f"{'run uid':<10} {'scan':>5} {'SoC':>5} {'status':<9}"
    print(header + "".join(f"{p:>8}" for p in phases) + f"{'ambig':>8}")
    for r in rows:
        fr = "".join(f"{100 * r['phase_fractions'].get(p, 0.0):7.1f}%" for p in phases)
        amb = r["ambiguous_fraction"]
        soc = r["state_of_charge"]
        print(f"{r['run_uid'][:8]:<10} {r['scan_id'] or '':>5} {'' if soc is None else f'{soc:.2f}':>5} "
              f"{r['status'] or '':<9}{fr}{'' if amb is None else f'{100 * amb:7.1f}%':>8}")


def _cmd_query(args: argparse.Namespace) -> int:
    from phasestream.catalog import find, result_rows

    with tiled_client(args) as (client, _):
        rows = result_rows(find(client, state_of_charge=args.soc, tolerance=args.tolerance, status=args.status,
                                root=args.root))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_rows(rows)
    return 0


def _cmd_reprocess(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from phasestream.services.reprocess import ReprocessOptions, reprocess_run

    opts = ReprocessOptions(root=args.root, backend=args.backend, references=args.references).validate()
    failures = 0
    with tiled_client(args, readable_storage=args.readable_storage) as (client, _):
        for uid in tqdm(args.uids, desc="reprocess", unit="run", disable=len(args.uids) < 2):
            try:
                result = reprocess_run(client, uid, opts)
                print(f"{uid}: {result.status}" + (f" ({'; '.join(result.errors)})" if result.errors else ""))
                failures += result.status not in ("complete",)
            except (KeyError, RuntimeError, ValueError) as exc:
                failures += 1
                print(f"{uid}: failed: {exc}", file=sys.stderr)
    return 1 if failures else 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import threading

    from phasestream.services.live import LiveService
    from phasestream.services.worker import DocumentWorker

    with tiled_client(args, readable_storage=args.readable_storage) as (client, uri):
        service = LiveService(client, backend=args.backend, update_every=args.update_every,
                              update_seconds=args.update_seconds, root=args.root, write_od=not args.no_od)
        worker = DocumentWorker(args.zmq, service, listener=service, stop_timeout=args.stop_timeout)

        def announce() -> None:
            if worker.connected.wait(60):
                print(json.dumps({"ready": True, "zmq": args.zmq, "tiled": uri.split("?")[0],
                                  "backend": service.callback.backend}), flush=True)

        threading.Thread(target=announce, daemon=True).start()
        try:
            stats = worker.run()
        finally:
            service.close()
    print(json.dumps({"stopped": True, "stats": {k: v for k, v in stats.items() if k != "gaps"}}), flush=True)
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

    demo = sub.add_parser("demo", help="simulated scans at 5 states of charge through the live stack")
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
    demo.add_argument("--json", action="store_true", help="also print the results as JSON")
    demo.set_defaults(func=_cmd_demo)

    refs = sub.add_parser("references", help="inspect reference spectra and choose scan energies")
    refs.add_argument("source", nargs="+", help="CSV file, two-column file(s) or a registered name (nvpf-synthetic)")
    refs.add_argument("--select", type=int, default=0, metavar="N", help="choose N discriminating energies")
    refs.add_argument("--pre-edge", type=float, default=None, help="pre-edge energy (eV) to add")
    refs.set_defaults(func=_cmd_references)

    serve = sub.add_parser("serve", help="live analysis worker on a 0MQ document stream")
    _add_tiled_options(serve)
    serve.add_argument("--zmq", required=True, metavar="ADDRESS",
                       help="output address of the 0MQ proxy, e.g. tcp://127.0.0.1:5578")
    serve.add_argument("--backend", choices=("auto", *BACKENDS), default=None)
    serve.add_argument("--update-every", type=int, default=4, help="partial maps every N images (default 4)")
    serve.add_argument("--update-seconds", type=float, default=2.0, help="... or every T seconds (default 2)")
    serve.add_argument("--stop-timeout", type=float, default=60.0,
                       help="seconds without documents after which a run without stop is given up (default 60)")
    serve.add_argument("--root", default="phasestream")
    serve.add_argument("--no-od", action="store_true",
                       help="do not write the OD cube live (high frame rates; reprocess adds it later)")
    serve.add_argument("--readable-storage", nargs="*", default=None, metavar="DIR",
                       help="embedded server only: directories of detector files it may read")
    serve.set_defaults(func=_cmd_serve)

    query = sub.add_parser("query", help="list phase-mapping results, e.g. --soc 2.0")
    _add_tiled_options(query)
    query.add_argument("--soc", type=float, default=None, help="state of charge (Na content x)")
    query.add_argument("--tolerance", type=float, default=0.0, help="match |SoC - x| <= tolerance")
    query.add_argument("--status", choices=("running", "complete", "partial", "failed"), default=None)
    query.add_argument("--root", default="phasestream", help="results container (default phasestream)")
    query.add_argument("--json", action="store_true")
    query.set_defaults(func=_cmd_query)

    rep = sub.add_parser("reprocess", help="recompute results from raw runs already in Tiled")
    _add_tiled_options(rep)
    rep.add_argument("uids", nargs="+", metavar="UID", help="raw run uids")
    rep.add_argument("--root", default="phasestream")
    rep.add_argument("--backend", choices=("auto", *BACKENDS), default=None)
    rep.add_argument("--references", default=None, help="override the runs' reference spectra")
    rep.add_argument("--readable-storage", nargs="*", default=None, metavar="DIR",
                     help="embedded server only: directories of detector files it may read")
    rep.set_defaults(func=_cmd_reprocess)
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
