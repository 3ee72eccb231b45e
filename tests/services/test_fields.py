"""A grid scan over 2 positions x 13 energies through the real worker process and Tiled, and through
`phasestream reprocess`: one complete result per field (`phasestream/<uid>.f<index>`), each equal to a
single-position scan of that field, found by the catalog's queries like any other result."""

import time

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.plans import list_grid_scan, list_scan
from ophyd.sim import SynAxis
from tiled.queries import Key

from phasestream.app.cli import main
from phasestream.app.live import ServeProcess
from phasestream.callbacks.phase_map import PhaseMapCallback
from phasestream.callbacks.unanalysed import CONFLICT_NOTE
from phasestream.contract import RunDefaults
from phasestream.contract.fields import field_key
from phasestream.references import load_references, select_energies
from phasestream.sim import MosaicDetector, TransmissionDetector, make_energy, make_sample
from phasestream.store.catalog import RunQuery, find, wait_for_result
from phasestream.store.tiled import raw_run_writer
from phasestream.transport.proxy import start_proxy
from phasestream.transport.wire import DocumentPublisher

ENERGIES = select_energies(load_references("nvpf-synthetic"), 12)  # 13 energies
ARRAYS = ("od", "pcc", "phase", "reliability", "ambiguous", "mask")
POSITIONS = [0.0, 1.0]
KEYS = ("--references", "nvpf-synthetic", "--energy-key", "energy")


def _samples():
    return [make_sample((32, 32), state_of_charge=soc, seed=seed, n_particles=2) for seed, soc in ((1, 1.2), (2, 2.6))]


def _arrays(client, key):
    node = client["phasestream"][key]
    return {name: node[name].read() for name in ARRAYS}


def _assert_equal(client, field, single):
    a, b = _arrays(client, field), _arrays(client, single)
    for name in ARRAYS:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    md_a, md_b = client["phasestream"][field].metadata, client["phasestream"][single].metadata
    assert md_a["phase_fractions"] == md_b["phase_fractions"] and md_a["energies_eV"] == md_b["energies_eV"]


@pytest.mark.cluster  # make test-stack: keeps make test under 15 minutes on 2 cores
def test_a_grid_scan_gives_one_complete_result_per_field_live_and_reprocessed(tiled_server, tiled_client, capsys):
    client = tiled_client
    samples = _samples()
    with start_proxy() as proxy, ServeProcess(proxy.out_address, tiled_server.uri,
                                              args=("--backend", "numpy", *KEYS)) as worker:
        with DocumentPublisher(proxy.in_address) as publisher:
            assert publisher.wait_for_subscriber(10)
            RE = RunEngine({})
            RE.subscribe(raw_run_writer(client))
            RE.subscribe(publisher)
            energy, x = make_energy(), SynAxis(name="sample_x")
            det = MosaicDetector(samples, POSITIONS, x, energy, noise=False)
            (grid,) = RE(list_grid_scan([det], energy, ENERGIES, x, POSITIONS), sample={"state_of_charge": 1.7})
            singles = []
            for sample in samples:
                energy = make_energy()
                singles += RE(list_scan([TransmissionDetector(sample, energy, noise=False)], energy, ENERGIES))
            fields = [field_key(grid, 0), field_key(grid, 1)]
            results = {key: wait_for_result(client, key, timeout=120).metadata for key in (*fields, *singles)}
        worker.stop()
    assert grid not in client["phasestream"]  # the run's results are its fields'
    for key in fields:  # the worker's stop left the finished fields as they were; post-scan jobs ran on each
        now = client["phasestream"][key].metadata
        assert (now["status"], now["errors"]) == ("complete", []), now
        assert now["refinement"]["retry"].endswith(f" {key}"), now["refinement"]  # skipped: no model server
    for index, (key, single) in enumerate(zip(fields, singles, strict=True)):
        md = results[key]
        assert md["status"] == "complete", md["errors"]
        assert md["run_uid"] == grid and md["raw"]["path"] == grid and md["state_of_charge"] == 1.7
        assert md["field"] == {"index": index, "count": 2, "positions": {"sample_x": POSITIONS[index]}}
        assert md["n_energies_seen"] == len(ENERGIES) and client["phasestream"][key]["od"].shape[0] == len(ENERGIES)
        _assert_equal(client, key, single)
    # every query finds the fields as results: by state of charge, by run uid, by field
    assert sorted(find(client, RunQuery(state_of_charge=1.7), status="complete")) == fields
    assert sorted(client["phasestream"].search(Key("run_uid") == grid)) == fields
    assert list(client["phasestream"].search(Key("field.positions.sample_x") == 1.0)) == [fields[1]]
    capsys.readouterr()
    assert main(["query", "--tiled", tiled_server.uri, "--soc", "1.7"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split()[0] for row in rows] == [f"{grid[:8]}.f0", f"{grid[:8]}.f1"]

    # reprocess the raw run: complete fields are kept without --replace, replaced with it
    replaced = time.time()
    assert main(["reprocess", "--tiled", tiled_server.uri, "--backend", "numpy", *KEYS, grid]) != 0
    assert all(client["phasestream"][key].metadata["updated_at"] < replaced for key in fields)
    assert main(["reprocess", "--tiled", tiled_server.uri, "--backend", "numpy", *KEYS, "--replace", grid]) == 0
    assert sorted(client["phasestream"].search(Key("run_uid") == grid)) == fields
    for key, single in zip(fields, singles, strict=True):
        md = client["phasestream"][key].metadata
        assert md["status"] == "complete" and md["updated_at"] > replaced, md["errors"]
        _assert_equal(client, key, single)


@pytest.mark.cluster  # make test-stack: keeps make test under 15 minutes on 2 cores
def test_reprocess_with_the_energy_key_replaces_the_skipped_result_by_the_fields(tiled_server, tiled_client):
    client = tiled_client
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(client))
    energy, x = make_energy(), SynAxis(name="sample_x")
    det = MosaicDetector(_samples(), POSITIONS, x, energy, noise=False)
    (grid,) = RE(list_grid_scan([det], energy, ENERGIES, x, POSITIONS))
    # two motors and no --energy-key: skipped under the run uid (exit 3), as any run whose keys are ambiguous
    assert main(["reprocess", "--tiled", tiled_server.uri, "--backend", "numpy", "--references", "nvpf-synthetic",
                 grid]) == 3
    assert client["phasestream"][grid].metadata["status"] == "skipped"
    assert main(["reprocess", "--tiled", tiled_server.uri, "--backend", "numpy", *KEYS, grid]) == 0
    found = {key: node.metadata["status"] for key, node in client["phasestream"].search(Key("run_uid") == grid).items()}
    assert found == {field_key(grid, 0): "complete", field_key(grid, 1): "complete"}
    # a post-scan step after the recomputation runs on every field's result
    assert main(["reprocess", "--tiled", tiled_server.uri, "--backend", "numpy", *KEYS, "--replace",
                 "--method", "normalize", grid]) == 0
    for key in found:
        node = client["phasestream"][key]
        assert node.metadata["methods"]["normalize"]["status"] == "complete" and "normalized" in node
    # the run's start document again (a replay, a second worker): a conflict, noted on its first field
    cb = PhaseMapCallback(client, backend="numpy", defaults=RunDefaults("nvpf-synthetic", energy_key="energy"))
    cb("start", dict(client[grid].metadata["start"]))
    cb.flush()
    cb.close()
    assert any(CONFLICT_NOTE in e for e in client["phasestream"][field_key(grid, 0)].metadata["errors"])
    assert sorted(client["phasestream"].search(Key("run_uid") == grid)) == sorted(found)
