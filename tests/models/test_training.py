"""Training sets (simulated, from Tiled results) and the ``phasestream train gmvae`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support import analysed_scan, frame_run

from phasestream.app.cli import main as cli_main
from phasestream.jobs.training import tiled_training_set
from phasestream.models.registry import Artifact, ModelRegistry
from phasestream.references import load_references, select_energies
from phasestream.sim import make_sample
from phasestream.sim.training import synthetic_training_set

REFS = load_references("nvpf-synthetic")
ENERGIES = select_energies(REFS, 12, method="score")  # the energies of the demo and the pretrained GMVAE


def test_synthetic_set_labels_are_pcc_argmax():
    data = synthetic_training_set(seed=3, n_samples=1, states=(3.0, 1.0), doses=(5000.0,), shape=(64, 64),
                                  max_spectra=None)
    assert data.spectra.shape[1] == 13 and data.spectra.dtype == np.float32
    np.testing.assert_allclose(data.energies_eV, ENERGIES)
    assert data.phases == list(REFS.phases)
    assert np.isfinite(data.spectra).all() and len(data.labels) == len(data.spectra)
    ref = REFS.interpolate(ENERGIES)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(data.spectra), 50, replace=False):
        pcc = [np.corrcoef(data.spectra[i], r)[0, 1] for r in ref]
        assert data.labels[i] == int(np.argmax(pcc))  # NumPy oracle
    assert data.provenance["source"] == "synthetic" and data.provenance["seed"] == 3
    assert data.provenance["n_spectra"] == len(data.spectra)


def _scan(client, soc: float, seed: int, energies=ENERGIES) -> str:
    return analysed_scan(client, energies, shape=(64, 64), seed=seed, state_of_charge=soc, i0=5000.0, raw=True)


@pytest.mark.cluster  # make test-stack: keeps make test under 15 minutes on 2 cores
def test_tiled_set_and_train_command(tiled_server, tiled_client, tmp_path):
    uids = [_scan(tiled_client, 2.0, 21), _scan(tiled_client, 2.0, 22), _scan(tiled_client, 3.0, 23)]
    data = tiled_training_set(tiled_client, state_of_charge=[2.0])
    assert set(data.provenance["runs"]) == set(uids[:2])
    node = tiled_client["phasestream"][uids[0]]
    mask = node["mask"].read().astype(bool)
    n_first = int(mask.sum())
    od = node["od"].read()
    order = np.argsort(node.metadata["energies_eV"])
    np.testing.assert_allclose(data.spectra[:n_first], od[order][:, mask].T, rtol=1e-6)  # the spectra as stored
    np.testing.assert_allclose(data.energies_eV, np.sort(ENERGIES), atol=1e-6)
    # each label's reliability is the stored map's, the PCC gap (an independent recomputation)
    np.testing.assert_allclose(data.reliability[:n_first], node["reliability"].read()[mask], rtol=1e-6)
    pcc = np.sort(node["pcc"].read()[:, mask], axis=0)
    np.testing.assert_allclose(data.reliability[:n_first], pcc[-1] - pcc[-2], atol=1e-5)

    code = cli_main(["train", "gmvae", "--tiled", tiled_server.uri, "--runs", *uids, "--epochs", "1",
                     "--out", str(tmp_path), "--name", "gmvae-beamline", "--version", "0.1.0",
                     "--scheduler", "local"])
    assert code == 0
    art = Artifact.read(tmp_path / "gmvae-beamline-0.1.0")
    manifest = json.loads((art.path / "manifest.json").read_text())
    assert manifest["training"]["source"] == "tiled" and set(manifest["training"]["runs"]) == set(uids)
    assert manifest["training"]["extracted_on"] == "dask"
    supervision = manifest["training"]["supervision"]  # runs from Tiled: semi-supervised by default
    assert supervision["labels"] == "pcc" and supervision["min_reliability"] == 0.02
    assert 0 < supervision["spectra"] < manifest["training"]["n_spectra"]
    assert "api_key" not in json.dumps(manifest)  # the key never lands in an artifact
    assert manifest["metrics"]["test_reconstruction_mse"] > 0
    # the training report: per-phase purity, validation runs (the last two given), warnings in words
    report = manifest["report"]
    assert set(report["per_phase_purity"]) <= set(manifest["phases"]) and report["per_phase_purity"]
    assert [run["run"] for run in report["validation_runs"]] == manifest["training"]["validation_runs"]
    assert len(manifest["training"]["validation_runs"]) == 2 and isinstance(report["warnings"], list)
    assert ModelRegistry([tmp_path]).get("gmvae-beamline").version == "0.1.0"


@pytest.mark.slow  # make test-stack: keeps make test under 15 minutes
def test_runs_at_other_energies_are_refused(tiled_client):
    a = _scan(tiled_client, 1.0, 31)
    b = _scan(tiled_client, 1.0, 32, energies=select_energies(REFS, 6))
    with pytest.raises(ValueError, match=f"run {b} was measured at other energies"):
        tiled_training_set(tiled_client, runs=[a, b])
    with pytest.raises(KeyError, match="no phasestream result for run nope"):
        tiled_training_set(tiled_client, runs=["nope"])


@pytest.mark.cluster  # make test-stack: keeps make test under 15 minutes on 2 cores
def test_extraction_on_dask_equals_in_process_and_names_failed_runs(tiled_server, tiled_client, monkeypatch):
    import pathlib

    import tiled.client.utils

    # Tiled's client retries a server error for up to 45 s: 3 s are enough (workers read the environment)
    monkeypatch.setenv("TILED_RETRY_TIMEOUT", "3")
    monkeypatch.setattr(tiled.client.utils, "TILED_RETRY_TIMEOUT", 3.0)
    uids = [_scan(tiled_client, 2.4, 41), _scan(tiled_client, 1.0, 42)]
    here = tiled_training_set(tiled_client, runs=uids)
    on_dask = tiled_training_set(tiled_client, runs=uids, tiled_uri=tiled_server.uri, scheduler="local")
    assert on_dask.provenance["runs"] == here.provenance["runs"] == uids
    assert on_dask.provenance["extracted_on"] == "dask"
    np.testing.assert_array_equal(on_dask.spectra, here.spectra)
    np.testing.assert_array_equal(on_dask.labels, here.labels)
    np.testing.assert_array_equal(on_dask.energies_eV, here.energies_eV)
    # the labels are the PCC argmax of the stored maps: an independent read of the first result
    node = tiled_client["phasestream"][uids[0]]
    mask = node["mask"].read().astype(bool)
    np.testing.assert_array_equal(here.labels[: int(mask.sum())], node["phase"].read()[mask])

    bad = _scan(tiled_client, 2.0, 43)
    chunks = [p for p in pathlib.Path(tiled_server.directory, "data").rglob("*")
              if p.is_file() and bad in p.parts and "od" in p.parts and p.name != "zarr.json"]
    assert chunks, f"no OD chunks of {bad}"
    for path in chunks:
        path.write_bytes(b"corrupted")
    with pytest.raises(ValueError, match=f"training data could not be read from {bad}: ") as info:
        tiled_training_set(tiled_client, runs=[*uids, bad], tiled_uri=tiled_server.uri, scheduler="local", retries=0)
    assert uids[0] not in str(info.value)  # only the failed run is named


@pytest.mark.cluster  # make test-stack: keeps make test under 15 minutes on 2 cores
def test_train_indi_from_an_lq_hq_pair_of_runs(tiled_server, tiled_client, tmp_path):
    pytest.importorskip("tensorflow")
    from phasestream.sim.phantoms import degrade, particle_phantom

    # the HQ scan: a 128^2 field of a wider sample; the LQ scan: the whole 256^2 sample at half
    # the resolution, so the HQ field sits at (40, 24) HQ pixels in the upscaled LQ scan and must be found
    wide = np.stack([particle_phantom((256, 256), seed=s, n_particles=14) for s in (41, 42)])
    hq = wide[:, 40:168, 24:152]
    lq = np.stack([degrade(w, noise=0.01, seed=i) for i, w in enumerate(wide)])
    hq_uid = frame_run(tiled_client, hq, {"pixel_size": 10.0, "pixel_unit": "nm"})
    lq_uid = frame_run(tiled_client, lq, {"pixel_size": 20.0, "pixel_unit": "nm"})

    code = cli_main(["train", "indi", "--tiled", tiled_server.uri, "--lq", lq_uid, "--hq", hq_uid,
                     "--iterations", "20", "--filters", "4", "--crop", "32", "--batch-size", "2",
                     "--domain", "counts", "--out", str(tmp_path), "--name", "indi-beamline"])
    assert code == 0
    art = Artifact.read(tmp_path / "indi-beamline-1.0.0")
    manifest = json.loads((art.path / "manifest.json").read_text())
    training = manifest["training"]
    assert training["source"] == "tiled" and (training["lq_run"], training["hq_run"]) == (lq_uid, hq_uid)
    for info in training["registration"]:
        assert np.abs(np.array(info["offset_px"]) - [40, 24]).max() <= 2  # integer search
        assert np.abs(np.array(info["offset_px"]) - [40, 24] - info["shift_px"]).max() < 0.2  # + sub-pixel
    assert manifest["pixel_size"] == {"lq": 0.02, "hq": 0.01, "unit": "um", "from": "pixel_size (nm)"}
    assert manifest["scale"] == 2 and manifest["domain"] == {"image": "counts", "normalization": {"mode": "none"}}
    assert "api_key" not in json.dumps(manifest)
    assert ModelRegistry([tmp_path]).get("indi-beamline").kind == "indi"


def _truth_set(seed: int = 7) -> tuple:
    """Particle-pixel spectra of simulated 64^2 scans of the five NVPF states (2000 counts/px), their
    PCC labels and reliabilities as the live path computes them, and the simulator's truth."""
    from phasestream.jobs.training import TrainingSet, analysed_labels

    ref_values = REFS.interpolate(ENERGIES)
    rng = np.random.default_rng(seed)
    x, labels, reliability, truth = [], [], [], []
    for soc in (3.0, 2.4, 2.0, 1.0, 0.8):
        sample = make_sample((64, 64), state_of_charge=soc, references=REFS, seed=seed + int(10 * soc))
        counts = np.stack([sample.transmitted(e, i0=2000.0, rng=rng) for e in ENERGIES])
        with np.errstate(divide="ignore"):
            od = -np.log(np.where(counts > 0, counts, np.nan) / 2000.0)
        mask, phase, gap = analysed_labels(od, ref_values)
        keep = mask & sample.particle & np.isfinite(od).all(axis=0)
        x.append(od[:, keep].T)
        labels.append(phase[keep])
        reliability.append(gap[keep])
        truth.append(sample.phase[keep])
    data = TrainingSet(np.concatenate(x).astype(np.float32), np.concatenate(labels).astype(np.int16),
                       np.asarray(ENERGIES), list(REFS.phases), {"source": "test"}, [], np.concatenate(reliability))
    return data, np.concatenate(truth)


@pytest.mark.slow  # make test-stack
def test_pcc_supervision_raises_purity_against_the_truth(tmp_path):
    """Confident PCC labels as partial supervision: the mixture components align with the true phases
    (purity against the simulator's truth, not against the labels trained on) and the manifest says so."""
    pytest.importorskip("tensorflow")
    from phasestream.jobs.training import supervised_spectra, train_artifact
    from phasestream.models.gmvae import cluster_purity

    data, truth = _truth_set()
    supervised = supervised_spectra(data)
    assert 0.3 < supervised.mean() < 0.9  # partial: many spectra stay unlabelled
    assert np.mean(data.labels[supervised] == truth[supervised]) > 0.95  # confident labels are mostly right
    options = {"epochs": 30, "hidden": (128, 64, 32, 16), "normalization": "feature", "beta": 0.2, "seed": 0,
               "progress": False}
    purity, aligned = {}, {}
    for supervision in ("none", "pcc"):
        artifact, result = train_artifact(data, tmp_path, name=f"gmvae-{supervision}", version="0.0.1",
                                          supervision=supervision, **options)
        components = result.model.encode(data.spectra)[1]
        purity[supervision] = cluster_purity(components, truth)
        aligned[supervision] = float(np.mean(components.argmax(axis=1) == truth))
        manifest = json.loads((artifact.path / "manifest.json").read_text())
        assert manifest["training"]["supervision"]["labels"] == supervision
    print(f"purity against the truth: unsupervised {purity['none']:.3f}, PCC-supervised {purity['pcc']:.3f}; "
          f"component = true phase: {aligned['none']:.3f} -> {aligned['pcc']:.3f}")
    assert purity["pcc"] >= purity["none"] + 0.1
    assert aligned["pcc"] > 0.6  # component k is phase k
    record = manifest["training"]["supervision"]
    assert record["spectra"] == sum(record["per_phase"].values()) == int(supervised.sum())
    assert 0 < result.metrics["supervised_spectra"] <= record["spectra"]  # those of the training split
    assert record["min_reliability"] == 0.02 and record["weight"] == 5.0


def test_supervision_needs_reliabilities(tmp_path):
    from phasestream.jobs.training import TrainingSet, train_artifact

    data = TrainingSet(np.zeros((50, 13), np.float32), np.zeros(50, np.int16), np.asarray(ENERGIES),
                       list(REFS.phases))
    with pytest.raises(ValueError, match="no PCC reliabilities"):
        train_artifact(data, tmp_path, name="g", version="0.0.1", supervision="pcc")
    with pytest.raises(ValueError, match="supervision must be one of"):
        train_artifact(data, tmp_path, name="g", version="0.0.1", supervision="labels")
