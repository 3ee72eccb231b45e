"""What the name of one frame of a TXM-XANES acquisition saved as one ``.xrm`` file per frame says: sample or
reference (flat, sample-out) frame, the series (field of view) it belongs to, the energy written in it.

Two facility namings are known (docs/formats.md, "Zeiss series"); a name is read by the first that fits:

- ``ssrl`` (SSRL 6-2c): ``rep01_20161456_NCA_fov08_XANES_08324.0_eV_001of003.xrm``, a sample frame (scan
  repetition ``rep01``, series name, energy in eV, frame 1 of 3 at that energy), and
  ``rep01_000051_ref_20161456_NCA_fov08_XANES_08324.0_eV_001of010.xrm``, a reference frame (a running
  number, the ``ref`` token, then the same fields). The series is ``rep01_<name>``; its references carry the
  same repetition and name.
- ``aps`` (APS 32-ID-C): ``fov03_xanessoc01_8353_0eV.xrm``, a sample frame (field of view ``fov03``, series
  ``xanessoc01``, 8353.0 eV), and ``ref_xanessoc01_8353_0eV.xrm``, its reference: one reference series
  serves every field of view of the same ``xanes<name>``. The series is ``<fov>_xanes<name>``.
- ``other``: any other name. A ``ref`` token (``_``-separated, any case) makes it a reference frame; the
  name carries no energy and no series (the folder, narrowed by a glob, is one series).

A name that has a ``ref`` token but fits a facility's sample pattern is read as ``other``, so that the token
always decides between sample and reference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["NAMINGS", "XrmName", "has_tokens", "parse_xrm_name"]

#: The namings :func:`parse_xrm_name` knows, and the facility each comes from.
NAMINGS = {"ssrl": "SSRL 6-2c", "aps": "APS 32-ID-C", "other": "not a facility naming"}

_ENERGY = r"(?P<energy>\d+(?:\.\d+)?)_eV"
_SSRL_REFERENCE = re.compile(rf"(?P<rep>rep\d+)_\d+_ref_(?P<name>.+)_{_ENERGY}_\d+of\d+", re.IGNORECASE)
_SSRL_SAMPLE = re.compile(rf"(?P<rep>rep\d+)_(?P<name>.+)_{_ENERGY}_\d+of\d+", re.IGNORECASE)
_APS = re.compile(r"(?P<fov>[A-Za-z0-9]+)_(?P<name>xanes[A-Za-z0-9_-]*?)_(?P<whole>\d+)_(?P<fraction>\d+)eV",
                  re.IGNORECASE)


@dataclass(frozen=True)
class XrmName:
    """One frame's file name, read.

    Attributes
    ----------
    naming : a key of :data:`NAMINGS`
    reference : a reference (flat, sample-out) frame, not a sample frame
    series : the series a sample frame belongs to (``rep01_<name>``, ``fov03_xanessoc01``; ``""`` for
        ``other``); None for a reference frame
    key : what pairs sample frames with their reference frames: equal for a series and its references
    energy : the energy written in the name, eV, or None
    """

    naming: str
    reference: bool
    series: str | None
    key: str
    energy: float | None


def has_tokens(label: str, choice: str) -> bool:
    """True when ``choice``'s ``_``-separated tokens appear, in order and together, among ``label``'s:
    ``fov03`` and ``fov03_xanessoc01`` in ``fov03_xanessoc01``, ``rep01`` in ``rep01_NCA_fov08``."""
    tokens, wanted = label.split("_"), choice.split("_")
    return any(tokens[i:i + len(wanted)] == wanted for i in range(len(tokens) - len(wanted) + 1))


def parse_xrm_name(name: str) -> XrmName:
    """Read a frame's file name (with or without its ``.xrm`` suffix) by the first naming that fits."""
    stem = name[:-4] if name.lower().endswith(".xrm") else name
    reference = "ref" in (token.lower() for token in stem.split("_"))
    if reference and (match := _SSRL_REFERENCE.fullmatch(stem)):
        key = f"{match['rep']}_{match['name']}"
        return XrmName("ssrl", True, None, key, float(match["energy"]))
    if not reference and (match := _SSRL_SAMPLE.fullmatch(stem)):
        key = f"{match['rep']}_{match['name']}"
        return XrmName("ssrl", False, key, key, float(match["energy"]))
    if match := _APS.fullmatch(stem):
        energy = float(f"{match['whole']}.{match['fraction']}")
        if match["fov"].lower() == "ref":
            return XrmName("aps", True, None, match["name"], energy)
        if not reference:
            return XrmName("aps", False, f"{match['fov']}_{match['name']}", match["name"], energy)
    return XrmName("other", reference, None if reference else "", "", None)
