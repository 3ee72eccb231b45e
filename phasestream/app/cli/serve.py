"""``phasestream serve``: the live analysis worker on a 0MQ document stream.

It prints one JSON line ``{"ready": true, ...}`` once connected to the proxy, and ``{"stopped":
true, "stats": ...}`` when SIGTERM has stopped it (:class:`~phasestream.app.process.ServiceProcess`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
from pathlib import Path

from phasestream.app.cli.common import (
    add_run_key_options,
    add_tiled_options,
    add_wait_for_tiled_option,
    positive_int,
    run_defaults,
    scheduler_option,
    tiled_client,
    tiled_wait,
)
from phasestream.app.cli.postscan import (
    add_enhance_and_denoise_options,
    add_refine_options,
    denoise_options,
    enhance_options,
    methods_base,
    refine_options,
)
from phasestream.app.live import LiveService
from phasestream.app.notify import notify
from phasestream.callbacks.phase_map import DEFAULT_MAX_OPEN_RUNS
from phasestream.contract import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_NUM_POINTS, DocumentBounds, check_raw_path
from phasestream.jobs.executors import DaskExecutor
from phasestream.kernels.backend import BACKENDS
from phasestream.references import REFERENCE_FOLDERS_ENV
from phasestream.store.odstore import check_od_store
from phasestream.transport.wire import DEFAULT_MAX_MESSAGE_SIZE, parse_byte_size
from phasestream.transport.worker import DocumentWorker

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="live analysis worker on a 0MQ document stream")
    add_tiled_options(serve)
    _add_stream_options(serve)
    _add_storage_options(serve)
    add_refine_options(serve)
    add_enhance_and_denoise_options(serve)
    serve.add_argument("--no-refine", action="store_true", help="no GMVAE refinement after each run")
    serve.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="Dask scheduler of the post-scan jobs, e.g. tcp://HOST:8786, or 'local' (a LocalCluster "
                            "of --workers processes); default $PHASESTREAM_DASK_SCHEDULER, else 'none': a thread of "
                            "this worker")
    serve.add_argument("--workers", type=positive_int, default=1,
                       help="--scheduler local: worker processes (default 1)")
    serve.add_argument("--retries", type=int, default=2, help="Dask retries of a failed post-scan job (default 2)")


def _partial_budget(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"--partial-budget must be a fraction in (0, 1] or 'none', got {text!r}")
    return value


def _add_stream_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--zmq", default=None, metavar="ADDRESS",
                       help="output address of the 0MQ proxy, e.g. tcp://127.0.0.1:5578 (default "
                            "$PHASESTREAM_ZMQ_OUT, else tcp://127.0.0.1:5578)")
    add_wait_for_tiled_option(serve)
    serve.add_argument("--backend", choices=("auto", *BACKENDS), default=None)
    serve.add_argument("--update-every", type=int, default=4, help="partial maps every N images (default 4)")
    serve.add_argument("--update-seconds", type=float, default=2.0, help="... or every T seconds (default 2)")
    serve.add_argument("--partial-budget", type=_partial_budget, default=0.125, metavar="FRACTION",
                       help="partial maps take at most about this fraction of the time: their interval grows with "
                            "their cost, and none is started in a burst of images near the scan's end (default "
                            "0.125; 'none': strictly every --update-every images / --update-seconds)")
    serve.add_argument("--stop-timeout", type=float, default=60.0,
                       help="seconds without documents after which a run without stop is given up (default 60)")
    serve.add_argument("--max-message-size", type=parse_byte_size, metavar="BYTES",
                       default=None,
                       help="largest document message accepted, e.g. 1073741824, 512M or 2G; larger ones are "
                            "dropped by 0MQ before they are read, and a run that loses one is reprocessed from "
                            "Tiled. Default "
                            f"$PHASESTREAM_MAX_MESSAGE_SIZE, else {DEFAULT_MAX_MESSAGE_SIZE >> 20}M")


def _add_storage_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--root", default="phasestream")
    serve.add_argument("--no-od", action="store_true",
                       help="do not write the OD cube live (high frame rates; reprocess adds it later)")
    serve.add_argument("--od-store", default=None, metavar="DIR",
                       help="write the live OD cube as external zarr data in DIR, registered in Tiled, instead of "
                            "uploading it (high frame rates; the Tiled server must be able to read DIR). Default "
                            "$PHASESTREAM_OD_STORE, else upload")
    serve.add_argument("--references-dir", action="append", metavar="DIR",
                       default=None,
                       help="folder whose reference files a start document may name (repeatable); default "
                            "$PHASESTREAM_REFERENCES (os.pathsep-separated). Without one, only registered names")
    serve.add_argument("--asset-dir", action="append", metavar="DIR", default=None,
                       help="folder of detector files (HDF5, .npy) that Resource and StreamResource documents may "
                            "name (repeatable); default $PHASESTREAM_DETECTOR_FILES. Without one, "
                            "no file a document names is read: runs with external images fail with that reason")
    serve.add_argument("--max-num-points", type=int, default=DEFAULT_MAX_NUM_POINTS, metavar="N",
                       help=f"refuse runs whose start document expects more energies (default "
                            f"{DEFAULT_MAX_NUM_POINTS})")
    serve.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                       help=f"refuse images of more pixels (default {DEFAULT_MAX_IMAGE_PIXELS}, 8192^2)")
    serve.add_argument("--max-open-runs", type=positive_int, default=DEFAULT_MAX_OPEN_RUNS, metavar="N",
                       help=f"runs analysed at once; the start of one more is refused, its raw run kept for "
                            f"phasestream reprocess (default {DEFAULT_MAX_OPEN_RUNS})")
    serve.add_argument("--references", default=None, metavar="R",
                       help="analyse runs without a phasestream block (stock plans) against these reference "
                            "spectra (a registered name or a file); their keys are inferred or given below. Runs "
                            "with the block keep their own references")
    add_run_key_options(serve)
    serve.add_argument("--raw", default="", metavar="PATH",
                       help="Tiled path of the container where TiledWriter stores the raw runs, e.g. bl/raw "
                            "(default: the catalog root): results link to them, lost runs are recovered from there")
    serve.add_argument("--readable-storage", nargs="*", default=None, metavar="DIR",
                       help="embedded server only: directories of detector files it may read")


def _configured(args: argparse.Namespace) -> None:
    """Options not given on the command line from the configuration (:mod:`phasestream.app.settings`)."""
    s = args.settings
    args.od_store = s.od_store if args.od_store is None else args.od_store
    args.references_dir = s.reference_folders if args.references_dir is None else args.references_dir
    args.asset_dir = ([s.detector_files] if s.detector_files else []) if args.asset_dir is None else args.asset_dir
    args.max_message_size = s.max_message_size if args.max_message_size is None else args.max_message_size
    args.zmq = s.zmq_out if args.zmq is None else args.zmq


def run(args: argparse.Namespace) -> int:
    _configured(args)
    defaults = run_defaults(args)  # refused before anything starts
    raw = check_raw_path(args.raw)
    refine = None if args.no_refine else refine_options(args)  # (--no-check with --strategy auto, ...)
    enhance, methods, denoise = enhance_options(args), methods_base(args), denoise_options(args)
    scheduler = scheduler_option(args)
    if args.od_store:  # fail now, not at the first image, when the folder cannot be made
        Path(args.od_store).mkdir(parents=True, exist_ok=True)
    readable = [*(args.readable_storage or []), *([args.od_store] if args.od_store else [])]
    wait = tiled_wait(args)
    with tiled_client(args, readable_storage=readable or None, wait=wait) as (client, uri):
        if args.od_store:
            check_od_store(client, args.od_store)
        if raw and raw not in client:  # TiledWriter may create it later: said, not refused
            logger.warning("no container %r of raw runs in Tiled yet (--raw): results link to raw runs there, and "
                           "runs that lose documents are recovered from there", raw)
        folders = [str(Path(f).resolve()) for f in args.references_dir]
        # post-scan jobs (threads, Dask workers started from here) load references by the same rule
        os.environ[REFERENCE_FOLDERS_ENV] = os.pathsep.join(folders)
        bounds = DocumentBounds(max_num_points=args.max_num_points, max_image_pixels=args.max_image_pixels)
        service = LiveService(client, backend=args.backend, update_every=args.update_every,
                              update_seconds=args.update_seconds, partial_budget=args.partial_budget,
                              root=args.root, raw=raw, write_od=not args.no_od,
                              od_store=args.od_store, reference_folders=folders, asset_folders=args.asset_dir,
                              bounds=bounds, defaults=defaults, max_open_runs=args.max_open_runs,
                              stale_after=args.stop_timeout,
                              refine=refine, enhance=enhance, methods=methods, denoise=denoise,
                              scheduler=scheduler, retries=args.retries, dask_workers=args.workers)
        executor = service.executor
        post_scan = f"dask {executor.address}" if isinstance(executor, DaskExecutor) else "thread"
        worker = DocumentWorker(args.zmq, service.callback, listener=service, stop_timeout=args.stop_timeout,
                                max_message_size=args.max_message_size)

        def announce() -> None:
            if worker.connected.wait(60):
                print(json.dumps({"ready": True, "zmq": args.zmq, "tiled": uri.split("?")[0],
                                  "backend": service.callback.backend, "post_scan": post_scan}), flush=True)
                notify(ready=True, status=f"analysing runs from {args.zmq}")

        threading.Thread(target=announce, daemon=True).start()
        try:
            stats = worker.run()
        finally:
            service.close()
    print(json.dumps({"stopped": True, "stats": {k: v for k, v in stats.items() if k != "gaps"}}), flush=True)
    return 0
