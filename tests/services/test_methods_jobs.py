"""Post-scan classic methods against a real embedded Tiled server: arrays, metadata, failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from phasestream.methods import linear_combination_fit
from phasestream.references import load_references
from phasestream.services.methods_jobs import (
    METHODS,
    MethodsOptions,
    lcf_arrays,
    methods_options_from_start,
    run_methods,
)
from phasestream.services.results import ResultWriter
from phasestream.sim.phantoms import particle_phantom

NI = Path(__file__).resolve().parents[3] / "shared" / "data" / "ni-k-edge"
ENERGIES = np.linspace(8300.0, 8450.0, 40)


@pytest.fixture(scope="module")
def ni_csv(tmp_path_factory):
    refs = load_references([NI / "ref_NiO.txt", NI / "ref_LiNiO2.txt"])
    path = tmp_path_factory.mktemp("refs") / "ni.csv"
    table = np.column_stack([refs.energies, refs.spectra.T])
    np.savetxt(path, table, delimiter=",", header="energy_eV,NiO,LiNiO2", comments="")
    return path


def _result(client, uid, ni_csv, *, recorded=ENERGIES, shape=(24, 32), raw=True):
    """A raw run (start document only) and its result with an OD cube of a two-phase sample."""
    refs = load_references(ni_csv)
    thickness = particle_phantom(shape, n_particles=3, seed=5).astype(np.float64)
    frac = np.clip(np.linspace(0, 1, shape[1])[None, :] + 0 * thickness, 0, 1)
    od = np.tensordot(refs.interpolate(ENERGIES).T, np.stack([frac, 1 - frac]) * thickness, axes=1)
    od += np.random.default_rng(0).normal(0, 0.01, od.shape)
    if raw:
        client.create_container(uid, metadata={"start": {"uid": uid, "phasestream": {"references": str(ni_csv)}}})
    writer = ResultWriter(client, uid, shape=shape, phases=refs.phases, n_energies=len(recorded),
                          metadata={"energies_eV": list(recorded), "references": {"name": refs.name}})
    writer.write_od_planes(0, od.astype(np.float32))
    writer.finalize_od(len(recorded))
    return od.astype(np.float32), refs


def test_run_methods_writes_arrays_equal_to_the_functions(tiled_client, ni_csv):
    od, refs = _result(tiled_client, "run-methods-1", ni_csv)
    opts = MethodsOptions(methods=("lcf", "normalize", "edge50", "masks", "kmeans", "rum_tv"), thickness_min=0.3,
                          rum_max_iter=20)
    record = run_methods(tiled_client, "run-methods-1", opts)
    assert {k: v["status"] for k, v in record.items()} == dict.fromkeys(opts.validate().methods, "complete"), record
    node = tiled_client["phasestream"]["run-methods-1"]
    # fractions_lcf equals the direct function's output on the same OD cube
    direct = lcf_arrays(od, refs.interpolate(ENERGIES), ENERGIES, opts)
    fit = linear_combination_fit(od.astype(np.float64), refs.interpolate(ENERGIES), method="nnls")
    np.testing.assert_allclose(node["fractions_lcf"].read(), direct["fractions_lcf"], rtol=1e-6)
    np.testing.assert_allclose(node["fit_error"].read(), fit.fit_error, rtol=1e-6)
    np.testing.assert_allclose(direct["fractions_lcf"] * fit.fractions.sum(axis=0), fit.fractions, atol=1e-6)
    assert node["fractions_lcf"].shape == (2, 24, 32) and node["fractions_lcf"].dtype == np.float32
    assert node["thickness"].shape == (24, 32) and node["cluster_spectra"].shape == (3, 40)
    assert node["fractions_rum_tv"].shape == (2, 24, 32)
    np.testing.assert_allclose(node["fractions_rum_tv"].read().sum(axis=0), 1.0, atol=1e-5)
    mask = node["threshold_mask"].read()
    np.testing.assert_array_equal(mask, node["thickness"].read() >= 0.3)
    md = node.metadata["methods"]
    assert md["lcf"]["parameters"]["method"] == "nnls" and md["lcf"]["seconds"] >= 0
    assert len(md["rum_tv"]["parameters"]["history"]["objective"]) == md["rum_tv"]["parameters"]["iterations"] + 1
    assert "methods" in node.metadata["timings"]


def test_a_failing_method_is_recorded_and_the_others_run(tiled_client, ni_csv):
    _result(tiled_client, "run-methods-2", ni_csv)
    record = run_methods(tiled_client, "run-methods-2", MethodsOptions(methods=("masks", "lcf")))
    assert record["masks"]["status"] == "failed" and "thickness_min" in record["masks"]["errors"][0]
    assert record["lcf"]["status"] == "complete"
    assert tiled_client["phasestream"]["run-methods-2"].metadata["methods"]["masks"]["status"] == "failed"


def test_bad_input_is_recorded_not_raised(tiled_client, ni_csv):
    # energies outside the references' range (8200-9000 eV): every method fails with the reason
    _result(tiled_client, "run-methods-3", ni_csv, recorded=np.linspace(9000, 9100, 40))
    record = run_methods(tiled_client, "run-methods-3", MethodsOptions(methods=("lcf", "rum_tv")))
    assert record["lcf"]["status"] == record["rum_tv"]["status"] == "failed"
    assert "outside the range" in record["lcf"]["errors"][0]
    assert run_methods(tiled_client, "no-such-run")["_job"]["status"] == "failed"


def test_options_from_start_document():
    assert methods_options_from_start({"phasestream": {"references": "x"}}) is None
    opts = methods_options_from_start({"phasestream": {"methods": ["rum_tv", "lcf"]}})
    assert opts.methods == ("lcf", "rum_tv")
    opts = methods_options_from_start({"methods": {"names": ["lcf"], "lcf_method": "fcls", "edge_window": [1, 2]}})
    assert opts.lcf_method == "fcls" and opts.edge_window == (1.0, 2.0)
    with pytest.raises(ValueError, match="unknown methods"):
        methods_options_from_start({"phasestream": {"methods": ["pca"]}})
    with pytest.raises(ValueError, match="unknown keys"):
        methods_options_from_start({"phasestream": {"methods": {"names": ["lcf"], "speed": 1}}})
    assert set(MethodsOptions(methods=METHODS).validate().methods) == set(METHODS)
