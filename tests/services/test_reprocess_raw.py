"""Raw runs stored under any Tiled path (issue 20): ``reprocess --raw PATH``, the friendly keys on raw runs
and results, the result's link back to its raw run, and raw paths that are refused."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

import numpy as np
import pytest
from bluesky import RunEngine

from phasestream.app.cli import main
from phasestream.app.cli.selection import parse_time
from phasestream.app.live import LiveService
from phasestream.contract import InvalidIdentifierError, check_raw_path, checked_run_origin
from phasestream.jobs.reprocess import ReprocessOptions
from phasestream.references import load_references, select_energies
from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.catalog import RunQuery, find, find_raw_runs
from phasestream.store.tiled import open_raw_run, raw_run_writer

ENERGIES = select_energies(load_references("nvpf-synthetic"), 5)  # 6 energies with the pre-edge one
ARRAYS = ("od", "pcc", "phase", "reliability", "ambiguous", "mask")
RAW = "bl/raw"
#: label -> (state of charge, sample name, plan name); "a" is also stored at the catalog root
RUNS = {
    "a": (1.0, "P1", None),
    "b": (2.0, "P1", None),
    "c": (2.05, "P2", "xanes_map"),
}


@pytest.fixture(scope="module")
def stored(tiled_client):
    """The runs of :data:`RUNS` stored by TiledWriter under ``bl/raw`` (run ``a`` at the root too, the same
    frames under the same uid); label -> (uid, start document, the recorded documents)."""
    client = tiled_client
    client.create_container("bl").create_container("raw")
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(client[RAW]))
    runs = {}
    for i, (label, (soc, name, plan)) in enumerate(RUNS.items()):
        sample = make_sample((48, 48), state_of_charge=soc, seed=20 + i, n_particles=2)
        energy = make_energy()
        det = TransmissionDetector(sample, energy, i0=6000.0, seed=i)
        root_copy = RE.subscribe(raw_run_writer(client)) if label == "a" else None
        docs = []
        plan_md = {"plan_name": plan} if plan else {}
        (uid,) = RE(energy_stack_scan([det], energy, ENERGIES, sample={"name": name, "state_of_charge": soc},
                                      i0_key=det.i0_key, md=plan_md), lambda n, d, docs=docs: docs.append((n, d)))
        if root_copy is not None:
            RE.unsubscribe(root_copy)
        runs[label] = (uid, docs[0][1], docs)
    return runs


def _reprocess(server, *args: str) -> int:
    return main(["reprocess", "--tiled", server.uri, "--backend", "numpy", "--in-process", *args])


def test_reprocess_under_a_prefix_equals_the_root_and_links_the_raw_run(tiled_server, tiled_client, stored):
    client, key = tiled_client, tiled_server.uri.split("api_key=")[1]
    uid, start, _ = stored["a"]
    assert _reprocess(tiled_server, uid) == 0
    at_root = client["phasestream"][uid]
    before = {k: at_root[k].read() for k in ARRAYS}
    assert at_root.metadata["raw"]["path"] == uid
    assert _reprocess(tiled_server, "--raw", RAW, "--replace", uid) == 0
    result = client["phasestream"][uid]
    md = result.metadata
    assert md["status"] == "complete", md["errors"]
    for k in ARRAYS:
        np.testing.assert_array_equal(result[k].read(), before[k], err_msg=k)
    # one step from the result to its raw images; the stored link carries no key
    assert md["raw"]["path"] == f"{RAW}/{uid}"
    raw = client[md["raw"]["path"]]
    assert raw.metadata["start"]["uid"] == uid and raw.uri == md["raw"]["uri"]
    assert raw.uri.startswith(client.uri.split("/api/")[0])
    np.testing.assert_array_equal(raw["primary"]["det_img"].read(), client[uid]["primary"]["det_img"].read())
    assert key not in str(dict(md)) and "api_key" not in str(dict(md))
    # and it is found by the keys of its start document
    assert md["time"] == start["time"] and md["plan_name"] == "energy_stack_scan"


def _expected(stored, labels: str) -> set[str]:
    return {stored[label][0] for label in labels}


@pytest.mark.slow  # make test-stack: keeps make test under 15 minutes
def test_friendly_keys_select_the_same_raw_runs_and_results(tiled_server, tiled_client, stored, capsys):
    client = tiled_client
    times = {label: start["time"] for label, (_, start, _) in stored.items()}
    # the command reprocesses exactly the runs selected, each into a root of its own
    steps = [("b", ["--sample", "P1", "--plan", "energy_stack_scan", "--since", repr(times["b"]), "--soc", "2.0",
                    "--tolerance", "0.1"]),
             ("a", ["--until", repr(times["b"])]),
             ("c", ["--plan", "xanes_map"])]
    for i, (_, options) in enumerate(steps):
        assert _reprocess(tiled_server, "--raw", RAW, "--root", "selection", *options) == 0
        assert set(client["selection"]) == _expected(stored, [label for label, _ in steps[: i + 1]])
    assert _reprocess(tiled_server, "--raw", RAW, "--root", "selection", "--sample", "P9") == 1
    assert "no raw runs match (under bl/raw)" in capsys.readouterr().err
    cases = [
        ("b", RunQuery(state_of_charge=2.0)),
        ("bc", RunQuery(state_of_charge=2.0, tolerance=0.1)),
        ("a", RunQuery(state_of_charge=1.02, tolerance=0.05)),
        ("ab", RunQuery(sample="P1")),
        ("c", RunQuery(plan="xanes_map")),
        ("ab", RunQuery(plan="energy_stack_scan")),
        ("bc", RunQuery(since=times["b"])),
        ("ab", RunQuery(until=times["c"])),
        ("b", RunQuery(since=times["b"], until=times["c"])),
        ("c", RunQuery(sample="P2", state_of_charge=2.0, tolerance=0.1, plan="xanes_map")),
        ("", RunQuery(sample="P1", plan="xanes_map")),
        ("b", RunQuery(start={"sample.name": "P1", "sample.state_of_charge": 2.0})),
        ("", RunQuery(sample="P3")),
    ]
    for labels, query in cases:
        expected = _expected(stored, labels)
        assert set(find_raw_runs(client, query, raw=RAW)) == expected, (labels, query)
        assert set(find(client, query, root="selection")) == expected, (labels, query)
    assert set(find_raw_runs(client, {"sample.name": "P1"}, raw=RAW)) == _expected(stored, "ab")  # the older form
    # phasestream query: the same keys on the results, a time in ISO 8601 between runs a and b
    between = datetime.fromtimestamp((times["a"] + times["b"]) / 2, UTC).isoformat()
    capsys.readouterr()
    assert main(["query", "--tiled", tiled_server.uri, "--root", "selection", "--since", between, "--json"]) == 0
    assert {row["run_uid"] for row in json.loads(capsys.readouterr().out)} == _expected(stored, "bc")
    # sorted by start time; the results at the root are not raw runs
    assert find_raw_runs(client, RunQuery(since=times["a"]), raw=RAW) == [stored[k][0] for k in "abc"]
    assert find_raw_runs(client, RunQuery(since=times["a"])) == [stored["a"][0]]


@pytest.mark.parametrize("bad", ["../x", "a//b", ".", "bl/..", "bl/./raw", "bl/raw/../.."])
def test_raw_paths_that_are_not_plain_are_refused(tiled_server, tiled_client, stored, bad, capsys):
    assert _reprocess(tiled_server, "--raw", bad, "--soc", "2.0") == 2
    err = capsys.readouterr().err
    assert "phasestream reprocess: error: raw-run path" in err and "refused" in err
    with pytest.raises(InvalidIdentifierError):
        ReprocessOptions(raw=bad).validate()
    with pytest.raises(InvalidIdentifierError):
        open_raw_run(tiled_client, stored["a"][0], bad)
    assert main(["serve", "--catalog", "/nonexistent", "--raw", bad]) == 2


def test_a_missing_raw_container_is_a_refused_request(tiled_server, stored, capsys):
    for selection in (["--soc", "2.0"], [stored["a"][0]]):
        assert _reprocess(tiled_server, "--raw", "bl/nothing", *selection) == 2
        assert "no container 'bl/nothing' of raw runs" in capsys.readouterr().err
    assert check_raw_path("/") == "" and check_raw_path("/bl/raw/") == RAW


def test_live_results_link_and_recover_from_the_raw_path(tiled_client, stored):
    uid, _, docs = stored["c"]  # stored under bl/raw only: recovery can only read it there
    live = LiveService(tiled_client, backend="numpy", poll_seconds=0.1, root="live", raw=RAW, stale_after=None)
    lost = next(i for i, (n, _) in enumerate(docs) if n == "event")
    for i, (name, doc) in enumerate(docs):
        if i == lost:
            live.run_incomplete(uid, "message gap: 1 document lost")
        else:
            live(name, doc)
    assert live.wait_recovered(uid, 60) == "complete"
    live.close()
    md = tiled_client["live"][uid].metadata
    assert md["recovered"]["reason"] == "documents lost" and md["n_energies_seen"] == len(ENERGIES)
    assert md["raw"]["path"] == f"{RAW}/{uid}" and md["plan_name"] == "xanes_map"


def test_times_are_iso_dates_or_seconds():
    assert parse_time("2026-12-03T14:00:00+00:00") == datetime(2026, 12, 3, 14, tzinfo=UTC).timestamp()
    assert parse_time("1700000000.5") == 1700000000.5
    assert parse_time("2026-12-03") == datetime(2026, 12, 3).astimezone().timestamp()  # local midnight
    for bad in ("yesterday", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_time(bad)
    with pytest.raises(ValueError, match="before until"):
        RunQuery(since=2.0, until=1.0)
    with pytest.raises(ValueError, match="refusing to select every run"):
        find_raw_runs(None, RunQuery())


def test_a_result_copies_only_usable_start_times_and_plan_names():
    assert checked_run_origin({"time": 5, "plan_name": "list_scan"}) == {"time": 5.0, "plan_name": "list_scan"}
    for start in ({"time": 10**400, "plan_name": "x" * 5000}, {"time": float("nan"), "plan_name": 3},
                  {"time": True, "plan_name": None}, {}):
        assert checked_run_origin(start) == {"time": None, "plan_name": None}
