"""``phasestream query``: list phase-mapping results in Tiled."""

from __future__ import annotations

import argparse
import json

from phasestream.app.cli.common import add_tiled_options, tiled_client
from phasestream.app.cli.selection import add_selection_options, run_query
from phasestream.contract import STATUSES
from phasestream.store.catalog import find, result_rows

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    query = subparsers.add_parser("query", help="list phase-mapping results, e.g. --soc 2.0")
    add_tiled_options(query)
    add_selection_options(query, "results")
    query.add_argument("--status", choices=STATUSES, default=None)
    query.add_argument("--root", default="phasestream", help="results container (default phasestream)")
    query.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    query = run_query(args)  # a refused selection before any Tiled is asked (or started: --catalog)
    with tiled_client(args) as (client, _):
        rows = result_rows(find(client, query, status=args.status, root=args.root))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_rows(rows)
    return 0


def print_rows(rows: list[dict]) -> None:
    """One line per result: run (``.f<index>`` for a field of a run imaged at several positions), scan, state of
    charge, status, phase fractions, ambiguous fraction."""
    if not rows:
        print("no results")
        return
    phases = rows[0]["phases"]
    header = f"{'run uid':<13} {'scan':>5} {'SoC':>5} {'status':<9}"
    print(header + "".join(f"{p:>8}" for p in phases) + f"{'ambig':>8}")
    for r in rows:
        fr = "".join(f"{100 * r['phase_fractions'].get(p, 0.0):7.1f}%" for p in phases)
        amb = r["ambiguous_fraction"]
        soc = r["state_of_charge"]
        run = r["run_uid"][:8] + ("" if r.get("field") is None else f".f{r['field']}")
        print(f"{run:<13} {r['scan_id'] or '':>5} {'' if soc is None else f'{soc:.2f}':>5} "
              f"{r['status'] or '':<9}{fr}{'' if amb is None else f'{100 * amb:7.1f}%':>8}")
