"""The contract every layer shares (docs/contract.md): statuses, the job outcome record, the result
layout, and which identifiers, paths and sizes a document may name (docs/security.md).

Every field of a start document comes from the network. Before a field names a Tiled key, a
file or a size, it is checked here; anything else is refused with an error that names the
field and what was expected. This module has no dependencies inside phasestream, so every
layer (callbacks, the Tiled writer, jobs, the CLI) applies the same rules and speaks the same
statuses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from phasestream.contract.denoise import DENOISED_LAYOUT, DenoiseRequest, denoise_request
from phasestream.contract.metadata import (
    DEFAULT_MAX_METADATA_BYTES,
    DEFAULT_MAX_METADATA_DEPTH,
    MetadataTooLargeError,
    check_metadata,
)

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS", "DEFAULT_MAX_METADATA_BYTES", "DEFAULT_MAX_METADATA_DEPTH", "DEFAULT_MAX_NUM_POINTS",
    "FINAL_JOB_STATUSES", "FINAL_STATUSES", "MAP_LAYOUT", "MODES", "OD_DTYPE", "RESULT_SPEC", "RUN_UID_PATTERN",
    "STATUSES", "USABLE_STATUSES", "DocumentBounds", "IncompleteReason", "InvalidIdentifierError", "JobOutcome",
    "JobStatus", "MetadataTooLargeError", "RunDefaults", "RunSettings", "RunSettingsError", "Status",
    "check_metadata", "check_raw_path", "check_result_root", "check_run_uid", "checked_run_origin", "checked_sample",
    "path_inside",
]

class Status(StrEnum):
    """A result's ``status``: ``running`` while its run is analysed, then final (docs/contract.md)."""

    RUNNING = "running"
    COMPLETE = "complete"  # every array written and read back
    PARTIAL = "partial"  # written and read back, but the run lost data (documents, energies, pixels)
    FAILED = "failed"  # nothing usable; ``errors`` says why
    SKIPPED = "skipped"  # not analysed: a run without a ``phasestream`` block whose keys cannot be inferred


class JobStatus(StrEnum):
    """The ``status`` of a post-scan job's record (``refinement``, ``enhancement``, ``methods.<name>``)."""

    COMPLETE = "complete"
    PARTIAL = "partial"
    SKIPPED = "skipped"  # nothing to do, or a missing prerequisite (model server down, no model)
    FAILED = "failed"


class IncompleteReason(StrEnum):
    """Why the transport reports a run's documents incomplete (``run_incomplete(uid, reason, kind=...)``).

    The listener decides on the kind, never on the reason's text: a :attr:`final` kind means no
    more documents of the run will come, so it is finalized now; otherwise its stop may still come.
    """

    MESSAGE_GAP = "message gap"  # sequence numbers skipped on the wire while the run was open
    NO_START = "no start document"  # documents of a run whose start never arrived
    NO_DESCRIPTOR = "no descriptor document"  # events of a descriptor never received
    MISSING_EVENTS = "missing events"  # a seq_num (or stream datum) gap in a stream
    EVENT_COUNT = "event count"  # the stop counts more events than arrived
    STOP_TIMEOUT = "no stop document"  # nothing more within the stop timeout

    @property
    def final(self) -> bool:
        return self is IncompleteReason.STOP_TIMEOUT


#: Result statuses: ``running`` while a run is analysed, then one of :data:`FINAL_STATUSES`.
STATUSES = tuple(s.value for s in Status)
FINAL_STATUSES = (Status.COMPLETE.value, Status.PARTIAL.value, Status.FAILED.value, Status.SKIPPED.value)
#: Result statuses whose maps a post-scan job may build on.
USABLE_STATUSES = (Status.COMPLETE.value, Status.PARTIAL.value)
#: Job record statuses that end the job (all of :class:`JobStatus` but ``partial``, which jobs never write).
FINAL_JOB_STATUSES = (JobStatus.COMPLETE.value, JobStatus.SKIPPED.value, JobStatus.FAILED.value)


@dataclass
class JobOutcome:
    """What became of one post-scan job on one run: the one record shape every executor returns.

    ``status`` a :class:`JobStatus` value; ``reason`` why it is not complete (empty when it is);
    ``seconds`` wall time; ``retry`` the command that repeats it (empty when complete); ``details``
    the job's own record (the ``refinement`` / ``enhancement`` / ``methods`` metadata it wrote,
    or the steps of a multi-step job).
    """

    run_uid: str
    job: str
    status: str
    reason: str = ""
    seconds: float = 0.0
    retry: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.status = JobStatus(self.status).value

    @property
    def ok(self) -> bool:
        return self.status == JobStatus.COMPLETE

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, run_uid: str, job: str, record: Mapping[str, Any]) -> JobOutcome:
        """The outcome of a job that wrote ``record`` (status, reason, seconds, retry) into the result."""
        return cls(run_uid, job, record["status"], reason=str(record.get("reason") or ""),
                   seconds=float(record.get("seconds") or 0.0), retry=str(record.get("retry") or ""),
                   details=dict(record))

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> JobOutcome:
        return cls(**{k: record[k] for k in ("run_uid", "job", "status", "reason", "seconds", "retry", "details")
                      if k in record})

RESULT_SPEC = "PhaseMap"
#: Contract result arrays: name -> (dtype, dims); "phase" is K, "y", "x" the image axes.
MAP_LAYOUT: dict[str, tuple[np.dtype, tuple[str, ...]]] = {
    "pcc": (np.dtype("float32"), ("phase", "y", "x")),
    "phase": (np.dtype("int16"), ("y", "x")),
    "reliability": (np.dtype("float32"), ("y", "x")),
    "ambiguous": (np.dtype("uint8"), ("y", "x")),
    "mask": (np.dtype("uint8"), ("y", "x")),
    "refined_phase": (np.dtype("int16"), ("y", "x")),
    "latent": (np.dtype("float32"), ("y", "x", "latent")),
    "false_positive": (np.dtype("uint8"), ("y", "x")),
    # classic XANES methods (phasestream.jobs.methods)
    "fractions_lcf": (np.dtype("float32"), ("phase", "y", "x")),
    "fit_error": (np.dtype("float32"), ("y", "x")),
    "reduced_chi2": (np.dtype("float32"), ("y", "x")),
    "scale_lcf": (np.dtype("float32"), ("y", "x")),
    "thickness": (np.dtype("float32"), ("y", "x")),
    "normalized": (np.dtype("float32"), ("energy", "y", "x")),
    "edge50": (np.dtype("float32"), ("y", "x")),
    "peak_position": (np.dtype("float32"), ("y", "x")),
    "threshold_mask": (np.dtype("uint8"), ("y", "x")),
    "cluster_mask": (np.dtype("int16"), ("y", "x")),
    "cluster_spectra": (np.dtype("float32"), ("cluster", "energy")),
    "fractions_rum_tv": (np.dtype("float32"), ("phase", "y", "x")),
    "scale_rum_tv": (np.dtype("float32"), ("y", "x")),
    "fractions_rum_pnp": (np.dtype("float32"), ("phase", "y", "x")),
    "scale_rum_pnp": (np.dtype("float32"), ("y", "x")),
    **DENOISED_LAYOUT,  # a denoising's arrays (phasestream.contract.denoise)
}
#: dtype of the OD cube ``od`` (E, Y, X)
OD_DTYPE = np.dtype("float32")

#: Run uids (event-model makes UUIDs): letters, digits, ``.``, ``_`` and ``-``, 1-128 characters,
#: not starting with a dot (so never ``.`` or ``..``, which Tiled resolves like a URL path).
RUN_UID_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
#: One key of the results root (``phasestream`` or ``beamline/phasestream``).
_ROOT_KEY = RUN_UID_PATTERN
#: the end of a field's result key (``<run uid>.f<index>``): no run uid ends so (it could take a field's key)
_FIELD_SUFFIX = re.compile(r"\.f[0-9]+$")

DEFAULT_MAX_NUM_POINTS = 10_000
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192


class InvalidIdentifierError(ValueError):
    """A document field that would name a Tiled key or a file does not match the allowed pattern."""


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_run_uid(uid: Any) -> str:
    """Return ``uid`` if it may name a result (``<root>/<uid>`` in Tiled, a folder of the OD store).

    Raises
    ------
    InvalidIdentifierError
        naming the value (shortened) and the pattern.
    """
    if not isinstance(uid, str) or RUN_UID_PATTERN.fullmatch(uid) is None:
        raise InvalidIdentifierError(
            f"run uid {_shown(uid)} refused: a uid is 1-128 letters, digits, '.', '_' or '-', not starting "
            "with '.' (event-model uids are UUIDs)"
        )
    if _FIELD_SUFFIX.search(uid) is not None:
        raise InvalidIdentifierError(
            f"run uid {_shown(uid)} refused: it ends like the result key of a field of another run "
            "('<run uid>.f<index>', docs/contract.md, Fields)"
        )
    return uid


def _plain_path(path: Any, what: str, *, example: str) -> str:
    """``path`` without leading and trailing ``/`` if every ``/``-separated key is a plain name (no ``.``, ``..``
    or empty key: Tiled resolves a path like a URL); ``""`` when it names no key at all."""
    keys = path.strip("/").split("/") if isinstance(path, str) else [None]
    if keys == [""]:
        return ""
    if any(not isinstance(k, str) or _ROOT_KEY.fullmatch(k) is None for k in keys):
        raise InvalidIdentifierError(
            f"{what} {_shown(path)} refused: one or more '/'-separated names of letters, digits, '.', '_' or '-', "
            f"none starting with '.' and none empty (e.g. {example})"
        )
    return "/".join(keys)


def check_result_root(root: Any) -> str:
    """Return the results container path (``a`` or ``a/b``) if every key in it is a plain name."""
    checked = _plain_path(root, "results root", example="'phasestream'")
    if not checked:
        raise InvalidIdentifierError(f"results root {_shown(root)} refused: name a container, e.g. 'phasestream'")
    return checked


def check_raw_path(path: Any) -> str:
    """Return the container of the raw runs (``bl/raw``; ``""`` the catalog root, also for ``"/"``) if
    every key in it is a plain name. A trusted option, checked all the same: ``..`` would leave it."""
    return _plain_path(path, "raw-run path", example="'bl/raw', or '' for the catalog root")


def path_inside(root: str | Path, *parts: str) -> Path:
    """``root/parts...`` resolved, checked to lie inside ``root`` (resolved) before anything is written there.

    Raises
    ------
    InvalidIdentifierError
        when the resolved path leaves ``root`` (``..``, an absolute part, a symbolic link out).
    """
    base = Path(root).resolve()
    path = base.joinpath(*parts).resolve()
    if path != base and not path.is_relative_to(base):
        raise InvalidIdentifierError(f"path {_shown('/'.join(parts))} leaves {base}; refused")
    return path



class DocumentBounds:
    """Bounds on what a start document may ask of the worker (each a ``phasestream serve`` option).

    Parameters
    ----------
    max_num_points : largest ``num_points`` (expected energies) accepted
    max_image_pixels : largest image (Y * X) accepted
    max_metadata_depth, max_metadata_bytes : bounds of the ``sample`` and ``phasestream`` blocks
    """

    def __init__(self, *, max_num_points: int = DEFAULT_MAX_NUM_POINTS,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 max_metadata_depth: int = DEFAULT_MAX_METADATA_DEPTH,
                 max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES):
        for name, value in (("max_num_points", max_num_points), ("max_image_pixels", max_image_pixels),
                            ("max_metadata_depth", max_metadata_depth), ("max_metadata_bytes", max_metadata_bytes)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.max_num_points = int(max_num_points)
        self.max_image_pixels = int(max_image_pixels)
        self.max_metadata_depth = int(max_metadata_depth)
        self.max_metadata_bytes = int(max_metadata_bytes)

    def as_dict(self) -> dict[str, int]:
        """The keywords that make these bounds again (to send them to another process)."""
        return {"max_num_points": self.max_num_points, "max_image_pixels": self.max_image_pixels,
                "max_metadata_depth": self.max_metadata_depth, "max_metadata_bytes": self.max_metadata_bytes}

    def metadata(self, value: Any, what: str) -> Any:
        return check_metadata(value, what=what, max_depth=self.max_metadata_depth,
                              max_bytes=self.max_metadata_bytes)


# ---------------------------------------------------------------------------------------------- start document

MODES = ("stxm", "txm")
#: longest data key or reference name accepted from a start document
MAX_KEY_LENGTH = 4096


class RunSettingsError(ValueError):
    """The start document does not carry usable phasestream settings."""


def _check_key(value: Any, what: str) -> None:
    if not (isinstance(value, str) and 0 < len(value) <= MAX_KEY_LENGTH):
        raise ValueError(f"{what} must be a non-empty string of at most {MAX_KEY_LENGTH} characters, got {value!r:.60}")


@dataclass(frozen=True)
class RunDefaults:
    """What a run whose start document has no ``phasestream`` block is analysed with (trusted options:
    ``serve`` / ``reprocess --references R [--image-key K] [--energy-key E] [--i0-key I] [--mode M]``).

    A key left None is inferred from the run's documents when that is unambiguous
    (``phasestream.callbacks.inference``); otherwise the run is ``skipped`` with the reason.
    """

    references: str
    image_key: str | None = None
    energy_key: str | None = None
    i0_key: str | None = None
    mode: str = "stxm"

    def __post_init__(self) -> None:
        _check_key(self.references, "references")
        for name in ("image_key", "energy_key", "i0_key"):
            if getattr(self, name) is not None:
                _check_key(getattr(self, name), name)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r:.60}")


@dataclass(frozen=True)
class RunSettings:
    """What the analysis needs to know about a run, from its start document.

    Attributes
    ----------
    run_uid, scan_id : identity of the run
    references : path or registered name of the reference spectra
    image_key, energy_key : event data keys of the image (Y, X) and the energy (eV)
    i0_key : optional data key of the STXM incident intensity (counts per pixel)
    mode : ``"stxm"`` or ``"txm"``
    sample : the start document's ``sample`` block (``name``, ``state_of_charge``, ...)
    num_points : expected number of energies, when the plan says so
    keys_from : for a run without a ``phasestream`` block, how each key was chosen
        (``{"image_key": "inferred" | "option", ...}``); empty for runs with the block
    denoise : the block's ``denoise`` request (:func:`~phasestream.contract.denoise.denoise_request`), or None
    """

    run_uid: str
    scan_id: int | None
    references: str
    image_key: str
    energy_key: str
    i0_key: str | None = None
    mode: str = "stxm"
    sample: dict = field(default_factory=dict)
    num_points: int | None = None
    extra: dict = field(default_factory=dict)
    keys_from: dict = field(default_factory=dict)
    #: the start document's ``time`` and ``plan_name`` (:func:`checked_run_origin`)
    origin: dict = field(default_factory=dict)
    denoise: DenoiseRequest | None = None

    @property
    def state_of_charge(self) -> float | None:
        value = self.sample.get("state_of_charge")
        return None if value is None else float(value)

    @classmethod
    def from_start(cls, start: dict[str, Any], *, references: str | None = None,
                   bounds: DocumentBounds | None = None, block: dict | None = None,
                   keys_from: dict | None = None) -> RunSettings:
        """Validate the ``phasestream`` block of ``start``; ``references`` overrides its value.

        ``block`` stands in for a start document without one (built from :class:`RunDefaults` and
        the inferred keys, ``keys_from`` saying which were inferred); it is checked the same way.

        Every field is checked before it can name a key, a file or a size: the uid against
        :data:`~phasestream.contract.RUN_UID_PATTERN`, ``num_points`` and the metadata blocks
        against ``bounds`` (default :class:`~phasestream.contract.DocumentBounds`).

        Raises
        ------
        RunSettingsError
            naming the run and the key that is missing or wrong.
        """
        bounds = bounds or DocumentBounds()
        try:
            uid = check_run_uid(start.get("uid"))
        except InvalidIdentifierError as exc:
            raise RunSettingsError(str(exc)) from None
        block = start.get("phasestream") if block is None else block
        if not isinstance(block, dict):
            raise RunSettingsError(f"run {uid}: start document has no 'phasestream' metadata block")
        sample = checked_sample(start, bounds)
        try:
            bounds.metadata(block, "the 'phasestream' block")
        except MetadataTooLargeError as exc:
            raise RunSettingsError(f"run {uid}: {exc}") from None
        refs = references if references is not None else block.get("references")
        missing = [k for k, v in (("references", refs), ("image_key", block.get("image_key")),
                                  ("energy_key", block.get("energy_key"))) if not v]
        if missing:
            raise RunSettingsError(f"run {uid}: phasestream metadata lacks {', '.join(missing)}")
        for key in ("references", "image_key", "energy_key", "i0_key"):
            value = refs if key == "references" else block.get(key)
            if value is not None and not (isinstance(value, str) and len(value) <= MAX_KEY_LENGTH):
                raise RunSettingsError(f"run {uid}: phasestream.{key} must be a string of at most "
                                       f"{MAX_KEY_LENGTH} characters, got {type(value).__name__}")
        mode = str(block.get("mode", "stxm")).lower()
        if mode not in MODES:
            raise RunSettingsError(f"run {uid}: phasestream.mode must be one of {MODES}, got {block.get('mode')!r:.60}")
        scan_id = start.get("scan_id")
        if scan_id is not None and (not isinstance(scan_id, int) or isinstance(scan_id, bool)):
            raise RunSettingsError(f"run {uid}: scan_id must be an integer, got {type(scan_id).__name__}")
        num = start.get("num_points")
        if num is not None and (not isinstance(num, int) or isinstance(num, bool) or num < 1):
            num = None  # not a count: the number of energies is unknown (the run still works)
        if num is not None and num > bounds.max_num_points:
            raise RunSettingsError(f"run {uid}: num_points {num} is more than the {bounds.max_num_points} energies "
                                   "allowed (phasestream serve --max-num-points)")
        known = {"references", "image_key", "energy_key", "i0_key", "mode", "denoise"}
        return cls(
            run_uid=uid,
            scan_id=scan_id,
            references=str(refs),
            image_key=block["image_key"],
            energy_key=block["energy_key"],
            i0_key=block.get("i0_key") or None,
            mode=mode,
            sample=dict(sample),
            num_points=num,
            extra={k: v for k, v in block.items() if k not in known},
            keys_from=dict(keys_from or {}),
            origin=checked_run_origin(start),
            denoise=denoise_request(block.get("denoise"), uid),
        )


def checked_sample(start: dict[str, Any], bounds: DocumentBounds | None = None) -> dict:
    """The start document's ``sample`` block, checked: a bounded mapping whose ``state_of_charge``,
    when present, is a finite number (it is the catalog's query key).

    Raises
    ------
    RunSettingsError
        naming the run and what is wrong.
    """
    uid = start.get("uid", "?")
    sample = start.get("sample") or {}
    if not isinstance(sample, dict):
        raise RunSettingsError(f"run {uid}: 'sample' must be a mapping, got {type(sample).__name__}")
    try:
        (bounds or DocumentBounds()).metadata(sample, "the 'sample' block")
    except MetadataTooLargeError as exc:
        raise RunSettingsError(f"run {uid}: {exc}") from None
    soc = sample.get("state_of_charge")
    if soc is not None and not (isinstance(soc, int | float) and not isinstance(soc, bool) and math.isfinite(soc)):
        raise RunSettingsError(f"run {uid}: sample.state_of_charge must be a finite number, got {soc!r:.60}")
    return dict(sample)


def checked_run_origin(start: Mapping[str, Any]) -> dict:
    """``{time, plan_name}`` of a start document, each None unless usable: ``time`` a finite number (seconds
    since the epoch), ``plan_name`` a string of at most ``MAX_KEY_LENGTH`` characters. A result copies them
    under the same names, so that results and raw runs are searched by the same keys."""
    when, plan = start.get("time"), start.get("plan_name")
    try:
        when = float(when) if isinstance(when, int | float) and not isinstance(when, bool) else None
    except OverflowError:  # an int beyond a float
        when = None
    return {"time": when if when is not None and math.isfinite(when) else None,
            "plan_name": plan if isinstance(plan, str) and len(plan) <= MAX_KEY_LENGTH else None}
