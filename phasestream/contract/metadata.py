"""A result's metadata as a reader may show it: every field the view and ``phasestream query`` use, of
the type they expect.

Results are written by the worker, but the catalog is writable by anyone holding the key, and older
or hand-edited results exist: a string ``updated_at`` or ``state_of_charge``, a list for ``sample`` or
a NaN fraction must cost that field (shown as unknown), never the reader (before: a ``TypeError`` in
sorting or summarizing ended the view's follower thread, and every page with it, and one such result
made ``phasestream query`` fail for all). Fields not checked here pass unchanged.

And the bound on what a document may put into a result's metadata (:func:`check_metadata`: the ``sample``
and ``phasestream`` blocks of a start document).
"""

from __future__ import annotations

import itertools
import json
import math
import reprlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["DEFAULT_MAX_METADATA_BYTES", "DEFAULT_MAX_METADATA_DEPTH", "MetadataTooLargeError", "check_metadata",
           "finite_number", "image_shape_of", "is_count", "json_ready", "recorded_energies", "recorded_map",
           "result_layout", "shown", "shown_metadata"]

DEFAULT_MAX_METADATA_DEPTH = 8
DEFAULT_MAX_METADATA_BYTES = 64 * 1024
MAX_TEXT = 4096  # characters of any one string the page gets
MAX_ERRORS = 50  # as the worker keeps (docs/security.md)
MAX_SHOWN_PHASES = 256  # phases (and fractions) the page gets: as many as a reference set may have
MAX_PHASE_NAME = 256  # characters of a phase name the page gets


def json_ready(value: Any) -> Any:
    """Plain JSON types, as a result's metadata is written: NumPy scalars and arrays to Python, tuples to lists,
    NaN/inf to None."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, np.ndarray | list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def shown(value: Any, limit: int = 200) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for an error message; a huge or deeply shared value (a
    YAML alias bomb) is never expanded (``reprlib``)."""
    if isinstance(value, str):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    text = reprlib.repr(value)
    return text[:limit] + ("..." if len(text) > limit else "")


def finite_number(value: Any) -> float | int | None:
    """``value`` if it is a finite real number (a NumPy scalar too; not a bool, not text), else None; an integer
    beyond the float range is None too (``math.isfinite`` raised OverflowError on it)."""
    if not isinstance(value, int | float | np.integer | np.floating) or isinstance(value, bool | np.bool_):
        return None
    try:
        return value if math.isfinite(value) else None
    except OverflowError:
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(value: Any) -> int:
    return value if is_count(value) else 0


def is_count(value: Any, maximum: int | None = None) -> bool:
    """Whether ``value`` is an integer (not a bool) from 0 to ``maximum`` (no bound when None)."""
    return _is_int(value) and value >= 0 and (maximum is None or value <= maximum)


def recorded_map(md: Any, key: str) -> dict[str, Any]:
    """The result's map ``key`` (``models``, ``enhancements``, a job's record) as a dict to extend; a value of
    another type (edited by hand, another tool) is none, not an exception in the job that extends it."""
    value = md.get(key) if isinstance(md, Mapping) else None
    return dict(value) if isinstance(value, Mapping) else {}


def _text(value: Any) -> str | None:
    return value[:MAX_TEXT] if isinstance(value, str) else None


def _is_list(value: Any) -> bool:
    """A list as JSON has it (Tiled's client gives nested ones as ``ListView``)."""
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def _fractions(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        return {}
    fractions = ((key[:MAX_PHASE_NAME], finite_number(x)) for key, x in value.items() if isinstance(key, str))
    return dict(itertools.islice(((key, x) for key, x in fractions if x is not None), MAX_SHOWN_PHASES))


def _record(value: Any) -> dict[str, Any]:
    """A post-scan job record (``refinement``): its text fields and the record it ``kept``."""
    if not isinstance(value, Mapping):
        return {}
    record = {k: text for k in ("status", "reason", "strategy", "model", "version")
              if (text := _text(value.get(k))) is not None}
    if isinstance(value.get("kept"), Mapping):
        record["kept"] = {k: text for k in ("strategy", "model", "version")
                          if (text := _text(value["kept"].get(k))) is not None}
    return record


def shown_metadata(metadata: Any) -> dict[str, Any]:
    """``metadata`` with the fields the view uses checked: a field of the wrong type becomes unknown
    (None, 0, empty), never an exception."""
    md = dict(metadata) if isinstance(metadata, Mapping) else {}  # nested maps: Tiled's DictView
    sample = md.get("sample")
    references = md.get("references")
    scan_id = md.get("scan_id")
    errors = md.get("errors")
    phases = references.get("phases") if isinstance(references, Mapping) else None
    field = md.get("field")
    index = field.get("index") if isinstance(field, Mapping) else None
    return md | {
        "run_uid": _text(md.get("run_uid")),
        "field": dict(field) | {"index": index if _is_int(index) else None}
        if isinstance(field, Mapping) else None,
        "status": _text(md.get("status")),
        "scan_id": scan_id if _is_int(scan_id) else _text(scan_id),
        "sample": {"name": _text(sample.get("name"))} if isinstance(sample, Mapping) else {},
        "references": {"phases": [p[:MAX_PHASE_NAME] for p in phases if isinstance(p, str)][:MAX_SHOWN_PHASES]
                       if _is_list(phases) else []},
        "n_energies_seen": _count(md.get("n_energies_seen")),
        "state_of_charge": finite_number(md.get("state_of_charge")),
        "ambiguous_fraction": finite_number(md.get("ambiguous_fraction")),
        "mean_reliability": finite_number(md.get("mean_reliability")),
        "updated_at": finite_number(md.get("updated_at")),
        "phase_fractions": _fractions(md.get("phase_fractions")),
        "refined_fractions": _fractions(md.get("refined_fractions")),
        "refinement": _record(md.get("refinement")),
        "errors": [e[:MAX_TEXT] if isinstance(e, str) else repr(e)[:MAX_TEXT] for e in errors[:MAX_ERRORS]]
        if _is_list(errors) else [],
    }


def image_shape_of(md: Mapping) -> tuple[int, int] | None:
    """The result's ``image_shape`` (Y, X) if it is two positive integers (a list as Tiled's client gives it,
    ``ListView``, too), else None: unknown."""
    shape = md.get("image_shape")
    if _is_list(shape) and len(shape) == 2 and all(_is_int(n) and n > 0 for n in shape):
        return int(shape[0]), int(shape[1])
    return None


def result_layout(path: str, md) -> tuple[tuple[int, int] | None, list[str], int, list[str] | None]:
    """``(image_shape, phases, n_energies_seen, errors)`` of the existing result at ``path`` (reopened to write
    more into it: ``ResultWriter.open``), each checked: a result whose metadata was edited by hand or written by
    another tool is a ValueError naming the field, not a ``TypeError`` or ``KeyError`` from inside a job.
    ``errors`` is None when the result's are a list (or none); else the list to write instead, quoting them."""
    shape = image_shape_of(md)
    if shape is None and md.get("image_shape") is not None:
        raise ValueError(f"result {path}: image_shape {md.get('image_shape')!r:.80} is not two pixel counts")
    references = md.get("references")
    if not isinstance(references, Mapping):
        raise ValueError(f"result {path}: references {references!r:.80} is not a map naming the phases")
    phases = references.get("phases")
    if not (_is_list(phases) and all(isinstance(p, str) for p in phases)):
        raise ValueError(f"result {path}: references.phases {phases!r:.80} is not a list of phase names")
    seen = md.get("n_energies_seen") or 0
    if not _is_int(seen) or seen < 0:
        raise ValueError(f"result {path}: n_energies_seen {seen!r:.80} is not a count")
    errors = md.get("errors")
    fixed = None if errors is None or _is_list(errors) else [f"errors were not a list: {errors!r:.500}"]
    return shape, list(phases), seen, fixed


def recorded_energies(path: str, md: Mapping) -> tuple[int, list[float]]:
    """``(n_energies_seen, energies_eV[:n])`` of the result at ``path``, each checked: a count, and a list of
    finite numbers (eV). A result edited by hand is a ValueError naming the field, not a ``TypeError`` from
    inside a post-scan job; a list shorter than the count is left for the caller to refuse."""
    seen = md.get("n_energies_seen") or 0
    if not is_count(seen):
        raise ValueError(f"result {path}: n_energies_seen {seen!r:.80} is not a count")
    energies = md.get("energies_eV") or []
    if not (_is_list(energies) and all(finite_number(e) is not None for e in energies[:seen])):
        raise ValueError(f"result {path}: energies_eV {energies!r:.80} is not a list of energies in eV")
    return seen, [float(e) for e in energies[:seen]]


class MetadataTooLargeError(ValueError):
    """Document metadata nests too deep or is too large to be stored with a result."""


def _as_json(value: Any) -> Any:
    """What the result's metadata holds for a value JSON has no type for (store/results.py writes arrays
    and NumPy scalars as lists and numbers)."""
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    return str(value)


def check_metadata(value: Any, *, what: str, max_depth: int = DEFAULT_MAX_METADATA_DEPTH,
                   max_bytes: int = DEFAULT_MAX_METADATA_BYTES) -> Any:
    """Return ``value`` if it nests at most ``max_depth`` levels and its JSON is at most ``max_bytes``.

    Checked iteratively (a 1000-level document cannot exhaust the stack) before anything is
    written. A NumPy array (what msgpack-numpy decodes) counts at least two bytes per element before
    it is measured as the list it is written as; other values JSON cannot hold are measured by their
    ``str``.

    Raises
    ------
    MetadataTooLargeError
        naming ``what`` and the bound.
    """
    stack, elements = [(value, 1)], 0
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping | list | tuple):
            if depth > max_depth:
                raise MetadataTooLargeError(f"{what} nests deeper than {max_depth} levels; refused")
            children = item.values() if isinstance(item, Mapping) else item
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(item, np.ndarray):  # its str is abbreviated ("[0. 0. ... 0.]"), its list is not
            elements += item.size
            if depth + item.ndim > max_depth + 1:
                raise MetadataTooLargeError(f"{what} nests deeper than {max_depth} levels; refused")
            if 2 * elements > max_bytes:
                raise MetadataTooLargeError(f"{what} holds arrays of {elements} elements, more than the "
                                            f"{max_bytes} bytes of JSON allowed; refused")
    size = len(json.dumps(value, default=_as_json))
    if size > max_bytes:
        raise MetadataTooLargeError(f"{what} is {size} bytes of JSON, more than the {max_bytes} allowed; refused")
    return value
