"""Post-scan self-supervised denoising of a run's OD cube, and the PCC phase maps of the denoised OD.

:func:`denoise_result` reads the result's ``od`` (E, Y, X), sends it to the model server's
``denoise`` operation (a denoise artifact, ``denoise-stxm-synthetic`` by default; no TensorFlow in
this process), writes ``denoised`` (E, Y, X) into the same result and recomputes the PCC maps from
it with the live analysis's kernels, the run's reference values and the live particle ``mask``
(:func:`~phasestream.jobs.maps.pcc_phase_maps`): ``pcc_denoised``, ``phase_denoised``,
``reliability_denoised``, ``ambiguous_denoised`` and the metadata ``phase_fractions_denoised`` and
``ambiguous_fraction_denoised``, beside the live maps, which it never touches. The record
``denoising: {status, reason, model, version, sha256, fine_tune_steps, components, seconds, ...}``
says what was done (docs/contract.md).

It runs after a scan whose start document asks for it (``phasestream: {denoise: true}`` or
``{denoise: {model, version, fine_tune_steps}}``, parsed into ``RunSettings.denoise``), or with
``phasestream reprocess --denoise UID``. Like the refinement, the arrays of an earlier denoising
are removed first and whenever this one does not complete, so the ``*_denoised`` arrays always
belong to the ``complete`` record beside them; a model server that is down or without the model
records ``skipped`` and the reason, a malformed request or a model-server error ``failed``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from phasestream.contract import USABLE_STATUSES, JobOutcome
from phasestream.contract.denoise import (
    DEFAULT_DENOISE_MODEL,
    DENOISING_ARRAYS,
    MAX_FINE_TUNE_STEPS,
    DenoiseRequest,
    averaging_settings,
)
from phasestream.contract.metadata import recorded_energies
from phasestream.jobs.context import JobContext
from phasestream.jobs.heartbeat import HEARTBEAT_SECONDS, STALE_AFTER, JobHeartbeat, JobRunningError
from phasestream.jobs.keeping import KeptJob, run_keeping
from phasestream.jobs.maps import pcc_phase_maps, result_reference_values
from phasestream.jobs.record import model_client as jobs_model_client
from phasestream.kernels.phases import DEFAULT_AMBIGUITY, phase_fractions
from phasestream.modelserver.client import ModelClient
from phasestream.modelserver.protocol import DEFAULT_MODEL_ADDRESS, ModelServerError, ModelServerUnavailable
from phasestream.store.readback import ReadBackError, read_back
from phasestream.store.results import ResultWriter

__all__ = ["DENOISING", "DenoiseOptions", "DenoisingSkipped", "denoise_result", "run"]

logger = logging.getLogger(__name__)

#: the denoising as a job that keeps its complete record through a re-run (jobs/keeping.py)
DENOISING = KeptJob("denoising", DENOISING_ARRAYS,
                    {"phase_fractions_denoised": {}, "ambiguous_fraction_denoised": None})


class DenoisingSkipped(RuntimeError):
    """A prerequisite of the denoising is missing (no OD cube, no model, an unusable PCC result)."""


@dataclass
class DenoiseOptions:
    """Options of the denoising job (validated by :meth:`validate`).

    model, version, fine_tune_steps : the request (:class:`~phasestream.contract.denoise.DenoiseRequest`)
    error : why a start document's request is malformed: the job records it as ``failed``
    address, timeout, retries : the model server, seconds to wait for the denoised stack, retries
    ambiguity : reliability below this marks a denoised pixel ambiguous (the live default)
    backend : kernel backend of the PCC maps (default ``PHASESTREAM_BACKEND``)
    heartbeat_seconds, stale_after : the ``running`` record's heartbeat, and how long one found without a
        heartbeat waits before it is taken as interrupted (as for the refinement, :mod:`phasestream.jobs.heartbeat`)
    """

    model: str = DEFAULT_DENOISE_MODEL
    version: str | None = None
    fine_tune_steps: int = 0
    error: str = ""
    address: str = DEFAULT_MODEL_ADDRESS
    root: str = "phasestream"
    timeout: float = 600.0
    retries: int = 0
    ambiguity: float = DEFAULT_AMBIGUITY
    backend: str | None = None
    heartbeat_seconds: float = HEARTBEAT_SECONDS
    stale_after: float = STALE_AFTER

    def validate(self) -> DenoiseOptions:
        if not 0 <= int(self.fine_tune_steps) <= MAX_FINE_TUNE_STEPS:
            raise ValueError(f"fine_tune_steps must be in 0..{MAX_FINE_TUNE_STEPS}, got {self.fine_tune_steps}")
        if self.timeout <= 0 or self.ambiguity < 0 or self.heartbeat_seconds <= 0 or self.stale_after <= 0:
            raise ValueError("timeout, heartbeat_seconds and stale_after must be > 0 and ambiguity >= 0")
        return self

    def requested(self, request: DenoiseRequest) -> DenoiseOptions:
        """These options (the server, the root) with a start document's request."""
        return DenoiseOptions(**{**asdict(self), **asdict(request)})

    def retry_command(self, run_uid: str) -> str:
        version = f" --denoise-version {self.version}" if self.version else ""
        return (f"phasestream reprocess --root {self.root} --refine-only --denoise --models {self.address} "
                f"--denoise-model {self.model}{version} --fine-tune-steps {self.fine_tune_steps} {run_uid}")


def denoise_result(tiled_client, run_uid: str, options: DenoiseOptions | None = None, *,
                   model_client: ModelClient | None = None) -> dict[str, Any]:
    """Denoise the OD cube of ``run_uid``'s result and map its phases; returns the ``denoising`` record written.

    Never raises for a run that cannot be denoised (the reason is recorded). Raises ``KeyError`` when
    the run has no result at all, and :class:`~phasestream.jobs.heartbeat.JobRunningError` (nothing written)
    when another denoising of it is at work.
    """
    opts = options or DenoiseOptions()
    def work(writer: ResultWriter, client: ModelClient, ready: Callable[[], ResultWriter],
             beat: JobHeartbeat) -> dict[str, Any]:
        return _denoise(writer, client, opts, ready, beat)

    return run_keeping(tiled_client, run_uid, DENOISING, work, root=opts.root, retry=opts.retry_command(run_uid),
                       model=opts.model,
                       heartbeat_seconds=opts.heartbeat_seconds, stale_after=opts.stale_after,
                       models=jobs_model_client(opts, model_client),
                       skipped=(DenoisingSkipped, ModelServerUnavailable), failed=(ModelServerError, ValueError),
                       extra={"model": opts.model, "version": opts.version, "fine_tune_steps": opts.fine_tune_steps})


def _model_info(client: ModelClient, opts: DenoiseOptions) -> dict[str, Any]:
    # a short first request: a server that is down is found out in seconds, not after the denoising timeout
    found = [m for m in client.list_models(timeout=min(5.0, opts.timeout))
             if m["name"] == opts.model and (opts.version is None or m["version"] == opts.version)]
    if not found:
        what = opts.model + (f" {opts.version}" if opts.version else "")
        raise DenoisingSkipped(f"the model server at {opts.address} has no model {what!r}")
    return found[-1]


def _denoise(writer: ResultWriter, client: ModelClient, opts: DenoiseOptions,
             ready: Callable[[], ResultWriter], beat: JobHeartbeat) -> dict[str, Any]:
    if opts.error:
        return {"status": "failed", "reason": opts.error}
    opts.validate()
    md = writer.metadata
    if md.get("status") not in USABLE_STATUSES:
        raise DenoisingSkipped(f"the PCC result is {md.get('status')!r}, not complete or partial")
    arrays = writer.container
    if "od" not in arrays:
        raise DenoisingSkipped("the result has no OD cube (the worker ran with --no-od)")
    if "mask" not in arrays:
        raise DenoisingSkipped("the result has no particle mask")
    n, energies = recorded_energies(writer.path, md)
    if n < 2:
        raise DenoisingSkipped(f"the result has {n} OD images; denoising needs at least 2")
    ref_values = result_reference_values(md, energies)
    if ref_values is None:
        raise DenoisingSkipped(f"the run's reference values are neither stored in the result nor loadable by name "
                               f"({(md.get('references') or {}).get('name')!r})")
    info = _model_info(client, opts)
    od = np.asarray(arrays["od"][:n], np.float32)
    reply = client.denoise(opts.model, od, version=info["version"], fine_tune_steps=opts.fine_tune_steps,
                           timeout=opts.timeout)
    denoised = np.asarray(reply["array"], np.float32)
    if denoised.shape != od.shape:
        raise ValueError(f"the model server returned a stack of shape {denoised.shape} for an OD cube of {od.shape}")
    averaging = averaging_settings(reply.get("shape_averaging"))
    denoised = np.where(np.isfinite(od), denoised, np.float32(np.nan))  # a masked pixel stays unmeasured
    mask = arrays["mask"].read().astype(bool)
    maps = pcc_phase_maps(denoised, ref_values, mask, ambiguity=opts.ambiguity, backend=opts.backend)
    written = {"denoised": denoised, **{f"{name}_denoised": a for name, a in maps.items()}}
    writer = ready()
    writer.write_maps(**written)
    try:
        digests = read_back(writer, written)  # every array, bit for bit, in bounded blocks
    except ReadBackError as error:
        return {"status": "failed", "reason": f"denoised arrays did not read back from Tiled: {error}"}
    fr = phase_fractions(maps["phase"], mask, maps["ambiguous"], len(writer.phases))
    with beat.paused():  # the model entry alone: what other jobs added to models meanwhile stays
        writer.update_entries({"models": {info["name"]: {"version": info["version"], "sha256": info["sha256"]}}},
                              phase_fractions_denoised=fr.as_dict(writer.phases) if fr.n_particle else {},
                              ambiguous_fraction_denoised=float(fr.ambiguous) if fr.n_particle else None)
    return {"status": "complete", "reason": "", "model": info["name"], "version": info["version"],
            "array_sha256": digests,
            "sha256": info["sha256"],
            "fine_tune_steps": int(reply.get("fine_tune_steps", opts.fine_tune_steps)),
            "components": int(reply["components"]),
            "posterior_components": int(reply["posterior_components"]),
            "shape_averaged_components": int(reply["shape_averaged_components"]), "shape_averaging": averaging,
            "model_seconds": float(reply.get("seconds") or 0.0),
            "ambiguity": opts.ambiguity, "mask": "the live result's", "shape": list(denoised.shape)}


def run(context: JobContext, run_uid: str, options: dict) -> JobOutcome:
    """The ``denoise`` job: the denoised OD and its phase maps in ``run_uid``'s result (its ``denoising`` record);
    ``skipped``, nothing written, while another denoising of it is at work."""
    opts = DenoiseOptions(**options)
    try:
        record = denoise_result(context.tiled(), run_uid, opts)
    except JobRunningError as exc:
        return JobOutcome(run_uid, "denoise", "skipped", reason=str(exc), retry=opts.retry_command(run_uid))
    return JobOutcome.from_record(run_uid, "denoise", record)
