"""The options that select runs by their friendly keys, shared by ``query`` (results) and ``reprocess``
(raw runs): ``--soc X [--tolerance T]``, ``--sample NAME``, ``--since T``, ``--until T``, ``--plan NAME``.
"""

from __future__ import annotations

import argparse
import math
from datetime import datetime

from phasestream.store.catalog import RunQuery

__all__ = ["add_selection_options", "finite_number", "parse_time", "parse_tolerance", "run_query"]


def add_selection_options(parser: argparse.ArgumentParser, what: str) -> None:
    """The friendly keys as options; ``what`` names the runs they select (``results``, ``raw runs``)."""
    group = parser.add_argument_group(f"which {what} (all criteria given must match)")
    group.add_argument("--soc", type=finite_number, default=None, metavar="X",
                       help="state of charge: sample.state_of_charge X (Na content x)")
    group.add_argument("--tolerance", type=parse_tolerance, default=0.0, help="--soc: match |SoC - X| <= tolerance")
    group.add_argument("--sample", default=None, metavar="NAME", help="sample.name equal to NAME")
    group.add_argument("--since", type=parse_time, default=None, metavar="T",
                       help="runs started at or after T: ISO 8601 (2026-12-03, 2026-12-03T14:00, local time "
                            "unless it names a zone) or seconds since the epoch")
    group.add_argument("--until", type=parse_time, default=None, metavar="T",
                       help="runs started before T (same forms as --since)")
    group.add_argument("--plan", default=None, metavar="NAME", help="the start document's plan_name, e.g. list_scan")


def run_query(args: argparse.Namespace, start: dict | None = None) -> RunQuery:
    """The :class:`RunQuery` of the options (``start``: more start-document keys and values)."""
    return RunQuery(state_of_charge=args.soc, tolerance=args.tolerance, sample=args.sample, since=args.since,
                    until=args.until, plan=args.plan, start=dict(start or {}))


def finite_number(text: str) -> float:
    """``text`` as a finite float (argparse then names the option): NaN would select no run, inf none."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def parse_tolerance(text: str) -> float:
    """``text`` as a finite float >= 0 (an infinite tolerance would select every run)."""
    value = finite_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def parse_time(text: str) -> float:
    """Seconds since the epoch of ``text``: a number of seconds, or an ISO 8601 date or date and time
    (local time unless it carries a zone: ``Z``, ``+02:00``)."""
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not a time: {text!r} (ISO 8601 such as 2026-12-03 or 2026-12-03T14:00:00, or seconds since the "
                "epoch)") from None
        return (when if when.tzinfo else when.astimezone()).timestamp()
    if not math.isfinite(seconds):
        raise argparse.ArgumentTypeError(f"not a time: {text!r}")
    return seconds
