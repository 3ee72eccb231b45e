"""One result or raw run whose metadata has a field of the wrong type (hand-edited, older, written by
another tool: anyone with the key can) costs that field, never the listing of the others: ``phasestream
query`` and the selection of raw runs by ``reprocess`` list every run."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from bluesky import RunEngine

from phasestream.app.cli import main
from phasestream.app.view import ViewServer
from phasestream.jobs.reprocess import ReprocessOptions, reprocess_run
from phasestream.references import load_references, select_energies
from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.catalog import RunQuery, find, find_raw_runs
from phasestream.store.tiled import raw_run_writer

ENERGIES = select_energies(load_references("nvpf-synthetic"), 4)
HOSTILE = [
    {"state_of_charge": "1.0"},  # sorted against the good run's float: TypeError before
    {"sample": "P1", "references": ["a"], "phase_fractions": [0.5, 0.5], "refined_fractions": 7},
    {"phase_fractions": {"Na3.0": "0.5"}, "ambiguous_fraction": [0.1], "scan_id": [1], "status": {"s": 1}},
    {"run_uid": 5, "references": {"phases": 5}, "field": {"index": [1]}},
]


@pytest.fixture(scope="module")
def runs(tiled_client):
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(tiled_client))
    uids = []
    for i, soc in enumerate((1.0, 2.0)):
        sample = make_sample((24, 24), state_of_charge=soc, seed=40 + i, n_particles=1)
        energy = make_energy()
        det = TransmissionDetector(sample, energy, mode="stxm", i0=5000.0, seed=i)
        (uid,) = RE(energy_stack_scan([det], energy, ENERGIES, sample=sample, mode="stxm", i0_key=det.i0_key))
        assert reprocess_run(tiled_client, uid, ReprocessOptions(backend="numpy")).status in ("complete", "partial")
        uids.append(uid)
    return uids


@pytest.mark.parametrize("hostile", HOSTILE)
def test_query_lists_every_result_beside_one_of_the_wrong_types(tiled_server, tiled_client, runs, hostile, capsys):
    bad, good = runs
    node = tiled_client["phasestream"][bad]
    original = dict(node.metadata)
    node.replace_metadata(metadata={**original, **hostile})
    try:
        assert main(["query", "--tiled", tiled_server.uri]) == 0
        text = capsys.readouterr().out
        assert good[:8] in text
        assert main(["query", "--tiled", tiled_server.uri, "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        rows = rows if isinstance(rows, list) else rows["results"]
        assert {good, bad} <= {r["key"] for r in rows}
    finally:
        node.replace_metadata(metadata=original)


@pytest.mark.parametrize("time", ["yesterday", None, [1]])
def test_a_raw_run_without_a_numeric_start_time_is_still_selected(tiled_client, runs, time):
    bad, good = runs
    node = tiled_client[bad]
    original = dict(node.metadata)
    node.replace_metadata(metadata={**original, "start": {**original["start"], "time": time}})
    try:
        found = find_raw_runs(tiled_client, RunQuery(state_of_charge=1.5, tolerance=0.5))
        assert found == [bad, good]  # the run without a time sorts first
    finally:
        node.replace_metadata(metadata=original)


NON_FINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", ["state_of_charge", "tolerance", "since", "until"])
def test_a_query_of_a_number_that_is_not_finite_is_refused_naming_it(name, value):
    # nan matched nothing and inf everything, silently (soc=nan: no run; tolerance=inf: every run)
    with pytest.raises(ValueError, match=name):
        RunQuery(**{"state_of_charge": 1.0, name: value})
    with pytest.raises(ValueError, match="scan_id"):
        RunQuery(start={"scan_id": value})


def test_a_query_whose_bounds_overflow_is_refused():
    with pytest.raises(ValueError, match="tolerance"):
        RunQuery(state_of_charge=1e308, tolerance=1e308)  # soc + tolerance is inf


def test_find_refuses_a_state_of_charge_or_tolerance_that_is_not_finite(tiled_client, runs):
    low, high = runs  # states of charge 1.0 and 2.0
    assert set(find(tiled_client, state_of_charge=1.5, tolerance=0.5)) == {low, high}
    assert set(find(tiled_client, state_of_charge=2.0)) == {high}
    for soc, tolerance in [(float("nan"), 0.0), (1.0, float("nan")), (float("inf"), 0.0), (1.0, float("inf")),
                           (float("1e400"), 1.0), (None, float("nan"))]:
        with pytest.raises(ValueError, match=r"state_of_charge|tolerance"):
            find(tiled_client, state_of_charge=soc, tolerance=tolerance)
        with pytest.raises(ValueError, match=r"state_of_charge|tolerance"):
            find_raw_runs(tiled_client, state_of_charge=soc, tolerance=tolerance)


@pytest.mark.parametrize("argv", [["--soc", "nan"], ["--soc", "inf"], ["--soc", "1e400"], ["--soc=-inf"],
                                  ["--soc", "1", "--tolerance", "nan"], ["--soc", "1", "--tolerance", "inf"],
                                  ["--soc", "1", "--tolerance=-1"]])
def test_query_refuses_an_option_that_is_no_finite_number(tiled_server, argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["query", "--tiled", tiled_server.uri, *argv])
    assert exit_.value.code == 2  # argparse's refusal, naming the option, before Tiled is asked
    option = argv[-1].partition("=")[0] if "=" in argv[-1] else argv[-2]
    assert f"argument {option}:" in capsys.readouterr().err


def test_the_views_search_answers_400_to_a_number_that_is_not_finite(tiled_client, runs):
    low, high = runs
    with ViewServer(tiled_client) as view:
        def search(query: str) -> tuple[int, dict]:
            try:
                with urllib.request.urlopen(f"{view.url}/api/search?{query}", timeout=30) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as error:
                return error.code, json.loads(error.read())

        assert search("soc=1.5&tolerance=0.5") == (200, {"uids": sorted([low, high])})
        for query in ("soc=nan", "soc=1&tolerance=nan", "soc=inf", "soc=1&tolerance=inf", "soc=1e400&tolerance=1"):
            status, body = search(query)
            assert status == 400 and ("state_of_charge" in body["error"] or "tolerance" in body["error"]), query
