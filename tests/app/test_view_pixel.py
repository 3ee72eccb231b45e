"""The view's pixel route (``/api/runs/{uid}/pixel?y=&x=``, phasestream.app.view.pixel) over a real analysed scan
in a real Tiled: what the page shows when the phase map is clicked. Oracles: the arrays in Tiled, SciPy's Pearson
correlation of the shown spectrum with the stored references (the worker's PCC), SciPy's linear regression (the
fitted references)."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
from scipy import stats
from support import analysed_scan, wait
from tiled.structures.array import ArrayStructure, BuiltinDtype
from tiled.structures.core import StructureFamily
from tiled.structures.data_source import DataSource
from view_support import chromium, missing, text_at

from phasestream.app.view import ViewServer
from phasestream.references import load_references, select_energies

ENERGIES = select_energies(load_references("nvpf-synthetic"), 8)
SHAPE = (32, 32)


@pytest.fixture(scope="module")
def viewed(tiled_client):
    """An analysed scan, a result without reference values, one whose ``od`` is off the contract, and the view."""
    uid = analysed_scan(tiled_client, ENERGIES, shape=SHAPE, seed=12)
    root = tiled_client["phasestream"]
    bare = {"run_uid": "pixel-bare", "status": "complete", "references": {"phases": ["A", "B"]}, "errors": [],
            "n_energies_seen": 3, "energies_eV": [1.0, 2.0, 3.0], "image_shape": [2, 2], "updated_at": time.time()}
    node = root.create_container("pixel-bare", specs=["PhaseMap"], metadata=bare)
    node.write_array(np.arange(12, dtype=np.float32).reshape(3, 2, 2), key="od")
    node.write_array(np.array([[0, 1], [-1, 1]], dtype=np.int16), key="phase")
    node.write_array(np.array([[0, 0], [-1, 1]], dtype=np.int16), key="refined_phase")
    node.write_array(np.arange(12, dtype=np.float32).reshape(3, 2, 2) / 2, key="denoised")
    node.write_array(np.array([[1, 1], [-1, 0]], dtype=np.int16), key="phase_denoised")
    odd = root.create_container("pixel-odd", specs=["PhaseMap"], metadata={**bare, "run_uid": "pixel-odd"})
    odd.write_array(np.zeros((3, 2, 5), dtype=np.float32), key="od")  # not the image_shape
    # declares 2 million energies, its metadata a billion seen and three energies: three are read
    vast = root.create_container("pixel-vast", specs=["PhaseMap"], metadata={**bare, "run_uid": "pixel-vast",
                                                                             "n_energies_seen": 10**9})
    structure = ArrayStructure(data_type=BuiltinDtype.from_numpy_dtype(np.dtype("float32")),
                               chunks=((1,) * 2_000_000, (2,), (2,)), shape=(2_000_000, 2, 2))
    vast.new(StructureFamily.array, [DataSource(structure=structure, structure_family=StructureFamily.array)],
             key="od")
    vast["od"].write_block(np.full((1, 2, 2), 7.0, dtype=np.float32), block=(1, 0, 0))
    with ViewServer(tiled_client) as view, httpx.Client(base_url=view.url, timeout=60) as http:
        wait(lambda: view.follower.state == "live" and
             {uid, "pixel-bare", "pixel-odd", "pixel-vast"} <= set(view.follower.runs), 60, "the view to follow them")
        yield http, uid, root[uid], view


def test_a_pixel_shows_its_spectrum_the_maps_there_and_the_references_fitted(viewed):
    http, uid, node, _ = viewed
    md = node.metadata
    phases, references = md["references"]["phases"], np.asarray(md["reference_values"], dtype=np.float64)
    phase = node["phase"].read()
    inside = tuple(int(i) for i in np.argwhere(phase >= 0)[len(np.argwhere(phase >= 0)) // 2])
    outside = tuple(int(i) for i in np.argwhere(phase < 0)[0])
    for y, x in (inside, outside):
        reply = http.get(f"/api/runs/{uid}/pixel", params={"y": y, "x": x})
        assert reply.status_code == 200, reply.text
        shown = reply.json()
        od = node["od"].read()[:, y, x].astype(np.float64)
        assert shown["y"] == y and shown["x"] == x and shown["energies_eV"] == md["energies_eV"]
        assert shown["od"] == [float(v) if np.isfinite(v) else None for v in od]
        assert shown["phase"] == (phases[phase[y, x]] if phase[y, x] >= 0 else None)
        assert shown["refined_phase"] is None and shown["denoised"] is None  # neither refined nor denoised
        reliability = float(node["reliability"].read()[y, x])
        assert shown["reliability"] == (reliability if np.isfinite(reliability) else None)
        assert shown["mask"] == bool(node["mask"].read()[y, x]) and shown["references"] == "stored"
        for k, name in enumerate(phases):
            fit = stats.linregress(references[k], od)
            np.testing.assert_allclose(shown["fitted"][name], fit.intercept + fit.slope * references[k], rtol=1e-9,
                                       atol=1e-12)
            if phase[y, x] >= 0:  # what the worker's PCC says there is SciPy's Pearson r of the shown spectrum
                assert shown["pcc"][name] == pytest.approx(stats.pearsonr(od, references[k]).statistic, abs=2e-6)
        if phase[y, x] >= 0:
            assert shown["phase"] == max(shown["pcc"], key=shown["pcc"].get)


def test_a_result_without_reference_values_shows_the_spectrum_alone(viewed):
    http = viewed[0]
    shown = http.get("/api/runs/pixel-bare/pixel", params={"y": 1, "x": 0}).json()
    assert shown["od"] == [2.0, 6.0, 10.0] and shown["energies_eV"] == [1.0, 2.0, 3.0]
    assert shown["phase"] is None and shown["pcc"] == {} and shown["mask"] is None
    assert shown["fitted"] == {"A": None, "B": None} and shown["references"] == "none stored with the result"
    other = http.get("/api/runs/pixel-bare/pixel", params={"y": 0, "x": 1}).json()
    assert other["phase"] == "B" and other["refined_phase"] == "A" and shown["refined_phase"] is None
    assert other["denoised"] == [0.5, 2.5, 4.5] and other["phase_denoised"] == "B" and shown["phase_denoised"] is None


@pytest.mark.parametrize(("query", "said"), [
    ({"x": "0"}, "y must be a pixel index (0 to 1), got ''"),
    ({"y": "-1", "x": "0"}, "y must be a pixel index (0 to 1), got '-1'"),
    ({"y": "0", "x": "1e0"}, "x must be a pixel index (0 to 1), got '1e0'"),
    ({"y": "0", "x": "2"}, "x 2 is outside the image (0 to 1)"),
    ({"y": "0", "x": "99999999999"}, "x must be a pixel index (0 to 1), got '99999999999'"),
])
def test_a_pixel_outside_the_image_or_not_a_number_is_refused_naming_it(viewed, query, said):
    reply = viewed[0].get("/api/runs/pixel-bare/pixel", params=query)
    assert reply.status_code == 400 and reply.json() == {"error": said}


def test_arrays_off_the_contract_and_unknown_results_are_said_never_read(viewed):
    http = viewed[0]
    reply = http.get("/api/runs/pixel-odd/pixel", params={"y": 0, "x": 0})
    assert reply.status_code == 422 and "od has shape (3, 2, 5), not the result's image_shape [2, 2]" in reply.text
    assert http.get("/api/runs/pixel-none/pixel", params={"y": 0, "x": 0}).status_code == 404
    assert http.get("/api/runs/..%2Fx/pixel", params={"y": 0, "x": 0}).status_code == 404


PIXEL_SHOWN = """
return [...document.querySelectorAll('#spectrum circle.od-point')].map((c) => [Number(c.dataset.energy),
  Number(c.dataset.od)]).concat([[document.querySelectorAll('#spectrum polyline.fitted').length, -1]]);
"""


@pytest.mark.browser
@pytest.mark.skipif(missing() is not None, reason=missing() or "")
def test_clicking_the_phase_map_shows_that_pixels_spectrum_in_a_browser(viewed):
    """A click on the phase map in a headless Chromium shows the clicked pixel: its phase as the result's ``phase``
    array says, and its OD spectrum, point for point as ``od`` holds it, with one fitted curve per reference."""
    from selenium.webdriver.common.action_chains import ActionChains

    _, uid, node, view = viewed
    phase, od = node["phase"].read(), node["od"].read()
    phases, energies = node.metadata["references"]["phases"], node.metadata["energies_eV"]
    with chromium() as driver:
        driver.get(f"{view.url}/#{uid}")
        wait(lambda: driver.execute_script("const i = document.getElementById('img-phase');"
                                           "return i.complete && i.naturalWidth > 0"), 30, "the phase map drawn")
        img = driver.find_element("css selector", "#img-phase")
        size = img.size
        for y, x in ((int(np.argwhere(phase >= 0)[0][0]) + 1, int(np.argwhere(phase >= 0)[0][1])), (0, 0)):
            # the centre of pixel (y, x) as drawn, from the image's centre (selenium 4's offsets)
            dx = (x + 0.5) * size["width"] / SHAPE[1] - size["width"] / 2
            dy = (y + 0.5) * size["height"] / SHAPE[0] - size["height"] / 2
            ActionChains(driver).move_to_element_with_offset(img, round(dx), round(dy)).click().perform()
            said = phases[phase[y, x]] if phase[y, x] >= 0 else "outside the particle mask"
            title = wait(lambda y=y, x=x, said=said: (t := text_at(driver, "#pixel-title")) and
                         t.startswith(f"pixel (y {y}, x {x}): {said}") and t, 30, f"pixel ({y}, {x}) shown")
            shown = driver.execute_script(PIXEL_SHOWN)
            points, curves = shown[:-1], shown[-1][0]
            expected = [[e, float(v)] for e, v in zip(energies, od[:, y, x], strict=True) if np.isfinite(v)]
            assert points == expected, title  # the JSON's numbers, drawn and read back exactly
            assert curves == len(phases)
        # a denoised result: its spectrum drawn beside the OD, its phase named (a new page: a hash alone is no reload)
        driver.get(f"{view.url}/?again#pixel-bare")
        wait(lambda: text_at(driver, "#run-title") and "pixel-bare" in text_at(driver, "#run-title"), 30, "the run")
        img = driver.find_element("css selector", "#img-phase")
        ActionChains(driver).move_to_element_with_offset(img, img.size["width"] // 4, -img.size["height"] // 4).click()\
            .perform()
        wait(lambda: text_at(driver, "#pixel-title") == "pixel (y 0, x 1): B; GMVAE refined: A; denoised: B", 30,
             "the denoised pixel")
        rings = driver.execute_script("return [...document.querySelectorAll('#spectrum circle.denoised-point')]"
                                      ".map((c) => Number(c.dataset.od))")
        assert rings == [0.5, 2.5, 4.5]


def test_a_result_declaring_more_energies_than_it_lists_is_read_only_as_far_as_the_list(viewed):
    shown = viewed[0].get("/api/runs/pixel-vast/pixel", params={"y": 1, "x": 1}).json()
    assert shown["od"] == [0.0, 7.0, 0.0] and shown["energies_eV"] == [1.0, 2.0, 3.0]
