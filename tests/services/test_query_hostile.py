"""One result or raw run whose metadata has a field of the wrong type (hand-edited, older, written by
another tool: anyone with the key can) costs that field, never the listing of the others: ``phasestream
query`` and the selection of raw runs by ``reprocess`` list every run."""

from __future__ import annotations

import json

import pytest
from bluesky import RunEngine

from phasestream.app.cli import main
from phasestream.jobs.reprocess import ReprocessOptions, reprocess_run
from phasestream.references import load_references, select_energies
from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.catalog import RunQuery, find_raw_runs
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
