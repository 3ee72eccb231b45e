"""What one sender can make the worker hold: at most ``max_open_runs`` runs analysed at once, and at most
``max_bytes`` of documents kept for a run waiting for its primary descriptor.

Each open run holds its streaming accumulators (about 4.7 MB at 512², measured: 40 open runs took 190 MB more);
runs that never stop are ended by the tracker after ``--stop-timeout``, but until then a sender could open any
number of them (docs/security.md, "Bounds and their options").
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.plans import count
from ophyd.sim import det

from phasestream.callbacks.pending import PendingRun, held_bytes
from phasestream.callbacks.phase_map import PhaseMapCallback
from phasestream.contract import Status
from phasestream.references import load_references, select_energies
from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample

REFS = load_references("nvpf-synthetic")
ENERGIES = select_energies(REFS, 6)


def scan(seed: int) -> list[tuple[str, dict]]:
    sample = make_sample((32, 32), state_of_charge=2.0, seed=seed, n_particles=2)
    energy = make_energy()
    detector = TransmissionDetector(sample, energy, i0=8000.0, seed=seed)
    docs = []
    RunEngine({})(energy_stack_scan([detector], energy, ENERGIES, sample=sample, i0_key=detector.i0_key),
                  lambda n, d: docs.append((n, copy.deepcopy(d))))
    return docs


def test_a_run_over_max_open_runs_is_refused_with_its_reason_and_the_open_ones_complete():
    runs = [scan(seed) for seed in range(4)]
    uids = [docs[0][1]["uid"] for docs in runs]
    cb = PhaseMapCallback(None, backend="numba", max_open_runs=2)
    for docs in runs[:3]:  # three runs open at once: each sends all but its stop
        for name, doc in docs[:-1]:
            cb(name, doc)
    for docs in runs[:3]:
        cb(*docs[-1])
    for name, doc in runs[3]:  # the first two ended: a fourth is analysed again
        cb(name, doc)
    assert cb.flush(30)
    cb.close()
    statuses = {uid: cb.results[uid].status for uid in uids}
    assert statuses == {uids[0]: Status.COMPLETE, uids[1]: Status.COMPLETE, uids[2]: Status.FAILED,
                        uids[3]: Status.COMPLETE}
    (error,) = cb.results[uids[2]].errors
    assert "2 runs are open in this worker" in error and "--max-open-runs" in error
    assert f"phasestream reprocess {uids[2]}" in error
    assert cb.active == {} and cb.pending == {}


def test_max_open_runs_must_be_a_positive_count():
    with pytest.raises(ValueError, match="max_open_runs"):
        PhaseMapCallback(None, max_open_runs=0)


def test_held_bytes_counts_arrays_strings_and_numbers_of_a_document():
    image = np.zeros((64, 64), np.float64)
    doc = {"data": {"img": image, "name": "x" * 100, "values": [1.0] * 10}, "seq_num": 1}
    assert held_bytes(doc) >= image.nbytes + 100 + 10 * 8
    assert held_bytes(doc) < image.nbytes + 100 + 10 * 8 + 4096
    assert held_bytes({"nested": [[image] * 3] * 2}) >= 6 * image.nbytes


def test_a_pending_run_holding_more_bytes_than_its_bound_is_given_up():
    docs = []
    RunEngine({})(count([det], num=3), lambda n, d: docs.append((n, copy.deepcopy(d))))
    start = docs[0][1]
    reasons = []
    pending = PendingRun(start, resolve=lambda s, d: None, give_up=reasons.append, max_bytes=1 << 20)
    dark = {"descriptor": "d", "uid": "e", "seq_num": 1, "data": {"dark": np.zeros((300, 300))}, "time": 0.0,
            "timestamps": {}}
    pending("descriptor", {"uid": "d", "name": "dark", "run_start": start["uid"], "data_keys": {}})
    pending("event", dark)
    assert reasons == [] and pending.held > 300 * 300 * 8
    pending("event", {**dark, "uid": "f", "seq_num": 2})
    assert len(reasons) == 1 and "1 MiB" in reasons[0] and "primary stream's descriptor" in reasons[0]
    assert pending.kept == [] and pending.held == 0
