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
from phasestream.models.registry import ModelRegistry
from phasestream.references import load_references, select_energies
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


@pytest.mark.parametrize(("soc", "seed"), [(2.0, 1), (1.0, 2)])
def test_refinement_resolves_ambiguous_pixels_against_ground_truth(tiled_client, models, soc, seed):
    """Acceptance: ambiguous pixels >= 85% right after refinement; overall better than PCC argmax."""
    sample = make_sample((256, 256), state_of_charge=soc, seed=seed)
    uid = _scan(tiled_client, sample, dose=2000.0, seed=seed + 10)
    record = refine_result(tiled_client, uid, RefineOptions(address=models.address))
    assert record["status"] == "complete", record
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
    retry = node.metadata["refinement"]["retry"]  # a whole command, the model server's address included
    assert retry == f"phasestream reprocess --refine-only --models tcp://127.0.0.1:1 --model {down.model} " \
                    f"--strategy {down.strategy} {uid}"
    assert "refined_phase" not in node
    code = cli_main(["reprocess", "--refine-only", uid, "--tiled", tiled_server.uri, "--models", models.address])
    assert code == 0
    node = tiled_client["phasestream"][uid]
    assert node.metadata["refinement"]["status"] == "complete"
    assert node["refined_phase"].read().shape == (64, 64)


def test_energies_not_matching_the_model_are_skipped_with_reason(tiled_client, models):
    sample = make_sample((48, 48), state_of_charge=2.0, seed=6, n_particles=1)
    uid = _scan(tiled_client, sample, energies=select_energies(REFS, 6))
    record = refine_result(tiled_client, uid, RefineOptions(address=models.address))
    assert record["status"] == "skipped" and "do not match the model's" in record["reason"]
    assert tiled_client["phasestream"][uid].metadata["status"] == "complete"


def test_result_without_od_cube_is_skipped_with_reason(tiled_client, models):
    sample = make_sample((48, 48), state_of_charge=2.0, seed=7, n_particles=1)
    uid = _scan(tiled_client, sample, write_od=False)
    record = refine_result(tiled_client, uid, RefineOptions(address=models.address))
    assert record["status"] == "skipped" and "no OD cube" in record["reason"]


def test_live_service_refines_after_stop(tiled_client, models):
    service = LiveService(tiled_client, backend="numba", refine=RefineOptions(address=models.address))
    sample = make_sample((64, 64), state_of_charge=1.0, seed=8, n_particles=2)
    uid = _scan(tiled_client, sample, callback=service)
    node = wait_for_refinement(tiled_client, uid, timeout=120)
    service.close()
    assert node.metadata["refinement"]["status"] == "complete"
    assert node.metadata["refinement"]["strategy"] == "knn"
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
