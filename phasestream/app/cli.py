"""The ``phasestream`` command.

Every command that talks to Tiled takes ``--tiled URI`` (an existing server; ``TILED_API_KEY``
is honoured) or else starts an embedded server for the command, over ``--catalog DIR`` when
given (a catalog that outlives the command) or a temporary one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from phasestream.contract import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_NUM_POINTS
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
    from phasestream.app.demo import DemoConfig, run_demo

    cfg = DemoConfig(states=args.states, shape=args.size, n_energies=args.energies - 1, dose=args.dose,
                     n_particles=args.particles, seed=args.seed, backend=args.backend, topology=args.topology,
                     out_dir=args.out, tiled=args.tiled, figures=not args.no_figures, refine=not args.no_refine,
                     strategy=args.strategy)
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
        if s.refined_fractions is not None:
            rf = "  ".join(f"{100 * f:5.1f}%" for f in s.refined_fractions)
            print(f"{'GMVAE':>5}  {rf}  {'':>6}  {'':>6}  {100 * s.refined_accuracy:5.1f}%  "
                  f"{1e3 * s.refinement.get('seconds', 0):6.0f} ms  refined ({s.refinement.get('strategy')})")
        elif s.refinement:
            print(f"{'GMVAE':>5}  refinement {s.refinement.get('status')}: {s.refinement.get('reason')}")

    t0 = time.perf_counter()
    summaries = run_demo(cfg, progress=show)
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


def tiled_client(args: argparse.Namespace, *, readable_storage=None):
    """``(client, uri)`` for the command: ``--tiled URI`` or an embedded server (``--catalog DIR``)."""
    from phasestream.store.tiled import tiled_session

    return tiled_session(args.tiled, directory=args.catalog, readable_storage=readable_storage)


def _add_tiled_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiled", metavar="URI", default=None,
                        help="Tiled server URI (default: an embedded server started for this command)")
    parser.add_argument("--catalog", metavar="DIR", default=None,
                        help="directory of the embedded server's catalog (persists between commands)")


def _scheduler_option(args: argparse.Namespace) -> str | None:
    """``--scheduler``: None for none/empty, ``local`` or an address; an address needs ``--tiled``."""
    scheduler = None if (args.scheduler or "").lower() in ("", "none") else args.scheduler
    if scheduler and scheduler.lower() != "local" and not args.tiled:
        raise ValueError("--scheduler needs --tiled URI: the Dask workers cannot reach this command's embedded server")
    return scheduler


def _workers_api_key(uri: str) -> str | None:
    """The API key Dask workers need besides ``uri`` (None when the URI carries one)."""
    return None if "api_key=" in uri else os.environ.get("TILED_API_KEY")


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
    from phasestream.store.catalog import find, result_rows

    with tiled_client(args) as (client, _):
        rows = result_rows(find(client, state_of_charge=args.soc, tolerance=args.tolerance, status=args.status,
                                root=args.root))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_rows(rows)
    return 0


def _query_pairs(pairs: list[str] | None) -> dict:
    """``KEY=VALUE`` start-document criteria; values are JSON when they parse (2.0, true, "x"), else text."""
    query = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--query takes KEY=VALUE (a start-document key, e.g. sample.name=P1), got {pair!r}")
        try:
            query[key] = json.loads(value)
        except ValueError:
            query[key] = value
    return query


def _reprocess_jobs(args: argparse.Namespace, uids: list[str]) -> list:
    from dataclasses import asdict

    from phasestream.jobs.executors import Job
    from phasestream.jobs.reprocess import ReprocessOptions

    steps = []
    if not args.refine_only:
        opts = ReprocessOptions(root=args.root, backend=args.backend, references=args.references,
                                replace=args.replace).validate()
        steps.append(("reprocess", asdict(opts)))
    if args.enhance:
        steps.append(("enhance", asdict(_enhance_options(args))))
    if args.refine:
        steps.append(("refine", asdict(_refine_options(args))))
    if args.method:
        from phasestream.jobs.methods import MethodsOptions

        steps.append(("methods", asdict(MethodsOptions(methods=tuple(args.method), root=args.root).validate())))
    return [Job(uid, tuple(steps)).validate() for uid in uids]


def _print_job(summary: dict) -> None:
    steps = summary.get("steps") or {}
    detail = ", ".join(f"{name} {step.get('status')}" for name, step in steps.items())
    if summary["status"] == "complete":
        print(f"{summary['run_uid']}: complete" + (f" ({detail})" if len(steps) > 1 else ""), flush=True)
    else:
        print(f"{summary['run_uid']}: failed: {summary.get('error') or detail}", file=sys.stderr, flush=True)


def _cmd_reprocess(args: argparse.Namespace) -> int:
    from phasestream.jobs.executors import dask_client, run_jobs, submit_jobs
    from phasestream.store.catalog import find_raw_runs

    query = _query_pairs(args.query)
    if not (args.uids or args.soc is not None or query):
        raise ValueError("reprocess needs run uids, --soc X or --query KEY=VALUE")
    scheduler = args.scheduler
    in_process = args.in_process or (scheduler or "").lower() == "none"
    if scheduler and not in_process and not args.tiled:
        raise ValueError("--scheduler needs --tiled URI: the Dask workers cannot reach this command's embedded server")
    with tiled_client(args, readable_storage=args.readable_storage) as (client, uri):
        uids = list(dict.fromkeys(args.uids))
        if args.soc is not None or query:
            uids += [u for u in find_raw_runs(client, state_of_charge=args.soc, tolerance=args.tolerance,
                                              query=query) if u not in uids]
            if not uids:
                print("no raw runs match", file=sys.stderr)
                return 1
        jobs = _reprocess_jobs(args, uids)
        api_key = _workers_api_key(uri)
        progress = not args.json and sys.stderr.isatty()
        split: list[tuple[str, str, dict]] = []
        if args.split > 1:
            if in_process:
                raise ValueError("--split N spreads one run over Dask workers: it needs Dask (not --in-process)")
            jobs, split = _split_steps(jobs)
        # one run gains nothing from a cluster: it runs here unless a scheduler is named
        if in_process or (len(jobs) == 1 and not scheduler and not split):
            report = run_jobs(jobs, uri, api_key=api_key, progress=progress, on_done=_print_job)
            where = "in process"
        else:
            with dask_client(None if scheduler in (None, "local") else scheduler, n_workers=args.workers) as dask:
                where = f"on Dask ({len(dask.scheduler_info()['workers'])} workers at {dask.scheduler.address})"
                report = submit_jobs(dask, jobs, uri, api_key=api_key, retries=args.retries, progress=progress,
                                     on_done=_print_job)
                _run_split(dask, split, uri, api_key, args, report)
    n_runs = len({*(j.run_uid for j in jobs), *(uid for uid, _, _ in split)})
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        print(f"{len(report.successes)} of {n_runs} runs complete, {len(report.failures)} failed, "
              f"in {report.seconds:.1f} s {where}")
    return 0 if report.ok else 1


def _split_steps(jobs: list) -> tuple[list, list[tuple[str, str, dict]]]:
    """Take the steps ``--split`` spreads over workers (``enhance``, the ``lcf`` method) out of ``jobs``."""
    from dataclasses import replace

    kept, split = [], []
    for job in jobs:
        steps = []
        for name, options in job.steps:
            if name == "enhance":
                split.append((job.run_uid, "enhance", options))
            elif name == "methods" and "lcf" in options["methods"]:
                split.append((job.run_uid, "lcf", options))
                rest = tuple(m for m in options["methods"] if m != "lcf")
                if rest:
                    steps.append((name, {**options, "methods": rest}))
            else:
                steps.append((name, options))
        if steps:
            kept.append(replace(job, steps=tuple(steps)))
    return kept, split


def _run_split(dask, split: list[tuple[str, str, dict]], uri: str, api_key: str | None, args, report) -> None:
    """After the per-run jobs: each split step of each run whose job did not fail, ``--split`` parts at once."""
    from phasestream.jobs.split import submit_split_enhance, submit_split_lcf

    t0 = time.perf_counter()
    failed = {f["run_uid"] for f in report.failures}
    done = {s["run_uid"]: s for s in report.successes}
    for uid, kind, options in split:
        if uid in failed:
            continue
        submit = submit_split_enhance if kind == "enhance" else submit_split_lcf
        record = submit(dask, uri, uid, options, parts=args.split, api_key=api_key, retries=args.retries)
        summary = done.get(uid) or {"run_uid": uid, "status": "complete", "steps": {}}
        summary["steps"][f"{kind} (split {args.split})"] = record
        if record["status"] != "complete":
            reason = record.get("reason") or "; ".join(record.get("errors") or [])
            report.successes = [s for s in report.successes if s["run_uid"] != uid]
            error = f"split {kind} {record['status']}: {reason}"
            report.failures.append({**summary, "status": "failed", "error": error})
            failed.add(uid)
            _print_job(report.failures[-1])
        elif uid not in done:
            done[uid] = summary
            report.successes.append(summary)
            _print_job(summary)
    report.seconds += time.perf_counter() - t0


def _refine_options(args: argparse.Namespace):
    from phasestream.jobs.refine import RefineOptions

    return RefineOptions(model=args.model, version=args.model_version, strategy=args.strategy, address=args.models,
                         root=args.root).validate()


def _methods_base(args: argparse.Namespace):
    """Base options of the classic methods a run may ask for in its start document."""
    from phasestream.jobs.methods import MethodsOptions

    return MethodsOptions(root=args.root).validate()


def _enhance_options(args: argparse.Namespace):
    from phasestream.jobs.enhance import EnhanceOptions

    return EnhanceOptions(model=args.indi_model, steps=args.steps, address=args.models, root=args.root).validate()


def _add_refine_options(parser: argparse.ArgumentParser) -> None:
    from phasestream.jobs.refine import DEFAULT_MODEL
    from phasestream.models.refine import STRATEGIES
    from phasestream.modelserver.protocol import DEFAULT_MODEL_ADDRESS

    parser.add_argument("--models", default=DEFAULT_MODEL_ADDRESS, metavar="ADDRESS",
                        help=f"model server address (default {DEFAULT_MODEL_ADDRESS})")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"GMVAE artifact name (default {DEFAULT_MODEL})")
    parser.add_argument("--model-version", default=None, help="artifact version (default: the highest)")
    parser.add_argument("--indi-model", default="indi-particles-synthetic",
                        help="InDI artifact for enhancement (default indi-particles-synthetic)")
    parser.add_argument("--steps", type=int, default=None, help="InDI steps (default: the artifact's)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="knn",
                        help="how ambiguous pixels get a phase in the latent space (default knn: the most accurate "
                             "on the simulated benchmarks; mahalanobis is the paper's)")


def _cmd_serve(args: argparse.Namespace) -> int:
    import threading

    from phasestream.app.live import LiveService
    from phasestream.transport.worker import DocumentWorker

    scheduler = _scheduler_option(args)
    if args.od_store:  # fail now, not at the first image, when the folder cannot be made
        Path(args.od_store).mkdir(parents=True, exist_ok=True)
    readable = [*(args.readable_storage or []), *([args.od_store] if args.od_store else [])]
    with tiled_client(args, readable_storage=readable or None) as (client, uri):
        if args.od_store:
            from phasestream.store.results import check_od_store

            check_od_store(client, args.od_store)
        from phasestream.contract import DocumentBounds
        from phasestream.references import REFERENCE_FOLDERS_ENV

        folders = [str(Path(f).resolve()) for f in args.references_dir]
        # post-scan jobs (threads, Dask workers started from here) load references by the same rule
        os.environ[REFERENCE_FOLDERS_ENV] = os.pathsep.join(folders)
        bounds = DocumentBounds(max_num_points=args.max_num_points, max_image_pixels=args.max_image_pixels)
        service = LiveService(client, backend=args.backend, update_every=args.update_every,
                              update_seconds=args.update_seconds, root=args.root, write_od=not args.no_od,
                              od_store=args.od_store, reference_folders=folders, bounds=bounds,
                              stale_after=args.stop_timeout,
                              refine=None if args.no_refine else _refine_options(args),
                              enhance=_enhance_options(args), methods=_methods_base(args),
                              scheduler=scheduler, retries=args.retries, dask_workers=args.workers)
        post_scan = f"dask {service.dask.address}" if service.dask is not None else "thread"
        worker = DocumentWorker(args.zmq, service, listener=service, stop_timeout=args.stop_timeout,
                                max_message_size=args.max_message_size)

        def announce() -> None:
            if worker.connected.wait(60):
                print(json.dumps({"ready": True, "zmq": args.zmq, "tiled": uri.split("?")[0],
                                  "backend": service.callback.backend, "post_scan": post_scan}), flush=True)

        threading.Thread(target=announce, daemon=True).start()
        try:
            stats = worker.run()
        finally:
            service.close()
    print(json.dumps({"stopped": True, "stats": {k: v for k, v in stats.items() if k != "gaps"}}), flush=True)
    return 0


def _cmd_serve_models(args: argparse.Namespace) -> int:
    from phasestream.modelserver.server import config_from_args, serve_models

    return serve_models(config_from_args(args))


def _cmd_train(args: argparse.Namespace) -> int:
    from phasestream.jobs.training import tiled_training_set, train_artifact
    from phasestream.models.registry import Artifact
    from phasestream.sim.training import synthetic_training_set

    out = args.out or os.environ.get("PHASESTREAM_MODELS", "").split(os.pathsep)[0] or "models"
    if args.synthetic:
        data = synthetic_training_set(seed=args.seed, n_samples=args.samples, max_spectra=args.max_spectra)
        name = args.name or "gmvae-nvpf-synthetic"
    else:
        if not (args.soc or args.runs):
            raise ValueError("train gmvae needs --synthetic, or --tiled URI with --soc X ... or --runs UID ...")
        scheduler = _scheduler_option(args)
        with tiled_client(args) as (client, uri):
            data = tiled_training_set(client, state_of_charge=args.soc or (), runs=args.runs or (), root=args.root,
                                      tiled_uri=uri, scheduler=scheduler, retries=args.retries,
                                      api_key=_workers_api_key(uri))
        name = args.name or "gmvae-tiled"
    print(f"training {name} {args.version} on {len(data.spectra)} spectra at {len(data.energies_eV)} energies "
          f"({data.provenance['source']})")
    artifact, result = train_artifact(data, out, name=name, version=args.version, epochs=args.epochs,
                                      seed=args.seed, normalization=args.normalization, beta=args.beta,
                                      overwrite=args.overwrite)
    artifact = Artifact.read(artifact.path)
    print(json.dumps({"artifact": str(artifact.path), "name": artifact.name, "version": artifact.version,
                      "sha256": artifact.sha256, "metrics": result.metrics}, indent=2))
    return 0


def _cmd_train_indi(args: argparse.Namespace) -> int:
    from phasestream.jobs.training import tiled_indi_pairs, train_indi_artifact
    from phasestream.sim.training import synthetic_indi_pairs

    out = args.out or os.environ.get("PHASESTREAM_MODELS", "").split(os.pathsep)[0] or "models"
    if args.synthetic:
        data = synthetic_indi_pairs(seed=args.seed, n_pairs=args.pairs)
        name = args.name or "indi-particles-synthetic"
    else:
        if not (args.lq and args.hq):
            raise ValueError("train indi needs --synthetic, or --tiled URI with --lq UID --hq UID")
        with tiled_client(args) as (client, uri):
            data = tiled_indi_pairs(client, args.lq, args.hq, tiled_uri=uri)
        name = args.name or "indi-tiled"
    print(f"training {name} {args.version} on {len(data.hq)} image pairs ({data.provenance['source']})")
    artifact, result = train_indi_artifact(data, out, name=name, version=args.version, overwrite=args.overwrite,
                                           iterations=args.iterations, base_filters=args.filters, seed=args.seed,
                                           crop=args.crop, batch_size=args.batch_size)
    print(json.dumps({"artifact": str(artifact.path), "name": artifact.name, "version": artifact.version,
                      "sha256": artifact.sha256, "steps": result.steps, "metrics": result.metrics}, indent=2))
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


def _cmd_up(args: argparse.Namespace) -> int:
    from phasestream.app.stack import COMPONENTS, StackConfig, up

    only = tuple(c.strip() for c in (args.only or ",".join(COMPONENTS)).split(",") if c.strip())
    cfg = StackConfig(run_dir=args.run_dir, host=args.host, tiled_port=args.tiled_port, tiled_uri=args.tiled,
                      tiled_config=args.tiled_config, proxy_in_port=args.proxy_in_port,
                      proxy_out_port=args.proxy_out_port, models_port=args.models_port,
                      scheduler_port=args.scheduler_port, scheduler_http_port=args.scheduler_http_port,
                      dask_workers=args.dask_workers, components=only,
                      worker_args=tuple(args.worker_arg or ()), models_args=tuple(args.models_arg or ()),
                      start_timeout=args.timeout).validate()
    state = up(cfg)
    for name, record in state["components"].items():
        print(f"{name:<13} pid {record['pid']:<8} {record['address']}")
    print(f"all {len(state['components'])} components healthy; clients: set -a; . {cfg.run_dir}/phasestream.env; "
          f"set +a   (logs in {cfg.run_dir}/logs; stop with: phasestream down --run-dir {cfg.run_dir})")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from phasestream.app.stack import status

    report = status(args.run_dir)
    if args.json:
        print(json.dumps(report, indent=2))
    elif not report:
        print(f"no stack started from {args.run_dir} (phasestream up)")
    else:
        for name, r in report.items():
            print(f"{name:<13} {'healthy' if r['healthy'] else 'UNHEALTHY':<10} pid {r['pid']:<8} {r['detail']}")
    return 0 if report and all(r["healthy"] for r in report.values()) else 1


def _cmd_down(args: argparse.Namespace) -> int:
    from phasestream.app.stack import down

    outcome = down(args.run_dir, timeout=args.timeout)
    if not outcome:
        print(f"no stack started from {args.run_dir}")
    for name, what in outcome.items():
        print(f"{name:<13} {what}")
    return 0 if all(v != "killed" for v in outcome.values()) else 1


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
    demo.add_argument("--no-refine", action="store_true", help="no model server, no GMVAE refinement")
    demo.add_argument("--strategy", choices=("mahalanobis", "anchor", "knn", "centroid"), default="knn",
                      help="latent-space assignment of ambiguous pixels (default knn)")
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
    from phasestream.transport.wire import DEFAULT_MAX_MESSAGE_SIZE, parse_byte_size

    serve.add_argument("--max-message-size", type=parse_byte_size, metavar="BYTES",
                       default=os.environ.get("PHASESTREAM_MAX_MESSAGE_SIZE") or DEFAULT_MAX_MESSAGE_SIZE,
                       help="largest document message accepted, e.g. 1073741824, 512M or 2G; larger ones are "
                            "dropped by 0MQ before they are read, and a run that loses one is reprocessed from "
                            "Tiled. Default "
                            f"$PHASESTREAM_MAX_MESSAGE_SIZE, else {DEFAULT_MAX_MESSAGE_SIZE >> 20}M")
    serve.add_argument("--root", default="phasestream")
    serve.add_argument("--no-od", action="store_true",
                       help="do not write the OD cube live (high frame rates; reprocess adds it later)")
    serve.add_argument("--od-store", default=os.environ.get("PHASESTREAM_OD_STORE") or None, metavar="DIR",
                       help="write the live OD cube as external zarr data in DIR, registered in Tiled, instead of "
                            "uploading it (high frame rates; the Tiled server must be able to read DIR). Default "
                            "$PHASESTREAM_OD_STORE, else upload")
    serve.add_argument("--references-dir", action="append", metavar="DIR",
                       default=[p for p in os.environ.get("PHASESTREAM_REFERENCES", "").split(os.pathsep) if p],
                       help="folder whose reference files a start document may name (repeatable); default "
                            "$PHASESTREAM_REFERENCES (os.pathsep-separated). Without one, only registered names")
    serve.add_argument("--max-num-points", type=int, default=DEFAULT_MAX_NUM_POINTS, metavar="N",
                       help=f"refuse runs whose start document expects more energies (default "
                            f"{DEFAULT_MAX_NUM_POINTS})")
    serve.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                       help=f"refuse images of more pixels (default {DEFAULT_MAX_IMAGE_PIXELS}, 8192^2)")
    serve.add_argument("--readable-storage", nargs="*", default=None, metavar="DIR",
                       help="embedded server only: directories of detector files it may read")
    _add_refine_options(serve)
    serve.add_argument("--no-refine", action="store_true", help="no GMVAE refinement after each run")
    serve.add_argument("--scheduler", default=os.environ.get("PHASESTREAM_DASK_SCHEDULER"), metavar="ADDRESS",
                       help="Dask scheduler of the post-scan jobs, e.g. tcp://HOST:8786, or 'local' (a LocalCluster "
                            "of --workers processes); default $PHASESTREAM_DASK_SCHEDULER, else 'none': a thread of "
                            "this worker")
    serve.add_argument("--workers", type=int, default=1, help="--scheduler local: worker processes (default 1)")
    serve.add_argument("--retries", type=int, default=2, help="Dask retries of a failed post-scan job (default 2)")
    serve.set_defaults(func=_cmd_serve)

    from phasestream.modelserver.server import add_arguments as add_model_server_arguments

    models = sub.add_parser("serve-models", help="the model server (GMVAE, InDI) on a 0MQ ROUTER socket")
    add_model_server_arguments(models)
    models.set_defaults(func=_cmd_serve_models)

    train = sub.add_parser("train", help="train a model and write a versioned artifact")
    train_sub = train.add_subparsers(dest="model_kind", required=True)
    gmvae = train_sub.add_parser("gmvae", help="GMVAE on particle-pixel spectra (simulated, or results in Tiled)")
    _add_tiled_options(gmvae)
    source = gmvae.add_mutually_exclusive_group()
    source.add_argument("--synthetic", action="store_true", help="train on simulated scans (phasestream.sim)")
    source.add_argument("--runs", nargs="+", metavar="UID", help="results of these runs in Tiled")
    gmvae.add_argument("--soc", type=float, nargs="+", metavar="X", help="results in Tiled at these states of charge")
    gmvae.add_argument("--root", default="phasestream")
    gmvae.add_argument("--scheduler", default=os.environ.get("PHASESTREAM_DASK_SCHEDULER"), metavar="ADDRESS",
                       help="extract the runs' spectra on Dask, one task per run: tcp://HOST:8786 or 'local' (a "
                            "LocalCluster); default $PHASESTREAM_DASK_SCHEDULER, else in this process")
    gmvae.add_argument("--retries", type=int, default=2, help="--scheduler: retries of a run's extraction (default 2)")
    gmvae.add_argument("--seed", type=int, default=0)
    gmvae.add_argument("--samples", type=int, default=3, help="--synthetic: simulated samples per state (default 3)")
    gmvae.add_argument("--epochs", type=int, default=15, help="training epochs (default 15, as the shipped model)")
    gmvae.add_argument("--normalization", choices=("feature", "spectrum"), default="feature",
                       help="feature: per-energy standardization, keeps thickness (default); spectrum: shape only")
    gmvae.add_argument("--beta", type=float, default=0.2, help="weight of the KL terms (default 0.2)")
    gmvae.add_argument("--max-spectra", type=int, default=150_000, help="--synthetic: spectra kept (default 150000)")
    gmvae.add_argument("--name", default=None, help="artifact name (default gmvae-nvpf-synthetic / gmvae-tiled)")
    gmvae.add_argument("--version", default="1.0.0")
    gmvae.add_argument("--out", default=None, help="artifact folder (default: $PHASESTREAM_MODELS or ./models)")
    gmvae.add_argument("--overwrite", action="store_true")
    gmvae.set_defaults(func=_cmd_train)

    indi = train_sub.add_parser("indi", help="InDI image enhancement from LQ/HQ image pairs")
    _add_tiled_options(indi)
    indi_source = indi.add_mutually_exclusive_group()
    indi_source.add_argument("--synthetic", action="store_true", help="train on simulated particle phantoms")
    indi_source.add_argument("--lq", metavar="UID", help="raw run of the low-quality scan in Tiled")
    indi.add_argument("--hq", metavar="UID", help="raw run of the high-quality scan of the same field")
    indi.add_argument("--seed", type=int, default=0)
    indi.add_argument("--pairs", type=int, default=24, help="--synthetic: phantom pairs (default 24)")
    indi.add_argument("--iterations", type=int, default=4000, help="training iterations (default 4000)")
    indi.add_argument("--filters", type=int, default=16, help="base filters of the U-Net (paper: 64; default 16)")
    indi.add_argument("--crop", type=int, default=64, help="training crop size (default 64)")
    indi.add_argument("--batch-size", type=int, default=8)
    indi.add_argument("--name", default=None, help="artifact name (default indi-particles-synthetic / indi-tiled)")
    indi.add_argument("--version", default="1.0.0")
    indi.add_argument("--out", default=None, help="artifact folder (default: $PHASESTREAM_MODELS or ./models)")
    indi.add_argument("--overwrite", action="store_true")
    indi.set_defaults(func=_cmd_train_indi)

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
    rep.add_argument("uids", nargs="*", metavar="UID", help="raw run uids (or select runs with --soc / --query)")
    rep.add_argument("--soc", type=float, default=None, metavar="X",
                     help="every raw run whose start document has sample.state_of_charge X")
    rep.add_argument("--tolerance", type=float, default=0.0, help="--soc: match |SoC - X| <= tolerance")
    rep.add_argument("--query", action="append", metavar="KEY=VALUE",
                     help="every raw run whose start document has KEY (dotted) equal to VALUE; repeatable")
    rep.add_argument("--scheduler", default=os.environ.get("PHASESTREAM_DASK_SCHEDULER"), metavar="ADDRESS",
                     help="Dask scheduler, e.g. tcp://HOST:8786 (default $PHASESTREAM_DASK_SCHEDULER, else a "
                          "LocalCluster on this host for 2 runs or more); 'none': in this process")
    rep.add_argument("--in-process", action="store_true", help="no Dask: the runs one after the other here")
    rep.add_argument("--workers", type=int, default=None,
                     help="LocalCluster worker processes (default: the number of cores, at most 4)")
    rep.add_argument("--retries", type=int, default=2, help="Dask retries of a failed run (default 2)")
    rep.add_argument("--split", type=int, default=1, metavar="N",
                     help="spread each run's --enhance (chunks of energies) and --method lcf (row bands) over N "
                          "Dask tasks, stitched in Tiled (default 1: one task per run)")
    rep.add_argument("--json", action="store_true", help="print the summary of successes and failures as JSON")
    rep.add_argument("--root", default="phasestream")
    rep.add_argument("--backend", choices=("auto", *BACKENDS), default=None)
    rep.add_argument("--references", default=None, help="override the runs' reference spectra")
    rep.add_argument("--readable-storage", nargs="*", default=None, metavar="DIR",
                     help="embedded server only: directories of detector files it may read")
    rep.add_argument("--replace", action="store_true",
                     help="recompute and replace results that are complete too (others are always recomputed)")
    rep.add_argument("--refine", action="store_true", help="then refine ambiguous pixels with the GMVAE")
    rep.add_argument("--refine-only", action="store_true",
                     help="only post-scan jobs on the existing results (no PCC recomputation); implies --refine "
                          "unless --enhance or --method is given")
    rep.add_argument("--enhance", action="store_true", help="InDI-enhance the OD images into `enhanced`")
    rep.add_argument("--method", action="append", metavar="NAME", default=[],
                     help="classic method on the result (repeat for several): normalize, lcf, edge50, peak, masks, "
                          "kmeans, rum_tv, rum_pnp")
    _add_refine_options(rep)
    rep.set_defaults(func=_cmd_reprocess)
    from phasestream.app.stack import COMPONENTS, DEFAULT_RUN_DIR

    upp = sub.add_parser("up", help="start the whole service on this host (Tiled, proxy, models, Dask, worker)")
    upp.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR), help=f"pid files, logs, env file "
                     f"(default {DEFAULT_RUN_DIR})")
    upp.add_argument("--host", default="127.0.0.1", help="address every service binds (default 127.0.0.1)")
    upp.add_argument("--tiled", metavar="URI", default=None, help="use this Tiled server instead of starting one")
    upp.add_argument("--tiled-config", default=None, metavar="PATH",
                     help="Tiled configuration, e.g. deploy/tiled/config.yml (PostgreSQL + Redis); default a "
                          "generated SQLite one in RUN_DIR/tiled")
    upp.add_argument("--tiled-port", type=int, default=8000)
    upp.add_argument("--proxy-in-port", type=int, default=5577)
    upp.add_argument("--proxy-out-port", type=int, default=5578)
    upp.add_argument("--models-port", type=int, default=5579)
    upp.add_argument("--scheduler-port", type=int, default=8786)
    upp.add_argument("--scheduler-http-port", type=int, default=8787,
                     help="the Dask scheduler's health and Prometheus metrics, on --host (default 8787)")
    upp.add_argument("--dask-workers", type=int, default=2, help="Dask worker processes (default 2)")
    upp.add_argument("--only", default=None, metavar="NAMES",
                     help=f"comma-separated components to start (default all: {','.join(COMPONENTS)})")
    upp.add_argument("--worker-arg", action="append", metavar="ARG",
                     help="extra argument of `phasestream serve` (repeat; e.g. --worker-arg=--no-refine)")
    upp.add_argument("--models-arg", action="append", metavar="ARG",
                     help="extra argument of `phasestream serve-models` (repeat)")
    upp.add_argument("--timeout", type=float, default=180.0, help="seconds each component may take to start")
    upp.set_defaults(func=_cmd_up)

    st = sub.add_parser("status", help="health of each component started by `phasestream up`")
    st.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR))
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_cmd_status)

    dn = sub.add_parser("down", help="stop what `phasestream up` started (SIGTERM, then SIGKILL)")
    dn.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR))
    dn.add_argument("--timeout", type=float, default=30.0, help="seconds to wait after SIGTERM (default 30)")
    dn.set_defaults(func=_cmd_down)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "refine_only", False) and not (getattr(args, "enhance", False) or getattr(args, "method", None)):
        args.refine = True
    logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"phasestream {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # Tiled unreachable, or the key missing or wrong: one line naming the server, no traceback
        from phasestream.store.tiled import describe_tiled_error

        message = describe_tiled_error(exc)
        if message is None:
            raise
        print(f"phasestream {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
