"""Reprocessing raw runs from Tiled gives the live results."""

import numpy as np
import pytest
from bluesky import RunEngine

from phasestream.callbacks.phase_map import PhaseMapCallback
from phasestream.jobs.context import JobContext
from phasestream.jobs.reprocess import reprocess_run, run
from phasestream.references import load_references, select_energies
from phasestream.sim import HDF5TransmissionDetector, TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.tiled import raw_run_writer

ENERGIES = select_energies(load_references("nvpf-synthetic"), 6)
ARRAYS = ("od", "pcc", "phase", "reliability", "ambiguous", "mask")


@pytest.fixture
def tiled(tiled_server, tiled_client, detector_files):
    return tiled_server, tiled_client, detector_files


@pytest.mark.parametrize(("mode", "external"), [("stxm", False), ("txm", False), ("stxm", True)])
def test_reprocess_equals_live(tiled, mode, external):
    server, client, files = tiled
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(client))
    live = PhaseMapCallback(client, backend="numba", update_every=2, asset_folders=[files] if external else ())
    RE.subscribe(live)
    sample = make_sample((40, 40), state_of_charge=1.0, seed=3, n_particles=2)
    energy = make_energy()
    kwargs = {"write_path": files} if external else {}
    cls = HDF5TransmissionDetector if external else TransmissionDetector
    det = cls(sample, energy, mode=mode, i0=6000.0, seed=2, **kwargs)
    i0_key = det.i0_key if mode == "stxm" else None
    (uid,) = RE(energy_stack_scan([det], energy, ENERGIES, sample=sample, mode=mode, i0_key=i0_key))
    assert live.flush(60)
    live.close()
    before = {k: client["phasestream"][uid][k].read() for k in ARRAYS}
    live_md = client["phasestream"][uid].metadata
    assert live_md["status"] == "complete", live_md["errors"]
    # the reprocess job, with another backend: the same numbers
    outcome = run(JobContext(server.uri), uid, {"backend": "numpy", "replace": True})
    assert outcome.status == "complete" and outcome.job == "reprocess" and outcome.reason == ""
    after = client["phasestream"][uid]
    for k in ARRAYS:
        np.testing.assert_allclose(after[k].read(), before[k], atol=1e-5, equal_nan=True, err_msg=k)
    assert after.metadata["phase_fractions"] == pytest.approx(live_md["phase_fractions"], abs=1e-3)


def test_reprocess_unknown_run_is_a_clear_error(tiled):
    _, client, _ = tiled
    with pytest.raises(KeyError):
        reprocess_run(client, "no-such-uid")
