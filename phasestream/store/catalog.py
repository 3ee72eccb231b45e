"""Finding phase-mapping results, and raw runs, in Tiled: by state of charge, sample, start time, plan, status.

Results live at ``<root>/<run uid>`` (docs/contract.md, "Results in Tiled") with ``state_of_charge`` at
the top level of their metadata, so a plain Tiled query works as well:
``client["phasestream"].search(Key("state_of_charge") == 2.0)``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from tiled.client.container import Container
from tiled.queries import Key

from phasestream.contract import FINAL_JOB_STATUSES, FINAL_STATUSES, STATUSES
from phasestream.contract.metadata import shown_metadata
from phasestream.store.tiled import raw_runs

__all__ = ["RunQuery", "find", "find_raw_runs", "result_rows", "search_runs", "wait_for_refinement",
           "wait_for_result"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunQuery:
    """The friendly keys by which results and raw runs are both searched (``query``, ``reprocess``).

    Each names a start-document key; a result copies those keys under the same names (docs/contract.md)
    and a raw run (TiledWriter) keeps the start document under ``start``, so one search serves both, with
    the key prefix as the only difference (:func:`search_runs`).

    Parameters
    ----------
    state_of_charge : ``|sample.state_of_charge - x| <= tolerance`` (exact equality when 0)
    tolerance : non-negative
    sample : ``sample.name`` equal to this
    since, until : ``since <= time < until``, the run's start time in seconds since the epoch
    plan : ``plan_name`` equal to this
    start : more keys (dotted, e.g. ``{"scan_id": 12}``) and the values they must equal

    Numbers must be finite (``ValueError`` naming the field otherwise): NaN would match no run and an
    infinite tolerance every one.
    """

    state_of_charge: float | None = None
    tolerance: float = 0.0
    sample: str | None = None
    since: float | None = None
    until: float | None = None
    plan: str | None = None
    start: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # a number that is not finite matches nothing (nan) or everything (a tolerance of inf), silently
        for name in ("state_of_charge", "since", "until"):
            if getattr(self, name) is not None:
                _check_finite(name, getattr(self, name))
        _check_tolerance(self.tolerance)
        if self.state_of_charge is not None and self.tolerance > 0 and not (
                math.isfinite(self.state_of_charge - self.tolerance)
                and math.isfinite(self.state_of_charge + self.tolerance)):
            raise ValueError(f"state_of_charge ± tolerance must be finite, got {self.state_of_charge} ± "
                             f"{self.tolerance}")
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError(f"since ({self.since}) must be before until ({self.until})")
        for key, value in self.start.items():
            if not (isinstance(key, str) and key and all(key.split("."))):
                raise ValueError(f"a start-document key is dotted names, e.g. sample.name; got {key!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"start-document key {key}: a value must be a finite number, got {value}")

    @property
    def empty(self) -> bool:
        """True when the query selects every run."""
        return all(value is None for value in (self.state_of_charge, self.sample, self.since, self.until,
                                               self.plan)) and not self.start


def search_runs(node: Container, query: RunQuery, *, prefix: str = "") -> Container:
    """``node.search(...)`` for every criterion of ``query``; ``prefix`` is ``""`` for results and
    ``"start."`` for raw runs (TiledWriter keeps the start document under ``metadata["start"]``)."""
    def key(name: str) -> Key:
        return Key(f"{prefix}{name}")

    if query.state_of_charge is not None:
        soc, at = float(query.state_of_charge), key("sample.state_of_charge")
        if query.tolerance == 0:
            node = node.search(at == soc)
        else:
            node = node.search(at >= soc - query.tolerance).search(at <= soc + query.tolerance)
    if query.sample is not None:
        node = node.search(key("sample.name") == query.sample)
    if query.since is not None:
        node = node.search(key("time") >= float(query.since))
    if query.until is not None:
        node = node.search(key("time") < float(query.until))
    if query.plan is not None:
        node = node.search(key("plan_name") == query.plan)
    for name, value in query.start.items():
        node = node.search(key(name) == value)
    return node


def find(
    client: Container,
    query: RunQuery | None = None,
    *,
    state_of_charge: float | None = None,
    tolerance: float = 0.0,
    status: str | None = None,
    root: str = "phasestream",
) -> dict[str, Container]:
    """Result containers under ``root``, by run uid, matching all the given criteria.

    Parameters
    ----------
    query : the friendly keys (:class:`RunQuery`: state of charge, sample, start time, plan)
    state_of_charge, tolerance : shorthand for ``RunQuery(state_of_charge=..., tolerance=...)``
    status : one of ``STATUSES``
    """
    query = _with_soc(query, state_of_charge, tolerance)
    if status is not None and status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    try:
        results = client[root]
    except KeyError:
        log.debug("no results container %r in Tiled: nothing found", root)
        return {}
    results = search_runs(results, query)
    if status is not None:
        results = results.search(Key("status") == status)
    return dict(results.items())


def find_raw_runs(
    client: Container,
    query: RunQuery | Mapping[str, Any] | None = None,
    *,
    raw: str = "",
    state_of_charge: float | None = None,
    tolerance: float = 0.0,
) -> list[str]:
    """Uids of the raw runs (TiledWriter) under ``raw`` (a Tiled path such as ``bl/raw``; ``""`` the catalog
    root) whose start document matches ``query``, sorted by start time. ``query`` may also be a mapping of
    start-document keys (dotted) and values, ``RunQuery(start=...)``.

    Refuses an empty query (it would select every run). Raises ``KeyError`` when ``raw`` is not a container.
    """
    query = _with_soc(query, state_of_charge, tolerance)
    if query.empty:
        raise ValueError("find_raw_runs needs a criterion (state of charge, sample, time, plan or start-document "
                         "keys): refusing to select every run")
    runs = search_runs(raw_runs(client, raw), query, prefix="start.")
    found = [(_start_time(node.metadata.get("start")), uid) for uid, node in runs.items() if "start" in node.metadata]
    return [uid for _, uid in sorted(found)]


def _start_time(start) -> float:
    """A raw run's start time for sorting; 0 when its start document has none that is a number (one run's
    string ``time`` made every selection fail)."""
    value = start.get("time") if isinstance(start, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
        else 0.0


def _check_finite(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")


def _check_tolerance(tolerance: Any) -> None:
    _check_finite("tolerance", tolerance)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")


def _with_soc(query: RunQuery | Mapping | None, state_of_charge: float | None, tolerance: float) -> RunQuery:
    """``query`` with the shorthand ``state_of_charge=`` (and its tolerance) when given."""
    _check_tolerance(tolerance)
    if isinstance(query, Mapping):  # start-document keys and values, as find_raw_runs(query=...) took before
        query = RunQuery(start=query)
    query = query or RunQuery()
    return query if state_of_charge is None else replace(query, state_of_charge=state_of_charge, tolerance=tolerance)


def result_rows(results: dict[str, Container]) -> list[dict]:
    """One flat dict per result (its key, run uid, field index, scan id, sample, state of charge, status,
    fractions), sorted by SoC, run uid, then key (the fields of a run in order)."""
    rows = []
    for uid, node in results.items():
        md = shown_metadata(node.metadata)  # a field of the wrong type is unknown, the other results listed
        rows.append({
            "run_uid": md["run_uid"] or uid,
            "key": uid,
            "field": (md["field"] or {}).get("index"),
            "scan_id": md["scan_id"],
            "sample": md["sample"].get("name"),
            "state_of_charge": md["state_of_charge"],
            "status": md["status"],
            "phases": md["references"]["phases"],
            "phase_fractions": md["phase_fractions"],
            "ambiguous_fraction": md["ambiguous_fraction"],
            "refined_fractions": md["refined_fractions"],
            "n_energies_seen": md["n_energies_seen"],
        })
    return sorted(rows, key=lambda r: (r["state_of_charge"] is None, r["state_of_charge"] or 0.0, r["run_uid"],
                                       r["field"] or 0, r["key"]))



def wait_for_result(client, run_uid: str, *, root: str = "phasestream", timeout: float = 120.0,
                    poll_seconds: float = 0.25) -> Container:
    """The result container of ``run_uid`` once its status is final (complete, partial, failed or skipped).

    Polls every ``poll_seconds`` (each poll is a request the server also has to serve, so not
    faster than needed). Raises ``TimeoutError`` after ``timeout`` seconds.
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(KeyError):
            node = client[root][run_uid]
            if node.metadata.get("status") in FINAL_STATUSES:
                return node
        time.sleep(poll_seconds)
    raise TimeoutError(f"no final result for run {run_uid} in Tiled after {timeout:.0f} s")


def wait_for_refinement(client, run_uid: str, *, root: str = "phasestream", timeout: float = 120.0,
                        poll_seconds: float = 0.25) -> Container:
    """The result container of ``run_uid`` once its GMVAE refinement has ended (complete, skipped or failed).

    ``metadata["refinement"]["status"]`` says which, ``["reason"]`` why it did not complete.
    Raises ``TimeoutError`` after ``timeout`` seconds.
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(KeyError):
            node = client[root][run_uid]
            if (node.metadata.get("refinement") or {}).get("status") in FINAL_JOB_STATUSES:
                return node
        time.sleep(poll_seconds)
    raise TimeoutError(f"no refinement for run {run_uid} in Tiled after {timeout:.0f} s")
