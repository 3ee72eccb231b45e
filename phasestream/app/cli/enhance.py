"""``phasestream enhance UID``: InDI enhancement of a run's OD images or raw frames, side by side in its result."""

from __future__ import annotations

import argparse
import json

from phasestream.app.cli.common import add_tiled_options, tiled_client
from phasestream.app.cli.postscan import model_address
from phasestream.contract import check_raw_path
from phasestream.jobs.enhance import DEFAULT_INDI_MODEL, SOURCES, EnhanceOptions, enhance_result
from phasestream.modelserver.protocol import DEFAULT_MODEL_ADDRESS

__all__ = ["EXIT_FAILED", "EXIT_SKIPPED", "add_parser", "run"]

EXIT_FAILED = 1
EXIT_SKIPPED = 3  # as reprocess: 2 is a refused request


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    enhance = subparsers.add_parser("enhance", help="InDI-enhance a run's OD images or raw frames into "
                                                    "enhanced/<model>/<version>/<steps> of its result")
    add_tiled_options(enhance)
    enhance.add_argument("uids", nargs="+", metavar="UID", help="run uids")
    enhance.add_argument("--source", choices=SOURCES, default="od",
                         help="od: the OD images of the run's result (models trained on od); raw: the raw run's "
                              "frames (models trained on transmission or counts; default od)")
    enhance.add_argument("--model", default=DEFAULT_INDI_MODEL, help=f"InDI artifact (default {DEFAULT_INDI_MODEL})")
    enhance.add_argument("--version", default=None, help="artifact version (default: the highest)")
    enhance.add_argument("--steps", type=int, default=None, help="InDI steps (default: the artifact's)")
    enhance.add_argument("--allow-low-gain", action="store_true",
                         help="enhance even with a model whose validated gain over bicubic is below 1 dB (the record "
                              "is marked low_gain)")
    enhance.add_argument("--models", default=None, metavar="ADDRESS",
                         help=f"model server address (default $PHASESTREAM_MODEL_SERVER, else {DEFAULT_MODEL_ADDRESS})")
    enhance.add_argument("--root", default="phasestream", help="results container (default phasestream)")
    enhance.add_argument("--raw", default="", metavar="PATH",
                         help="--source raw: Tiled path of the raw runs' container, e.g. bl/raw (default the root)")
    enhance.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each model-server reply")
    enhance.add_argument("--json", action="store_true", help="print each run's record as JSON")


def run(args: argparse.Namespace) -> int:
    options = EnhanceOptions(model=args.model, version=args.version, steps=args.steps, address=model_address(args),
                             root=args.root, timeout=args.timeout, source=args.source,
                             allow_low_gain=args.allow_low_gain,
                             raw=check_raw_path(args.raw)).validate()
    records = {}
    with tiled_client(args) as (client, _):
        for uid in dict.fromkeys(args.uids):
            try:
                records[uid] = record = enhance_result(client, uid, options)
            except (KeyError, TypeError, ValueError) as exc:  # this run's result: the next runs go on
                reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
                records[uid] = record = {"status": "failed", "reason": f"{type(exc).__name__}: {reason}"}
            if not args.json:
                where = record.get("path") or record.get("reason")
                print(f"{uid}: {record['status']}: {where}", flush=True)
                if record["status"] != "complete" and record.get("retry"):
                    print(f"  retry: {record['retry']}", flush=True)
    if args.json:
        print(json.dumps(records, indent=2, default=str))
    statuses = {r["status"] for r in records.values()}
    return EXIT_FAILED if "failed" in statuses else EXIT_SKIPPED if "skipped" in statuses else 0
