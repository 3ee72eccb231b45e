"""``phasestream serve-models``: the model server (GMVAE, InDI) on a 0MQ ROUTER socket."""

from __future__ import annotations

import argparse

from phasestream.app.notify import notify
from phasestream.modelserver.server import add_arguments, config_from_args, serve_models

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    models = subparsers.add_parser("serve-models", help="the model server (GMVAE, InDI) on a 0MQ ROUTER socket")
    add_arguments(models)


def run(args: argparse.Namespace) -> int:
    return serve_models(config_from_args(args),
                        on_ready=lambda ready: notify(ready=True, status=f"serving models at {ready['address']}"))
