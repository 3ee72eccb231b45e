"""What every ``phasestream`` command shares: logging, one-line errors, the Tiled session and its options.

Tiled is imported when a command opens a session or reports a Tiled error, not with this module,
so that commands without Tiled (``proxy``, ``status``) start quickly.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

__all__ = [
    "SCHEDULER_NEEDS_TILED",
    "add_tiled_options",
    "configure_logging",
    "run_reporting_errors",
    "scheduler_option",
    "tiled_client",
    "tiled_uri",
    "workers_api_key",
]

logger = logging.getLogger("phasestream.cli")

SCHEDULER_NEEDS_TILED = ("--scheduler needs --tiled URI (or TILED_URI): the Dask workers cannot reach this "
                         "command's embedded server")

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"


def configure_logging(verbose: int) -> None:
    """Log to stderr: warnings, or info with ``-v``, or debug with ``-vv``."""
    logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)], format=LOG_FORMAT)


def run_reporting_errors(command: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``run(args)``; a refused request (bad value, missing file, Tiled unreachable or the key wrong) is one
    line ``phasestream COMMAND: error: ...`` on stderr and exit status 2, without a traceback.
    """
    try:
        return run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"phasestream {command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from phasestream.store.tiled import describe_tiled_error  # see the module docstring

        message = describe_tiled_error(exc)
        if message is None:
            raise
        print(f"phasestream {command}: error: {message}", file=sys.stderr)
        return 2


def add_tiled_options(parser: argparse.ArgumentParser) -> None:
    """``--tiled URI`` and ``--catalog DIR``: which Tiled server the command uses."""
    parser.add_argument("--tiled", metavar="URI", default=None,
                        help="Tiled server URI (default $TILED_URI, its key in $TILED_API_KEY; without either "
                             "and with --catalog: an embedded server started for this command)")
    parser.add_argument("--catalog", metavar="DIR", default=None,
                        help="directory of the embedded server's catalog (persists between commands)")


def tiled_client(args: argparse.Namespace, *, readable_storage=None):
    """``(client, uri)`` for the command: ``--tiled URI`` or an embedded server (``--catalog DIR``)."""
    from phasestream.store.tiled import tiled_session  # see the module docstring

    uri = tiled_uri(args)
    if uri and not args.tiled:
        logger.info("using the Tiled server of TILED_URI: %s", uri.split("?")[0])
    return tiled_session(uri, directory=args.catalog, readable_storage=readable_storage)


def tiled_uri(args: argparse.Namespace) -> str | None:
    """The Tiled server of the command: ``--tiled URI``, else ``$TILED_URI`` (the stack's env file sets
    it), unless ``--catalog DIR`` asks for an embedded server; None: an embedded server."""
    if args.tiled or args.catalog:
        return args.tiled
    return os.environ.get("TILED_URI") or None


def scheduler_option(args: argparse.Namespace) -> str | None:
    """``--scheduler``: None for none/empty, ``local`` or an address; an address needs ``--tiled``."""
    scheduler = None if (args.scheduler or "").lower() in ("", "none") else args.scheduler
    if scheduler and scheduler.lower() != "local" and not tiled_uri(args):
        raise ValueError(SCHEDULER_NEEDS_TILED)
    return scheduler


def workers_api_key(uri: str) -> str | None:
    """The API key Dask workers need besides ``uri`` (None when the URI carries one)."""
    return None if "api_key=" in uri else os.environ.get("TILED_API_KEY")
