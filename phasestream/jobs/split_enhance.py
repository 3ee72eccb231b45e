"""InDI enhancement of one large result split by chunks of energies across Dask workers
(``phasestream.jobs.split``).

:func:`submit_split_enhance` fixes the model version with one probe request, then sends one task per range of
OD planes ``[i0, i1)``: each reads its planes from Tiled, enhances them through the model server and writes
them, one block per plane, into the (E, Y*s, X*s) array staged for its submission
(:mod:`phasestream.jobs.staging`), which becomes ``enhanced/<model>/<version>/<steps>`` only once every block
read back as written; a re-run that does not complete keeps the earlier complete enhancement. While it copies,
``enhancement`` says ``running`` with ``staging``, ``path`` and a heartbeat
(:class:`~phasestream.jobs.heartbeat.JobHeartbeat`): a submitter killed meanwhile leaves a record that the live
worker's sweep, or the next split enhancement, records ``failed`` (interrupted); a split enhancement that finds a
live one is not run.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict
from typing import Any

import numpy as np

from phasestream.contract.metadata import recorded_map
from phasestream.jobs.cluster import dask_task, gather_all, submit_tasks
from phasestream.jobs.enhance import (
    ENHANCED,
    EnhanceOptions,
    enhanced_node,
    enhanced_path,
    enhancement_arrays,
    marked,
    od_images_to_enhance,
    record_enhancement,
    remove_enhanced,
    remove_unverified,
)
from phasestream.jobs.heartbeat import HEARTBEAT_SECONDS, STALE_AFTER, JobHeartbeat, JobRunningError, ensure_not_running
from phasestream.jobs.methods_record import earlier_complete
from phasestream.jobs.record import recorded_job
from phasestream.jobs.split_parts import SplitJobError, od_image_shape, split_ranges
from phasestream.jobs.staging import (
    ArrayLayout,
    Staging,
    StagingError,
    block_digest,
    check_staging_key,
    merged_digests,
)
from phasestream.modelserver.client import ModelClient
from phasestream.modelserver.protocol import ModelRefused, ModelServerError, ModelServerUnavailable
from phasestream.store.results import ResultWriter
from phasestream.store.tiled import connect, separate_api_key

__all__ = ["enhance_planes", "submit_split_enhance"]

logger = logging.getLogger(__name__)


@dask_task
def enhance_planes(tiled_uri: str, run_uid: str, root: str, staging: str, planes: tuple[int, int], options: dict,
                   api_key: str | None = None) -> dict:
    """Dask task: enhance OD planes ``[i0, i1)`` through the model server into blocks ``[i0, i1)`` of the
    ``enhanced`` array staged in the result's container ``staging`` (version and steps fixed in ``options``);
    returns the artifact and the blocks' digests."""
    opts = EnhanceOptions(**options)
    node = connect(tiled_uri, api_key=api_key)[f"{root}/{run_uid}"]
    od, out = node["od"], node[check_staging_key(staging)]["enhanced"]
    info: dict = {}
    digests: dict = {}
    with ModelClient(opts.address, timeout=opts.timeout, retries=opts.retries) as models:
        for i in range(*planes):
            reply = models.enhance(opts.model, np.asarray(od[i], np.float32), domain="od", version=opts.version,
                                   steps=opts.steps, allow_low_gain=opts.allow_low_gain)
            plane = np.ascontiguousarray(reply["array"][np.newaxis], np.float32)
            out.write_block(plane, block=(i, 0, 0))
            digests[(i, 0, 0)] = block_digest(plane)
            info = {k: reply[k] for k in ("model", "version", "sha256", "steps")}
    return {"planes": list(planes), **info, "digests": {"enhanced": digests}}


def _staged_enhancement(dask, writer: ResultWriter, uri: str, api_key: str | None, opts: EnhanceOptions,
                        probe: dict[str, Any], n: int, parts: int, retries: int, beat: JobHeartbeat) -> dict[str, Any]:
    """The enhancement of ``n`` OD planes by the artifact ``probe`` names, staged, read back, then copied to
    its path, its ``running`` record beaten by ``beat`` meanwhile; its record (failed: with the earlier complete
    one of the same path as ``kept`` while that array is untouched)."""
    path = enhanced_path(probe["model"], probe["version"], probe["steps"])
    earlier = earlier_complete(recorded_map(writer.metadata, "enhancements"), path.removeprefix(f"{ENHANCED}/"))
    scale = probe["array"].shape[-1] // 8
    staging, replacing = None, False
    try:
        ny, nx = od_image_shape(writer, n)
        shape = (n, ny * scale, nx * scale)
        layout = ArrayLayout(shape, ((1,) * n, (shape[1],), (shape[2],)), np.dtype(np.float32), ("energy", "y", "x"))
        staging = Staging(writer.container, {"enhanced": layout}, job=f"split enhancement {path} of {writer.path}")
        staging.create()
        ranges = split_ranges(n, parts)
        task_opts = {**asdict(opts), "version": probe["version"], "steps": probe["steps"]}
        futures = submit_tasks(dask, enhance_planes, [(uri, writer.run_uid, opts.root, staging.key, r, task_opts,
                                                       api_key) for r in ranges],
                               retries=retries, tag=f"enhance-{writer.run_uid}")
        chunks = gather_all(futures, [f"enhancement part {i}" for i in range(len(ranges))], SplitJobError)
        if {c["sha256"] for c in chunks} != {probe["sha256"]}:
            raise SplitJobError(f"chunks were enhanced by different artifacts: {sorted({c['sha256'] for c in chunks})}")
        digests = merged_digests(c["digests"] for c in chunks)
        staging.read_back(digests)
        replacing = True  # from here the earlier array of this path is replaced: the records say so first
        writer.update_metadata(enhancement=beat.running(model=probe["model"], source="od", path=path,
                                                        staging=staging.key,
                                                        reason=f"replacing {path} with the staged enhancement"))
        with beat:  # stopped before recorded_job writes the final record
            with beat.paused():
                parent, key, note = enhanced_node(writer, path)
            staging.copy("enhanced", parent, key, digests)
            staging.verify_copy("enhanced", parent[key], digests)
            staging.remove()
            record = {"status": "complete", "version": probe["version"], "sha256": probe["sha256"],
                      "steps": chunks[0]["steps"], "scale": float(scale), "shape": list(shape), "source": "od",
                      "domain": "od", "path": path,
                      "split": {"parts": len(ranges), "ranges": [list(r) for r in ranges]}}
            if note:
                record["note"] = note
            with beat.paused():
                return record_enhancement(writer, probe, marked(record, probe, opts))
    except (ModelServerError, ValueError, SplitJobError, StagingError) as exc:
        failed = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "version": probe["version"],
                  "steps": probe["steps"], "path": path}
        if replacing:
            remove_enhanced(writer, path)
        elif earlier is not None:
            failed["kept"] = earlier
        return failed
    except Exception:  # recorded by recorded_job as an internal error; no array without its record
        if replacing:
            with contextlib.suppress(Exception):
                remove_enhanced(writer, path)
        raise
    finally:
        if staging is not None:
            staging.remove()


def submit_split_enhance(dask, tiled_uri: str, run_uid: str, options: dict | EnhanceOptions | None = None, *,
                         parts: int = 4, api_key: str | None = None, retries: int = 2,
                         heartbeat_seconds: float = HEARTBEAT_SECONDS, stale_after: float = STALE_AFTER
                         ) -> dict[str, Any]:
    """InDI enhancement of ``run_uid``'s OD planes in ``parts`` chunks of energies on Dask, stitched in Tiled.

    The model version is fixed before the tasks start (one probe request), so every chunk uses the
    same artifact. Returns the ``enhancement`` record written into the result, as
    :func:`~phasestream.jobs.enhance.enhance_result` does (``skipped`` when the model server
    is down or there is no OD cube, ``failed`` when a chunk failed after its retries: with ``kept``, the
    earlier complete enhancement of the same model, version and steps, whose array is untouched). While the
    array is copied in, the ``running`` record beats every ``heartbeat_seconds``; a split enhancement that finds
    another one's live ``running`` record (a heartbeat within ``stale_after`` seconds) returns a ``skipped``
    record without writing it, and finalizes a stale one (``failed``, interrupted) before it runs.
    """
    opts = options if isinstance(options, EnhanceOptions) else EnhanceOptions(**(options or {}))
    opts = opts.validate()
    uri, api_key = separate_api_key(tiled_uri, api_key)
    client = connect(uri, api_key=api_key)
    writer = ResultWriter.open(client, run_uid, root=opts.root)
    retry = f"phasestream reprocess --enhance --split {parts} {run_uid}"
    try:
        ensure_not_running(writer, "enhancement", enhancement_arrays, stale_after=stale_after,
                           job="split enhancement")
    except JobRunningError as exc:
        logger.warning("run %s: split enhancement not run: %s", run_uid, exc)
        return {"status": "skipped", "reason": str(exc), "model": opts.model, "source": "od", "retry": retry}
    remove_unverified(writer)
    beat = JobHeartbeat(client, writer.path, "enhancement", every=heartbeat_seconds)

    def work() -> dict[str, Any]:
        n, skipped = od_images_to_enhance(writer)
        if skipped is not None:
            return skipped
        with ModelClient(opts.address, timeout=opts.timeout, retries=opts.retries) as models:
            models.health(timeout=min(5.0, opts.timeout))
            probe = models.enhance(opts.model, np.zeros((8, 8), np.float32), domain="od", version=opts.version,
                                   steps=opts.steps, allow_low_gain=opts.allow_low_gain)
        return _staged_enhancement(dask, writer, uri, api_key, opts, probe, n, parts, retries, beat)

    return recorded_job(writer, "enhancement", work, skipped=(ModelServerUnavailable, ModelRefused),
                        failed=(ModelServerError, ValueError, SplitJobError),
                        retry=retry,
                        extra={"model": opts.model, "source": "od"})


