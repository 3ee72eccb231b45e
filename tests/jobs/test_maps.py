"""The PCC maps of a stored result recomputed from another OD cube, against the kernels' NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest

from phasestream.jobs.maps import pcc_phase_maps, result_reference_values
from phasestream.kernels import assign_phases, pearson_maps
from phasestream.references import load_references


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_maps_equal_the_numpy_reference_and_leave_masked_pixels_out(backend):
    rng = np.random.default_rng(3)
    refs = rng.uniform(0.2, 1.5, (3, 9))
    weights = rng.dirichlet(np.ones(3), (20, 24))  # (Y, X, K)
    od = (np.einsum("yxk,ke->eyx", weights, refs) + rng.normal(0, 0.02, (9, 20, 24))).astype(np.float32)
    od[4, 2, 3] = np.nan
    mask = np.ones((20, 24), bool)
    mask[0] = False
    maps = pcc_phase_maps(od, refs, mask, ambiguity=0.01, backend=backend)
    pcc = pearson_maps(od, refs)
    np.testing.assert_allclose(maps["pcc"], pcc, atol=1e-5)
    phase, reliability, ambiguous = assign_phases(pcc, mask, 0.01, backend="numpy")
    np.testing.assert_array_equal(maps["phase"], phase)
    np.testing.assert_allclose(maps["reliability"], reliability, atol=1e-5)
    np.testing.assert_array_equal(maps["ambiguous"], ambiguous)
    assert np.isnan(maps["pcc"][:, 2, 3]).all() and maps["phase"][2, 3] == -1 and (maps["phase"][0] == -1).all()
    with pytest.raises(ValueError, match="do not match"):
        pcc_phase_maps(od[:5], refs, mask)


def test_reference_values_stored_in_the_result_come_first():
    md = {"references": {"name": "not-registered", "phases": ["a", "b"]}, "reference_values": [[1, 2, 3], [3, 2, 1]]}
    np.testing.assert_array_equal(result_reference_values(md, [700.0, 701.0]), [[1, 2], [3, 2]])
    assert result_reference_values({**md, "reference_values": None}, [700.0]) is None  # nor loadable by name
    refs = load_references("nvpf-synthetic")
    energies = [float(e) for e in refs.energies[:2]]
    loaded = result_reference_values({"references": {"name": "nvpf-synthetic", "phases": []}}, energies)
    np.testing.assert_allclose(loaded, refs.interpolate(energies))
