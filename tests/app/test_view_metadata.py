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
from phasestream.app.view.summary import HISTORY_NUMBERS, RunSummary, summarize
from phasestream.contract.metadata import MAX_PHASE_NAME, MAX_SHOWN_PHASES, shown_metadata

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


def test_a_run_of_many_phases_and_energies_keeps_a_bounded_history_from_its_start():
    """Each update with a new ``n_energies_seen`` kept another copy of every fraction, and every ``run`` event sent
    them all: 256 phases grew a run's JSON to 50 MB after 200 updates (2000 points allowed). The history is now
    bounded by points times phases, thinned to every other point (its first and newest kept) when full."""
    phases = [f"phase {k} " + "x" * 5000 for k in range(300)]  # more phases, and longer names, than shown
    run = RunSummary("u", {})
    for n in range(1, 201):
        fractions = {p: (k + n) / 1e5 for k, p in enumerate(phases)}
        run.absorb({**GOOD, "n_energies_seen": n, "references": {"phases": phases}, "phase_fractions": fractions})
    shown = summarize(run, tiled_base="http://127.0.0.1:1/api/v1", root="phasestream")
    assert len(shown["phases"]) == MAX_SHOWN_PHASES and all(len(p) == MAX_PHASE_NAME for p in shown["phases"])
    assert set(shown["phase_fractions"]) == set(shown["phases"])  # the names the fractions are keyed by, cut alike
    points = [n for n, _ in shown["history"]]
    assert points == sorted(points) and points[0] == 1 and points[-1] == 200
    assert len(points) * MAX_SHOWN_PHASES <= HISTORY_NUMBERS and len(points) >= HISTORY_NUMBERS // MAX_SHOWN_PHASES // 2
    assert shown["history"][-1][1] == [shown["phase_fractions"][p] for p in shown["phases"]]
    assert len(json.dumps(shown)) < 1_000_000


def test_a_history_of_few_phases_keeps_every_point():
    run = RunSummary("u", {})
    for n in (1, 2, 3, 3, 5):
        run.absorb({**GOOD, "n_energies_seen": n, "phase_fractions": {"A": n / 10, "B": 1 - n / 10}})
    assert run.history == [[n, [n / 10, 1 - n / 10]] for n in (1, 2, 3, 5)]  # GOOD's phases: A, B
