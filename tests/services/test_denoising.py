"""The model server's denoise operation and the post-scan denoising job, through a real model-server subprocess
and a real Tiled server."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from bluesky import RunEngine
from support import feed_losing_first_event

from phasestream.app.cli import main as cli_main
from phasestream.app.live import LiveService
from phasestream.app.process import ModelServerProcess
from phasestream.callbacks.phase_map import PhaseMapCallback
from phasestream.contract.denoise import DENOISING_ARRAYS
from phasestream.jobs.denoise import DenoiseOptions, denoise_result
from phasestream.jobs.refine import RefineOptions, refine_result
from phasestream.kernels import assign_phases, pearson_maps
from phasestream.models.registry import ModelRegistry
from phasestream.models.spectra import shape_averaging_settings
from phasestream.modelserver.client import ModelClient
from phasestream.modelserver.protocol import ModelServerError
from phasestream.references import load_references, select_energies
from phasestream.sim import (
    LINE_CORRELATED,
    TransmissionDetector,
    energy_stack_scan,
    make_energy,
    make_sample,
    simulate_stack,
)
from phasestream.store.tiled import raw_run_writer

if importlib.util.find_spec("tensorflow") is None:  # the model server process runs it, not this one
    pytest.skip("TensorFlow is not installed", allow_module_level=True)

DENOISE = "denoise-stxm-synthetic"
ENERGIES = select_energies(load_references("nvpf-synthetic"), 13)


@pytest.fixture(scope="module")
def models():
    with ModelServerProcess(args=("--preload", DENOISE)) as proc:
        yield proc


def test_denoise_op_equals_the_model_in_process(models):
    from phasestream.models.denoise import denoise_stack

    art, model = ModelRegistry().load(DENOISE)
    refs = load_references("nvpf-synthetic")
    sample = make_sample((64, 64), seed=8, n_particles=2)
    od = simulate_stack(sample, select_energies(refs, 6), dose=300.0, noise=LINE_CORRELATED, rng=2).od
    od[0, 3, 4] = np.nan
    with ModelClient(models.address, timeout=120) as client:
        reply = client.denoise(DENOISE, od)
        assert reply["array"].shape == od.shape and np.isfinite(reply["array"]).all()
        assert (reply["model"], reply["version"], reply["sha256"]) == (DENOISE, art.version, art.sha256)
        expected = denoise_stack(model, od.astype(np.float32))
        assert reply["components"] == expected.components
        assert reply["posterior_components"] == expected.info["posterior_components"] == 1
        assert reply["shape_averaged_components"] == expected.info["shape_averaged_components"]
        assert reply["shape_averaged_components"] == reply["components"] - 1  # every weak component
        settings = shape_averaging_settings() if reply["shape_averaged_components"] else None
        assert reply["shape_averaging"] == expected.info["shape_averaging"] == settings
        np.testing.assert_allclose(reply["array"], expected.od, rtol=1e-4, atol=1e-4)
        tuned = client.denoise(DENOISE, od, fine_tune_steps=3)
        assert tuned["fine_tune_steps"] == 3 and tuned["array"].shape == od.shape
        with pytest.raises(ModelServerError, match="OD stack"):
            client.denoise(DENOISE, np.zeros((4, 16), np.float32))
        with pytest.raises(ModelServerError, match="fine_tune_steps must be"):
            client.request("denoise", model=DENOISE, array=od, options={"fine_tune_steps": -1})
        with pytest.raises(ModelServerError, match="is a denoise model"):
            client.request("enhance", model=DENOISE, array=od[0])


def _scan(client, callback=None, md=None, seed=4):
    """A simulated 13-energy scan of a 48 x 48 sample; its uid (the result written by ``callback``)."""
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(client))
    cb = callback or PhaseMapCallback(client, backend="numba")
    RE.subscribe(cb)
    sample = make_sample((48, 48), state_of_charge=2.0, seed=seed, n_particles=2)
    energy = make_energy()
    det = TransmissionDetector(sample, energy, name="det", i0=300.0, seed=seed)
    (uid,) = RE(energy_stack_scan([det], energy, ENERGIES, sample=sample, i0_key=det.i0_key, md=md))
    if callback is None:
        assert cb.flush(60)
        cb.close()
    return uid


def _denoised_oracle(node):
    """The shipped model's denoise of the result's OD in this process, then the PCC kernels' NumPy reference."""
    from phasestream.models.denoise import denoise_stack

    _, model = ModelRegistry().load(DENOISE)
    md = node.metadata
    od = node["od"][: md["n_energies_seen"]]
    denoised = denoise_stack(model, od.astype(np.float32)).od
    pcc = pearson_maps(denoised, np.asarray(md["reference_values"]))
    phase, reliability, ambiguous = assign_phases(pcc, node["mask"].read().astype(bool), backend="numpy")
    return od, denoised, pcc, phase, reliability, ambiguous


def _no_denoised_arrays(node) -> bool:
    return not set(DENOISING_ARRAYS) & set(node)


@pytest.mark.cluster  # make test-stack: keeps make test under 15 minutes on 2 cores
def test_denoising_requested_in_the_start_document(tiled_client, models):
    service = LiveService(tiled_client, backend="numba", denoise=DenoiseOptions(address=models.address, timeout=300))
    uid = _scan(tiled_client, callback=service, md={"phasestream": {"denoise": True}})
    bad = _scan(tiled_client, callback=service, md={"phasestream": {"denoise": {"fine_tune_steps": -3}}}, seed=5)
    service.callback.flush(60)
    service.close()
    assert service.outcome(uid, "denoise").status == "complete", service.outcome(uid, "denoise")
    node = tiled_client["phasestream"][uid]
    md = node.metadata
    record = md["denoising"]
    art = ModelRegistry().get(DENOISE)
    assert (record["status"], record["model"], record["version"], record["sha256"]) == (
        "complete", DENOISE, art.version, art.sha256)
    assert record["seconds"] > 0 and record["reason"] == "" and record["fine_tune_steps"] == 0
    assert 1 <= record["posterior_components"] <= record["components"]
    assert record["posterior_components"] + record["shape_averaged_components"] == record["components"]
    assert record["shape_averaged_components"] >= 1  # a scan with a weak component, averaged:
    assert record["shape_averaging"] == shape_averaging_settings()  # the record says how
    od, denoised, pcc, phase, reliability, ambiguous = _denoised_oracle(node)
    np.testing.assert_allclose(node["denoised"].read(), denoised, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(node["pcc_denoised"].read(), pcc, atol=1e-4)
    np.testing.assert_array_equal(node["phase_denoised"].read(), phase)
    np.testing.assert_allclose(node["reliability_denoised"].read(), reliability, atol=1e-4)
    np.testing.assert_array_equal(node["ambiguous_denoised"].read().astype(bool), ambiguous)
    mask = node["mask"].read().astype(bool)
    n = mask.sum()
    assert md["ambiguous_fraction_denoised"] == pytest.approx(ambiguous[mask].sum() / n)
    phases = md["references"]["phases"]
    assert md["phase_fractions_denoised"] == pytest.approx(
        {name: float((phase[mask] == k).sum() / n) for k, name in enumerate(phases)})
    # the live maps are the raw OD's, untouched
    live_pcc = pearson_maps(od, np.asarray(md["reference_values"]))
    np.testing.assert_allclose(node["pcc"].read(), live_pcc, atol=1e-4)
    np.testing.assert_array_equal(node["phase"].read(), assign_phases(live_pcc, mask, backend="numpy")[0])
    assert not np.allclose(node["pcc"].read()[:, mask], node["pcc_denoised"].read()[:, mask], atol=1e-3)
    assert md["status"] == "complete" and md["models"][DENOISE]["sha256"] == art.sha256
    # a malformed request: a failed record on the result, and the PCC result as it is
    bad_md = tiled_client["phasestream"][bad].metadata
    assert bad_md["status"] == "complete" and bad_md["phase_fractions"]
    assert bad_md["denoising"]["status"] == "failed"
    assert "fine_tune_steps must be an integer in 0..5000, got -3" in bad_md["denoising"]["reason"]
    assert service.outcome(bad, "denoise").status == "failed"
    assert _no_denoised_arrays(tiled_client["phasestream"][bad])


@pytest.mark.slow  # make test-stack
def test_a_denoising_that_does_not_complete_keeps_the_earlier_complete_one(tiled_client, models):
    """A re-run against a model server that is down, or without the model, is skipped: the earlier complete
    denoising's arrays, fractions and model entry stay, described by ``kept``; a re-run that completes
    replaces them."""
    uid = _scan(tiled_client, seed=6)
    first = denoise_result(tiled_client, uid, DenoiseOptions(address=models.address))
    assert first["status"] == "complete", first
    node = tiled_client["phasestream"][uid]
    assert not _no_denoised_arrays(node) and node.metadata["phase_fractions_denoised"]
    arrays = {name: node[name].read() for name in DENOISING_ARRAYS}
    fractions = node.metadata["phase_fractions_denoised"]
    live = node["phase"].read()
    down = denoise_result(tiled_client, uid, DenoiseOptions(address="tcp://127.0.0.1:1", timeout=0.5))
    assert down["status"] == "skipped" and "no reply from the model server" in down["reason"]
    assert "phasestream reprocess" in down["retry"] and "--denoise" in down["retry"] and uid in down["retry"]
    missing = denoise_result(tiled_client, uid, DenoiseOptions(address=models.address, model="denoise-none"))
    assert missing["status"] == "skipped" and "has no model 'denoise-none'" in missing["reason"]
    node = tiled_client["phasestream"][uid]
    md = node.metadata
    assert md["denoising"]["status"] == "skipped" and md["denoising"]["kept"]["status"] == "complete"
    assert md["denoising"]["kept"]["sha256"] == first["sha256"] and down["kept"]["version"] == first["version"]
    for name, array in arrays.items():
        np.testing.assert_array_equal(node[name].read(), array)
    assert md["phase_fractions_denoised"] == fractions and DENOISE in md["models"]
    np.testing.assert_array_equal(node["phase"].read(), live)
    again = denoise_result(tiled_client, uid, DenoiseOptions(address=models.address))
    md = tiled_client["phasestream"][uid].metadata
    assert again["status"] == "complete" and "kept" not in again and "kept" not in md["denoising"]
    assert md["phase_fractions_denoised"] and DENOISE in md["models"]


@pytest.mark.slow  # make test-stack: keeps make test under 15 minutes
def test_a_denoising_that_does_not_complete_leaves_no_arrays_of_its_own(tiled_client, models):
    uid = _scan(tiled_client, seed=7)
    down = denoise_result(tiled_client, uid, DenoiseOptions(address="tcp://127.0.0.1:1", timeout=0.5))
    node = tiled_client["phasestream"][uid]
    md = node.metadata
    assert down["status"] == "skipped" and "kept" not in md["denoising"] and _no_denoised_arrays(node)
    assert md["phase_fractions_denoised"] == {} and md["ambiguous_fraction_denoised"] is None
    assert DENOISE not in md["models"]


@pytest.mark.slow  # make test-stack: keeps make test under 15 minutes
def test_models_of_the_wrong_type_are_taken_as_none(tiled_client, models):
    """A hand-edited ``models`` (a string) failed the denoising after its arrays were written (``dict()``'s
    ValueError), and the refinement likewise; it is taken as none and the model entry written."""
    uid = _scan(tiled_client, seed=8)
    node = tiled_client["phasestream"][uid]
    node.replace_metadata(metadata={**dict(node.metadata), "models": "hand-edited"})
    record = denoise_result(tiled_client, uid, DenoiseOptions(address=models.address))
    assert record["status"] == "complete", record
    assert tiled_client["phasestream"][uid].metadata["models"][DENOISE]["sha256"] == record["sha256"]
    node.replace_metadata(metadata={**dict(node.metadata), "models": ["hand-edited"]})
    refined = refine_result(tiled_client, uid, RefineOptions(address="tcp://127.0.0.1:1", timeout=0.5, retries=0,
                                                           strategy="spatial", check=False))
    assert refined["status"] == "complete", refined
    assert tiled_client["phasestream"][uid].metadata["refined_fractions"]


@pytest.mark.slow  # make test-stack: keeps make test under 15 minutes
def test_reprocess_denoise_command(tiled_server, tiled_client, models):
    uid = _scan(tiled_client, seed=7)
    base = ["reprocess", "--refine-only", "--denoise", uid, "--tiled", tiled_server.uri]
    assert cli_main([*base, "--models", models.address]) == 0
    node = tiled_client["phasestream"][uid]
    assert node.metadata["denoising"]["status"] == "complete" and "phase_denoised" in node
    assert "refinement" not in node.metadata or node.metadata["refinement"].get("status") is None
    assert cli_main([*base, "--models", models.address, "--denoise-model", "denoise-none"]) == 3  # skipped
    node = tiled_client["phasestream"][uid]  # the complete denoising is kept beside the skipped record
    assert node.metadata["denoising"]["kept"]["status"] == "complete" and "phase_denoised" in node


@pytest.mark.cluster  # a LocalCluster of 2 worker processes: make test-stack
def test_lost_run_asking_for_denoising_is_recovered_and_denoised_on_dask(tiled_client, models):
    from phasestream.jobs.cluster import dask_client
    from phasestream.jobs.executors import DaskExecutor

    docs: list = []
    uid = _scan(tiled_client, callback=lambda n, d: docs.append((n, d)), md={"phasestream": {"denoise": True}},
                seed=6)
    with dask_client(n_workers=2) as dask:
        live = LiveService(tiled_client, backend="numba", poll_seconds=0.1, scheduler=dask,
                           denoise=DenoiseOptions(address=models.address, timeout=300))
        assert isinstance(live.executor, DaskExecutor)
        feed_losing_first_event(live, docs, uid)
        assert live.wait_recovered(uid, 180) == "complete"
        assert live.executor.wait(300)
        live.close()
    assert live.outcome(uid, "reprocess").status == "complete"
    assert live.outcome(uid, "denoise").status == "complete", live.outcome(uid, "denoise")
    node = tiled_client["phasestream"][uid]
    md = node.metadata
    assert md["recovered"]["on"] == "dask" and md["denoising"]["status"] == "complete"
    assert md["n_energies_seen"] == len(ENERGIES)  # the recovered result, not the live one with an image lost
    _, denoised, _, phase, _, _ = _denoised_oracle(node)
    np.testing.assert_allclose(node["denoised"].read(), denoised, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(node["phase_denoised"].read(), phase)
