"""Runs imaged at several sample positions: one analysis per field of view (docs/contract.md, "Fields").

A grid scan over the energy and a sample motor (``list_grid_scan``, ``grid_scan``, snaking or not,
either axis outer), a mosaic or any plan that images several fields per energy records one image
per energy *and* position. Each field is analysed like a single-position scan of it, into its own
result ``<root>/<run uid>.f<index>`` (:func:`phasestream.contract.fields.field_key`).

Which data keys are positions is read from the start document and the ``primary`` descriptor
(:func:`field_plan`): bluesky's hinted ``dimensions`` put the motors a plan moves together in one
dimension (``list_scan`` moving the energy and a zone plate) and the axes of a grid in dimensions
of their own, so a position is a scalar number of a dimension other than the energy's. Without
hinted dimensions the motors of ``start["motors"]`` are the dimensions when ``start["shape"]`` has
one length per motor. A field is one distinct tuple of positions, compared with a tolerance
(readbacks jitter): a tenth of the grid spacing when ``shape`` and ``extents`` give it, else the
motor's display ``precision`` (``10**-precision``), else a millionth of the value. With the grid's
``shape`` each field's arrays are pre-sized with its number of energies (``num_points`` / fields).

:class:`FieldRuns` stands where a :class:`~phasestream.callbacks.analysis.RunAnalysis` stands for
one run: it makes one ``RunAnalysis`` per field as the fields appear, gives each field every
document but the other fields' primary events (the fields share one copy of a TXM run's dark and
flat frames), and finishes every field at the stop. A run with no position key (one dimension)
keeps one analysis under the run uid.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from event_model import unpack_event_page

from phasestream.callbacks.analysis import RunAnalysis
from phasestream.callbacks.result import RunResult
from phasestream.contract import RunSettings
from phasestream.contract.fields import MAX_FIELDS, field_key

__all__ = ["FieldPlan", "FieldRuns", "field_plan", "may_have_fields"]

logger = logging.getLogger(__name__)

#: dimensions and motors looked at (a document may list more; a plan has a handful)
_MAX_DIMENSIONS = 16
#: documents kept for the fields that appear later (the start and the descriptors)
MAX_SHARED_DOCUMENTS = 1000
#: relative tolerance of positions when neither the grid nor the motor's precision gives one
DEFAULT_RELATIVE_TOLERANCE = 1e-6


@dataclasses.dataclass(frozen=True)
class FieldPlan:
    """How a run's primary events split into fields.

    ``position_keys`` the data keys of the positions (empty: one field, the run itself);
    ``tolerances`` one per key (None: :data:`DEFAULT_RELATIVE_TOLERANCE` of the value);
    ``count`` the number of fields and ``energies`` the energies per field, when the grid's
    ``shape`` says so.
    """

    position_keys: tuple[str, ...] = ()
    tolerances: tuple[float | None, ...] = ()
    count: int | None = None
    energies: int | None = None


def _dimensions(start: Mapping[str, Any], descriptor: Mapping[str, Any]) -> list[list[str]]:
    """The primary stream's dimensions, each a list of data keys: the hinted ones, else one per motor of a grid."""
    hints = start.get("hints") if isinstance(start.get("hints"), Mapping) else {}
    dims = hints.get("dimensions")
    if isinstance(dims, list | tuple) and dims:
        return [[f for f in dim[0][:_MAX_DIMENSIONS] if isinstance(f, str)] for dim in dims[:_MAX_DIMENSIONS]
                if isinstance(dim, list | tuple) and len(dim) == 2 and dim[1] == "primary"
                and isinstance(dim[0], list | tuple)]
    motors, shape = start.get("motors"), start.get("shape")
    if not (isinstance(motors, list | tuple) and isinstance(shape, list | tuple) and len(motors) == len(shape)):
        return []
    described = descriptor.get("hints") if isinstance(descriptor.get("hints"), Mapping) else {}
    dims = []
    for motor in motors[:_MAX_DIMENSIONS]:
        hinted = described.get(motor).get("fields") if isinstance(described.get(motor), Mapping) else None
        dims.append([f for f in hinted if isinstance(f, str)] if isinstance(hinted, list) and hinted else [motor])
    return dims


def may_have_fields(start: Mapping[str, Any]) -> bool:
    """Whether the start document describes more than one dimension (a grid): its run may have several fields."""
    hints = start.get("hints") if isinstance(start.get("hints"), Mapping) else {}
    dims = hints.get("dimensions")
    if isinstance(dims, list | tuple) and dims:
        return sum(isinstance(d, list | tuple) and len(d) == 2 and d[1] == "primary" for d in dims) >= 2
    motors, shape = start.get("motors"), start.get("shape")
    return isinstance(motors, list | tuple) and isinstance(shape, list | tuple) and len(motors) == len(shape) >= 2


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def _grid_spacing(extent: Any, n: int | None) -> float | None:
    """Mean spacing of ``n`` positions over ``extent`` ``[first, last]`` (None when it is not a usable grid)."""
    if not (n and n > 1 and isinstance(extent, list | tuple) and len(extent) == 2):
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in extent):
        return None
    spacing = abs(float(extent[1]) - float(extent[0])) / (n - 1)
    return spacing if spacing > 0 else None


def field_plan(start: Mapping[str, Any], descriptor: Mapping[str, Any], energy_key: str) -> FieldPlan:
    """The position keys, tolerances and grid size of a run, from its start document and primary descriptor.

    No position key (a plan of one dimension, an energy found in no dimension or in several) gives
    ``FieldPlan()``: the run is one field, analysed as before.
    """
    dims = _dimensions(start, descriptor)
    at = [i for i, dim in enumerate(dims) if energy_key in dim]
    if len(at) != 1:
        return FieldPlan()
    keys = descriptor.get("data_keys") if isinstance(descriptor.get("data_keys"), Mapping) else {}

    def scalar(key: str) -> bool:
        desc = keys.get(key)
        return isinstance(desc, Mapping) and desc.get("dtype") in ("number", "integer") and not desc.get("shape")

    energy_dim = at[0]
    where = {key: i for i, dim in enumerate(dims) if i != energy_dim
             for key in dim if scalar(key) and key != energy_key}
    if not where:
        return FieldPlan()
    shape, extents = start.get("shape"), start.get("extents")
    shape = list(shape) if isinstance(shape, list | tuple) and len(shape) == len(dims) else None
    if shape is not None and any(_count(n) is None for n in shape):
        shape = None
    num_points = _count(start.get("num_points"))
    # the shape sizes the fields' arrays: only as a count of the num_points that RunSettings bounded
    if shape is not None and (num_points is None or math.prod(shape) != num_points):
        shape = None
    extents = list(extents) if isinstance(extents, list | tuple) and len(extents) == len(dims) else None
    tolerances = []
    for key, i in where.items():
        spacing = None if shape is None or extents is None else _grid_spacing(extents[i], shape[i])
        precision = keys[key].get("precision")
        if spacing is not None:
            tolerances.append(spacing / 10)
        elif isinstance(precision, int) and not isinstance(precision, bool) and 0 <= precision <= 15:
            tolerances.append(10.0 ** -precision)
        else:
            tolerances.append(None)
    count = None if shape is None else math.prod(n for i, n in enumerate(shape) if i != energy_dim)
    # every other dimension must be a position for the grid to count the fields
    if shape is not None and set(where.values()) != set(range(len(dims))) - {energy_dim}:
        count = None
    return FieldPlan(tuple(where), tuple(tolerances), count, None if count is None else shape[energy_dim])


class FieldRuns:
    """The analyses of one run's fields, in the place of one :class:`RunAnalysis` (see the module docstring).

    Parameters
    ----------
    start, settings : the run's start document and its checked settings
    make_analysis : ``settings -> RunAnalysis`` for one field (the owner's options, sink and writer)
    on_field : called with each field's :class:`RunResult` as the field appears, and with the first
        field's when its key changes from the run uid to ``<uid>.f0`` (``previous`` the old key)
    """

    def __init__(self, start: dict, settings: RunSettings, make_analysis: Callable[[RunSettings], RunAnalysis],
                 on_field: Callable[[RunResult, str | None], None]):
        self.start = start
        self.settings = settings
        self.make_analysis = make_analysis
        self.on_field = on_field
        self.fields: list[RunAnalysis] = [make_analysis(settings)]
        self.references = self.fields[0].references
        self.positions: list[tuple[float, ...]] = []  # one per field, once its first image came
        self.plan: FieldPlan | None = None  # decided by the primary descriptor
        self.streams: dict[str, str] = {}
        self.shared: list[tuple[str, dict]] = []  # documents every later field gets first
        self.stopped = False

    # -- what the owner asks of an open run ------------------------------------------------

    @property
    def result(self) -> RunResult:
        return self.fields[0].result

    @property
    def closed(self) -> bool:
        return all(field.closed for field in self.fields)

    @property
    def incomplete_reason(self) -> str | None:
        return self.fields[0].incomplete_reason

    @incomplete_reason.setter
    def incomplete_reason(self, reason: str | None) -> None:
        for field in self.fields:
            field.incomplete_reason = reason

    def record_error(self, message: str) -> None:
        """An error of the whole run (lost documents, a rejected document): recorded on every field."""
        for field in self.fields:
            field.record_error(message)

    def heartbeat(self) -> None:
        for field in self.fields:
            field.heartbeat()

    def finalize(self, *, exit_status: str = "success", reason: str = "") -> None:
        """Finish every field (the stop, or a run given up)."""
        self.stopped = True
        self._settle_count()
        for field in list(self.fields):
            field.finalize(exit_status=exit_status, reason=reason)

    def by_key(self, key: str) -> RunAnalysis | None:
        """The field whose result key is ``key``."""
        return next((field for field in self.fields if field.result.key == key), None)

    # -- documents ---------------------------------------------------------------------------

    def __call__(self, name: str, doc: dict) -> None:
        if name == "event_page":
            for event in unpack_event_page(doc):
                self.event(event)
        elif name == "event":
            self.event(doc)
        elif name == "descriptor":
            self.descriptor(doc)
        elif name == "stop":
            self.stopped = True
            self._settle_count()
            for field in list(self.fields):
                field(name, doc)
        else:  # start, (stream) resources and datums: the first field reads the frames for every field
            if name == "start":
                self._share(name, doc)
            self.fields[0](name, doc)

    def _share(self, name: str, doc: dict) -> None:
        """Keep ``doc`` for the fields that appear later (none will when the run has no positions)."""
        if (self.plan is None or self.plan.position_keys) and len(self.shared) < MAX_SHARED_DOCUMENTS:
            self.shared.append((name, doc))

    def descriptor(self, doc: dict) -> None:
        stream = doc.get("name", "primary")
        self.streams[doc.get("uid")] = stream
        if stream == "primary" and self.plan is None:
            try:
                self.plan = field_plan(self.start, doc, self.settings.energy_key)
            except Exception as exc:  # noqa: BLE001 - a document the rules did not foresee: one field
                logger.warning("run %s: its fields cannot be told apart (%s): analysed as one", self.settings.run_uid,
                               exc)
                self.plan = FieldPlan()
            if self.plan.position_keys:
                self._become_fields()
            else:
                self.shared = []
        self._share("descriptor", doc)
        for field in self.fields:
            field("descriptor", doc)

    def _become_fields(self) -> None:
        """The run has positions: the first field gets its key and its share of the energies."""
        first = self.fields[0]
        settings = dataclasses.replace(self.settings, num_points=self.plan.energies)
        first.settings = first.result.settings = settings
        first.result.key = field_key(self.settings.run_uid, 0)
        first.result.field = {"index": 0, "count": self.plan.count or 1, "positions": {}}
        self.on_field(first.result, self.settings.run_uid)

    def event(self, doc: dict) -> None:
        stream = self.streams.get(doc.get("descriptor"))
        if stream != "primary" or not self.plan or not self.plan.position_keys:
            self.fields[0]("event", doc)  # dark and flat frames go into the lists every field shares
            return
        if self.stopped:
            self.fields[0].record_error(f"event {doc.get('seq_num')} arrived after the run was finalized; ignored")
            return
        try:
            position = self._position(doc)
        except ValueError as exc:
            self.fields[0].record_error(f"primary event {doc.get('seq_num')}: {exc}; image ignored")
            return
        field = self._field_at(position)
        if field is not None:
            field("event", self._filled(doc))

    def _filled(self, doc: dict) -> dict:
        """``doc`` with its external image (read by the first field, which gets every StreamDatum) inline."""
        frame = self.fields[0].stream_frames.pop((doc.get("descriptor"), doc.get("seq_num")), None)
        if frame is None:
            return doc
        return {**doc, "data": {**doc.get("data", {}), self.settings.image_key: frame}}

    def _position(self, doc: dict) -> tuple[float, ...]:
        data = doc.get("data") or {}
        values = []
        for key in self.plan.position_keys:
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float | np.number) or not math.isfinite(value):
                raise ValueError(f"no usable position under data key {key!r:.80} ({value!r:.40})")
            values.append(float(value))
        return tuple(values)

    def _matches(self, a: Sequence[float], b: Sequence[float]) -> bool:
        for x, y, tol in zip(a, b, self.plan.tolerances, strict=True):
            limit = tol if tol is not None else DEFAULT_RELATIVE_TOLERANCE * max(abs(x), abs(y))
            if abs(x - y) > limit:
                return False
        return True

    def _field_at(self, position: tuple[float, ...]) -> RunAnalysis | None:
        """The field at ``position``: one already seen within the tolerances, else a new one."""
        for index, seen in enumerate(self.positions):
            if self._matches(position, seen):
                return self.fields[index]
        index = len(self.positions)
        if index >= MAX_FIELDS:
            self.fields[0].record_error(f"more than {MAX_FIELDS} fields (positions {position}); image ignored")
            return None
        self.positions.append(position)
        named = dict(zip(self.plan.position_keys, position, strict=True))
        if index == 0:
            self.fields[0].result.field["positions"] = named
            return self.fields[0]
        settings = self.fields[0].settings
        field = self.make_analysis(settings)
        field.result.key = field_key(self.settings.run_uid, index)
        field.result.field = {"index": index, "count": max(self.plan.count or 0, index + 1), "positions": named}
        for name, doc in self.shared:
            field(name, doc)
        field.corrections = self.fields[0].corrections  # one copy of a TXM run's dark and flat frames
        self.fields.append(field)
        if self.plan.count is None or index + 1 > self.plan.count:
            for other in self.fields:
                other.result.field["count"] = index + 1
        self.on_field(field.result, None)
        return field

    def _settle_count(self) -> None:
        """At the end, ``count`` is the number of fields the run imaged."""
        if self.plan and self.plan.position_keys and self.positions:
            for field in self.fields:
                field.result.field["count"] = len(self.positions)
