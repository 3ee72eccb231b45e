"""Run settings read from a start document (DESIGN.md "Run metadata"), validated once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MODES", "RunSettings", "RunSettingsError"]

MODES = ("stxm", "txm")


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
    def from_start(cls, start: dict[str, Any], *, references: str | None = None) -> RunSettings:
        """Validate the ``phasestream`` block of ``start``; ``references`` overrides its value.

        Raises
        ------
        RunSettingsError
            naming the run and the key that is missing or wrong.
        """
        uid = start.get("uid", "?")
        block = start.get("phasestream")
        if not isinstance(block, dict):
            raise RunSettingsError(f"run {uid}: start document has no 'phasestream' metadata block")
        refs = references if references is not None else block.get("references")
        missing = [k for k, v in (("references", refs), ("image_key", block.get("image_key")),
                                  ("energy_key", block.get("energy_key"))) if not v]
        if missing:
            raise RunSettingsError(f"run {uid}: phasestream metadata lacks {', '.join(missing)}")
        mode = str(block.get("mode", "stxm")).lower()
        if mode not in MODES:
            raise RunSettingsError(f"run {uid}: phasestream.mode must be one of {MODES}, got {block.get('mode')!r}")
        sample = start.get("sample") or {}
        if not isinstance(sample, dict):
            raise RunSettingsError(f"run {uid}: 'sample' must be a mapping, got {type(sample).__name__}")
        soc = sample.get("state_of_charge")
        if soc is not None and not (isinstance(soc, (int, float)) and math.isfinite(soc)):
            raise RunSettingsError(f"run {uid}: sample.state_of_charge must be a finite number, got {soc!r}")
        num = start.get("num_points")
        known = {"references", "image_key", "energy_key", "i0_key", "mode"}
        return cls(
            run_uid=uid,
            scan_id=start.get("scan_id"),
            references=str(refs),
            image_key=str(block["image_key"]),
            energy_key=str(block["energy_key"]),
            i0_key=block.get("i0_key") or None,
            mode=mode,
            sample=dict(sample),
            num_points=int(num) if isinstance(num, int) and num > 0 else None,
            extra={k: v for k, v in block.items() if k not in known},
        )
