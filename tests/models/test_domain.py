"""The image domain of an InDI artifact: the refusal rules and the conversion of counts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from phasestream.models.domain import DomainMismatchError, check_domain, to_domain
from phasestream.models.registry import PRETRAINED_DIR


def _manifest(image: str | None) -> dict:
    manifest = {"name": "indi-x", "version": "1.0.0", "kind": "indi"}
    if image is not None:
        manifest["domain"] = {"image": image, "normalization": {"mode": "open_beam"}}
    return manifest


@pytest.mark.parametrize("model, image", [("transmission", "od"), ("od", "transmission"), ("counts", "od"),
                                          ("od", "counts")])
def test_another_domain_is_refused_naming_both(model, image):
    with pytest.raises(DomainMismatchError) as info:
        check_domain(_manifest(model), image)
    assert f"trained on {model} images and these images are {image}" in str(info.value)
    assert f"--domain {image}" in str(info.value)


def test_same_domain_passes_and_an_undeclared_domain_is_refused():
    assert check_domain(_manifest("od"), "od")["image"] == "od"
    with pytest.raises(DomainMismatchError, match="declares no image domain"):
        check_domain(_manifest(None), "od")
    with pytest.raises(ValueError, match="must be one of"):
        check_domain(_manifest("od"), "intensity")


def test_the_shipped_model_declares_the_synthetic_od_domain():
    manifest = json.loads((PRETRAINED_DIR / "indi-particles-synthetic-1.0.0" / "manifest.json").read_text())
    assert manifest["domain"]["image"] == "od"
    assert "simulated" in manifest["domain"]["normalization"]["note"]
    check_domain(manifest, "od")


def test_counts_to_each_domain_against_beer_lambert():
    counts = np.array([[3000.0, 1500.0], [300.0, 0.0]])
    np.testing.assert_allclose(to_domain(counts, "transmission", 3000.0), counts / 3000.0, rtol=1e-6)
    od = to_domain(counts, "od", 3000.0)
    np.testing.assert_allclose(od[:1], [[0.0, np.log(2.0)]], atol=1e-6)
    assert od[1, 0] == pytest.approx(np.log(10.0), rel=1e-6) and np.isnan(od[1, 1])
    np.testing.assert_array_equal(to_domain(counts, "counts"), counts.astype(np.float32))
    with pytest.raises(ValueError, match="positive open-beam"):
        to_domain(counts, "od", None)
