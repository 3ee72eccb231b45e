"""The ``phasestream`` command: one module of this package per subcommand.

Each command module has ``add_parser(subparsers)``, which adds its subcommand(s) with their options,
and ``run(args) -> int``, which does the work and returns the exit status. Modules are imported when
their command runs, so ``phasestream proxy`` starts without loading Tiled, Dask or TensorFlow; the
full parser (every command) is built for ``phasestream --help`` and for an unknown command.

Every command reads one configuration (:mod:`phasestream.app.settings`): its options, then the
environment (``TILED_URI``, ``TILED_API_KEY``, ``PHASESTREAM_*``), then the file of ``--config FILE``
or ``$PHASESTREAM_CONFIG``; ``args.settings`` holds it. A command that talks to Tiled uses
``--tiled URI`` or ``TILED_URI``; it starts an embedded server only when given ``--catalog DIR``
(``demo`` starts one of its own), and says so when none is configured.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from phasestream.app.cli.common import configure_logging, run_reporting_errors

__all__ = ["COMMANDS", "build_parser", "main"]

# subcommand -> the module of this package that defines it, in the order of `phasestream --help`
COMMANDS = {
    "demo": "demo",
    "references": "references",
    "serve": "serve",
    "serve-models": "serve_models",
    "train": "train",
    "query": "query",
    "view": "view",
    "reprocess": "reprocess",
    "import": "importing",
    "enhance": "enhance",
    "up": "stack",
    "status": "stack",
    "down": "stack",
    "proxy": "proxy",
    "restart": "stack",
    "config": "config",
    "deploy": "config",
}


def command_module(command: str) -> ModuleType:
    """The module of this package that defines ``command``."""
    return importlib.import_module(f"{__name__}.{COMMANDS[command]}")


def build_parser(commands: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """The ``phasestream`` parser with the subcommands ``commands`` (default: all of them)."""
    parser = argparse.ArgumentParser(prog="phasestream", description="Streaming phase mapping for X-ray "
                                     "spectromicroscopy (STXM / TXM-XANES).")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="configuration file: an env file (KEY=VALUE, e.g. deploy/env/phasestream.env) or TOML "
                             "(default $PHASESTREAM_CONFIG); options and the environment win over it")
    # a parser of some commands still names them all in its usage line
    metavar = None if commands is None else "{" + ",".join(COMMANDS) + "}"
    sub = parser.add_subparsers(dest="command", required=True, metavar=metavar)
    for module in dict.fromkeys(COMMANDS[command] for command in commands or COMMANDS):
        importlib.import_module(f"{__name__}.{module}").add_parser(sub)
    return parser


def _command_to_run(argv: list[str]) -> tuple[str] | None:
    """``(command,)`` when ``argv`` runs a known command, so only its module is imported; else None (all).

    None too for ``phasestream --help ...``, and for an unknown or missing command: the full
    parser lists them all.
    """
    words = iter(argv)
    for word in words:
        if word in ("-h", "--help"):
            return None
        if word == "--config":
            next(words, None)  # its value
        elif not word.startswith("-"):
            return (word,) if word in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    """Run ``phasestream ARGV``; the exit status (2 with a one-line error for a refused request)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_to_run(argv))
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    return run_reporting_errors(args.command, _configured(command_module(args.command).run), args)


def _configured(run):
    """``run`` after loading the configuration into ``args.settings`` (its file's values exported)."""
    def configured(args: argparse.Namespace) -> int:
        from phasestream.app.settings import export, load_settings

        args.loaded = load_settings(args.config)
        args.settings = args.loaded.settings
        export(args.loaded)
        return run(args)

    return configured
