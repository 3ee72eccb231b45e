"""The trust contract: which identifiers, paths and sizes a document may name (docs/security.md).

Every field of a start document comes from the network. Before a field names a Tiled key, a
file or a size, it is checked here; anything else is refused with an error that names the
field and what was expected. This module has no dependencies inside phasestream, so every
layer (callbacks, the Tiled writer, jobs, the CLI) applies the same rules.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DEFAULT_MAX_METADATA_BYTES",
    "DEFAULT_MAX_METADATA_DEPTH",
    "DEFAULT_MAX_NUM_POINTS",
    "FINAL_STATUSES",
    "RUN_UID_PATTERN",
    "STATUSES",
    "DocumentBounds",
    "InvalidIdentifierError",
    "MetadataTooLargeError",
    "check_metadata",
    "check_result_root",
    "check_run_uid",
    "path_inside",
]

#: Result statuses: ``running`` while a run is analysed, then one of :data:`FINAL_STATUSES`.
STATUSES = ("running", "complete", "partial", "failed")
FINAL_STATUSES = ("complete", "partial", "failed")

#: Run uids (event-model makes UUIDs): letters, digits, ``.``, ``_`` and ``-``, 1-128 characters,
#: not starting with a dot (so never ``.`` or ``..``, which Tiled resolves like a URL path).
RUN_UID_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
#: One key of the results root (``phasestream`` or ``beamline/phasestream``).
_ROOT_KEY = RUN_UID_PATTERN

DEFAULT_MAX_NUM_POINTS = 10_000
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
DEFAULT_MAX_METADATA_DEPTH = 8
DEFAULT_MAX_METADATA_BYTES = 64 * 1024


class InvalidIdentifierError(ValueError):
    """A document field that would name a Tiled key or a file does not match the allowed pattern."""


class MetadataTooLargeError(ValueError):
    """Document metadata nests too deep or is too large to be stored with a result."""


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
    return uid


def check_result_root(root: Any) -> str:
    """Return the results container path (``a`` or ``a/b``) if every key in it is a plain name."""
    keys = str(root).strip("/").split("/") if isinstance(root, str) else []
    if not keys or any(_ROOT_KEY.fullmatch(k) is None for k in keys):
        raise InvalidIdentifierError(
            f"results root {_shown(root)} refused: one or more '/'-separated names of letters, digits, '.', "
            "'_' or '-' (none starting with '.')"
        )
    return "/".join(keys)


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


def check_metadata(value: Any, *, what: str, max_depth: int = DEFAULT_MAX_METADATA_DEPTH,
                   max_bytes: int = DEFAULT_MAX_METADATA_BYTES) -> Any:
    """Return ``value`` if it nests at most ``max_depth`` levels and its JSON is at most ``max_bytes``.

    Checked iteratively (a 1000-level document cannot exhaust the stack) before anything is
    written. Values JSON cannot hold are measured by their ``str``.

    Raises
    ------
    MetadataTooLargeError
        naming ``what`` and the bound.
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping | list | tuple):
            if depth > max_depth:
                raise MetadataTooLargeError(f"{what} nests deeper than {max_depth} levels; refused")
            children = item.values() if isinstance(item, Mapping) else item
            stack.extend((child, depth + 1) for child in children)
    size = len(json.dumps(value, default=str))
    if size > max_bytes:
        raise MetadataTooLargeError(f"{what} is {size} bytes of JSON, more than the {max_bytes} allowed; refused")
    return value


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

    def metadata(self, value: Any, what: str) -> Any:
        return check_metadata(value, what=what, max_depth=self.max_metadata_depth,
                              max_bytes=self.max_metadata_bytes)
