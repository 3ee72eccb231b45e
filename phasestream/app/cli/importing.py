"""``phasestream import FILE...``: facility files become raw runs in Tiled (docs/import.md), optionally analysed
right away (``--analyze``: the reprocess job, then ``--refine`` and ``--method``).

One line per file on stdout: ``FILE: imported UID``, ``FILE: already imported UID``; a file that cannot be
imported is ``FILE: error: reason`` on stderr, and nothing of it is left in Tiled.

Exit status (as ``reprocess``, docs/cli.md): :data:`EXIT_COMPLETE` every file imported (and analysed),
:data:`EXIT_FAILED` a file could not be imported or its analysis failed, :data:`EXIT_SKIPPED` none failed but
an analysis step was skipped; 2 a refused request (bad options, Tiled unreachable).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from phasestream.app.cli.common import add_tiled_options, tiled_client, workers_api_key
from phasestream.app.cli.postscan import add_refine_options, refine_options
from phasestream.app.cli.reprocess import EXIT_COMPLETE, EXIT_FAILED, EXIT_SKIPPED, print_job_outcome
from phasestream.app.cli.selection import finite_number
from phasestream.contract import MODES, check_raw_path
from phasestream.formats import FORMATS
from phasestream.jobs.context import JobContext
from phasestream.jobs.executors import Job, run_jobs
from phasestream.jobs.importing import DEFAULT_REFERENCES, ImportOptions
from phasestream.jobs.importing import run as import_file
from phasestream.jobs.methods_options import MethodsOptions
from phasestream.jobs.reprocess import ReprocessOptions
from phasestream.kernels.backend import BACKENDS
from phasestream.store.tiled import ensure_container

__all__ = ["add_parser", "parse_energies", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    imp = subparsers.add_parser("import", help="import facility files (NXstxm, aXis2000, TIFF, PyXAS, XRM) as raw "
                                               "runs into Tiled")
    add_tiled_options(imp)
    imp.add_argument("files", nargs="+", metavar="FILE", help="stack files (a folder: of TIFFs, or of .xrm frames)")
    imp.add_argument("--format", choices=FORMATS, default=None, help="reader (default: detected from each file)")
    imp.add_argument("--energies", default=None, metavar="FILE_OR_LIST",
                     help="energies in eV: a text file, or a comma-separated list (TIFF needs them unless an "
                          "energy file lies beside it; for other formats they replace the file's)")
    imp.add_argument("--mode", choices=MODES, default=None, help="stxm or txm, for formats that do not say (TIFF)")
    imp.add_argument("--select", action="append", default=[], metavar="NAME=VALUE", type=_selection,
                     help="which part of files holding several to read (repeatable): NXstxm entry= and channel=, "
                          "aXis2000 channel=, xrm-series field= (a field of view) and pattern= (a file-name glob)")
    imp.add_argument("--references", required=True, metavar="R",
                     help=f"reference spectra the runs are analysed against, a registered name or a file (required: "
                          f"a facility file names none; {DEFAULT_REFERENCES} is the simulated demo set); every "
                          "energy must lie in their range")
    imp.add_argument("--sample", default=None, metavar="NAME", help="sample name (default: the file's, else its "
                                                                    "name)")
    imp.add_argument("--soc", type=finite_number, default=None, metavar="X",
                     help="state of charge (default: the file's)")
    imp.add_argument("--raw", default="", metavar="PATH",
                     help="Tiled path of the container of the raw runs, e.g. bl/raw (default: the catalog root); "
                          "created when missing")
    imp.add_argument("--copy-images", action="store_true",
                     help="write HDF5 and TIFF images into Tiled even when the server could read them from the file")
    imp.add_argument("--replace-incomplete", action="store_true",
                     help="an incomplete import of these files (no stop document, left by an import that was "
                          "killed) is removed and the files imported again; say so only when no import of them is "
                          "running (a complete import and another's run are never removed)")
    imp.add_argument("--readable-storage", nargs="*", default=None, metavar="DIR",
                     help="embedded server only: folders of files it may read (HDF5 and TIFF images stay there)")
    imp.add_argument("--analyze", action="store_true",
                     help="analyse each imported run right away (phase maps, as reprocess), then --refine/--method")
    imp.add_argument("--root", default="phasestream", help="results container (default phasestream)")
    imp.add_argument("--backend", choices=("auto", *BACKENDS), default=None)
    imp.add_argument("--refine", action="store_true", help="with --analyze: refine ambiguous pixels with the GMVAE")
    imp.add_argument("--method", action="append", metavar="NAME", default=[],
                     help="with --analyze: classic method on the result (repeatable): normalize, lcf, edge50, peak, "
                          "masks, kmeans, rum_tv, rum_pnp")
    imp.add_argument("--json", action="store_true", help="print every outcome as JSON at the end")
    add_refine_options(imp)


def _selection(text: str) -> tuple[str, str]:
    """``--select NAME=VALUE``."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. entry=entry2), got {text!r:.80}")
    return name.strip(), value


def parse_energies(value: str | None) -> list[float] | str | None:
    """``--energies``: an existing file stays a path; else a comma-separated list of eV values."""
    if value is None or Path(value).exists():
        return value
    try:
        return [float(v) for v in value.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--energies {value!r:.80} is neither a file nor a comma-separated list of eV values") \
            from None


def run(args: argparse.Namespace) -> int:
    raw = check_raw_path(args.raw)
    if (args.refine or args.method) and not args.analyze:
        raise ValueError("--refine and --method act on the analysis: add --analyze")
    options = asdict(ImportOptions(raw=raw, references=args.references, format=args.format,
                                   energies=parse_energies(args.energies), mode=args.mode, sample=args.sample,
                                   soc=args.soc, external=not args.copy_images, select=dict(args.select),
                                   replace_incomplete=args.replace_incomplete).validate())
    steps = _analysis_steps(args, raw) if args.analyze else ()
    outcomes, jobs = [], []
    with tiled_client(args, readable_storage=args.readable_storage) as (client, uri):
        ensure_container(client, raw, lambda made: print(f"created container {made.item['id']!r} under "
                                                          f"{made.uri.rsplit('/', 1)[0]}", file=sys.stderr))
        context = JobContext(client=client)
        for path in args.files:
            outcome = import_file(context, path, options)
            outcomes.append(outcome.as_dict())
            _print_import(path, outcome)
            if outcome.ok and steps and not _analysed(client, args.root, outcome):
                jobs.append(Job(outcome.run_uid, steps))
        report = run_jobs(jobs, uri, api_key=workers_api_key(uri), on_done=print_job_outcome) if jobs else None
    failed = sum(not o["status"] == "complete" for o in outcomes)
    if report is not None:
        skipped = [o for o in report.failures if o["status"] == "skipped"]
        failed += len(report.failures) - len(skipped)
    else:
        skipped = []
    if args.json:
        print(json.dumps({"imports": outcomes, "analyses": report.as_dict() if report else None}, indent=2,
                         default=str))
    return EXIT_FAILED if failed else EXIT_SKIPPED if skipped else EXIT_COMPLETE


def _analysis_steps(args: argparse.Namespace, raw: str) -> tuple[tuple[str, dict], ...]:
    steps = [("reprocess", asdict(ReprocessOptions(root=args.root, backend=args.backend, raw=raw).validate()))]
    if args.refine:
        steps.append(("refine", asdict(refine_options(args))))
    if args.method:
        steps.append(("methods", asdict(MethodsOptions(methods=tuple(args.method), root=args.root).validate())))
    return tuple(steps)


def _analysed(client, root: str, outcome) -> bool:
    """Whether an already imported run has a complete result (it is not analysed again)."""
    if not outcome.details.get("already_imported"):
        return False
    try:
        return client[root][outcome.run_uid].metadata.get("status") == "complete"
    except KeyError:
        return False


def _print_import(path: str, outcome) -> None:
    details = outcome.details
    if not outcome.ok:
        print(f"{path}: error: {outcome.reason}", file=sys.stderr, flush=True)
        return
    if details.get("already_imported"):
        print(f"{path}: already imported {outcome.run_uid}", flush=True)
        return
    where = (f"images left in {details.get('images_in', 'their file')}" if details.get("images") == "external"
             else "images written into Tiled")
    note = f"; {details['copy_reason']}" if details.get("copy_reason") else ""
    print(f"{path}: imported {outcome.run_uid} ({where}{note})", flush=True)
