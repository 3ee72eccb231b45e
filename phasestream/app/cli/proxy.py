"""``phasestream proxy``: the 0MQ proxy from RunEngine publishers to analysis workers.

Prints one JSON line ``{"ready": true, "in_address": ..., "out_address": ...}`` with the bound
addresses (:func:`phasestream.transport.proxy.start_proxy` reads it), and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging

import zmq

from phasestream.app.notify import notify
from phasestream.transport.proxy import run_proxy
from phasestream.transport.wire import DEFAULT_IN_ADDRESS, DEFAULT_OUT_ADDRESS

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    proxy = subparsers.add_parser("proxy", help="forward bluesky documents from publishers to workers (0MQ)")
    proxy.add_argument("--in", dest="in_address", default=DEFAULT_IN_ADDRESS, metavar="ADDRESS",
                       help=f"address publishers connect to (default {DEFAULT_IN_ADDRESS}; port 0 picks one)")
    proxy.add_argument("--out", dest="out_address", default=DEFAULT_OUT_ADDRESS, metavar="ADDRESS",
                       help=f"address workers subscribe to (default {DEFAULT_OUT_ADDRESS}; port 0 picks one)")


def run(args: argparse.Namespace) -> int:
    if args.settings.log_level and not args.verbose:  # the proxy's log level when -v does not say
        logging.getLogger().setLevel(args.settings.log_level.upper())

    def announce(in_address: str, out_address: str) -> None:
        print(json.dumps({"ready": True, "in_address": in_address, "out_address": out_address}), flush=True)
        notify(ready=True, status=f"forwarding {in_address} -> {out_address}")

    try:
        run_proxy(args.in_address, args.out_address, on_ready=announce)
    except zmq.ZMQError as exc:
        raise RuntimeError(f"cannot bind {args.in_address} and {args.out_address}: {exc}") from exc
    return 0
