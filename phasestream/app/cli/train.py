"""``phasestream train gmvae|indi|denoise``: train a model and write a versioned artifact."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator

from phasestream.app.cli.common import add_tiled_options, scheduler_option, tiled_client, workers_api_key
from phasestream.app.cli.selection import finite_number
from phasestream.contract import check_raw_path
from phasestream.contract.denoise import DEFAULT_DENOISE_MODEL
from phasestream.jobs.frames import PIXEL_SIZE_KEY
from phasestream.jobs.training import (
    DEFAULT_MIN_RELIABILITY,
    DEFAULT_SUPERVISION_WEIGHT,
    SUPERVISIONS,
    check_indi_pairs,
    tiled_indi_pairs,
    tiled_training_set,
    train_artifact,
    train_denoise_artifact,
    train_indi_artifact,
)
from phasestream.models.domain import DOMAINS
from phasestream.models.registry import Artifact
from phasestream.sim.training import synthetic_denoise_stacks, synthetic_indi_pairs, synthetic_training_set

__all__ = ["TILED_SUPERVISION", "add_parser", "run"]

#: ``train gmvae --tiled``'s default supervision (``--synthetic`` trains unsupervised, as the shipped model was)
TILED_SUPERVISION = "pcc"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train a model and write a versioned artifact")
    train_sub = train.add_subparsers(dest="model_kind", required=True)
    _add_gmvae_parser(train_sub)
    _add_indi_parser(train_sub)
    _add_denoise_parser(train_sub)


def _add_gmvae_parser(train_sub: argparse._SubParsersAction) -> None:
    gmvae = train_sub.add_parser("gmvae", help="GMVAE on particle-pixel spectra (simulated, or results in Tiled)")
    add_tiled_options(gmvae)
    source = gmvae.add_mutually_exclusive_group()
    source.add_argument("--synthetic", action="store_true", help="train on simulated scans (phasestream.sim)")
    source.add_argument("--runs", nargs="+", metavar="UID", help="results of these runs in Tiled")
    gmvae.add_argument("--soc", type=finite_number, nargs="+", metavar="X",
                       help="results in Tiled at these states of charge")
    gmvae.add_argument("--root", default="phasestream")
    gmvae.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="extract the runs' spectra on Dask, one task per run: tcp://HOST:8786 or 'local' (a "
                            "LocalCluster); default $PHASESTREAM_DASK_SCHEDULER, else in this process")
    gmvae.add_argument("--retries", type=int, default=2, help="--scheduler: retries of a run's extraction (default 2)")
    gmvae.add_argument("--seed", type=int, default=0)
    gmvae.add_argument("--samples", type=int, default=3, help="--synthetic: simulated samples per state (default 3)")
    gmvae.add_argument("--epochs", type=int, default=15, help="training epochs (default 15, as the shipped model)")
    gmvae.add_argument("--normalization", choices=("feature", "spectrum"), default="feature",
                       help="feature: per-energy standardization, keeps thickness (default); spectrum: shape only")
    gmvae.add_argument("--beta", type=float, default=0.2, help="weight of the KL terms (default 0.2)")
    gmvae.add_argument("--supervision", choices=SUPERVISIONS, default=None,
                       help="pcc: confident PCC labels train the mixture components (semi-supervised; default with "
                            "--tiled); none: unsupervised (default with --synthetic)")
    gmvae.add_argument("--min-reliability", type=float, default=DEFAULT_MIN_RELIABILITY,
                       help="--supervision pcc: the PCC reliability (best minus second-best PCC) a label needs "
                            f"(default {DEFAULT_MIN_RELIABILITY})")
    gmvae.add_argument("--supervision-weight", type=float, default=DEFAULT_SUPERVISION_WEIGHT,
                       help="--supervision pcc: weight of the labels' cross-entropy "
                            f"(default {DEFAULT_SUPERVISION_WEIGHT})")
    gmvae.add_argument("--max-spectra", type=int, default=150_000, help="--synthetic: spectra kept (default 150000)")
    gmvae.add_argument("--name", default=None, help="artifact name (default gmvae-nvpf-synthetic / gmvae-tiled)")
    gmvae.add_argument("--version", default="1.0.0")
    gmvae.add_argument("--out", default=None, help="artifact folder (default: $PHASESTREAM_MODELS or ./models)")
    gmvae.add_argument("--overwrite", action="store_true")


def _add_indi_parser(train_sub: argparse._SubParsersAction) -> None:
    indi = train_sub.add_parser("indi", help="InDI image enhancement from LQ/HQ image pairs")
    add_tiled_options(indi)
    indi_source = indi.add_mutually_exclusive_group()
    indi_source.add_argument("--synthetic", action="store_true", help="train on simulated particle phantoms")
    indi_source.add_argument("--lq", metavar="UID", help="raw run of the low-quality scan in Tiled")
    indi.add_argument("--hq", metavar="UID", help="raw run of the high-quality scan of the same field")
    indi.add_argument("--raw", default="", metavar="PATH",
                      help="Tiled path of the container of the raw runs, e.g. bl/raw (default: the catalog root)")
    indi.add_argument("--domain", choices=DOMAINS, default="od",
                      help="the images the model learns and will enhance: od (-ln(I/I0), what `enhance --source od` "
                           "and `reprocess --enhance` enhance; the default), transmission (I/I0) or counts (raw; "
                           "`enhance --source raw` takes transmission or counts models)")
    indi.add_argument("--open-beam", type=float, nargs=2, metavar=("LQ", "HQ"), default=None,
                      help="open-beam intensity (counts/px) of the LQ and the HQ scan (default: each run's I0 "
                           "column, else estimated from each frame's background); with --domain counts: divide "
                           "each scan by it (scans at different doses)")
    indi.add_argument("--pixel-size", type=float, nargs=2, metavar=("LQ", "HQ"), default=None,
                      help=f"pixel sizes in µm of the LQ and the HQ scan (default: the start documents' "
                           f"{PIXEL_SIZE_KEY})")
    indi.add_argument("--seed", type=int, default=0)
    indi.add_argument("--pairs", type=int, default=24, help="--synthetic: phantom pairs (default 24)")
    indi.add_argument("--iterations", type=int, default=4000, help="training iterations (default 4000)")
    indi.add_argument("--filters", type=int, default=16, help="base filters of the U-Net (paper: 64; default 16)")
    indi.add_argument("--depth", type=int, default=2,
                      help="down-sampling blocks of the U-Net, 1-5 (default 2; --crop must be a multiple of 2**depth)")
    indi.add_argument("--crop", type=int, default=64, help="training crop size (default 64)")
    indi.add_argument("--batch-size", type=int, default=8)
    indi.add_argument("--name", default=None, help="artifact name (default indi-particles-synthetic / indi-tiled)")
    indi.add_argument("--version", default="1.0.0")
    indi.add_argument("--out", default=None, help="artifact folder (default: $PHASESTREAM_MODELS or ./models)")
    indi.add_argument("--overwrite", action="store_true")


def _add_denoise_parser(train_sub: argparse._SubParsersAction) -> None:
    den = train_sub.add_parser("denoise", help="self-supervised denoiser of energy stacks (simulated STXM scans)")
    den.add_argument("--synthetic", action="store_true", required=True,
                     help="train on simulated STXM scans with line-correlated noise")
    den.add_argument("--seed", type=int, default=0)
    den.add_argument("--stacks", type=int, default=10, help="simulated stacks (default 10)")
    den.add_argument("--steps", type=int, default=3000, help="training steps (default 3000)")
    den.add_argument("--filters", type=int, default=16, help="width of the network (default 16)")
    den.add_argument("--name", default=DEFAULT_DENOISE_MODEL)
    den.add_argument("--version", default="1.0.0")
    den.add_argument("--out", default=None, help="artifact folder (default: $PHASESTREAM_MODELS or ./models)")
    den.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    return {"gmvae": train_gmvae, "indi": train_indi, "denoise": train_denoise}[args.model_kind](args)


def _artifact_folder(args: argparse.Namespace) -> str:
    return args.out or next(iter(args.settings.model_folders), "models")


@contextlib.contextmanager
def not_found_refused() -> Iterator[None]:
    """A run or container not found in Tiled (the store's KeyError, its message naming it) as a refused request:
    one error line, exit status 2 (``run_reporting_errors``), not a traceback."""
    try:
        yield
    except KeyError as error:
        raise ValueError(error.args[0] if error.args else str(error)) from error


def train_gmvae(args: argparse.Namespace) -> int:
    """``train gmvae``: on simulated scans, or on the results of runs in Tiled."""
    if args.synthetic:
        if args.soc:
            raise ValueError("train gmvae --synthetic trains on simulated scans: --soc selects results in Tiled "
                             "(give --soc with --tiled URI, or leave it out)")
        data = synthetic_training_set(seed=args.seed, n_samples=args.samples, max_spectra=args.max_spectra)
        name = args.name or "gmvae-nvpf-synthetic"
        supervision = args.supervision or "none"
    else:
        if not (args.soc or args.runs):
            raise ValueError("train gmvae needs --synthetic, or --tiled URI with --soc X ... or --runs UID ...")
        scheduler = scheduler_option(args)
        with tiled_client(args) as (client, uri), not_found_refused():
            data = tiled_training_set(client, state_of_charge=args.soc or (), runs=args.runs or (), root=args.root,
                                      tiled_uri=uri, scheduler=scheduler, retries=args.retries,
                                      api_key=workers_api_key(uri))
        name = args.name or "gmvae-tiled"
        supervision = args.supervision or TILED_SUPERVISION
    print(f"training {name} {args.version} on {len(data.spectra)} spectra at {len(data.energies_eV)} energies "
          f"({data.provenance['source']}, supervision: {supervision})")
    artifact, result = train_artifact(data, _artifact_folder(args), name=name, version=args.version,
                                      epochs=args.epochs, seed=args.seed, normalization=args.normalization,
                                      beta=args.beta, overwrite=args.overwrite, supervision=supervision,
                                      min_reliability=args.min_reliability,
                                      supervision_weight=args.supervision_weight)
    artifact = Artifact.read(artifact.path)
    print(json.dumps({"artifact": str(artifact.path), "name": artifact.name, "version": artifact.version,
                      "sha256": artifact.sha256, "metrics": result.metrics}, indent=2))
    _print_report(result.report)
    return 0


def _print_report(report: dict) -> None:
    """The training report in words: per-phase purity, the held-out refinement gain, the warnings."""
    purity = ", ".join(f"{phase} {value:.2f}" for phase, value in report.get("per_phase_purity", {}).items())
    print(f"cluster purity {report.get('cluster_purity', float('nan')):.3f}; per phase: {purity}")
    if "model_gain" in report:
        runs = len([r for r in report["validation_runs"] if "pixels" in r])
        print(f"held-out refinement gain over PCC on {runs} validation run(s): {report['best_strategy']} "
              f"{report['model_gain']:+.3f} (image neighbours alone, no model: {report['spatial_gain']:+.3f})")
    for text in report.get("warnings", []):
        print(f"WARNING: {text}")


def train_indi(args: argparse.Namespace) -> int:
    """``train indi``: on simulated particle phantoms, or on a low- and a high-quality scan in Tiled."""
    if args.iterations < 1 or args.batch_size < 1 or args.filters < 1:
        raise ValueError("--iterations, --batch-size and --filters must be >= 1")
    if not 1 <= args.depth <= 5:
        raise ValueError(f"--depth must be 1 to 5 down-sampling blocks, got {args.depth}")
    multiple = max(4, 2**args.depth)
    if args.crop < 2 * multiple or args.crop % multiple:
        raise ValueError(f"--crop must be a multiple of {multiple} of at least {2 * multiple} pixels (--depth "
                         f"{args.depth}), got {args.crop}")
    if args.synthetic:
        data = synthetic_indi_pairs(seed=args.seed, n_pairs=args.pairs)
        name = args.name or "indi-particles-synthetic"
    else:
        if not (args.lq and args.hq):
            raise ValueError("train indi needs --synthetic, or --tiled URI with --lq UID --hq UID")
        raw = check_raw_path(args.raw)
        with tiled_client(args) as (client, uri), not_found_refused():
            data = tiled_indi_pairs(client, args.lq, args.hq, tiled_uri=uri, domain=args.domain,
                                    open_beam=args.open_beam, pixel_size=args.pixel_size, raw=raw)
        name = args.name or "indi-tiled"
    check_indi_pairs(data, crop=args.crop)  # every data error before TensorFlow loads
    print(f"training {name} {args.version} on {len(data.hq)} image pair(s) of {data.domain['image']} "
          f"({data.provenance['source']})")
    artifact, result = train_indi_artifact(data, _artifact_folder(args), name=name, version=args.version,
                                           overwrite=args.overwrite, iterations=args.iterations,
                                           base_filters=args.filters, depth=args.depth, seed=args.seed,
                                           crop=args.crop,
                                           batch_size=args.batch_size)
    print(json.dumps({"artifact": str(artifact.path), "name": artifact.name, "version": artifact.version,
                      "sha256": artifact.sha256, "steps": result.steps, "metrics": result.metrics}, indent=2))
    return 0


def train_denoise(args: argparse.Namespace) -> int:
    """``train denoise --synthetic``: the blind-row denoiser on simulated STXM stacks (no clean targets used)."""
    stacks, provenance = synthetic_denoise_stacks(seed=args.seed, n_stacks=args.stacks)
    print(f"training {args.name} {args.version} on {len(stacks)} simulated stacks")
    artifact, result = train_denoise_artifact(stacks, provenance, _artifact_folder(args), name=args.name,
                                              version=args.version, overwrite=args.overwrite, steps=args.steps,
                                              filters=args.filters, seed=args.seed)
    print(json.dumps({"artifact": str(artifact.path), "name": artifact.name, "version": artifact.version,
                      "sha256": artifact.sha256, "metrics": result.metrics}, indent=2))
    return 0
