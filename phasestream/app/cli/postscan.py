"""The post-scan job options ``serve`` and ``reprocess`` share: GMVAE refinement, InDI enhancement, methods,
denoising."""

from __future__ import annotations

import argparse

from phasestream.contract.denoise import DEFAULT_DENOISE_MODEL, MAX_FINE_TUNE_STEPS
from phasestream.jobs.denoise import DenoiseOptions
from phasestream.jobs.enhance import EnhanceOptions
from phasestream.jobs.methods_options import MethodsOptions
from phasestream.jobs.refine import DEFAULT_MODEL, RefineOptions
from phasestream.models.refine import AUTO, STRATEGY_CHOICES
from phasestream.modelserver.protocol import DEFAULT_MODEL_ADDRESS

__all__ = ["add_enhance_and_denoise_options", "add_refine_options", "denoise_options", "enhance_options",
           "methods_base", "model_address", "refine_options"]


def add_refine_options(parser: argparse.ArgumentParser) -> None:
    """The model server, the GMVAE artifact and the latent-space strategy."""
    parser.add_argument("--models", default=None, metavar="ADDRESS",
                        help=f"model server address (default $PHASESTREAM_MODEL_SERVER, else {DEFAULT_MODEL_ADDRESS})")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"GMVAE artifact name (default {DEFAULT_MODEL})")
    parser.add_argument("--model-version", default=None, help="artifact version (default: the highest)")
    parser.add_argument("--strategy", choices=STRATEGY_CHOICES, default=AUTO,
                        help="how ambiguous pixels get a phase in the latent space (default auto: the strategy that "
                             "wins the run's held-out check; mahalanobis is the paper's)")
    parser.add_argument("--min-gain", type=float, default=0.01, metavar="ACC",
                        help="refine only when the strategy beats PCC on held-out pixels by this accuracy "
                             "(default 0.01: one point)")
    parser.add_argument("--no-check", action="store_true",
                        help="no held-out check: apply --strategy (not auto) without showing that it helps")


def add_enhance_and_denoise_options(parser: argparse.ArgumentParser) -> None:
    """The InDI and denoise artifacts and their settings (``serve`` and ``reprocess``; ``import`` runs neither)."""
    parser.add_argument("--indi-model", default="indi-particles-synthetic",
                        help="InDI artifact for enhancement (default indi-particles-synthetic)")
    parser.add_argument("--steps", type=int, default=None, help="InDI steps (default: the artifact's)")
    parser.add_argument("--allow-low-gain", action="store_true",
                        help="InDI: enhance even with a model whose validated gain over bicubic is below 1 dB "
                             "(the record is marked low_gain)")
    parser.add_argument("--denoise-model", default=DEFAULT_DENOISE_MODEL,
                        help=f"denoise artifact for --denoise and runs asking for denoising with `denoise: true` "
                             f"(default {DEFAULT_DENOISE_MODEL})")
    parser.add_argument("--denoise-version", default=None, help="denoise artifact version (default: the highest)")
    parser.add_argument("--fine-tune-steps", type=int, default=0, metavar="N",
                        help="self-supervised fine-tuning steps on the scan before denoising "
                             f"(0-{MAX_FINE_TUNE_STEPS}, default 0)")


def refine_options(args: argparse.Namespace) -> RefineOptions:
    """The GMVAE refinement of the options added by :func:`add_refine_options`."""
    return RefineOptions(model=args.model, version=args.model_version, strategy=args.strategy,
                         min_gain=args.min_gain, check=not args.no_check, address=model_address(args),
                         root=args.root, tiled=getattr(args, "tiled", None) or None).validate()


def model_address(args: argparse.Namespace) -> str:
    """``--models``, else the configuration's model server (``PHASESTREAM_MODEL_SERVER``)."""
    return args.settings.model_server if args.models is None else args.models


def enhance_options(args: argparse.Namespace) -> EnhanceOptions:
    """The InDI enhancement of the options added by :func:`add_enhance_and_denoise_options`."""
    return EnhanceOptions(model=args.indi_model, steps=args.steps, address=model_address(args), root=args.root,
                          allow_low_gain=args.allow_low_gain).validate()


def denoise_options(args: argparse.Namespace) -> DenoiseOptions:
    """The denoising of the options of :func:`add_enhance_and_denoise_options` (a run's own request overrides the
    model)."""
    return DenoiseOptions(model=args.denoise_model, version=args.denoise_version,
                          fine_tune_steps=args.fine_tune_steps, address=model_address(args), root=args.root,
                          backend=getattr(args, "backend", None)).validate()


def methods_base(args: argparse.Namespace) -> MethodsOptions:
    """Base options of the classic methods a run may ask for in its start document."""
    return MethodsOptions(root=args.root).validate()
