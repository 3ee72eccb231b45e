"""Post-scan InDI enhancement of a run's OD images in Tiled.

:func:`enhance_result` reads the OD cube (E, Y, X) of a run's result, sends each energy's image
to the model server's ``enhance`` operation (an InDI artifact; no TensorFlow in this process) and
writes the ``enhanced`` array (E, Y*s, X*s) float32 into the same result with the metadata
``enhancement: {status, model, version, sha256, steps, scale, seconds}`` (and the model under
``models``). Masked (NaN) OD pixels are filled with the image median before enhancement; the
``mask`` of the PCC result still says which pixels are particle.

It runs after a scan when the start document asks for it (``phasestream: {enhance: true}`` or
``{enhance: {model, steps}}``), or with ``phasestream reprocess --enhance UID``. Like the GMVAE
refinement it never spoils the PCC result: a model server that is down or a result without OD
cube records ``status: skipped`` and the reason.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from phasestream.contract import JobOutcome
from phasestream.jobs.context import JobContext
from phasestream.jobs.record import model_client as jobs_model_client
from phasestream.jobs.record import recorded_job
from phasestream.modelserver.client import ModelClient
from phasestream.modelserver.protocol import (
    DEFAULT_MODEL_ADDRESS,
    ModelRefused,
    ModelServerError,
    ModelServerUnavailable,
)
from phasestream.store.results import ResultWriter

__all__ = ["DEFAULT_INDI_MODEL", "EnhanceOptions", "enhance_options_from_start", "enhance_result",
           "od_images_to_enhance", "run"]

logger = logging.getLogger(__name__)

DEFAULT_INDI_MODEL = "indi-particles-synthetic"


@dataclass
class EnhanceOptions:
    """Options of the enhancement job: the InDI artifact, steps (default: the artifact's), server."""

    model: str = DEFAULT_INDI_MODEL
    version: str | None = None
    steps: int | None = None
    address: str = DEFAULT_MODEL_ADDRESS
    root: str = "phasestream"
    timeout: float = 300.0
    retries: int = 0

    def validate(self) -> EnhanceOptions:
        if self.steps is not None and not 1 <= int(self.steps) <= 100:
            raise ValueError(f"steps must be in 1..100, got {self.steps}")
        if self.timeout <= 0:
            raise ValueError("timeout must be > 0")
        return self


def enhance_options_from_start(extra: dict[str, Any], base: EnhanceOptions) -> EnhanceOptions | None:
    """The enhancement a start document's ``phasestream`` block asks for (``enhance``), or None."""
    request = extra.get("enhance")
    if not request:
        return None
    if request is True:
        return base
    if isinstance(request, dict):
        allowed = {k: request[k] for k in ("model", "version", "steps") if k in request}
        return EnhanceOptions(**{**asdict(base), **allowed}).validate()
    raise ValueError(f"phasestream.enhance must be true or {{model, version, steps}}, got {request!r}")


def enhance_result(tiled_client, run_uid: str, options: EnhanceOptions | None = None, *,
                   model_client: ModelClient | None = None) -> dict[str, Any]:
    """Enhance the OD images of ``run_uid``'s result; returns the ``enhancement`` metadata it wrote."""
    opts = (options or EnhanceOptions()).validate()
    writer = ResultWriter.open(tiled_client, run_uid, root=opts.root)
    with jobs_model_client(opts, model_client) as client:
        return recorded_job(writer, "enhancement", lambda: _enhance(writer, client, opts),
                            skipped=(ModelServerUnavailable, ModelRefused),
                            failed=(ModelServerError, ValueError),
                            retry=f"phasestream reprocess --enhance {run_uid}", extra={"model": opts.model})


def od_images_to_enhance(writer: ResultWriter) -> tuple[int, dict[str, Any] | None]:
    """How many OD images the result holds, or 0 and the ``skipped`` record saying why none."""
    if "od" not in writer.container:
        return 0, {"status": "skipped", "reason": "the result has no OD cube (the worker ran with --no-od)"}
    n = int(writer.metadata.get("n_energies_seen") or 0)
    if n == 0:
        return 0, {"status": "skipped", "reason": "the result has no OD image"}
    return n, None


def _enhance(writer: ResultWriter, client: ModelClient, opts: EnhanceOptions) -> dict[str, Any]:
    n, skipped = od_images_to_enhance(writer)
    if skipped is not None:
        return skipped
    md = writer.metadata
    client.health(timeout=min(5.0, opts.timeout))  # a stopped server is found out in seconds
    od = writer.container["od"]
    planes, info = [], None
    for i in range(n):
        plane = np.asarray(od[i], np.float32)
        reply = client.enhance(opts.model, plane, domain="od",
                               version=opts.version if info is None else info["version"], steps=opts.steps)
        info = info or reply
        planes.append(reply["array"])
    enhanced = np.stack(planes).astype(np.float32)
    writer.write_maps(enhanced=enhanced)
    models = dict(md.get("models") or {})
    models[info["model"]] = {"version": info["version"], "sha256": info["sha256"]}
    writer.update_metadata(models=models)
    scale = enhanced.shape[1] / od.shape[1]
    return {"status": "complete", "version": info["version"], "sha256": info["sha256"], "steps": info["steps"],
            "scale": scale, "shape": list(enhanced.shape), "source": "od"}


def run(context: JobContext, run_uid: str, options: dict) -> JobOutcome:
    """The ``enhance`` job: InDI enhancement of the OD images of ``run_uid`` (its ``enhancement`` record)."""
    record = enhance_result(context.tiled(), run_uid, EnhanceOptions(**options))
    return JobOutcome.from_record(run_uid, "enhance", record)
