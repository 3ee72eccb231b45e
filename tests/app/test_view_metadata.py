"""Results whose metadata the view cannot use as written (hand-edited, older, written by another tool)
cost the fields that are wrong, never the view: the page's state and each run's JSON are still served,
the other results beside them unchanged."""

from __future__ import annotations

import json
import math
import time
import uuid

import httpx
import pytest
from support import wait

from phasestream.app.view import ViewServer
from phasestream.contract.metadata import shown_metadata

GOOD = {"status": "complete", "sample": {"name": "good"}, "state_of_charge": 1.0, "n_energies_seen": 6,
        "references": {"phases": ["A", "B"]}, "phase_fractions": {"A": 0.25, "B": 0.75}, "errors": [],
        "refinement": {"status": "complete", "strategy": "knn"}}
BAD = [
    {"updated_at": "yesterday", "sample": "not a map", "n_energies_seen": "six", "status": 3},
    {"updated_at": [1, 2], "sample": ["x"], "phase_fractions": ["A", 0.5], "references": "nvpf",
     "refined_fractions": {"A": "half", "B": float("nan")}, "refinement": "done", "errors": "one error"},
    {"status": "running", "n_energies_seen": -4, "references": {"phases": "AB"}, "scan_id": {"a": 1},
     "refinement": {"status": ["x"], "kept": "earlier"}, "errors": [{"e": 1}, "text"], "state_of_charge": True},
]


def test_wrong_fields_become_unknown():
    shown = shown_metadata({**GOOD, **BAD[1]})
    assert shown["updated_at"] is None and shown["sample"] == {} and shown["phase_fractions"] == {}
    assert shown["references"] == {"phases": []} and shown["refined_fractions"] == {}
    assert shown["refinement"] == {} and shown["errors"] == []
    assert shown["state_of_charge"] == 1.0 and shown["n_energies_seen"] == 6  # the right ones stay
    third = shown_metadata(BAD[2])
    assert third["n_energies_seen"] == 0 and third["scan_id"] is None and third["state_of_charge"] is None
    assert third["refinement"] == {} and third["errors"] == ["{'e': 1}", "text"]
    assert all(shown_metadata(GOOD)[k] == v for k, v in GOOD.items())  # a good result's metadata as written


@pytest.mark.parametrize("order", ["before", "after"])
def test_the_view_serves_beside_results_with_wrong_metadata(tiled_client, order):
    root = f"view-md-{uuid.uuid4().hex[:8]}"
    container = tiled_client.create_container(root)
    good = str(uuid.uuid4())
    bad = [str(uuid.uuid4()) for _ in BAD]

    def write_bad():
        for uid, md in zip(bad, BAD, strict=True):
            container.create_container(uid, specs=["PhaseMap"], metadata={"run_uid": uid, **md})

    container.create_container(good, specs=["PhaseMap"], metadata={"run_uid": good, **GOOD,
                                                                    "updated_at": time.time()})
    if order == "before":  # read in the catch-up, or
        write_bad()
    with ViewServer(tiled_client, root=root) as view:
        wait(lambda: view.follower.state == "live" and good in view.follower.runs, 30, "the view to go live")
        if order == "after":  # streamed
            write_bad()
        wait(lambda: all(uid in view.follower.runs for uid in bad), 30, "the view to see the results")
        with httpx.Client(base_url=view.url, timeout=30) as http:
            state = http.get("/api/state")
            assert state.status_code == 200
            runs = {r["uid"]: r for r in json.loads(state.text)["runs"]}  # strict JSON: no NaN
            assert set(runs) == {good, *bad}
            assert runs[good]["sample"] == "good" and runs[good]["phase_fractions"] == {"A": 0.25, "B": 0.75}
            assert runs[good]["refinement"] == {"status": "complete", "strategy": "knn"}
            assert runs[bad[0]]["updated_at"] is None and runs[bad[0]]["status"] is None
            assert runs[bad[1]]["errors"] == [] and runs[bad[1]]["refined_fractions"] == {}
            for uid in bad:
                one = http.get(f"/api/runs/{uid}")
                assert one.status_code == 200 and json.loads(one.text)["uid"] == uid
            assert not any(isinstance(v, float) and not math.isfinite(v) for r in runs.values() for v in r.values())
            assert http.get("/healthz").status_code == 200


def test_a_number_beyond_the_float_range_is_unknown_not_an_overflow():
    """``math.isfinite(10**400)`` raises OverflowError: such an ``updated_at`` (JSON holds any integer) ended the
    check in an exception; it is now unknown like any other number that is not a finite real."""
    import numpy as np

    from phasestream.contract.metadata import finite_number, shown_metadata

    assert shown_metadata({"updated_at": 10**400, "state_of_charge": np.float32(1.5)})["updated_at"] is None
    assert finite_number(np.float32(1.5)) == 1.5 and finite_number(np.True_) is None and finite_number("1") is None
