"""Post-scan InDI enhancement of what the user has: a result's OD images, or a raw run's frames.

:func:`enhance_result` sends each image to the model server's ``enhance`` operation (an InDI
artifact; no TensorFlow in this process) and writes the enhanced images side by side, never over
another model's or step count's, at ``enhanced/<model>/<version>/<steps>`` inside the run's result
(docs/contract.md, "Enhanced images"):

* ``source="od"``: the result's OD cube (E, Y, X) -> (E, Y*s, X*s); masked (NaN) OD pixels are
  filled with the image median first (the ``mask`` still says which pixels are particle);
* ``source="raw"``: the raw run's ``primary`` frames (N, Y, X) -> (N, Y*s, X*s), divided by the run's
  open beam when the model was trained on transmission (or on counts per dose), converted to
  ``-ln(I / I0)`` for a model trained on OD. A raw run without a result gets one with status
  ``skipped`` (not analysed) to hold them.

The image's domain is sent with every request and the server refuses a model trained on another
domain (models/domain.py). Each enhancement's record goes under ``enhancements[<model>/<version>/
<steps>]`` and, as the latest one, ``enhancement``. It runs when the start document asks for it
(``phasestream: {enhance: true}`` or ``{enhance: {model, version, steps}}``), with
``phasestream enhance UID`` or ``phasestream reprocess --enhance UID``. Like the GMVAE refinement it
never spoils the PCC result: a model server that is down, a refused model or a result without OD
cube records ``status: skipped`` and the reason. ``complete`` means the array was read back from Tiled bit
for bit as written (``array_sha256``, :mod:`phasestream.store.readback`); one that does not read back is
removed and the record is ``failed``.

:func:`enhance_images` does the same on arrays, for Python users.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from tiled.structures.core import StructureFamily

from phasestream.contract import RUN_UID_PATTERN, InvalidIdentifierError, JobOutcome
from phasestream.contract.metadata import recorded_map
from phasestream.jobs.context import JobContext
from phasestream.jobs.frames import RawFrames, raw_frames
from phasestream.jobs.heartbeat import STALE_AFTER, JobRunningError, ensure_not_running
from phasestream.jobs.record import model_client as jobs_model_client
from phasestream.jobs.record import recorded_job
from phasestream.models.domain import DomainMismatchError, to_domain
from phasestream.modelserver.client import ModelClient
from phasestream.modelserver.protocol import (
    DEFAULT_MODEL_ADDRESS,
    ModelRefused,
    ModelServerError,
    ModelServerUnavailable,
)
from phasestream.store.readback import read_back
from phasestream.store.results import ResultWriter
from phasestream.store.tiled import open_raw_run

__all__ = ["DEFAULT_INDI_MODEL", "ENHANCED", "SOURCES", "EnhanceOptions", "enhance_images",
           "enhance_options_from_start", "enhance_result", "enhanced_node", "enhanced_path", "enhancement_arrays",
           "marked", "model_summary", "od_images_to_enhance", "record_enhancement", "remove_enhanced",
           "remove_unverified", "run"]

logger = logging.getLogger(__name__)

DEFAULT_INDI_MODEL = "indi-particles-synthetic"
#: the container of every enhancement inside a result
ENHANCED = "enhanced"
SOURCES = ("od", "raw")


@dataclass
class EnhanceOptions:
    """Options of the enhancement job: the InDI artifact, steps (default: the artifact's), what to
    enhance (``source``: the result's ``od`` or the ``raw`` run's frames under ``raw``), the server."""

    model: str = DEFAULT_INDI_MODEL
    version: str | None = None
    steps: int | None = None
    address: str = DEFAULT_MODEL_ADDRESS
    root: str = "phasestream"
    timeout: float = 300.0
    retries: int = 0
    source: str = "od"
    raw: str = ""
    allow_low_gain: bool = False
    #: False when a start document asked for enhancement without naming a model (a demo model then warns)
    model_named: bool = True

    def validate(self) -> EnhanceOptions:
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or not 1 <= self.steps <= 100):
            raise ValueError(f"steps must be an integer in 1..100, got {self.steps!r}")
        if self.timeout <= 0:
            raise ValueError("timeout must be > 0")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        return self


def enhanced_path(model: str, version: str, steps: int) -> str:
    """``enhanced/<model>/<version>/<steps>``, each key checked against the contract's key pattern."""
    keys = (str(model), str(version), str(int(steps)))
    for what, key in zip(("model", "version", "steps"), keys, strict=True):
        if RUN_UID_PATTERN.fullmatch(key) is None:
            raise InvalidIdentifierError(f"{what} {key[:60]!r} cannot name a Tiled key: letters, digits, '.', '_' "
                                         "or '-', not starting with '.'")
    return "/".join((ENHANCED, *keys))


def enhance_options_from_start(extra: dict[str, Any], base: EnhanceOptions) -> EnhanceOptions | None:
    """The enhancement a start document's ``phasestream`` block asks for (``enhance``), or None."""
    request = extra.get("enhance")
    if not request:
        return None
    if request is True:
        return replace(base, model_named=False)
    if isinstance(request, dict):
        allowed = {k: request[k] for k in ("model", "version", "steps") if k in request}
        return EnhanceOptions(**{**asdict(base), **allowed, "model_named": "model" in request}).validate()
    raise ValueError(f"phasestream.enhance must be true or {{model, version, steps}}, got {request!r}")


def _retry(run_uid: str, opts: EnhanceOptions) -> str:
    version = f" --version {opts.version}" if opts.version else ""
    steps = f" --steps {opts.steps}" if opts.steps else ""
    return f"phasestream enhance --source {opts.source} --model {opts.model}{version}{steps} {run_uid}"


def _writer(tiled_client, run_uid: str, opts: EnhanceOptions) -> ResultWriter:
    """The run's result; for raw frames of a run never analysed, a new ``skipped`` result to hold them."""
    try:
        return ResultWriter.open(tiled_client, run_uid, root=opts.root)
    except KeyError:
        if opts.source != "raw":
            raise
    start = dict(open_raw_run(tiled_client, run_uid, opts.raw).metadata["start"])
    md = {"status": "skipped", "sample": start.get("sample") or {}, "scan_id": start.get("scan_id"),
          "errors": ["not analysed: holds the enhanced raw frames of `phasestream enhance --source raw`"]}
    return ResultWriter(tiled_client, run_uid, root=opts.root, shape=None, phases=[], metadata=md)


def enhance_result(tiled_client, run_uid: str, options: EnhanceOptions | None = None, *,
                   model_client: ModelClient | None = None) -> dict[str, Any]:
    """Enhance the OD images (or raw frames) of ``run_uid``; returns the record it wrote (see the module). While a
    split enhancement copies its array in (its ``enhancement`` record ``running`` and alive), nothing is written:
    the ``skipped`` record returned says so."""
    opts = (options or EnhanceOptions()).validate()
    writer = _writer(tiled_client, run_uid, opts)
    try:  # one left running by a split enhancement that stopped is finalized (failed, interrupted) first
        ensure_not_running(writer, "enhancement", enhancement_arrays, stale_after=STALE_AFTER,
                           job="split enhancement")
    except JobRunningError as exc:
        logger.warning("run %s: enhancement not run: %s", run_uid, exc)
        return {"status": "skipped", "reason": str(exc), "model": opts.model, "source": opts.source,
                "retry": _retry(run_uid, opts)}
    remove_unverified(writer)
    with jobs_model_client(opts, model_client) as client:
        return recorded_job(writer, "enhancement", lambda: _enhance(tiled_client, writer, client, opts),
                            skipped=(ModelServerUnavailable, ModelRefused, DomainMismatchError),
                            failed=(ModelServerError, ValueError), retry=_retry(run_uid, opts),
                            extra={"model": opts.model, "source": opts.source})


def od_images_to_enhance(writer: ResultWriter) -> tuple[int, dict[str, Any] | None]:
    """How many OD images the result holds, or 0 and the ``skipped`` record saying why none."""
    if "od" not in writer.container:
        return 0, {"status": "skipped", "reason": "the result has no OD cube (the worker ran with --no-od)"}
    n = int(writer.metadata.get("n_energies_seen") or 0)
    if n == 0:
        return 0, {"status": "skipped", "reason": "the result has no OD image"}
    return n, None


def model_summary(client: ModelClient, name: str, version: str | None) -> dict[str, Any]:
    """The registered artifact ``name`` (``version``, else the highest) as the server lists it."""
    found = [m for m in client.list_models() if m["name"] == name and (version is None or m["version"] == version)]
    if not found:
        raise ModelRefused(f"the model server has no InDI model {name!r}" + (f" {version}" if version else ""))
    return found[-1]  # the server lists versions in increasing order


def _raw_in_model_domain(frames: RawFrames, summary: dict[str, Any]) -> tuple[str, list[np.ndarray], dict]:
    """The raw frames in the model's domain: ``counts`` as they are (or per dose), ``transmission`` divided by
    each frame's open beam, ``od`` as ``-ln`` of that (counts that are not positive become NaN, filled like
    the result's masked OD); a model declaring no domain gets counts, for the server to refuse."""
    domain = (summary.get("domain") or {}).get("image")
    mode = ((summary.get("domain") or {}).get("normalization") or {}).get("mode")
    if domain in ("transmission", "od") or (domain == "counts" and mode == "dose"):
        images = [to_domain(im, domain, float(i0)) for im, i0 in zip(frames.images, frames.i0, strict=True)]
        return domain, images, {"mode": "dose" if domain == "counts" else "open_beam", **frames.normalization()}
    return "counts", list(frames.images), {"mode": "none"}


def enhanced_node(writer: ResultWriter, path: str) -> tuple[Any, str, str | None]:
    """``(container, key, note)``: the containers along ``path`` inside the result, created as needed, the key
    of the array in the last one (an earlier array of the same model, version and steps removed, its entry in
    ``enhancements`` first: the metadata never names an array that is gone or being rewritten, and a re-run
    that fails leaves no complete record of it), and a note when an unversioned ``enhanced`` array of an earlier
    phasestream had to go."""
    note = None
    node = writer.container
    keys = path.split("/")
    for key in keys[:-1]:
        if key in node and node[key].structure_family != StructureFamily.container:
            node.delete_contents(key, external_only=False)
            note = f"the unversioned {key!r} array written by an earlier phasestream was removed"
        if key not in node:
            node.create_container(key)
        node = node[key]
    if keys[-1] in node:
        name = path.removeprefix(f"{ENHANCED}/")
        if name in recorded_map(writer.metadata, "enhancements"):
            writer.update_entries({}, removed={"enhancements": [name]})
        node.delete_contents(keys[-1], external_only=False)
    return node, keys[-1], note


def enhancement_arrays(record: Mapping[str, Any]) -> tuple[str, ...]:
    """The array an ``enhancement`` record was replacing: its ``path``, when that is an enhancement's
    (``enhanced_path``'s, checked: a record edited by hand names none)."""
    path = record.get("path")
    keys = path.split("/") if isinstance(path, str) else []
    with contextlib.suppress(ValueError):  # an InvalidIdentifierError, or steps that are not a number
        if len(keys) == 4 and keys[0] == ENHANCED and enhanced_path(*keys[1:]) == path:
            return (path,)
    return ()


def remove_unverified(writer: ResultWriter) -> None:
    """Before an enhancement writes its record over an interrupted one (``failed``, ``unverified_arrays``: a split
    enhancement killed while it copied), remove the array that record names, unless a complete enhancement names
    it: once its record is gone nothing would describe it (docs/contract.md#post-scan-job-records)."""
    record = recorded_map(writer.metadata, "enhancement")
    unverified = record.get("unverified_arrays")
    if record.get("status") != "failed" or not isinstance(unverified, list):
        return
    complete = recorded_map(writer.metadata, "enhancements")
    for path in enhancement_arrays(record):  # the record's path, checked to be an enhancement's
        if path in unverified and path.removeprefix(f"{ENHANCED}/") not in complete:
            logger.info("%s: removing %s, left unverified by an interrupted enhancement", writer.path, path)
            remove_enhanced(writer, path)


def remove_enhanced(writer: ResultWriter, path: str) -> None:
    """Remove the array at ``path`` (``enhanced_path``'s, checked) if it is there: a replacement that failed."""
    parent, _, key = path.rpartition("/")
    with contextlib.suppress(KeyError):  # no parent container: nothing to remove
        node = writer.container[parent]
        if key in node:
            node.delete_contents(key, external_only=False)


def record_enhancement(writer: ResultWriter, info: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """Add ``record`` to the result's ``enhancements`` (under ``<model>/<version>/<steps>``) and the model to
    ``models``; returns the record (which the caller writes as the latest ``enhancement``)."""
    writer.update_entries({"models": {info["model"]: {"version": info["version"], "sha256": info["sha256"]}},
                           "enhancements": {record["path"].removeprefix(f"{ENHANCED}/"): {**record,
                                                                                        "model": info["model"]}}})
    return record


def _enhance(tiled_client, writer: ResultWriter, client: ModelClient, opts: EnhanceOptions) -> dict[str, Any]:
    client.health(timeout=min(5.0, opts.timeout))  # a stopped server is found out in seconds
    normalization = None
    if opts.source == "od":
        n, skipped = od_images_to_enhance(writer)
        if skipped is not None:
            return skipped
        od = writer.container["od"]
        images = [np.asarray(od[i], np.float32) for i in range(n)]
        domain, dims = "od", ("energy", "y", "x")
    else:
        frames = raw_frames(tiled_client, writer.run_uid, raw=opts.raw)
        summary = model_summary(client, opts.model, opts.version)
        domain, images, normalization = _raw_in_model_domain(frames, summary)
        dims = ("frame", "y", "x")
    planes, info = [], None
    for image in images:
        reply = client.enhance(opts.model, image, domain=domain, steps=opts.steps, allow_low_gain=opts.allow_low_gain,
                               version=opts.version if info is None else info["version"])
        info = info or reply
        planes.append(reply["array"])
    if info is None:
        return {"status": "skipped", "reason": "the run has no image to enhance"}
    enhanced = np.stack(planes).astype(np.float32)
    path = enhanced_path(info["model"], info["version"], info["steps"])
    parent, key, note = enhanced_node(writer, path)
    try:
        parent.write_array(enhanced, key=key, dims=dims)
        digests = read_back(writer, {path: enhanced})  # complete only when it reads back as written
    except Exception:  # no array without its record: a failed write or read-back leaves none
        with contextlib.suppress(Exception):
            remove_enhanced(writer, path)
        raise
    record = {"status": "complete", "version": info["version"], "sha256": info["sha256"], "steps": info["steps"],
              "scale": enhanced.shape[-1] / images[0].shape[-1], "shape": list(enhanced.shape),
              "source": opts.source, "domain": domain, "path": path, "array_sha256": digests}
    if normalization is not None:
        record["normalization"] = normalization
    if note:
        record["note"] = note
    return record_enhancement(writer, info, marked(record, info, opts))


DEMO_WARNING = ("enhanced with {model} {version}, a demo model trained on simulated particle phantoms, because the "
                "start document asked for enhancement without naming a model: it can make real images worse than "
                "bicubic up-sampling; train a model on pairs from your beamline (phasestream train indi) and name "
                "it (phasestream: {{enhance: {{model: NAME}}}})")


def marked(record: dict[str, Any], reply: dict[str, Any], opts: EnhanceOptions) -> dict[str, Any]:
    """``record`` with the marks a reader must see: ``low_gain`` (written only because asked to, the model's
    validated gain being below 1 dB) and ``warning`` (a demo model nobody named)."""
    if reply.get("low_gain") is not None:
        record["low_gain"] = reply["low_gain"]
    if reply.get("demo") and not opts.model_named:
        record["warning"] = DEMO_WARNING.format(model=reply["model"], version=reply["version"])
        logger.warning("%s", record["warning"])
    return record


def enhance_images(images: np.ndarray, *, domain: str, model: str = DEFAULT_INDI_MODEL, version: str | None = None,
                   steps: int | None = None, allow_low_gain: bool = False, address: str = DEFAULT_MODEL_ADDRESS,
                   timeout: float = 300.0, client: ModelClient | None = None) -> dict[str, Any]:
    """InDI enhancement of images you hold, through the model server: ``images`` (Y, X) or (N, Y, X) of
    ``domain`` (``transmission``, ``od`` or ``counts``, as the model was trained on; another is refused with
    :class:`~phasestream.modelserver.protocol.ModelRefused`, as is a model whose validated gain over bicubic is
    below 1 dB unless ``allow_low_gain``). Returns the server's reply: ``array`` (Y*s, X*s) or (N, Y*s, X*s),
    ``model``, ``version``, ``sha256``, ``steps``, ``low_gain`` when marked."""
    opts = EnhanceOptions(model=model, version=version, steps=steps, address=address, timeout=timeout).validate()
    with jobs_model_client(opts, client) as models:
        return models.enhance(model, np.asarray(images, np.float32), domain=domain, version=version, steps=steps,
                              allow_low_gain=allow_low_gain)


def run(context: JobContext, run_uid: str, options: dict) -> JobOutcome:
    """The ``enhance`` job: InDI enhancement of the OD images (or raw frames) of ``run_uid``."""
    record = enhance_result(context.tiled(), run_uid, EnhanceOptions(**options))
    return JobOutcome.from_record(run_uid, "enhance", record)
