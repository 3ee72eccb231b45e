"""Simulated scans through the kernels, end to end, against the simulation's ground truth."""

import numpy as np
import pytest
from bluesky import RunEngine

from phasestream.kernels import PearsonAccumulator, assign_phases, optical_density, particle_mask
from phasestream.references import load_references, select_energies
from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample


@pytest.mark.parametrize("noise", [False, True])
def test_txm_scan_with_dark_and_flat_streams_recovers_phases(noise):
    refs = load_references("nvpf-synthetic")
    energies = select_energies(refs, 12)
    sample = make_sample((96, 96), state_of_charge=2.4, seed=11)
    energy = make_energy()
    det = TransmissionDetector(sample, energy, mode="txm", i0=20000.0, noise=noise, seed=5)
    streams, docs = {}, []
    RE = RunEngine({})
    RE(energy_stack_scan([det], energy, energies, sample=sample, mode="txm"), lambda n, d: docs.append((n, d)))
    start = next(d for n, d in docs if n == "start")
    assert start["phasestream"]["mode"] == "txm"
    for name, doc in docs:
        if name == "descriptor":
            streams[doc["uid"]] = doc["name"]
    events = [(streams[d["descriptor"]], d["data"]) for n, d in docs if n == "event"]
    key, ekey = start["phasestream"]["image_key"], start["phasestream"]["energy_key"]
    dark = np.mean([np.asarray(d[key], float) for s, d in events if s == "dark"], axis=0)
    flats = {round(d[ekey], 3): np.asarray(d[key]) for s, d in events if s == "flat"}
    acc = PearsonAccumulator(sample.shape, len(refs.phases), backend="numba")
    ods = []
    for stream, data in events:
        if stream != "primary":
            continue
        e = data[ekey]
        od, valid = optical_density(np.asarray(data[key]), flat=flats[round(e, 3)], dark=dark)
        acc.update(od, refs.interpolate(e)[:, 0], valid)
        ods.append(od)
        if not noise:  # flat/dark correction removes the illumination pattern exactly
            truth = sample.optical_density(e)  # flats are taken without sample and substrate
            np.testing.assert_allclose(od[sample.particle], truth[sample.particle], atol=2e-3)
    assert len(ods) == len(energies)
    mask = particle_mask(np.stack(ods))
    phase, _, _ = assign_phases(acc.maps(), mask)
    assert sample.accuracy(phase) >= (0.99 if not noise else 0.97)
