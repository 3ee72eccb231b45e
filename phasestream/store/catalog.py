"""Finding phase-mapping results in Tiled: by state of charge, status, sample.

Results live at ``<root>/<run uid>`` (docs/contract.md, "Results in Tiled") with ``state_of_charge`` at
the top level of their metadata, so a plain Tiled query works as well:
``client["phasestream"].search(Key("state_of_charge") == 2.0)``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

from tiled.client.container import Container
from tiled.queries import Key

from phasestream.contract import FINAL_JOB_STATUSES, FINAL_STATUSES, STATUSES

__all__ = ["find", "find_raw_runs", "result_rows", "wait_for_refinement",
           "wait_for_result"]

log = logging.getLogger(__name__)


def find(
    client: Container,
    *,
    state_of_charge: float | None = None,
    tolerance: float = 0.0,
    status: str | None = None,
    root: str = "phasestream",
) -> dict[str, Container]:
    """Result containers under ``root``, by run uid, matching all the given criteria.

    Parameters
    ----------
    state_of_charge : match ``|state_of_charge - x| <= tolerance`` (exact equality when 0)
    tolerance : non-negative
    status : one of ``STATUSES``
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if status is not None and status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    try:
        results = client[root]
    except KeyError:
        log.debug("no results container %r in Tiled: nothing found", root)
        return {}
    if state_of_charge is not None:
        soc = float(state_of_charge)
        if tolerance == 0:
            results = results.search(Key("state_of_charge") == soc)
        else:
            results = results.search(Key("state_of_charge") >= soc - tolerance)
            results = results.search(Key("state_of_charge") <= soc + tolerance)
    if status is not None:
        results = results.search(Key("status") == status)
    return dict(results.items())


def find_raw_runs(
    client: Container,
    *,
    state_of_charge: float | None = None,
    tolerance: float = 0.0,
    query: Mapping[str, Any] | None = None,
) -> list[str]:
    """Uids of the raw runs (TiledWriter, at the top level) whose start document matches, sorted by start time.

    Parameters
    ----------
    state_of_charge : match ``|start.sample.state_of_charge - x| <= tolerance``
    query : start-document keys (dotted) and values that must be equal, e.g.
        ``{"sample.name": "P1", "scan_id": 12}``
    """
    if state_of_charge is None and not query:
        raise ValueError("find_raw_runs needs state_of_charge= or query= (refusing to select every run)")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    runs = client
    if state_of_charge is not None:
        soc, key = float(state_of_charge), Key("start.sample.state_of_charge")
        if tolerance == 0:
            runs = runs.search(key == soc)
        else:
            runs = runs.search(key >= soc - tolerance).search(key <= soc + tolerance)
    for name, value in (query or {}).items():
        runs = runs.search(Key(f"start.{name}") == value)
    found = [(node.metadata.get("start", {}).get("time", 0.0), uid) for uid, node in runs.items()
             if "start" in node.metadata]
    return [uid for _, uid in sorted(found)]


def result_rows(results: dict[str, Container]) -> list[dict]:
    """One flat dict per result (uid, scan id, sample, state of charge, status, fractions), sorted by SoC then uid."""
    rows = []
    for uid, node in results.items():
        md = node.metadata
        rows.append({
            "run_uid": uid,
            "scan_id": md.get("scan_id"),
            "sample": (md.get("sample") or {}).get("name"),
            "state_of_charge": md.get("state_of_charge"),
            "status": md.get("status"),
            "phases": list((md.get("references") or {}).get("phases", [])),
            "phase_fractions": dict(md.get("phase_fractions") or {}),
            "ambiguous_fraction": md.get("ambiguous_fraction"),
            "refined_fractions": dict(md.get("refined_fractions") or {}),
            "n_energies_seen": md.get("n_energies_seen"),
        })
    return sorted(rows, key=lambda r: (r["state_of_charge"] is None, r["state_of_charge"] or 0.0, r["run_uid"]))



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
