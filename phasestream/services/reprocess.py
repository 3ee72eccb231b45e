"""Post-scan (re)analysis of raw runs already in Tiled.

A raw run written by TiledWriter is read back the way users read it (``BlueskyRun``:
``run["primary"]["det_img"]``), turned back into the document stream it came from (start,
one descriptor per stream with its original uid and data keys, events merged across streams in
time order, stop) and replayed through a fresh :class:`PhaseMapCallback`. The arithmetic is the
live path's, so a reprocessed result equals the live one.

Post-scan jobs are plain functions of (tiled uri, run uid, options) so that they run the same
in-process, on a Dask worker or from the command line: :func:`reprocess`.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from phasestream.callbacks.phase_map import PhaseMapCallback, RunResult
from phasestream.services.tiled import connect, open_raw_run, raw_run_complete

__all__ = ["ReprocessOptions", "raw_run_documents", "reprocess", "reprocess_run"]

logger = logging.getLogger(__name__)

# event-level columns TiledWriter adds next to the data keys
_EVENT_COLUMNS = ("seq_num", "time")


@dataclass
class ReprocessOptions:
    """Options of a reprocessing job (validated by :meth:`validate`)."""

    root: str = "phasestream"
    backend: str | None = None
    references: str | None = None
    require_complete: bool = True

    def validate(self) -> ReprocessOptions:
        if not self.root or "/" in self.root:
            raise ValueError(f"root must be a single container name, got {self.root!r}")
        return self


def _stream_events(run, stream: str) -> Iterator[tuple[float, int, dict]]:
    node = run[stream]
    md = node.metadata
    data_keys = md.get("data_keys", {})
    columns = {key: node[key].read() for key in data_keys if key in node}
    times = np.asarray(node["time"].read(), dtype=np.float64)
    seq = np.asarray(node["seq_num"].read()) if "seq_num" in node else np.arange(1, len(times) + 1)
    descriptor = md["uid"]
    for i in range(len(times)):
        data = {key: (col[i] if np.ndim(col[i]) else col[i].item()) for key, col in columns.items()}
        yield float(times[i]), int(seq[i]), {
            "uid": f"{descriptor}-{int(seq[i])}",
            "descriptor": descriptor,
            "seq_num": int(seq[i]),
            "time": float(times[i]),
            "data": data,
            "timestamps": dict.fromkeys(data, float(times[i])),
            "filled": {},
        }


def raw_run_documents(run) -> Iterator[tuple[str, dict]]:
    """The document stream of a raw run read from Tiled: start, descriptors, events in time order, stop.

    Image data arrive inline in the events (Tiled has resolved external files), so a
    reprocessed run needs no access to the detector's files.
    """
    start = dict(run.metadata["start"])
    yield "start", start
    streams = list(run)
    for stream in streams:
        md = run[stream].metadata
        yield "descriptor", {
            "uid": md["uid"],
            "run_start": start["uid"],
            "name": stream,
            "time": md.get("time", start["time"]),
            "data_keys": md.get("data_keys", {}),
            "object_keys": {},
            "configuration": {},
            "hints": md.get("hints", {}),
        }
    merged = heapq.merge(*(_stream_events(run, s) for s in streams), key=lambda item: (item[0], item[1]))
    for _, _, event in merged:
        yield "event", event
    stop = run.metadata.get("stop")
    if stop:
        yield "stop", dict(stop)


def reprocess_run(client, run_uid: str, options: ReprocessOptions | None = None) -> RunResult:
    """Recompute the phase maps of one raw run in Tiled; results replace ``<root>/<run_uid>``.

    Raises
    ------
    KeyError
        when the run is not in Tiled.
    RuntimeError
        when the raw run has no stop document yet and ``require_complete`` is set.
    """
    opts = (options or ReprocessOptions()).validate()
    run = open_raw_run(client, run_uid)
    if opts.require_complete and not raw_run_complete(client, run_uid):
        raise RuntimeError(f"raw run {run_uid} is not complete in Tiled yet (no stop document); try again later")
    cb = PhaseMapCallback(client, root=opts.root, backend=opts.backend, references=opts.references,
                          update_every=10**9, update_seconds=float("inf"))
    try:
        for name, doc in raw_run_documents(run):
            cb(name, doc)
        cb.flush(None)
    finally:
        cb.close()
    result = cb.results.get(run_uid)
    if result is None:
        raise RuntimeError(f"run {run_uid} carries no phasestream metadata; pass references= to analyse it")
    logger.info("reprocessed %s: %s", run_uid, result.status)
    return result


def reprocess(tiled_uri: str, run_uid: str, options: dict | ReprocessOptions | None = None) -> dict:
    """Post-scan job: reprocess ``run_uid`` from the raw run at ``tiled_uri``; a JSON-able summary."""
    opts = options if isinstance(options, ReprocessOptions) else ReprocessOptions(**(options or {}))
    result = reprocess_run(connect(tiled_uri), run_uid, opts)
    return {
        "run_uid": run_uid,
        "status": result.status,
        "errors": list(result.errors),
        "phase_fractions": result.metadata.get("phase_fractions", {}),
        "options": asdict(opts),
    }
