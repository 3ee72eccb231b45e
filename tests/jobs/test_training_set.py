"""tiled_training_set: runs whose results name their phases in another order, and results not complete."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from phasestream.jobs.training import tiled_training_set
from phasestream.references import load_references
from phasestream.store.results import ResultWriter

NI = Path(__file__).resolve().parents[1] / "data" / "ni-k-edge"  # tests/data/ni-k-edge/README.md
REFS = load_references([NI / "ref_NiO.txt", NI / "ref_LiNiO2.txt"])
ENERGIES = np.linspace(8300.0, 8450.0, 12)
SHAPE = (8, 8)


def _result(client, uid, phases, phase_map, status="complete"):
    """A result of the given phase order whose ``phase`` map is ``phase_map`` (every pixel a particle)."""
    od = np.random.default_rng(0).uniform(0.1, 1.0, (len(ENERGIES), *SHAPE)).astype(np.float32)
    client.create_container(uid, metadata={"start": {"uid": uid}})
    writer = ResultWriter(client, uid, shape=SHAPE, phases=phases, n_energies=len(ENERGIES),
                          metadata={"energies_eV": list(ENERGIES), "references": {"name": REFS.name}})
    writer.write_od_planes(0, od)
    writer.finalize_od(len(ENERGIES))
    pcc = np.zeros((len(phases), *SHAPE))
    writer.write_maps(pcc=pcc, phase=phase_map.astype(np.int16), mask=np.ones(SHAPE, np.uint8),
                      reliability=np.ones(SHAPE), ambiguous=np.zeros(SHAPE, np.uint8))
    writer.update_metadata(status=status)


def test_labels_of_runs_in_another_phase_order_are_remapped(tiled_client):
    labels = np.tile(np.array([0, 1, -1, 0]), 16).reshape(SHAPE)
    _result(tiled_client, "ts-order-a", ["NiO", "LiNiO2"], labels)
    _result(tiled_client, "ts-order-b", ["LiNiO2", "NiO"], labels)  # its label 0 is LiNiO2
    data = tiled_training_set(tiled_client, runs=["ts-order-a", "ts-order-b"], n_validation=0)
    assert data.phases == ["NiO", "LiNiO2"]
    n = labels.size
    first, second = data.labels[:n], data.labels[n:]
    np.testing.assert_array_equal(first, labels.ravel())
    # the second run's labels name the same phases as the first's: 0 <-> 1 swapped, -1 (no phase) kept
    np.testing.assert_array_equal(second, np.select([labels.ravel() == 0, labels.ravel() == 1], [1, 0], -1))
    assert [data.phases[k] for k in second[second >= 0]] == \
        [["LiNiO2", "NiO"][k] for k in labels.ravel()[labels.ravel() >= 0]]


def test_runs_of_other_phases_are_refused(tiled_client):
    _result(tiled_client, "ts-phases-a", ["NiO", "LiNiO2"], np.zeros(SHAPE))
    _result(tiled_client, "ts-phases-b", ["NiO", "Ni"], np.zeros(SHAPE))
    with pytest.raises(ValueError, match=r"run ts-phases-b .*\['NiO', 'Ni'\].*\['NiO', 'LiNiO2'\]"):
        tiled_training_set(tiled_client, runs=["ts-phases-a", "ts-phases-b"], n_validation=0)


def test_results_not_complete_are_refused_by_name(tiled_client):
    _result(tiled_client, "ts-done", ["NiO", "LiNiO2"], np.zeros(SHAPE))
    _result(tiled_client, "ts-running", ["NiO", "LiNiO2"], np.zeros(SHAPE), status="running")
    with pytest.raises(ValueError, match="run ts-running: its result is 'running', not complete"):
        tiled_training_set(tiled_client, runs=["ts-done", "ts-running"], n_validation=0)
