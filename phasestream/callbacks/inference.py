"""Which data keys a run from any plan means: its image, its energy and its STXM I0 (docs/any-plan.md).

A start document without a ``phasestream`` block (a stock ``list_scan``, ``scan``, ...) names no
keys. With :class:`~phasestream.contract.RunDefaults` (``serve`` / ``reprocess --references R``)
each key the options leave open is inferred from the start document and the ``primary``
descriptor, and only when exactly one candidate fits:

- the image: the only data key of a numeric 2-D array (``shape`` of two lengths);
- the energy: the only motor of ``start["motors"]`` (its data key through the descriptor's
  ``hints``, or its own name), or without motors the only field of ``start["hints"]["dimensions"]``
  for the primary stream; it must be a scalar number;
- the STXM I0: the only scalar number whose name is ``i0`` or ``izero`` (as a word of a ``_``, ``-``
  or ``.``-separated name: ``det_i0``, ``I0``, ``izero_mon``). None: I0 is estimated from the image
  background, as for a block without ``i0_key``. TXM needs no I0.

Anything else (no candidate, or several) raises :class:`KeysNotInferred` naming the candidates and
the option to pass: a guess is never made. Every value here comes from a document: names are
only compared and shown shortened, never used to name anything before the analysis checks them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from phasestream.contract import RunDefaults

__all__ = ["KeysNotInferred", "energy_candidates", "i0_candidates", "image_candidates", "infer_block"]

_I0_NAME = re.compile(r"(?:^|[_.\-])(?:i0|izero)(?:$|[_.\-])", re.IGNORECASE)
_NUMERIC = ("number", "integer")
#: candidates shown in a message
_SHOWN = 10


class KeysNotInferred(ValueError):
    """A key of a run without a ``phasestream`` block is ambiguous or absent: the run is ``skipped``."""


def _names(keys: list[str]) -> str:
    shown = ", ".join(f"{k!r:.80}" for k in keys[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def _data_keys(descriptor: Mapping[str, Any]) -> dict[str, dict]:
    keys = descriptor.get("data_keys")
    if not isinstance(keys, Mapping):
        return {}
    return {k: v for k, v in keys.items() if isinstance(k, str) and isinstance(v, Mapping)}


def _is_scalar_number(desc: Mapping[str, Any]) -> bool:
    return desc.get("dtype") in _NUMERIC and not desc.get("shape")


def image_candidates(descriptor: Mapping[str, Any]) -> list[str]:
    """Data keys of the descriptor that hold a numeric 2-D array (``shape`` [Y, X])."""
    found = []
    for key, desc in _data_keys(descriptor).items():
        shape = desc.get("shape")
        numpy_kind = str(desc.get("dtype_numpy") or "")[1:2]
        if (desc.get("dtype") in ("array", *_NUMERIC) and isinstance(shape, list) and len(shape) == 2
                and numpy_kind in ("", "b", "i", "u", "f")):
            found.append(key)
    return found


def energy_candidates(start: Mapping[str, Any], descriptor: Mapping[str, Any]) -> list[str]:
    """Scalar numeric data keys of the run's motors (``start["motors"]``, else its hinted dimensions)."""
    keys = _data_keys(descriptor)
    hints = descriptor.get("hints") if isinstance(descriptor.get("hints"), Mapping) else {}
    fields: list[str] = []
    motors = start.get("motors")
    if isinstance(motors, list | tuple) and motors:
        for motor in motors[:100]:
            if not isinstance(motor, str):
                continue
            hinted = (hints.get(motor) or {}).get("fields") if isinstance(hints.get(motor), Mapping) else None
            if motor in keys:
                fields.append(motor)
            elif isinstance(hinted, list) and len(hinted) == 1 and isinstance(hinted[0], str):
                fields.append(hinted[0])
            else:
                fields.append(motor)  # not among the data keys: reported as not a scalar below
    else:
        dims = (start.get("hints") or {}).get("dimensions") if isinstance(start.get("hints"), Mapping) else None
        for dim in dims if isinstance(dims, list | tuple) else ():
            if isinstance(dim, list | tuple) and len(dim) == 2 and dim[1] == "primary" and isinstance(dim[0], list):
                fields += [f for f in dim[0][:100] if isinstance(f, str)]
    return list(dict.fromkeys(fields))


def i0_candidates(descriptor: Mapping[str, Any], *, exclude: tuple[str, ...] = ()) -> list[str]:
    """Scalar numeric data keys named as an I0 monitor (``i0``, ``det_i0``, ``Izero``, ...)."""
    return [key for key, desc in _data_keys(descriptor).items()
            if key not in exclude and _is_scalar_number(desc) and _I0_NAME.search(key)]


def infer_block(start: Mapping[str, Any], descriptor: Mapping[str, Any],
                defaults: RunDefaults) -> tuple[dict, dict]:
    """The ``phasestream`` block a run without one is analysed with, and how each key was chosen.

    ``defaults`` gives what the options fix; the rest is inferred from ``start`` and the ``primary``
    ``descriptor``. Returns ``(block, keys_from)``, ``keys_from`` mapping each key to ``"option"``,
    ``"inferred"`` or (``i0_key`` only) ``"none: estimated from the image background"``.

    Raises
    ------
    KeysNotInferred
        naming the key, the candidates found and the option to pass.
    """
    keys = _data_keys(descriptor)
    block: dict[str, Any] = {"references": defaults.references, "mode": defaults.mode}
    keys_from: dict[str, str] = {}

    def choose(name: str, option: str, given: str | None, found: list[str], what: str) -> str:
        if given is not None:
            keys_from[name] = "option"
            return given
        if len(found) != 1:
            which = f"{len(found)} candidates ({_names(found)})" if found else "none"
            raise KeysNotInferred(f"the {what} cannot be inferred: {which}; pass {option}")
        keys_from[name] = "inferred"
        return found[0]

    block["image_key"] = choose("image_key", "--image-key", defaults.image_key, image_candidates(descriptor),
                                "image (a numeric 2-D array field of the primary stream)")
    motors = energy_candidates(start, descriptor)
    not_scalar = [m for m in motors if not _is_scalar_number(keys.get(m, {}))]
    if defaults.energy_key is None and len(motors) == 1 and not_scalar:
        raise KeysNotInferred(f"the energy cannot be inferred: the run's motor {motors[0]!r:.80} is not a scalar "
                              "number of the primary stream; pass --energy-key")
    block["energy_key"] = choose("energy_key", "--energy-key", defaults.energy_key, motors,
                                 "energy (the only motor of the start document, or its hinted dimension)")
    if defaults.mode == "stxm":
        if defaults.i0_key is not None:
            block["i0_key"], keys_from["i0_key"] = defaults.i0_key, "option"
        else:
            found = i0_candidates(descriptor, exclude=(block["image_key"], block["energy_key"]))
            if len(found) > 1:
                raise KeysNotInferred(f"the I0 cannot be inferred: {len(found)} candidates ({_names(found)}); "
                                      "pass --i0-key")
            if found:
                block["i0_key"], keys_from["i0_key"] = found[0], "inferred"
            else:
                keys_from["i0_key"] = "none: estimated from the image background"
    return block, keys_from
