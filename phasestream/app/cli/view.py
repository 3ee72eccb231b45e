"""``phasestream view``: the web view of the phase-mapping results in Tiled, following running scans live."""

from __future__ import annotations

import argparse
import json
import logging

from phasestream.app.cli.common import add_tiled_options, add_wait_for_tiled_option, tiled_client, tiled_wait
from phasestream.app.notify import notify

__all__ = ["add_parser", "run"]

log = logging.getLogger("phasestream.cli")

PUBLIC_WARNING = ("phasestream view: warning: --public serves the results to every host that reaches {host}:{port}, "
                  "without asking for a key (read-only; the Tiled API key stays on this host)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    view = subparsers.add_parser("view", help="web view of the results, live (http://127.0.0.1:8010 by default)")
    add_tiled_options(view)
    view.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; 0.0.0.0 with --public)")
    view.add_argument("--port", type=int, default=8010, help="port (default 8010; 0 picks a free one)")
    view.add_argument("--root", default="phasestream", help="results container (default phasestream)")
    add_wait_for_tiled_option(view)
    view.add_argument("--public", action="store_true",
                      help="listen on every interface (read-only view, no login): only on a trusted network")
    view.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                      help="a Host name the view answers besides 127.0.0.1 and localhost when it listens on "
                           "loopback (a reverse proxy's public name; repeatable)")


def run(args: argparse.Namespace) -> int:
    from phasestream.app.view import run_view  # starlette and uvicorn only for this command
    from phasestream.app.view.server import is_loopback, url_host

    host = (args.host or ("0.0.0.0" if args.public else "127.0.0.1")).removeprefix("[").removesuffix("]")  # [::1]
    if args.public or not is_loopback(host):  # on loopback (::1 too) the Host guard is on: allowed_hosts
        import sys

        print(PUBLIC_WARNING.format(host=host, port=args.port), file=sys.stderr)

    def ready(bound_host: str, bound_port: int) -> None:
        url = f"http://{url_host(bound_host)}:{bound_port}/"
        print(json.dumps({"ready": True, "url": url}), flush=True)
        notify(ready=True, status=f"serving {url}")

    with tiled_client(args, wait=tiled_wait(args)) as (client, _):
        run_view(client, host=host, port=args.port, root=args.root, ready=ready, extra_hosts=args.allow_host)
    return 0
