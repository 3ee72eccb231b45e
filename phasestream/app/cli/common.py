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

from phasestream.contract import MODES, RunDefaults

__all__ = [
    "NO_TILED",
    "QUIET_AT_DEBUG",
    "SCHEDULER_NEEDS_TILED",
    "add_run_key_options",
    "add_tiled_options",
    "configure_logging",
    "run_defaults",
    "run_reporting_errors",
    "scheduler_option",
    "tiled_client",
    "tiled_uri",
    "workers_api_key",
]

logger = logging.getLogger("phasestream.cli")

SCHEDULER_NEEDS_TILED = ("--scheduler needs --tiled URI (or TILED_URI): the Dask workers cannot reach this "
                         "command's embedded server")
NO_TILED = ("no Tiled server configured: pass --tiled URI, set TILED_URI (for the stack of `phasestream up`: "
            "set -a; . RUN_DIR/phasestream.env; set +a), name a configuration file (--config FILE, "
            "$PHASESTREAM_CONFIG), or give --catalog DIR for an embedded server over that catalog")

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"


# libraries whose debug lines carry request headers (the Tiled API key in ``Authorization``): info at most
QUIET_AT_DEBUG = ("websockets", "httpcore", "httpx", "hpack", "h11", "urllib3")


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (``--workers -1`` made a Dask cluster of no worker that never
    ran a task)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def configure_logging(verbose: int) -> None:
    """Log to stderr: warnings, or info with ``-v``, or debug with ``-vv`` (phasestream's and Tiled's;
    never the HTTP and websocket libraries' debug lines, which show the API key)."""
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for name in QUIET_AT_DEBUG:
        logging.getLogger(name).setLevel(max(level, logging.INFO))


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
                        help="Tiled server URI (default $TILED_URI, its key in $TILED_API_KEY)")
    parser.add_argument("--catalog", metavar="DIR", default=None,
                        help="instead of a Tiled server: an embedded one started for this command over the "
                             "catalog in DIR (persists between commands)")


def tiled_client(args: argparse.Namespace, *, readable_storage=None, wait: float | None = 0.0):
    """``(client, uri)`` for the command: ``--tiled URI`` (else ``TILED_URI``) or an embedded server
    over ``--catalog DIR``. Raises ``ValueError`` (:data:`NO_TILED`) when neither is configured: an
    empty embedded server would answer every question with nothing. ``wait``: seconds to wait for the
    server to answer (None: no limit; 0, for people at a terminal: fail at once)."""
    from phasestream.store.tiled import tiled_session  # see the module docstring

    uri = tiled_uri(args)
    if uri and not args.tiled:
        logger.info("using the Tiled server of TILED_URI (%s): %s", args.loaded.sources["tiled_uri"],
                    uri.split("?")[0])
    if not uri and not args.catalog:
        raise ValueError(NO_TILED)
    return tiled_session(uri, directory=args.catalog, readable_storage=readable_storage, wait=wait)


def add_wait_for_tiled_option(parser: argparse.ArgumentParser) -> None:
    """``--wait-for-tiled SECONDS`` of the long-running commands (``serve``, ``view``); see :func:`tiled_wait`."""
    parser.add_argument("--wait-for-tiled", type=float, default=300.0, metavar="SECONDS",
                        help="wait this long for the Tiled server to answer, logging 'waiting for Tiled at ...' "
                             "with backoff (default 300; -1: no limit; 0: exit at once)")


def tiled_wait(args: argparse.Namespace) -> float | None:
    """``--wait-for-tiled`` as :func:`tiled_client`'s ``wait`` (None: no limit)."""
    return None if args.wait_for_tiled < 0 else args.wait_for_tiled


def tiled_uri(args: argparse.Namespace) -> str | None:
    """The Tiled server of the command: ``--tiled URI``, else ``$TILED_URI`` (the stack's env file sets
    it), unless ``--catalog DIR`` asks for an embedded server; None: an embedded server."""
    if args.tiled or args.catalog:
        return args.tiled
    return args.settings.tiled_uri or None


def scheduler_option(args: argparse.Namespace) -> str | None:
    """``--scheduler`` (default ``PHASESTREAM_DASK_SCHEDULER``): None for none/empty, ``local`` or an
    address; an address needs ``--tiled``."""
    chosen = args.settings.dask_scheduler if args.scheduler is None else args.scheduler
    scheduler = None if (chosen or "").lower() in ("", "none") else chosen
    if scheduler and scheduler.lower() != "local" and not tiled_uri(args):
        raise ValueError(SCHEDULER_NEEDS_TILED)
    return scheduler


def workers_api_key(uri: str) -> str | None:
    """The API key Dask workers need besides ``uri`` (None when the URI carries one)."""
    return None if "api_key=" in uri else os.environ.get("TILED_API_KEY")  # the configuration's, exported


def add_run_key_options(parser: argparse.ArgumentParser) -> None:
    """``--image-key``, ``--energy-key``, ``--i0-key``, ``--mode``: how runs without a ``phasestream`` block
    are analysed, with ``--references`` (docs/any-plan.md)."""
    group = parser.add_argument_group("runs from any plan (no phasestream block; needs --references)")
    group.add_argument("--image-key", default=None, metavar="KEY",
                       help="data key of the images (default: inferred, the only 2-D array field)")
    group.add_argument("--energy-key", default=None, metavar="KEY",
                       help="data key of the energy in eV (default: inferred, the run's only motor)")
    group.add_argument("--i0-key", default=None, metavar="KEY",
                       help="STXM: data key of I0 (default: inferred, the only field named i0/izero; none: I0 "
                            "estimated from the image background)")
    group.add_argument("--mode", choices=MODES, default=None, help="stxm (default) or txm")


def run_defaults(args: argparse.Namespace) -> RunDefaults | None:
    """The :class:`RunDefaults` the options ask for; None without ``--references`` (the key options need it)."""
    given = [f"--{name.replace('_', '-')}" for name in ("image_key", "energy_key", "i0_key", "mode")
             if getattr(args, name) is not None]
    if args.references is None:
        if given:
            raise ValueError(f"{', '.join(given)} describe runs without a phasestream block: they need --references")
        return None
    return RunDefaults(args.references, image_key=args.image_key, energy_key=args.energy_key, i0_key=args.i0_key,
                       mode=args.mode or "stxm")
