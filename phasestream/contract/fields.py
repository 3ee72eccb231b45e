"""Fields of view: the result keys of a run imaged at several sample positions (docs/contract.md, "Fields").

A run whose primary stream images several positions (a grid scan over the energy and a sample
motor, a mosaic) gets one result per field, each a whole ``PhaseMap`` result at
``<root>/<run uid>.f<index>`` beside the results of other runs; a run at one position keeps the
key ``<root>/<run uid>``. Every result names its raw run in its ``run_uid`` metadata, so the
results of one run are ``search(Key("run_uid") == uid)``, and a key says which run it belongs to
(:func:`parse_field_key`). The rules here check a key before it names a Tiled node or a folder.
"""

from __future__ import annotations

import re
from typing import Any

from phasestream.contract import RUN_UID_PATTERN, InvalidIdentifierError, check_run_uid

__all__ = ["MAX_FIELDS", "check_field_index", "check_result_key", "field_key", "parse_field_key"]

#: fields one run may have (each one is a result container; a mosaic of 32 x 32 tiles fits)
MAX_FIELDS = 1024
#: a field's key: the run uid, ``.f`` and the field's index (0-based, no leading zeros)
_FIELD_KEY = re.compile(rf"(?P<uid>{RUN_UID_PATTERN.pattern})\.f(?P<index>0|[1-9][0-9]{{0,3}})")


def field_key(run_uid: str, index: int) -> str:
    """The result key of field ``index`` (0-based) of run ``run_uid``: ``<run uid>.f<index>``.

    Raises
    ------
    InvalidIdentifierError
        when ``run_uid`` is not a run uid or ``index`` is not in ``0 .. MAX_FIELDS - 1``.
    """
    check_run_uid(run_uid)
    return f"{run_uid}.f{check_field_index(index)}"


def check_field_index(index: Any) -> int:
    """Return ``index`` if it may name a field: an int in ``0 .. MAX_FIELDS - 1``.

    Raises
    ------
    InvalidIdentifierError
        naming the value (shortened) and the range.
    """
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < MAX_FIELDS:
        raise InvalidIdentifierError(f"field index {index!r:.40} refused: 0 to {MAX_FIELDS - 1}")
    return index


def parse_field_key(key: Any) -> tuple[str, int] | None:
    """``(run uid, index)`` of a field's result key, None when ``key`` is not one."""
    found = _FIELD_KEY.fullmatch(key) if isinstance(key, str) else None
    return None if found is None else (found["uid"], int(found["index"]))


def check_result_key(key: Any) -> str:
    """Return ``key`` if it may name a result: a run uid, or a field's key ``<run uid>.f<index>``.

    Raises
    ------
    InvalidIdentifierError
        naming the value (shortened) and the patterns.
    """
    if parse_field_key(key) is not None:
        return key
    try:
        return check_run_uid(key)
    except InvalidIdentifierError as exc:
        raise InvalidIdentifierError(f"{exc}; a field's result key is '<run uid>.f<index>'") from None
