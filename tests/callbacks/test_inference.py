"""Runs from any plan: keys inferred from the documents, or the run skipped with the option to pass."""

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.plans import list_grid_scan, list_scan
from ophyd.sim import SynAxis

from phasestream.callbacks.inference import KeysNotInferred, infer_block
from phasestream.callbacks.phase_map import PhaseMapCallback
from phasestream.contract import RunDefaults
from phasestream.references import load_references, select_energies
from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample

ENERGIES = select_energies(load_references("nvpf-synthetic"), 7)  # 8 energies
SHAPE = (48, 48)
ARRAYS = ("pcc", "phase", "reliability", "ambiguous", "mask")


def _devices(seed=4, mode="stxm"):
    sample = make_sample(SHAPE, state_of_charge=1.5, seed=seed, n_particles=2)
    energy = make_energy()
    return sample, energy, TransmissionDetector(sample, energy, i0=7000.0, seed=seed, mode=mode)


def _documents(plan):
    docs = []
    RunEngine({})(plan, lambda name, doc: docs.append((name, doc)))
    return docs


def _primary(docs):
    start = docs[0][1]
    descriptor = next(d for n, d in docs if n == "descriptor" and d["name"] == "primary")
    return start, descriptor


def test_a_stock_list_scan_is_analysed_like_the_same_scan_with_the_block():
    sample, energy, det = _devices()
    stock = _documents(list_scan([det], energy, ENERGIES))
    sample, energy, det = _devices()  # the same frames again (same seed)
    with_block = _documents(energy_stack_scan([det], energy, ENERGIES, sample=sample, i0_key="det_i0"))
    inferred = PhaseMapCallback(references="nvpf-synthetic", backend="numpy")
    own = PhaseMapCallback(backend="numpy")
    for cb, docs in ((inferred, stock), (own, with_block)):
        for name, doc in docs:
            cb(name, doc)
        cb.flush()
    a, b = inferred.results[stock[0][1]["uid"]], own.results[with_block[0][1]["uid"]]
    assert a.status == b.status == "complete", (a.errors, b.errors)
    assert (a.settings.image_key, a.settings.energy_key, a.settings.i0_key) == ("det_img", "energy", "det_i0")
    assert a.settings.keys_from == {"image_key": "inferred", "energy_key": "inferred", "i0_key": "inferred"}
    assert a.energies == b.energies == pytest.approx(ENERGIES)
    for key in ARRAYS:
        np.testing.assert_array_equal(a.arrays[key], b.arrays[key], err_msg=key)


def test_ambiguous_keys_skip_the_run_naming_the_option():
    _, energy, det = _devices()
    other = SynAxis(name="sample_x")
    docs = _documents(list_grid_scan([det], energy, ENERGIES[:2], other, [0.0, 1.0]))
    cb = PhaseMapCallback(references="nvpf-synthetic", backend="numpy")
    for name, doc in docs:
        cb(name, doc)
    cb.flush()
    result = cb.results[docs[0][1]["uid"]]
    assert result.status == "skipped"
    assert "--energy-key" in result.errors[0] and "'energy'" in result.errors[0] and "'sample_x'" in result.errors[0]
    assert not result.arrays and not cb.active and not cb.pending
    # with the option the same run is analysed: one result per position of sample_x (tests/callbacks/test_fields.py)
    cb = PhaseMapCallback(defaults=RunDefaults("nvpf-synthetic", energy_key="energy"), backend="numpy")
    for name, doc in docs:
        cb(name, doc)
    cb.flush()
    uid = docs[0][1]["uid"]
    assert sorted(cb.results) == [f"{uid}.f0", f"{uid}.f1"]
    for result in cb.results.values():
        assert result.settings.keys_from["energy_key"] == "option"
        assert result.status == "complete" and len(result.energies) == 2, result.errors


def test_infer_block_rules():
    start = {"uid": "u", "motors": ["mono"]}
    scalar = {"dtype": "number", "shape": [], "source": "s"}
    image = {"dtype": "array", "shape": [4, 4], "dtype_numpy": "<u2", "source": "s"}
    desc = {"name": "primary", "data_keys": {"cam": image, "mono_energy": scalar, "I0": scalar, "ring": scalar},
            "hints": {"mono": {"fields": ["mono_energy"]}}}
    block, keys_from = infer_block(start, desc, RunDefaults("nvpf-synthetic"))
    assert block == {"references": "nvpf-synthetic", "mode": "stxm", "image_key": "cam",
                     "energy_key": "mono_energy", "i0_key": "I0"}
    # two images, two I0 monitors, a motor that is an image: never guessed
    cases = [
        ({**desc["data_keys"], "cam2": image}, "--image-key"),
        ({**desc["data_keys"], "izero_2": scalar}, "--i0-key"),
        ({"cam": image, "mono_energy": {"dtype": "array", "shape": [3]}}, "--energy-key"),
        ({"cam": image}, "--energy-key"),
    ]
    for keys, option in cases:
        with pytest.raises(KeysNotInferred, match=option):
            infer_block(start, {**desc, "data_keys": keys}, RunDefaults("nvpf-synthetic"))
    # TXM needs no I0; options win; no I0 candidate: I0 from the background
    block, keys_from = infer_block(start, {**desc, "data_keys": {**desc["data_keys"], "izero_2": scalar}},
                                   RunDefaults("nvpf-synthetic", mode="txm"))
    assert "i0_key" not in block
    block, keys_from = infer_block(start, {**desc, "data_keys": {"cam": image, "mono_energy": scalar}},
                                   RunDefaults("nvpf-synthetic", image_key="x"))
    assert block["image_key"] == "x" and keys_from["image_key"] == "option" and "i0_key" not in block
    assert keys_from["i0_key"].startswith("none")
    # without motors: the start document's hinted dimension
    block, _ = infer_block({"uid": "u", "hints": {"dimensions": [[["mono_energy"], "primary"]]}}, desc,
                           RunDefaults("nvpf-synthetic", i0_key="I0"))
    assert block["energy_key"] == "mono_energy"


def test_a_run_without_a_block_and_a_uid_that_cannot_name_a_result_is_never_recorded():
    _, energy, det = _devices()
    docs = _documents(list_scan([det], energy, ENERGIES[:2]))
    cb = PhaseMapCallback(references="nvpf-synthetic", backend="numpy")
    for name, doc in docs:
        cb(name, {**doc, "uid": ".."} if name == "start" else doc)
    cb.flush()
    assert not cb.results and not cb.pending and not cb.active


def test_a_run_that_ends_before_its_primary_descriptor_is_skipped():
    cb = PhaseMapCallback(references="nvpf-synthetic", backend="numpy")
    cb("start", {"uid": "run-1", "time": 0.0})
    cb("stop", {"uid": "stop-1", "run_start": "run-1", "time": 1.0, "exit_status": "abort"})
    cb.flush()
    result = cb.results["run-1"]
    assert result.status == "skipped" and "without a primary stream" in result.errors[0] and not cb.pending
