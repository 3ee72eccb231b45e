"""Run settings read from a start document (docs/contract.md, "Start document"), validated once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from phasestream.contract import (
    DocumentBounds,
    InvalidIdentifierError,
    MetadataTooLargeError,
    check_run_uid,
)

__all__ = ["MODES", "AnalysisConfig", "RunSettings", "RunSettingsError", "checked_sample"]

MODES = ("stxm", "txm")
#: longest data key or reference name accepted from a start document
MAX_KEY_LENGTH = 4096


class RunSettingsError(ValueError):
    """The start document does not carry usable phasestream settings."""


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

    @property
    def state_of_charge(self) -> float | None:
        value = self.sample.get("state_of_charge")
        return None if value is None else float(value)

    @classmethod
    def from_start(cls, start: dict[str, Any], *, references: str | None = None,
                   bounds: DocumentBounds | None = None) -> RunSettings:
        """Validate the ``phasestream`` block of ``start``; ``references`` overrides its value.

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
        block = start.get("phasestream")
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
        known = {"references", "image_key", "energy_key", "i0_key", "mode"}
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


@dataclass(frozen=True)
class AnalysisConfig:
    """How each run is analysed: the callback's options as plain values (``PhaseMapCallback.analysis_config``).

    ``update_every`` / ``update_seconds``: partial maps after this many images or seconds, at most
    one per ``min_update_seconds`` and costing at most ``partial_budget`` of the time (None: no
    limit); ``writes_tiled``: results go to Tiled (else they are kept in memory only).
    """

    backend: str
    ambiguity: float
    mask_threshold: float | None = None
    update_every: int = 4
    update_seconds: float = 2.0
    min_update_seconds: float = 0.5
    partial_budget: float | None = 0.125
    write_od: bool = True
    keep_arrays: bool = True
    writes_tiled: bool = False
    bounds: DocumentBounds = field(default_factory=DocumentBounds)
