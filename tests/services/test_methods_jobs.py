"""Post-scan classic methods against a real embedded Tiled server: arrays, metadata, failures."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from phasestream.jobs.methods import kmeans_arrays, lcf_arrays, run_methods
from phasestream.jobs.methods_options import METHODS, MethodsOptions, methods_options_from_start
from phasestream.kernels import particle_mask
from phasestream.methods import kmeans_clusters, linear_combination_fit, normalize_edge
from phasestream.references import load_references
from phasestream.sim.phantoms import particle_phantom
from phasestream.store.results import ResultWriter

NI = Path(__file__).resolve().parents[1] / "data" / "ni-k-edge"  # tests/data/ni-k-edge/README.md
ENERGIES = np.linspace(8300.0, 8450.0, 40)


@pytest.fixture(scope="module")
def ni_csv(tmp_path_factory):
    refs = load_references([NI / "ref_NiO.txt", NI / "ref_LiNiO2.txt"])
    path = tmp_path_factory.mktemp("refs") / "ni.csv"
    table = np.column_stack([refs.energies, refs.spectra.T])
    np.savetxt(path, table, delimiter=",", header="energy_eV,NiO,LiNiO2", comments="")
    with pytest.MonkeyPatch.context() as env:  # the folder the deployment allows start documents to name
        env.setenv("PHASESTREAM_REFERENCES", str(path.parent))
        yield path


def _result(client, uid, ni_csv, *, recorded=ENERGIES, shape=(24, 32), raw=True, od_energies=ENERGIES):
    """A raw run (start document only) and its result with an OD cube of a two-phase sample."""
    refs = load_references(ni_csv)
    thickness = particle_phantom(shape, n_particles=3, seed=5).astype(np.float64)
    frac = np.clip(np.linspace(0, 1, shape[1])[None, :] + 0 * thickness, 0, 1)
    od = np.tensordot(refs.interpolate(od_energies).T, np.stack([frac, 1 - frac]) * thickness, axes=1)
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
                          rum_max_iter=20, kmeans_mask="all")  # the small phantom's particles are below min_size
    record = run_methods(tiled_client, "run-methods-1", opts)
    assert {k: v["status"] for k, v in record.items()} == dict.fromkeys(opts.validate().methods, "complete"), record
    node = tiled_client["phasestream"]["run-methods-1"]
    # fractions_lcf equals the direct function's output on the same OD cube
    direct = lcf_arrays(od, refs.interpolate(ENERGIES), ENERGIES, opts)
    fit = linear_combination_fit(od.astype(np.float64), refs.interpolate(ENERGIES), method="nnls", energies=ENERGIES,
                                 background_order=0)
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
    with pytest.raises(KeyError, match="no result"):
        run_methods(tiled_client, "no-such-run")


@pytest.mark.parametrize("hostile", [{"methods": ["lcf"], "timings": [1]}, {"methods": "lcf", "timings": "fast"},
                                     {"reference_values": {"a": 1}}])
def test_earlier_records_of_the_wrong_type_are_none(tiled_client, ni_csv, hostile):
    """``methods``, ``timings`` or ``reference_values`` edited by hand (a list, a string, a map) raised in the job;
    they are taken as none (the references then loaded by name) and the method runs."""
    uid = f"run-methods-hostile-{len(str(hostile))}"
    _result(tiled_client, uid, ni_csv)
    node = tiled_client["phasestream"][uid]
    node.replace_metadata(metadata={**dict(node.metadata), **hostile})
    record = run_methods(tiled_client, uid, MethodsOptions(methods=("lcf",)))
    assert record["lcf"]["status"] == "complete", record
    md = tiled_client["phasestream"][uid].metadata
    assert md["methods"]["lcf"]["status"] == "complete" and "methods" in md["timings"]


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



BACKGROUND_ORDER = "background_order must be None or an integer from 0 to 5"


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"names": ["lcf"], "n_clusters": "3"}, "n_clusters must be an integer from 1 to 100, got '3'"),
        ({"names": ["lcf"], "curve_order": 2.5}, "curve_order must be an integer"),
        ({"names": ["lcf"], "rum_max_iter": True}, "rum_max_iter must be an integer"),
        ({"names": ["lcf"], "pre_edge": 500}, "pre_edge must be (low, high) eV"),
        ({"names": ["lcf"], "edge_window": ["a", "b"]}, "edge_window must be (low, high) eV"),
        ({"names": ["lcf"], "edge_window": [8300, float("inf")]}, "edge_window must be (low, high) eV"),
        ({"names": 5}, "names must be a list of method names"),
        ({"names": ["lcf"], "n_clusters": 10**6}, "n_clusters must be an integer from 1 to 100, got 1000000"),
        ({"names": ["lcf"], "rum_max_iter": 10**9}, "rum_max_iter must be an integer from 1 to 10000"),
        ({"names": ["lcf"], "curve_order": 50}, "curve_order must be an integer from 1 to 10, got 50"),
        # background_order: 30000000 took 91 s and 9 GB before a MemoryError; "2" and 1.5 were TypeErrors
        ({"names": ["lcf"], "background_order": "2"}, f"{BACKGROUND_ORDER}, got '2'"),
        ({"names": ["lcf"], "background_order": 1.5}, f"{BACKGROUND_ORDER}, got 1.5"),
        ({"names": ["lcf"], "background_order": True}, f"{BACKGROUND_ORDER}, got True"),
        ({"names": ["lcf"], "background_order": -1}, f"{BACKGROUND_ORDER}, got -1"),
        ({"names": ["lcf"], "background_order": 30_000_000}, f"{BACKGROUND_ORDER}, got 30000000"),
        # numeric options that were not checked at all: "x" was a TypeError inside robust_unmixing
        ({"names": ["rum_tv"], "rum_strength": "x"}, "rum_strength must be None or a finite number >= 0, got 'x'"),
        ({"names": ["rum_tv"], "rum_strength": -1.0}, "rum_strength must be None or a finite number >= 0, got -1.0"),
        ({"names": ["rum_tv"], "rum_lam": True}, "rum_lam must be None or a finite number >= 0, got True"),
        ({"names": ["rum_tv"], "rum_lam": float("nan")}, "rum_lam must be None or a finite number >= 0, got nan"),
        ({"names": ["rum_tv"], "rum_rho": 0}, "rum_rho must be None or a finite number > 0, got 0"),
        ({"names": ["rum_tv"], "rum_rho": [1.0]}, "rum_rho must be None or a finite number > 0, got [1.0]"),
        ({"names": ["masks"], "thickness_min": "0.3"}, "thickness_min must be None or a finite number >= 0, got '0.3'"),
        ({"names": ["masks"], "thickness_min": float("inf")}, "thickness_min must be None or a finite number >= 0"),
        ({"names": ["masks"], "fit_error_max": -1}, "fit_error_max must be None or a finite number >= 0, got -1"),
        ({"names": ["masks"], "fit_error_max": {"x": 1}}, "fit_error_max must be None or a finite number >= 0"),
    ],
)
def test_a_wrongly_typed_request_is_a_value_error_naming_the_field(request_, message):
    """Values of the wrong type from a start document raised TypeError, which the live service did not
    catch: every post-scan step of the run vanished without a status."""
    with pytest.raises(ValueError, match=re.escape(message)):
        methods_options_from_start({"phasestream": {"methods": request_}})


def test_numeric_options_in_their_ranges_are_accepted():
    opts = methods_options_from_start({"methods": {"names": ["lcf"], "background_order": 5, "rum_strength": 0,
                                                   "rum_lam": 0.5, "rum_rho": 2, "thickness_min": 0,
                                                   "fit_error_max": 1e-3, "n_clusters": 100, "curve_order": 10}})
    assert (opts.background_order, opts.rum_strength, opts.rum_rho, opts.thickness_min) == (5, 0.0, 2.0, 0.0)
    opts = methods_options_from_start({"methods": {"names": ["lcf"], "background_order": None}})
    assert opts.background_order is None


@pytest.mark.parametrize(("override", "why"), [
    ("no-such-file.csv", "no such file in the reference folders"),
    ("outside", "lies outside the reference folders"),
    ("a-folder.csv", "not a regular file"),
])
def test_a_references_override_that_cannot_be_loaded_fails_naming_it(tiled_server, tiled_client, ni_csv, tmp_path,
                                                                    override, why):
    """``phasestream: {methods: {references: ...}}`` that did not load was dropped silently: the job reported
    ``complete`` with the run's own references. Now every method asked for fails, naming the override and why."""
    from dataclasses import asdict

    from phasestream.jobs.context import JobContext
    from phasestream.jobs.methods import run as methods_job

    uid = f"run-methods-override-{override.partition('.')[0]}"
    _result(tiled_client, uid, ni_csv)
    if override == "outside":  # valid references, but not in the configured folder
        override = str(tmp_path / "ni.csv")
        Path(override).write_bytes(ni_csv.read_bytes())
    elif override == "a-folder.csv":
        (ni_csv.parent / override).mkdir(exist_ok=True)
    opts = methods_options_from_start({"phasestream": {"methods": {"names": ["lcf", "rum_tv"], "rum_max_iter": 5,
                                                                   "references": override}}})
    outcome = methods_job(JobContext(client=tiled_client), uid, asdict(opts))
    said = f"references override {override!r} (phasestream.methods.references) cannot be loaded"
    assert outcome.status == "failed" and said in outcome.reason and why in outcome.reason, outcome.reason
    node = tiled_client["phasestream"][uid]
    for name in ("lcf", "rum_tv"):
        entry = node.metadata["methods"][name]
        assert entry["status"] == "failed" and said in entry["errors"][0] and why in entry["errors"][0], entry
    assert "fractions_lcf" not in node and "fractions_rum_tv" not in node
    # the split LCF (same references function) fails alike, before any band is submitted (no Dask needed)
    from phasestream.jobs.split import submit_split_lcf

    split = submit_split_lcf(None, tiled_server.uri, uid, opts, parts=2, retries=0)
    assert split["status"] == "failed" and said in split["errors"][0] and why in split["errors"][0], split
    assert "fractions_lcf" not in tiled_client["phasestream"][uid]


def test_a_complete_method_records_the_references_it_used(tiled_client, ni_csv):
    _result(tiled_client, "run-methods-refs", ni_csv)
    record = run_methods(tiled_client, "run-methods-refs", MethodsOptions(methods=("lcf",)))
    assert record["lcf"]["status"] == "complete"
    assert record["lcf"]["references"] == {"name": "ni", "source": str(ni_csv), "from": "start document"}
    record = run_methods(tiled_client, "run-methods-refs", MethodsOptions(methods=("lcf",), references="ni.csv"))
    assert record["lcf"]["references"] == {"name": "ni", "source": "ni.csv", "from": "option"}
    md = tiled_client["phasestream"]["run-methods-refs"].metadata["methods"]
    assert md["lcf"]["references"]["from"] == "option"


@pytest.mark.slow  # make test-stack: keeps make test under 15 minutes
def test_live_service_runs_the_methods_a_run_asks_for(tiled_client):
    """Real RunEngine scan asking for ``phasestream: {methods: [lcf]}``: the worker fits it after the scan."""
    from bluesky import RunEngine
    from scipy.optimize import nnls

    from phasestream.app.live import LiveService
    from phasestream.references import select_energies
    from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample
    from phasestream.store.tiled import raw_run_writer

    refs = load_references("nvpf-synthetic")
    energies = select_energies(refs, 12)
    service = LiveService(tiled_client, backend="numba", methods=MethodsOptions())
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(tiled_client))
    RE.subscribe(service)
    uids = []
    for md in ({"phasestream": {"methods": ["lcf"]}}, None):
        sample = make_sample((48, 48), state_of_charge=3.0, seed=4, n_particles=1)
        energy = make_energy()
        det = TransmissionDetector(sample, energy, name="det", i0=20000.0, seed=4)
        (uid,) = RE(energy_stack_scan([det], energy, energies, sample=sample, i0_key=det.i0_key, md=md))
        uids.append(uid)
    service.callback.flush(60)
    service.close()
    asked, other = uids
    assert service.outcome(asked, "methods").details["lcf"]["status"] == "complete"
    assert service.outcome(asked, "methods").status == "complete"
    assert service.outcome(other, "methods") is None
    node = tiled_client["phasestream"][asked]
    assert node.metadata["methods"]["lcf"]["status"] == "complete" and "fractions_lcf" not in tiled_client[
        "phasestream"][other]
    fractions, od = node["fractions_lcf"].read(), node["od"].read()
    mask = node["mask"].read().astype(bool)
    order = np.argsort(node.metadata["energies_eV"])
    a = refs.interpolate(np.asarray(node.metadata["energies_eV"])[order]).T  # (E, K)
    proj = np.eye(a.shape[0]) - 1.0 / a.shape[0]  # the job's default constant background, projected out
    for y, x in np.argwhere(mask)[:: max(1, int(mask.sum()) // 40)]:
        w, _ = nnls(proj @ a, proj @ od[order, y, x].astype(np.float64))  # SciPy oracle, normalized as the job does
        np.testing.assert_allclose(fractions[:, y, x], w / w.sum(), atol=2e-3)
    # Na3.0 / Na2.4 particle: the LCF majority phase is the simulated truth's
    truth = sample.phase[mask & sample.particle & ~sample.boundary]
    lcf_phase = np.argmax(fractions, axis=0)[mask & sample.particle & ~sample.boundary]
    print(f"LCF majority phase = truth on {np.mean(lcf_phase == truth):.3f} of {truth.size} interior pixels")
    assert truth.size > 100 and np.mean(lcf_phase == truth) >= 0.8


def test_reprocess_method_command(tiled_server, tiled_client, ni_csv, capsys):
    from phasestream.app.cli import main as cli_main

    od, refs = _result(tiled_client, "run-methods-cli", ni_csv)
    code = cli_main(["reprocess", "--tiled", tiled_server.uri, "--refine-only", "--method", "lcf",
                     "--method", "edge50", "run-methods-cli"])
    assert code == 0, capsys.readouterr()
    node = tiled_client["phasestream"]["run-methods-cli"]
    assert {k: v["status"] for k, v in node.metadata["methods"].items()} == {"lcf": "complete", "edge50": "complete"}
    assert "refinement" not in node.metadata  # --method alone does not imply --refine
    direct = lcf_arrays(od, refs.interpolate(ENERGIES), ENERGIES, MethodsOptions())
    np.testing.assert_allclose(node["fractions_lcf"].read(), direct["fractions_lcf"], rtol=1e-6)


@pytest.mark.slow  # make test-stack: keeps make test under 15 minutes
def test_sparse_scan_every_step_done_or_skipped_with_a_reason(tiled_client, ni_csv):
    """13 energies (one pre-edge, 12 at the edge): no step fails; normalization from the reference fit."""
    sparse = np.concatenate([[8300.0], np.linspace(8336.0, 8358.0, 12)])
    _result(tiled_client, "run-methods-sparse", ni_csv, recorded=sparse, od_energies=sparse)
    opts = MethodsOptions(methods=METHODS, thickness_min=0.3, rum_max_iter=5)
    record = run_methods(tiled_client, "run-methods-sparse", opts)
    assert set(record) == set(METHODS)
    for name, entry in record.items():
        assert entry["status"] in ("complete", "skipped"), (name, entry)
        if entry["status"] == "skipped":
            assert "energies" in entry["reason"] or "pixels" in entry["reason"], (name, entry)
    norm = record["normalize"]["parameters"]
    assert norm["path"] == "reference fit" and "sparse scan" in norm["reason"] and "post-edge window" in norm["reason"]
    # the phantom's thickness is the edge jump (edge-normalized references): recovered from the reference fit
    truth = particle_phantom((24, 32), n_particles=3, seed=5)
    thickness = tiled_client["phasestream"]["run-methods-sparse"]["thickness"].read()
    np.testing.assert_allclose(thickness, truth, atol=0.05)
    print({name: (entry["status"], entry.get("reason", "")) for name, entry in record.items()})


def _two_phase_od(nonres, seed=0, shape=(64, 64)):
    """Measured Ni references on a phantom: OD = t (mu_k + nonres) + noise, phase k from a smooth field."""
    refs = load_references([NI / "ref_NiO.txt", NI / "ref_LiNiO2.txt"])
    rng = np.random.default_rng(seed)
    thickness = 2.0 * particle_phantom(shape, n_particles=6, seed=seed).astype(np.float64)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    phase = ((np.sin(xx / 7.0 + seed) + np.cos(yy / 9.0)) > 0).astype(int)
    energies = np.linspace(8250.0, 8450.0, 60)
    mu = refs.interpolate(energies)
    od = thickness * (mu[phase].transpose(2, 0, 1) + nonres) + rng.normal(0, 0.01, (energies.size, *shape))
    return od, energies, mu, thickness, phase


@pytest.mark.parametrize("nonres", [0.0, 0.3, 1.0])
def test_lcf_default_offset_takes_up_non_resonant_absorption(nonres):
    """Fraction RMSE against the phantom truth on particle pixels: low with the default constant term."""
    od, energies, mu, thickness, phase = _two_phase_od(nonres)
    inside = thickness > 0.5
    truth = np.stack([phase == 0, phase == 1]).astype(float)

    def rmse(opts):
        f = lcf_arrays(od, mu, energies, opts)["fractions_lcf"]
        return float(np.sqrt(np.mean((f[:, inside] - truth[:, inside]) ** 2)))

    with_offset, without = rmse(MethodsOptions()), rmse(MethodsOptions(background_order=None))
    print(f"non-resonant {nonres}: fraction RMSE {with_offset:.4f} with the offset, {without:.4f} without")
    assert with_offset < 0.02
    if nonres > 0:
        assert without > 3 * with_offset


def _cluster_accuracy(labels, truth, region):
    """Accuracy after matching clusters to phases (Hungarian assignment on the contingency table)."""
    k = int(truth.max()) + 1
    table = np.array([[np.sum((labels[region] == i) & (truth[region] == j)) for j in range(k)]
                      for i in range(int(labels.max()) + 1)])
    rows, cols = linear_sum_assignment(-table)
    return table[rows, cols].sum() / region.sum()


@pytest.mark.parametrize("seed", [0, 1])
def test_kmeans_on_normalized_particle_spectra_finds_the_phases(seed):
    """scikit-learn k-means in the job: on normalized spectra inside the particle mask it follows phase,
    on raw OD of every pixel it follows thickness."""
    od, energies, _, thickness, phase = _two_phase_od(0.3, seed=seed)
    region = particle_mask(od) & (thickness > 0.5)
    normalized = normalize_edge(od, energies).normalized
    arrays, params = kmeans_arrays(od, normalized, MethodsOptions(n_clusters=2))
    labels = arrays["cluster_mask"]
    assert (labels[~particle_mask(od)] == -1).all() and params["mask"] == "particle"
    new = _cluster_accuracy(labels, phase, region)
    old = _cluster_accuracy(kmeans_clusters(od, 2).labels, phase, region)  # the former default
    print(f"seed {seed}: k-means accuracy {new:.3f} (normalized, particle mask), {old:.3f} (raw OD, all pixels)")
    assert new >= 0.95 and old < 0.75


@pytest.mark.parametrize(("hostile", "said"), [
    ({"energies_eV": 8300.0}, "energies_eV 8300.0 is not a list of energies in eV"),
    ({"energies_eV": ["8300 eV"] * 40}, "is not a list of energies in eV"),
    ({"n_energies_seen": "forty"}, "n_energies_seen 'forty' is not a count"),
    ({"n_energies_seen": [40]}, "n_energies_seen [40] is not a count"),
])
def test_energies_of_the_wrong_type_fail_naming_the_field(tiled_client, ni_csv, hostile, said):
    """A hand-edited ``energies_eV`` or ``n_energies_seen`` (a number, strings, a list) was a TypeError inside the
    methods, refinement, denoising and training jobs; each now fails with a ValueError naming the field."""
    from phasestream.jobs.denoise import DenoiseOptions, denoise_result
    from phasestream.jobs.refine import RefineOptions, refine_result
    from phasestream.jobs.training import tiled_training_set

    uid = f"run-methods-energies-{abs(hash(str(hostile)))}"
    _result(tiled_client, uid, ni_csv)
    node = tiled_client["phasestream"][uid]
    for key, array in {"ambiguous": np.zeros((24, 32), np.uint8), "phase": np.zeros((24, 32), np.int8),
                       "mask": np.ones((24, 32), np.uint8), "pcc": np.zeros((2, 24, 32), np.float32)}.items():
        node.write_array(array, key=key)
    node.replace_metadata(metadata={**dict(node.metadata), **hostile, "status": "complete"})
    down = {"address": "tcp://127.0.0.1:1", "timeout": 0.5, "retries": 0}
    said_again = pytest.raises(ValueError, match=re.escape(said))
    if "n_energies_seen" in hostile:  # refused on opening the result to write (ResultWriter.open)
        with said_again:
            run_methods(tiled_client, uid, MethodsOptions(methods=("lcf",)))
        with said_again:
            refine_result(tiled_client, uid, RefineOptions(**down, strategy="spatial", check=False))
        with said_again:
            denoise_result(tiled_client, uid, DenoiseOptions(**down))
    else:
        record = run_methods(tiled_client, uid, MethodsOptions(methods=("lcf",)))
        assert record["lcf"]["status"] == "failed" and said in record["lcf"]["errors"][0], record
        refined = refine_result(tiled_client, uid, RefineOptions(**down, strategy="spatial", check=False))
        assert refined["status"] == "failed" and said in refined["reason"], refined
        denoised = denoise_result(tiled_client, uid, DenoiseOptions(**down))
        assert denoised["status"] == "failed" and said in denoised["reason"], denoised
    with said_again:
        tiled_training_set(tiled_client, runs=[uid])


LCF_ARRAYS = ("fractions_lcf", "fit_error", "reduced_chi2", "scale_lcf")


def test_a_rerun_that_does_not_complete_keeps_the_earlier_complete_record_and_arrays(tiled_client, ni_csv):
    """A re-run whose references did not load (or a method that failed) replaced the ``complete`` record with a
    ``failed`` one naming no arrays, while the earlier run's arrays stayed, described by no record. The earlier
    complete record is now ``kept`` beside the failed one, and its arrays are unchanged."""
    uid = "run-methods-rerun"
    _result(tiled_client, uid, ni_csv)
    first = run_methods(tiled_client, uid, MethodsOptions(methods=("lcf", "masks"), thickness_min=0.3))
    assert first["lcf"]["status"] == first["masks"]["status"] == "complete", first
    node = tiled_client["phasestream"][uid]
    before = {name: node[name].read() for name in (*LCF_ARRAYS, "threshold_mask")}
    # the references do not load: every method fails; masks without thresholds fails on its own
    reruns = (MethodsOptions(methods=("lcf", "masks"), references="missing.csv"), MethodsOptions(methods=("masks",)))
    for opts in reruns:
        run_methods(tiled_client, uid, opts)
        node = tiled_client["phasestream"][uid]
        for name in opts.methods:
            entry = node.metadata["methods"][name]
            assert entry["status"] == "failed" and entry["arrays"] == [], entry
            assert entry["kept"] == first[name], entry
        for name, value in before.items():
            np.testing.assert_array_equal(node[name].read(), value)
    # a re-run that completes replaces the record (no kept) and the arrays
    record = run_methods(tiled_client, uid, MethodsOptions(methods=("lcf",), lcf_method="lstsq", lcf_sum_to_one=False))
    assert record["lcf"]["status"] == "complete" and "kept" not in record["lcf"], record["lcf"]
    node = tiled_client["phasestream"][uid]
    assert node.metadata["methods"]["lcf"]["parameters"]["method"] == "lstsq"
    assert not np.array_equal(node["scale_lcf"].read(), before["scale_lcf"]) or not np.array_equal(
        node["fractions_lcf"].read(), before["fractions_lcf"])


def test_a_failed_run_without_an_earlier_complete_one_leaves_no_arrays(tiled_client, ni_csv, monkeypatch):
    """A method whose arrays were written in part (the write failed) leaves none of them beside its failed record."""
    uid = "run-methods-partial"
    _result(tiled_client, uid, ni_csv)
    real = ResultWriter.write_maps

    def partial(self, **arrays):
        real(self, fractions_lcf=arrays["fractions_lcf"])
        raise OSError("disk full")

    monkeypatch.setattr(ResultWriter, "write_maps", partial)
    record = run_methods(tiled_client, uid, MethodsOptions(methods=("lcf",)))
    assert record["lcf"]["status"] == "failed" and "kept" not in record["lcf"], record["lcf"]
    assert "disk full" in record["lcf"]["errors"][0]
    node = tiled_client["phasestream"][uid]
    assert not any(name in node for name in LCF_ARRAYS)


def test_a_complete_method_read_its_arrays_back(tiled_client, ni_csv):
    """``complete`` means every array read back from Tiled as written: the record's ``array_sha256`` are the
    digests of the arrays as Tiled serves them (read here independently), one per array the method wrote."""
    import hashlib

    uid = "run-methods-digests"
    _result(tiled_client, uid, ni_csv)
    record = run_methods(tiled_client, uid, MethodsOptions(methods=("lcf", "masks"), thickness_min=0.3))
    node = tiled_client["phasestream"][uid]
    for name in ("lcf", "masks"):
        assert record[name]["status"] == "complete", record[name]
        served = {array: hashlib.sha256(node[array].read().tobytes()).hexdigest() for array in record[name]["arrays"]}
        assert record[name]["array_sha256"] == served == node.metadata["methods"][name]["array_sha256"]
    assert set(record["lcf"]["array_sha256"]) == set(LCF_ARRAYS)


def test_a_method_whose_arrays_do_not_read_back_fails_and_leaves_none(tiled_client, ni_csv, monkeypatch):
    """The storage kept other values than were sent (one fraction changed on its way): the LCF is ``failed``,
    naming the array and the element, not ``complete``, and none of its arrays stays beside that record."""
    uid = "run-methods-corrupt"
    _result(tiled_client, uid, ni_csv)
    real = ResultWriter.write_maps

    def corrupting(self, **arrays):
        changed = {name: np.array(value, copy=True) for name, value in arrays.items()}
        changed["fractions_lcf"][1, 7, 5] += 0.25
        real(self, **changed)

    monkeypatch.setattr(ResultWriter, "write_maps", corrupting)
    record = run_methods(tiled_client, uid, MethodsOptions(methods=("lcf",)))
    monkeypatch.undo()
    assert record["lcf"]["status"] == "failed" and "array_sha256" not in record["lcf"], record["lcf"]
    assert re.search(r"ReadBackError: fractions_lcf: .* at \(1, 7, 5\)", record["lcf"]["errors"][0]), record["lcf"]
    node = tiled_client["phasestream"][uid]
    assert not any(name in node for name in LCF_ARRAYS)


def test_the_lcf_is_not_run_while_a_split_lcf_replaces_its_arrays(tiled_client, ni_csv):
    """A split LCF copying its staged bands in (``methods.lcf`` running, its heartbeat fresh): an unsplit LCF
    would write the same arrays at the same time. It is ``skipped``, naming the split LCF, and its record stays;
    the other methods run."""
    import time

    from phasestream.store.liveness import process_identity

    uid = "run-methods-split-at-work"
    _result(tiled_client, uid, ni_csv)
    node = tiled_client["phasestream"][uid]
    running = {"status": "running", "staging": "_staging-0123456789abcdef", **process_identity(),
               "heartbeat_at": time.time(), "heartbeat_seconds": 15.0}
    ResultWriter.open(tiled_client, uid).update_metadata(methods={"lcf": running})
    record = run_methods(tiled_client, uid, MethodsOptions(methods=("lcf", "normalize")))
    assert record["lcf"]["status"] == "skipped" and "a split LCF of result" in record["lcf"]["reason"], record
    assert record["normalize"]["status"] == "complete", record["normalize"]
    md = node.refresh().metadata["methods"]
    assert md["lcf"] == running and md["normalize"]["status"] == "complete"
    assert not any(name in node for name in LCF_ARRAYS)
    # bad input fails the methods it runs, and still leaves the split LCF's record alone
    record = run_methods(tiled_client, uid, MethodsOptions(methods=("lcf", "normalize"), references="missing.csv"))
    assert record["lcf"]["status"] == "skipped" and record["normalize"]["status"] == "failed", record
    assert node.refresh().metadata["methods"]["lcf"] == running


def test_a_methods_record_written_meanwhile_is_not_written_back_over(tiled_client, ni_csv, monkeypatch):
    """The job wrote back the whole ``methods`` map it had read when it started: a record another job wrote
    meanwhile (a split LCF finishing) went back to what it was. Each method's record now goes into the map as it
    is in Tiled then."""
    from phasestream.jobs import methods as methods_job

    uid = "run-methods-meanwhile"
    _result(tiled_client, uid, ni_csv)
    other = {"status": "complete", "parameters": {"method": "split"}, "arrays": [], "errors": [], "seconds": 1.0}
    real = methods_job._RUNNERS["normalize"]

    def normalize_while_another_job_records(ctx):
        ResultWriter.open(tiled_client, uid).update_metadata(methods={"lcf": other})
        return real(ctx)

    monkeypatch.setitem(methods_job._RUNNERS, "normalize", normalize_while_another_job_records)
    record = run_methods(tiled_client, uid, MethodsOptions(methods=("normalize",)))
    md = tiled_client["phasestream"][uid].metadata["methods"]
    assert md["lcf"] == other and record["lcf"] == other
    assert md["normalize"]["status"] == "complete"


def test_method_records_another_update_took_back_are_written_again(tiled_client, ni_csv, monkeypatch):
    """Tiled applies a metadata patch by reading the node's metadata and writing it whole: a process that read the
    result before the methods job wrote its records and wrote after it took the records back, and the result held
    no record beside the method's arrays. The job now reads its records back and writes them again."""
    uid = "run-methods-taken-back"
    _result(tiled_client, uid, ni_csv)
    update = ResultWriter.update_metadata
    taken_back = []

    def raced(self, **fields):
        if "methods" not in fields or taken_back:
            return update(self, **fields)
        node = tiled_client["phasestream"][uid]
        stale = dict(node.metadata)  # another process reads the metadata ...
        update(self, **fields)
        node.replace_metadata(stale)  # ... and writes it whole after the job's records
        taken_back.append("methods" in stale)

    monkeypatch.setattr(ResultWriter, "update_metadata", raced)
    record = run_methods(tiled_client, uid, MethodsOptions(methods=("edge50",)))
    monkeypatch.undo()
    held = tiled_client["phasestream"][uid].metadata["methods"]
    assert taken_back == [False]
    assert record["edge50"]["status"] == "complete" and held["edge50"] == record["edge50"]
    assert "edge50" in tiled_client["phasestream"][uid]
