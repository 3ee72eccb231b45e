"""Post-scan GMVAE refinement end to end: RunEngine, sim devices, Tiled, a model-server subprocess."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from bluesky import RunEngine

from phasestream.app.cli import main as cli_main
from phasestream.app.live import LiveService
from phasestream.app.process import ModelServerProcess
from phasestream.callbacks.phase_map import PhaseMapCallback
from phasestream.jobs.refine import RefineOptions, match_energies, refine_result
from phasestream.models.refine import STRATEGIES
from phasestream.models.registry import ModelRegistry
from phasestream.references import ReferenceSet, load_references, select_energies, write_references
from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.catalog import wait_for_refinement
from phasestream.store.tiled import raw_run_writer

if importlib.util.find_spec("tensorflow") is None:  # not imported here: the model server process runs it
    pytest.skip("TensorFlow is not installed", allow_module_level=True)

MODEL = "gmvae-nvpf-synthetic"
REFS = load_references("nvpf-synthetic")
ENERGIES = select_energies(REFS, 12, method="score")  # the demo's 13 energies, those of the pretrained model


@pytest.fixture(scope="module")
def models():
    with ModelServerProcess(args=("--preload", MODEL)) as proc:
        yield proc


def _scan(client, sample, *, energies=ENERGIES, dose=2000.0, seed=1, write_od=True, callback=None):
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(client))
    cb = callback or PhaseMapCallback(client, backend="numba", write_od=write_od)
    RE.subscribe(cb)
    energy = make_energy()
    det = TransmissionDetector(sample, energy, name="det", i0=dose, seed=seed)
    (uid,) = RE(energy_stack_scan([det], energy, energies, sample=sample, i0_key=det.i0_key))
    if callback is None:
        assert cb.flush(60)
        cb.close()
    return uid


def test_pretrained_model_energies_are_the_demo_energies():
    art = ModelRegistry().get(MODEL)
    np.testing.assert_allclose(art.energies, ENERGIES, atol=1e-6)
    assert art.phases == list(REFS.phases)


@pytest.mark.parametrize(("soc", "seed"), [(2.0, 1), pytest.param(1.0, 2, marks=pytest.mark.slow)])  # make test-stack
def test_refinement_resolves_ambiguous_pixels_against_ground_truth(tiled_client, models, soc, seed):
    """Acceptance: ambiguous pixels >= 85% right after refinement; overall better than PCC argmax."""
    sample = make_sample((256, 256), state_of_charge=soc, seed=seed)
    uid = _scan(tiled_client, sample, dose=2000.0, seed=seed + 10)
    record = refine_result(tiled_client, uid, RefineOptions(address=models.address))
    assert record["status"] == "complete", record
    # --strategy auto: the held-out check tried every strategy and applied the winner, by a margin
    held = record["held_out"]
    assert record["requested_strategy"] == "auto" and set(held["strategies"]) == set(STRATEGIES)
    assert record["strategy"] == max(held["strategies"], key=held["strategies"].get)
    assert held["pixels"] >= 1000 and held["gain"] >= 0.01
    assert held["strategies"][record["strategy"]] - held["pcc"] == pytest.approx(held["gain"], abs=1e-3)
    node = tiled_client["phasestream"][uid]
    md = node.metadata
    phase, refined = node["phase"].read(), node["refined_phase"].read()
    ambiguous, mask = node["ambiguous"].read().astype(bool), node["mask"].read().astype(bool)
    assert refined.dtype == np.int16 and node["latent"].read().shape == (256, 256, 3)
    assert node["false_positive"].read().dtype == np.uint8
    good = sample.particle & ~sample.boundary & mask
    amb = good & ambiguous
    assert amb.sum() / good.sum() >= 0.15
    pcc_amb = np.mean(phase[amb] == sample.phase[amb])
    refined_amb = np.mean(refined[amb] == sample.phase[amb])
    print(f"soc {soc}: held-out {held}")
    print(f"soc {soc}: ambiguous {100 * ambiguous[mask].mean():.1f}% of particle; accuracy on ambiguous "
          f"PCC {pcc_amb:.3f} -> refined {refined_amb:.3f}; overall {sample.accuracy(phase):.4f} -> "
          f"{sample.accuracy(refined):.4f}")
    assert refined_amb >= 0.85
    assert sample.accuracy(refined) > sample.accuracy(phase)
    # unambiguous pixels keep their PCC phase; fractions are over the particle mask
    np.testing.assert_array_equal(refined[mask & ~ambiguous], phase[mask & ~ambiguous])
    counts = np.bincount(refined[mask], minlength=5)
    expected = {p: c / mask.sum() for p, c in zip(REFS.phases, counts, strict=True)}
    assert md["refined_fractions"] == pytest.approx(expected, abs=1e-9)
    art = ModelRegistry().get(MODEL)
    assert md["models"] == {MODEL: {"version": art.version, "sha256": art.sha256}}
    assert md["status"] == "complete"


def test_model_server_down_skips_and_reprocess_refines_later(tiled_client, tiled_server, models):
    sample = make_sample((64, 64), state_of_charge=2.0, seed=5, n_particles=2)
    uid = _scan(tiled_client, sample)
    down = RefineOptions(address="tcp://127.0.0.1:1", timeout=0.5, retries=0)
    record = refine_result(tiled_client, uid, down)
    node = tiled_client["phasestream"][uid]
    assert record["status"] == "skipped" and "no reply from the model server" in record["reason"]
    assert node.metadata["status"] == "complete"  # the PCC result is untouched
    retry = node.metadata["refinement"]["retry"]  # a whole command: Tiled and the model server included
    tiled_uri = str(tiled_client.context.api_uri).rstrip("/")
    assert retry == (f"phasestream reprocess --tiled {tiled_uri} --root phasestream --refine-only --models "
                     f"tcp://127.0.0.1:1 --model {down.model} --strategy auto --min-gain 0.01 {uid}")
    assert "refined_phase" not in node
    code = cli_main(["reprocess", "--refine-only", uid, "--tiled", tiled_server.uri, "--models", models.address])
    assert code == 0
    node = tiled_client["phasestream"][uid]
    assert node.metadata["refinement"]["status"] == "complete"
    assert node["refined_phase"].read().shape == (64, 64)


@pytest.mark.parametrize("hostile", [  # in make test-stack: keeps make test under 15 minutes
    pytest.param({"refinement": "x", "models": [1, 2]}, marks=pytest.mark.slow),
    pytest.param({"refinement": {"status": "skipped", "kept": "earlier"}}, marks=pytest.mark.slow),
    pytest.param({"refinement": {"status": "complete", "model": ["gmvae"]}, "models": {"a": 1}},
                 marks=pytest.mark.slow)])
def test_an_earlier_refinement_record_of_the_wrong_type_is_no_record(tiled_client, hostile):
    """A hand-edited ``refinement`` or ``models`` (a string, a list) raised AttributeError/TypeError in the job;
    it is taken as no earlier record and the refinement records its own status."""
    from phasestream.jobs.denoise import DenoiseOptions, denoise_result

    uid = _scan(tiled_client, make_sample((32, 32), state_of_charge=2.0, seed=6, n_particles=1))
    node = tiled_client["phasestream"][uid]
    node.replace_metadata(metadata={**dict(node.metadata), **hostile,
                                    "denoising": hostile.get("refinement")})
    record = refine_result(tiled_client, uid, RefineOptions(address="tcp://127.0.0.1:1", timeout=0.5, retries=0))
    assert record["status"] == "skipped" and "no reply from the model server" in record["reason"], record
    record = denoise_result(tiled_client, uid, DenoiseOptions(address="tcp://127.0.0.1:1", timeout=0.5, retries=0))
    assert record["status"] == "skipped", record
    md = tiled_client["phasestream"][uid].metadata
    assert md["refinement"]["status"] == "skipped" and md["denoising"]["status"] == "skipped"


@pytest.mark.slow  # make test-stack: keeps make test under 15 minutes (a skip with its reason: model_server_down)
def test_energies_not_matching_the_model_are_skipped_with_reason(tiled_client, tiled_server, models, capsys):
    sample = make_sample((48, 48), state_of_charge=2.0, seed=6, n_particles=1)
    uid = _scan(tiled_client, sample, energies=select_energies(REFS, 6))
    record = refine_result(tiled_client, uid, RefineOptions(address=models.address))
    assert record["status"] == "skipped" and "do not match the model's" in record["reason"]
    assert tiled_client["phasestream"][uid].metadata["status"] == "complete"
    # the command: skipped is not failed (exit status 3, docs/cli.md), the reason and the retry on stdout
    capsys.readouterr()
    code = cli_main(["reprocess", "--refine-only", uid, "--tiled", tiled_server.uri, "--models", models.address])
    out, err = capsys.readouterr()
    assert code == 3, (out, err)
    assert f"{uid}: skipped: refine skipped: the run's energies do not match the model's" in out
    retry = tiled_client["phasestream"][uid].metadata["refinement"]["retry"]
    assert f"  retry: {retry}" in out and retry.startswith("phasestream reprocess --tiled http")
    assert "0 of 1 runs complete, 1 skipped, 0 failed" in out and "in process" in out


def test_result_without_od_cube_is_skipped_with_reason(tiled_client, models):
    sample = make_sample((48, 48), state_of_charge=2.0, seed=7, n_particles=1)
    uid = _scan(tiled_client, sample, write_od=False)
    record = refine_result(tiled_client, uid, RefineOptions(address=models.address))
    assert record["status"] == "skipped" and "no OD cube" in record["reason"]


def test_live_service_refines_after_stop(tiled_client, models):
    # the worker's part, not the check's (tested above): a named strategy, unchecked
    service = LiveService(tiled_client, backend="numba",
                          refine=RefineOptions(address=models.address, strategy="knn", check=False))
    sample = make_sample((64, 64), state_of_charge=1.0, seed=8, n_particles=2)
    uid = _scan(tiled_client, sample, callback=service)
    node = wait_for_refinement(tiled_client, uid, timeout=120)
    service.close()
    assert node.metadata["refinement"]["status"] == "complete"
    assert node.metadata["refinement"]["strategy"] == "knn" and node.metadata["refinement"]["held_out"] is None
    assert set(node.metadata["refined_fractions"]) == set(REFS.phases)


def test_match_energies_orders_by_model():
    run = [530.0, 505.0, 515.2]
    np.testing.assert_array_equal(match_energies(run, [505.0, 515.21, 530.0], 0.05), [1, 2, 0])
    from phasestream.jobs.refine import RefinementSkipped

    with pytest.raises(RefinementSkipped, match=r"\['520.00'\]"):
        match_energies(run, [505.0, 520.0], 0.05)


def test_live_path_never_imports_tensorflow():
    import subprocess
    import sys

    code = ("import sys, phasestream.callbacks, phasestream.app.live, phasestream.jobs.refine, "
            "phasestream.transport.worker, phasestream.modelserver.server, phasestream.models.refine, "
            "phasestream.models.registry; "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TensorFlow was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.slow  # make test-stack
def test_a_refinement_that_does_not_complete_keeps_the_earlier_complete_one(tiled_client, models):
    """A re-run that skips (here: it cannot show a gain of 100 points) leaves the earlier complete refinement's
    arrays, fractions and model entry in place, described by ``kept``, and records its held-out figures; a
    re-run that completes replaces them, stale arrays (``latent`` of a model-free strategy) included."""
    sample = make_sample((128, 128), state_of_charge=2.0, seed=1, n_particles=2)
    uid = _scan(tiled_client, sample, dose=2000.0, seed=11)
    first = refine_result(tiled_client, uid, RefineOptions(address=models.address))
    assert first["status"] == "complete", first
    node = tiled_client["phasestream"][uid]
    assert "refined_phase" in node and MODEL in node.metadata["models"] and node.metadata["refined_fractions"]
    arrays = {key: node[key].read() for key in ("refined_phase", "latent", "false_positive")}
    fractions = node.metadata["refined_fractions"]
    record = refine_result(tiled_client, uid, RefineOptions(address=models.address, min_gain=1.0))
    held = record["held_out"]
    assert record["status"] == "skipped", record
    assert f"{held['pixels']:,} held-out pixels" in record["reason"] and "needs a gain of 1.000" in record["reason"]
    assert set(held["strategies"]) == set(STRATEGIES) and held["pcc"] is not None
    assert record["retry"].startswith("phasestream reprocess --tiled ") and record["retry"].endswith(uid)
    assert f"--strategy {record['strategy']} --no-check" in record["retry"]  # refines anyway, if asked to
    node = tiled_client["phasestream"][uid]
    md = node.metadata
    assert md["status"] == "complete" and md["refinement"]["status"] == "skipped"
    kept = md["refinement"]["kept"]
    assert kept["status"] == "complete" and kept["strategy"] == first["strategy"]
    assert kept["reassigned_fraction"] == pytest.approx(first["reassigned_fraction"])
    for key, array in arrays.items():
        np.testing.assert_array_equal(node[key].read(), array)
    assert md["refined_fractions"] == fractions and MODEL in md["models"]
    # a second one that does not complete (the server is down) keeps the same
    down = refine_result(tiled_client, uid, RefineOptions(address="tcp://127.0.0.1:1", timeout=0.5))
    assert down["status"] == "skipped" and down["kept"] == kept, down
    node = tiled_client["phasestream"][uid]
    assert node.metadata["refinement"]["kept"] == kept and node.metadata["refined_fractions"] == fractions
    np.testing.assert_array_equal(node["refined_phase"].read(), arrays["refined_phase"])
    # a refinement that completes replaces the kept one: no latent beside a model-free record
    spatial = refine_result(tiled_client, uid, RefineOptions(address=models.address, strategy="spatial",
                                                             check=False))
    assert spatial["status"] == "complete", spatial
    node = tiled_client["phasestream"][uid]
    md = node.metadata
    assert "kept" not in md["refinement"] and md["refinement"]["strategy"] == "spatial"
    assert {"refined_phase", "false_positive"} <= set(node) and "latent" not in node
    assert MODEL not in md["models"] and md["refined_fractions"] != {}


@pytest.mark.slow  # make test-stack: keeps make test under 15 minutes
def test_anchor_strategy_with_references_from_a_csv_file(tiled_client, models, tmp_path, monkeypatch):
    """References from a CSV file that is nowhere the job could find again: the result carries their values."""
    monkeypatch.delenv("PHASESTREAM_REFERENCES", raising=False)
    refs = ReferenceSet(REFS.energies, REFS.phases, REFS.spectra, name="beamtime-refs", metadata=REFS.metadata)
    path = write_references(refs, tmp_path / "beamtime-refs.csv")
    sample = make_sample((96, 96), state_of_charge=1.0, seed=9, n_particles=2)
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(tiled_client))
    cb = PhaseMapCallback(tiled_client, backend="numba", references=str(path))
    RE.subscribe(cb)
    energy = make_energy()
    det = TransmissionDetector(sample, energy, name="det", i0=2000.0, seed=3)
    (uid,) = RE(energy_stack_scan([det], energy, ENERGIES, sample=sample, i0_key=det.i0_key))
    assert cb.flush(60)
    cb.close()
    path.unlink()
    path.with_suffix(".yaml").unlink()
    node = tiled_client["phasestream"][uid]
    assert node.metadata["references"]["name"] == "beamtime-refs"
    np.testing.assert_allclose(node.metadata["reference_values"], REFS.interpolate(ENERGIES), atol=1e-6)
    record = refine_result(tiled_client, uid, RefineOptions(address=models.address, strategy="anchor", check=False))
    assert record["status"] == "complete" and record["strategy"] == "anchor", record
    assert record["held_out"] is None
    node = tiled_client["phasestream"][uid]
    refined, phase = node["refined_phase"].read(), node["phase"].read()
    mask, ambiguous = node["mask"].read().astype(bool), node["ambiguous"].read().astype(bool)
    assert (refined[mask] >= 0).all()
    np.testing.assert_array_equal(refined[mask & ~ambiguous], phase[mask & ~ambiguous])
    # anchor gives every ambiguous pixel a phase from the latent space
    assert record["reassigned_fraction"] == pytest.approx(node.metadata["ambiguous_fraction"], abs=1e-6)
    assert record["reassigned_fraction"] > 0.01


def test_spatial_refines_without_a_model_server(tiled_client):
    sample = make_sample((96, 96), state_of_charge=2.0, seed=11, n_particles=2)
    uid = _scan(tiled_client, sample)
    down = RefineOptions(address="tcp://127.0.0.1:1", timeout=0.5, retries=0, strategy="spatial", check=False)
    record = refine_result(tiled_client, uid, down)
    node = tiled_client["phasestream"][uid]
    assert record["status"] == "complete" and record["strategy"] == "spatial" and record["model"] is None
    assert "latent" not in node and node.metadata["refinement"]["model"] is None
    assert "--strategy spatial --no-check" in down.retry_command(uid)
    phase, refined = node["phase"].read(), node["refined_phase"].read()
    amb = node["ambiguous"].read().astype(bool) & sample.particle & ~sample.boundary
    assert amb.sum() > 50
    truth = sample.phase
    assert np.mean(refined[amb] == truth[amb]) > np.mean(phase[amb] == truth[amb])  # the simulator's truth
    sure = ~amb & sample.particle & ~sample.boundary
    assert (refined[sure] == phase[sure]).all()
