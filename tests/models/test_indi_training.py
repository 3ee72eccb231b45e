"""InDI training from pairs as scientists have them (``phasestream train indi``): one LQ and one HQ frame
at two doses, normalized to one domain, pixel sizes from the start document, and every data or argument
error raised before TensorFlow loads."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from support import frame_run

from phasestream.app.cli import main as cli_main
from phasestream.models.pairs import check_pair_range, split_field
from phasestream.models.registry import Artifact
from phasestream.sim.phantoms import degrade, particle_phantom

LQ_DOSE, HQ_DOSE = 120.0, 3000.0


@pytest.fixture(scope="module")
def dose_pair(tiled_client):
    """One LQ frame (120 counts/px, blurred and 2x binned, the whole 256^2 field) and one HQ frame
    (3000 counts/px, a 128^2 part of it) of absorbing particles, Poisson noise: raw counts at two doses."""
    rng = np.random.default_rng(5)
    od = 1.5 * particle_phantom((256, 256), seed=51, n_particles=14)
    transmission = np.exp(-od)
    hq = rng.poisson(HQ_DOSE * transmission[40:168, 24:152]).astype(np.float32)
    lq = rng.poisson(LQ_DOSE * degrade(transmission, noise=0.0)).astype(np.float32)
    lq_uid = frame_run(tiled_client, lq[None], {"sample": {"name": "P1", "pixel_size_um": 0.04}})
    hq_uid = frame_run(tiled_client, hq[None], {"sample": {"name": "P1", "pixel_size_um": 0.02}})
    return lq_uid, hq_uid


@pytest.mark.slow  # make test-stack
def test_one_frame_pair_at_two_doses_trains_on_od(tiled_server, dose_pair, tmp_path):
    pytest.importorskip("tensorflow")
    lq_uid, hq_uid = dose_pair
    code = cli_main(["train", "indi", "--tiled", tiled_server.uri, "--lq", lq_uid, "--hq", hq_uid,
                     "--iterations", "20", "--filters", "4", "--crop", "32", "--batch-size", "2",
                     "--out", str(tmp_path), "--name", "indi-p1"])
    assert code == 0
    manifest = json.loads((Artifact.read(tmp_path / "indi-p1-1.0.0").path / "manifest.json").read_text())
    domain = manifest["domain"]
    assert domain["image"] == "od" and domain["normalization"]["mode"] == "open_beam"
    # each scan divided by its own open beam, estimated from its background (OD 0.15 there: T = 0.86)
    background = np.exp(-0.15)
    assert domain["normalization"]["lq"]["i0"] == pytest.approx(LQ_DOSE * background, rel=0.05)
    assert domain["normalization"]["hq"]["i0"] == pytest.approx(HQ_DOSE * background, rel=0.05)
    assert manifest["pixel_size"] == {"lq": 0.04, "hq": 0.02, "unit": "um", "from": "sample.pixel_size_um"}
    validation = manifest["metrics"]["validation"]
    # one frame: validated on a band of the field it was not trained on (32 rows of the registered HQ field)
    assert validation["pairs"] == 1 and validation["region"]["shapes"][0][0] == 32
    assert {"psnr_db", "ssim", "edge_fwhm_px", "hf_correlation", "gain_over_bicubic_db"} <= set(validation)


_PROBE = """
import json, sys
from phasestream.app.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    code = main(argv)
    results.append({"code": code, "tensorflow": "tensorflow" in sys.modules})
print(json.dumps(results))
"""


def test_data_and_argument_errors_come_before_tensorflow(tiled_server, dose_pair, tmp_path):
    lq_uid, hq_uid = dose_pair
    base = ["train", "indi", "--tiled", tiled_server.uri, "--lq", lq_uid, "--hq", hq_uid, "--out", str(tmp_path)]
    cases = {
        "outside the network's range": [*base, "--domain", "counts"],  # raw counts at 120 and 3000: refused
        "is not 2 x the HQ pixel": [*base, "--pixel-size", "0.05", "0.02"],
        "--crop must be a multiple of 4": [*base, "--crop", "30"],
        "--crop must be a multiple of 8 of at least 16 pixels (--depth 3)": [*base, "--depth", "3", "--crop", "36"],
        "--depth must be 1 to 5": [*base, "--depth", "0"],
        "too small to train on": [*base, "--crop", "128"],
        "--open-beam takes two positive": [*base, "--open-beam", "120", "0"],
        # a raw path is checked before it names a Tiled node; the runs are looked up there (none are)
        "raw-run path 'bl/..' refused": [*base, "--raw", "bl/.."],
        "no container 'bl/raw' of raw runs": [*base, "--raw", "bl/raw"],
    }
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(list(cases.values()))], capture_output=True,
                         text=True, timeout=300)
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["code"] for r in results] == [2] * len(cases), out.stderr[-2000:]
    assert not any(r["tensorflow"] for r in results)  # every error raised before TensorFlow loaded
    for message in cases:
        assert message in out.stderr, (message, out.stderr[-2000:])
    assert "100% of the HQ pixels" in out.stderr


def test_pair_range_and_validation_band_rules():
    rng = np.random.default_rng(0)
    lq = rng.uniform(50, 120, (64, 64))
    assert check_pair_range(lq * 1.02, lq) < 0.1
    with pytest.raises(ValueError, match=r"100% of the HQ pixels fall outside"):
        check_pair_range(25 * lq, lq)
    train, val = split_field((96, 160), crop=32)
    assert val == (slice(0, 96), slice(128, 160)) and train == (slice(0, 96), slice(0, 120))
    with pytest.raises(ValueError, match="too small to train on"):
        split_field((64, 64), crop=32)
