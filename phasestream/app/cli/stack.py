"""``phasestream up``, ``status`` and ``down``: the whole service on this host (:mod:`phasestream.app.stack`)."""

from __future__ import annotations

import argparse
import json

from phasestream.app.cli.common import positive_int
from phasestream.app.stack import COMPONENTS, DEFAULT_RUN_DIR, StackConfig, down, restart, status, up

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    _add_up_parser(subparsers)
    st = subparsers.add_parser("status", help="health of each component started by `phasestream up`")
    st.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR))
    st.add_argument("--json", action="store_true")
    rs = subparsers.add_parser("restart", help="restart one component of the stack of `phasestream up` (its "
                                               "supervisor starts it again) and wait until it is healthy")
    rs.add_argument("component", choices=COMPONENTS)
    rs.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR))
    rs.add_argument("--timeout", type=float, default=180.0, help="seconds to wait until it is healthy (default 180)")
    dn = subparsers.add_parser("down", help="stop what `phasestream up` started (SIGTERM, then SIGKILL)")
    dn.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR))
    dn.add_argument("--timeout", type=float, default=30.0, help="seconds to wait after SIGTERM (default 30)")


def _add_up_parser(subparsers: argparse._SubParsersAction) -> None:
    upp = subparsers.add_parser("up", help="start the whole service on this host (Tiled, proxy, models, Dask, worker, "
                                               "live view)")
    upp.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR), help=f"pid files, logs, env file "
                     f"(default {DEFAULT_RUN_DIR})")
    upp.add_argument("--host", default="127.0.0.1", help="address every service binds (default 127.0.0.1)")
    upp.add_argument("--tiled", metavar="URI", default=None, help="use this Tiled server instead of starting one")
    upp.add_argument("--tiled-config", default=None, metavar="PATH",
                     help="Tiled configuration, e.g. deploy/tiled/config.yml (PostgreSQL + Redis); default a "
                          "generated SQLite one in RUN_DIR/tiled")
    upp.add_argument("--tiled-port", type=port_number, default=8000)
    upp.add_argument("--proxy-in-port", type=port_number, default=5577)
    upp.add_argument("--proxy-out-port", type=port_number, default=5578)
    upp.add_argument("--models-port", type=port_number, default=5579)
    upp.add_argument("--scheduler-port", type=port_number, default=8786)
    upp.add_argument("--scheduler-http-port", type=port_number, default=8787,
                     help="the Dask scheduler's health and Prometheus metrics, on --host (default 8787)")
    upp.add_argument("--dask-workers", type=positive_int, default=2, help="Dask worker processes (default 2)")
    upp.add_argument("--view-port", type=port_number, default=8010,
                     help="the live view, http://HOST:PORT/ (default 8010)")
    upp.add_argument("--only", default=None, metavar="NAMES",
                     help=f"comma-separated components to start (default all: {','.join(COMPONENTS)})")
    upp.add_argument("--worker-arg", action="append", metavar="ARG",
                     help="extra argument of `phasestream serve` (repeat; e.g. --worker-arg=--no-refine)")
    upp.add_argument("--models-arg", action="append", metavar="ARG",
                     help="extra argument of `phasestream serve-models` (repeat)")
    upp.add_argument("--timeout", type=float, default=180.0, help="seconds each component may take to start")
    upp.add_argument("--no-supervise", action="store_true",
                     help="no supervisor: a component that dies stays dead (default: started again with backoff)")


def port_number(text: str) -> int:
    """An argparse type: a TCP port from 1 to 65535 (the stack's clients are told each port before it
    starts, so no 0 for "any"; 0MQ bound 70000 as 4464 while the env file said 70000)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    return {"up": run_up, "status": run_status, "down": run_down, "restart": run_restart}[args.command](args)


def run_restart(args: argparse.Namespace) -> int:
    record = restart(args.run_dir, args.component, timeout=args.timeout)
    print(f"{args.component:<13} pid {record['pid']:<8} healthy (restart {record.get('restarts', 0)})")
    return 0


def run_up(args: argparse.Namespace) -> int:
    """Start the components and wait until each is healthy; print where each listens."""
    only = tuple(c.strip() for c in (args.only or ",".join(COMPONENTS)).split(",") if c.strip())
    cfg = StackConfig(run_dir=args.run_dir, host=args.host, tiled_port=args.tiled_port, tiled_uri=args.tiled,
                      tiled_config=args.tiled_config, proxy_in_port=args.proxy_in_port,
                      proxy_out_port=args.proxy_out_port, models_port=args.models_port,
                      scheduler_port=args.scheduler_port, scheduler_http_port=args.scheduler_http_port,
                      dask_workers=args.dask_workers, view_port=args.view_port, components=only,
                      worker_args=tuple(args.worker_arg or ()), models_args=tuple(args.models_arg or ()),
                      start_timeout=args.timeout, supervise=not args.no_supervise).validate()
    state = up(cfg)
    for name, record in state["components"].items():
        print(f"{name:<13} pid {record['pid']:<8} {record['address']}")
    if "supervisor" in state:
        print(f"{'supervisor':<13} pid {state['supervisor']['pid']:<8} restarts components that die")
    print(f"all {len(state['components'])} components healthy; clients: set -a; . {cfg.run_dir}/phasestream.env; "
          f"set +a   (logs in {cfg.run_dir}/logs; stop with: phasestream down --run-dir {cfg.run_dir})")
    return 0


def run_status(args: argparse.Namespace) -> int:
    """One line per component (or JSON); exit status 1 unless every one is healthy."""
    report = status(args.run_dir)
    if args.json:
        print(json.dumps(report, indent=2))
    elif not report:
        print(f"no stack started from {args.run_dir} (phasestream up)")
    else:
        for name, r in report.items():
            print(f"{name:<13} {'healthy' if r['healthy'] else 'UNHEALTHY':<10} pid {r['pid']:<8} {r['detail']}")
    return 0 if report and all(r["healthy"] for r in report.values()) else 1


def run_down(args: argparse.Namespace) -> int:
    """Stop the components, last started first; exit status 1 when one had to be killed."""
    outcome = down(args.run_dir, timeout=args.timeout)
    if not outcome:
        print(f"no stack started from {args.run_dir}")
    for name, what in outcome.items():
        print(f"{name:<13} {what}")
    return 0 if all(v != "killed" for v in outcome.values()) else 1
