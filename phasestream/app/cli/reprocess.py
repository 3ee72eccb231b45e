"""``phasestream reprocess``: recompute results, and run post-scan jobs, from raw runs already in Tiled.

One :class:`~phasestream.jobs.executors.Job` per run: in this process, or on Dask when a scheduler
is named (``--scheduler``, ``PHASESTREAM_DASK_SCHEDULER``) or ``--workers N`` / ``--split N`` asks
for a LocalCluster. ``--split N`` spreads a run's enhancement and LCF over N Dask tasks, after the
per-run jobs.

Exit status (docs/cli.md): :data:`EXIT_COMPLETE` every run complete, :data:`EXIT_FAILED` a run
failed, :data:`EXIT_SKIPPED` none failed but a step was skipped (e.g. a refinement that could not
show it helps); 2 a refused request, as every command.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from phasestream.app.cli.common import (
    SCHEDULER_NEEDS_TILED,
    add_run_key_options,
    add_tiled_options,
    positive_int,
    run_defaults,
    tiled_client,
    tiled_uri,
    workers_api_key,
)
from phasestream.app.cli.postscan import (
    add_enhance_and_denoise_options,
    add_refine_options,
    denoise_options,
    enhance_options,
    refine_options,
)
from phasestream.app.cli.selection import add_selection_options, run_query
from phasestream.contract import check_raw_path
from phasestream.jobs.cluster import dask_client
from phasestream.jobs.executors import Job, run_jobs, submit_jobs
from phasestream.jobs.methods_options import MethodsOptions
from phasestream.jobs.reprocess import ReprocessOptions
from phasestream.jobs.split import SplitStep, run_split_steps, split_steps
from phasestream.kernels.backend import BACKENDS
from phasestream.store.catalog import find_raw_runs
from phasestream.store.tiled import raw_runs

__all__ = ["EXIT_COMPLETE", "EXIT_FAILED", "EXIT_SKIPPED", "add_parser", "run"]

EXIT_COMPLETE = 0
EXIT_FAILED = 1
EXIT_SKIPPED = 3  # 2 is a refused request (argparse and run_reporting_errors)

def add_parser(subparsers: argparse._SubParsersAction) -> None:
    rep = subparsers.add_parser("reprocess", help="recompute results from raw runs already in Tiled")
    add_tiled_options(rep)
    rep.add_argument("uids", nargs="*", metavar="UID",
                     help="raw run uids (or select runs with --soc, --sample, --since, --until, --plan, --query)")
    rep.add_argument("--raw", default="", metavar="PATH",
                     help="Tiled path of the container of the raw runs, e.g. bl/raw (default: the catalog root)")
    add_selection_options(rep, "raw runs")
    rep.add_argument("--query", action="append", metavar="KEY=VALUE",
                     help="every raw run whose start document has KEY (dotted) equal to VALUE; repeatable")
    rep.add_argument("--scheduler", default=None, metavar="ADDRESS",
                     help="Dask scheduler, e.g. tcp://HOST:8786 (default $PHASESTREAM_DASK_SCHEDULER, else in "
                          "this process unless --workers N or --split N asks for a LocalCluster); 'none': here")
    rep.add_argument("--in-process", action="store_true", help="no Dask: the runs one after the other here")
    rep.add_argument("--workers", type=positive_int, default=None,
                     help="run on a LocalCluster of N worker processes on this host (default: in this process)")
    rep.add_argument("--retries", type=int, default=2, help="Dask retries of a failed run (default 2)")
    rep.add_argument("--split", type=positive_int, default=1, metavar="N",
                     help="spread each run's --enhance (chunks of energies) and --method lcf (row bands) over N "
                          "Dask tasks, stitched in Tiled (default 1: one task per run)")
    rep.add_argument("--json", action="store_true", help="print the summary of successes and failures as JSON")
    rep.add_argument("--root", default="phasestream")
    rep.add_argument("--backend", choices=("auto", *BACKENDS), default=None)
    rep.add_argument("--references", default=None,
                     help="override the runs' reference spectra; also analyses runs without a phasestream block "
                          "(stock plans), their keys inferred or given below")
    add_run_key_options(rep)
    rep.add_argument("--readable-storage", nargs="*", default=None, metavar="DIR",
                     help="embedded server only: directories of detector files it may read")
    rep.add_argument("--replace", action="store_true",
                     help="recompute and replace results that are complete too (others are always recomputed)")
    rep.add_argument("--refine", action="store_true", help="then refine ambiguous pixels with the GMVAE")
    rep.add_argument("--refine-only", action="store_true",
                     help="only post-scan jobs on the existing results (no PCC recomputation); implies --refine "
                          "unless --enhance, --method or --denoise is given")
    rep.add_argument("--enhance", action="store_true",
                     help="InDI-enhance the OD images into enhanced/<model>/<version>/<steps>")
    rep.add_argument("--method", action="append", metavar="NAME", default=[],
                     help="classic method on the result (repeat for several): normalize, lcf, edge50, peak, masks, "
                          "kmeans, rum_tv, rum_pnp")
    rep.add_argument("--denoise", action="store_true",
                     help="denoise the OD cube into `denoised` and map its phases beside the live maps "
                          "(`phase_denoised`, ...; --denoise-model, --fine-tune-steps)")
    add_refine_options(rep)
    add_enhance_and_denoise_options(rep)


def run(args: argparse.Namespace) -> int:
    if args.refine_only and not (args.enhance or args.method or args.denoise):
        args.refine = True
    args.raw = check_raw_path(args.raw)
    selection = run_query(args, _query_pairs(args.query))
    if not args.uids and selection.empty:
        raise ValueError("reprocess needs run uids or a selection (--soc X, --sample NAME, --since T, --until T, "
                         "--plan NAME, --query KEY=VALUE)")
    scheduler = args.settings.dask_scheduler if args.scheduler is None else args.scheduler
    scheduler = scheduler or None
    # a cluster only when asked for: a named scheduler, --workers N, or --split N (which needs Dask)
    in_process = (args.in_process or (scheduler or "").lower() == "none"
                  or (not scheduler and args.workers is None and args.split <= 1))
    if scheduler and not in_process and not tiled_uri(args):
        raise ValueError(SCHEDULER_NEEDS_TILED)
    with tiled_client(args, readable_storage=args.readable_storage) as (client, uri):
        uids = list(dict.fromkeys(args.uids))
        if args.raw and not (args.refine_only and selection.empty):
            try:
                raw_runs(client, args.raw)
            except KeyError as error:  # no such container: a refused request, not a failed run
                raise ValueError(error.args[0]) from None
        if not selection.empty:
            uids += [u for u in find_raw_runs(client, selection, raw=args.raw) if u not in uids]
            if not uids:
                print(f"no raw runs match (under {args.raw or 'the catalog root'})", file=sys.stderr)
                return 1
        jobs = _reprocess_jobs(args, uids)
        api_key = workers_api_key(uri)
        progress = not args.json and sys.stderr.isatty()
        split: list[SplitStep] = []
        if args.split > 1:
            if in_process:
                raise ValueError("--split N spreads one run over Dask workers: it needs Dask (not --in-process)")
            jobs, split = split_steps(jobs)
        if in_process:
            report = run_jobs(jobs, uri, api_key=api_key, progress=progress, on_done=print_job_outcome)
            where = "in process"
        else:
            with dask_client(scheduler or "local", n_workers=args.workers) as dask:
                where = f"on Dask ({len(dask.scheduler_info()['workers'])} workers at {dask.scheduler.address})"
                report = submit_jobs(dask, jobs, uri, api_key=api_key, retries=args.retries, progress=progress,
                                     on_done=print_job_outcome)
                run_split_steps(dask, split, uri, report, parts=args.split, api_key=api_key,
                                retries=args.retries, on_done=print_job_outcome)
    n_runs = len({*(j.run_uid for j in jobs), *(uid for uid, _, _ in split)})
    skipped = [o for o in report.failures if o["status"] == "skipped"]
    n_failed = len(report.failures) - len(skipped)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        print(f"{len(report.successes)} of {n_runs} runs complete, {len(skipped)} skipped, {n_failed} failed, "
              f"in {report.seconds:.1f} s {where}")
    return EXIT_FAILED if n_failed else EXIT_SKIPPED if skipped else EXIT_COMPLETE


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


def _reprocess_jobs(args: argparse.Namespace, uids: list[str]) -> list[Job]:
    """One job per run: recompute (unless ``--refine-only``), then the post-scan steps asked for."""
    steps = []
    if not args.refine_only:
        defaults = run_defaults(args)
        opts = ReprocessOptions(root=args.root, backend=args.backend, references=args.references, replace=args.replace,
                                defaults=None if defaults is None else asdict(defaults), raw=args.raw).validate()
        steps.append(("reprocess", asdict(opts)))
    if args.enhance:
        steps.append(("enhance", asdict(enhance_options(args))))
    if args.refine:
        steps.append(("refine", asdict(refine_options(args))))
    if args.method:
        steps.append(("methods", asdict(MethodsOptions(methods=tuple(args.method), root=args.root).validate())))
    if args.denoise:
        steps.append(("denoise", asdict(denoise_options(args))))
    return [Job(uid, tuple(steps)).validate() for uid in uids]


def print_job_outcome(outcome: dict) -> None:
    """One line per run: ``UID: complete (step status, ...)``; ``UID: skipped: reason`` and its retry command on
    stdout (a skip is an outcome, not an error); ``UID: failed: reason`` and its retry command on stderr."""
    steps = outcome.get("details", {}).get("steps") or {}
    detail = ", ".join(f"{name} {step.get('status')}" for name, step in steps.items())
    status = outcome["status"]
    if status == "complete":
        print(f"{outcome['run_uid']}: complete" + (f" ({detail})" if len(steps) > 1 else ""), flush=True)
    else:
        out = sys.stdout if status == "skipped" else sys.stderr
        print(f"{outcome['run_uid']}: {status}: {outcome.get('reason') or detail}", file=out, flush=True)
        if outcome.get("retry"):
            print(f"  retry: {outcome['retry']}", file=out, flush=True)
    _print_replaced(steps)


#: the job step that computes each post-scan record again, and its option
_RECOMPUTED_BY = {"refinement": ("refine", "--refine"), "enhancement": ("enhance", "--enhance"),
                  "enhancements": ("enhance", "--enhance"), "denoising": ("denoise", "--denoise"),
                  "methods": ("methods", "--method NAME")}


def _print_replaced(steps: dict) -> None:
    """One line per result that ``--replace`` removed with post-scan records: which went with it, and the options
    that compute them again (those whose step this job did not complete)."""
    replaced = ((steps.get("reprocess") or {}).get("details") or {}).get("replaced") or {}
    ran = {label.split()[0] for label, step in steps.items() if step.get("status") == "complete"}
    for key, record in replaced.items():
        records = [r for r in record.get("records") or () if r in _RECOMPUTED_BY]
        if not records:
            continue
        again = sorted({_RECOMPUTED_BY[r][1] for r in records if _RECOMPUTED_BY[r][0] not in ran})
        print(f"  replaced the earlier {record.get('status')} result {key}; its {', '.join(records)} went with it"
              + (f": compute them again with {', '.join(again)}" if again else ""), flush=True)
