import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.stats import pearsonr

from phasestream.kernels import PearsonAccumulator, assign_phases, pearson_maps


def _accumulate(stack, refs, backend, valid=None):
    acc = PearsonAccumulator(stack.shape[1:], refs.shape[0], backend=backend)
    for j in range(stack.shape[0]):
        acc.update(stack[j], refs[:, j], None if valid is None else valid[j])
    return acc


def _scipy_maps(stack, refs):
    _e, ny, nx = stack.shape
    out = np.empty((refs.shape[0], ny, nx))
    for k in range(refs.shape[0]):
        for y in range(ny):
            for x in range(nx):
                out[k, y, x] = pearsonr(stack[:, y, x].astype(np.float64), refs[k]).statistic
    return out


def test_streaming_pcc_equals_scipy_on_random_spectra(backend):
    rng = np.random.default_rng(0)
    stack = rng.normal(1.0, 0.5, (13, 6, 7)).astype(np.float32)
    refs = rng.normal(0.5, 0.3, (5, 13))
    maps = _accumulate(stack, refs, backend).maps()
    assert maps.shape == (5, 6, 7) and maps.dtype == np.float32
    np.testing.assert_allclose(maps, _scipy_maps(stack, refs), atol=1e-5)


def test_streaming_pcc_is_stable_for_near_constant_spectra_with_large_offset(backend):
    rng = np.random.default_rng(1)
    # OD 2.0 +- 1e-3: naive power sums lose most digits here
    stack = (2.0 + rng.uniform(-1e-3, 1e-3, (13, 5, 5))).astype(np.float32)
    refs = 1e3 + rng.normal(0.0, 1e-2, (5, 13))  # references with a large offset too
    maps = _accumulate(stack, refs, backend).maps()
    np.testing.assert_allclose(maps, _scipy_maps(stack, refs), atol=1e-5)


def test_partial_maps_after_each_energy_equal_batch(backend):
    rng = np.random.default_rng(2)
    stack = rng.normal(0.0, 1.0, (8, 4, 4)).astype(np.float32)
    refs = rng.normal(0.0, 1.0, (3, 8))
    acc = PearsonAccumulator((4, 4), 3, backend=backend)
    for j in range(8):
        acc.update(stack[j], refs[:, j])
        assert acc.n == j + 1
        batch = pearson_maps(stack[: j + 1], refs[:, : j + 1])
        np.testing.assert_allclose(acc.maps(), batch, atol=1e-5, equal_nan=True)


def test_undefined_pcc_is_nan(backend):
    refs = np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])  # second reference has zero variance
    stack = np.ones((3, 2, 2), np.float32)
    stack[:, 0, 0] = [0.1, 0.2, 0.4]
    stack[:, 0, 1] = [0.3, np.nan, 0.2]  # masked at one energy
    stack[:, 1, 0] = [0.1, 0.2, 0.4]
    valid = np.ones((3, 2, 2), bool)
    valid[2, 1, 0] = False  # invalid through the mask
    acc = PearsonAccumulator((2, 2), 2, backend=backend)
    acc.update(stack[0], refs[:, 0], valid[0])
    assert np.isnan(acc.maps()).all()  # one energy only
    phase, rel, amb = assign_phases(acc.maps(), np.ones((2, 2), bool))
    assert (phase == -1).all() and np.isnan(rel).all() and not amb.any()  # nothing to assign yet
    acc.update(stack[1], refs[:, 1], valid[1])
    acc.update(stack[2], refs[:, 2], valid[2])
    m = acc.maps()
    assert np.isfinite(m[0, 0, 0]) and np.isnan(m[1]).all()  # zero-variance reference
    assert np.isnan(m[:, 0, 1]).all() and np.isnan(m[:, 1, 0]).all()  # masked pixels
    assert np.isnan(m[:, 1, 1]).all()  # constant spectrum
    np.testing.assert_array_equal(acc.valid, [[True, False], [False, True]])


def test_accumulator_rejects_mismatches(backend):
    acc = PearsonAccumulator((4, 4), 5, backend=backend)
    with pytest.raises(ValueError, match=r"OD image shape \(4, 5\) does not match the run's image shape \(4, 4\)"):
        acc.update(np.zeros((4, 5), np.float32), np.arange(5.0))
    with pytest.raises(ValueError, match="got 3 reference values, expected 5"):
        acc.update(np.zeros((4, 4), np.float32), np.arange(3.0))
    assert acc.n == 0


def test_state_memory_is_as_documented():
    acc = PearsonAccumulator((64, 32), 5, backend="numpy")
    assert acc.nbytes == 64 * 32 * (8 * (5 + 2) + 1)


def test_batch_reference_equals_scipy():
    rng = np.random.default_rng(3)
    stack = rng.normal(size=(9, 3, 4))
    refs = rng.normal(size=(2, 9))
    np.testing.assert_allclose(pearson_maps(stack, refs), _scipy_maps(stack, refs), atol=1e-6)


spectra = hnp.arrays(np.float32, (6, 3, 3), elements=st.floats(-10, 10, width=32))
references = hnp.arrays(np.float64, (2, 6), elements=st.floats(-10, 10))


@settings(max_examples=60, deadline=None)
@given(spectra, references)
def test_pcc_is_in_unit_interval(stack, refs):
    for backend in ("numpy", "numba"):
        m = _accumulate(stack, refs, backend).maps()
        finite = m[np.isfinite(m)]
        assert np.all((finite >= -1.0) & (finite <= 1.0))


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.float64, (8, 2, 2), elements=st.floats(0.0, 3.0)),
    st.floats(0.1, 10.0),
    st.floats(-5.0, 5.0),
)
def test_pcc_is_invariant_to_affine_change_of_a_spectrum(stack, a, b):
    refs = np.array([[0.2, 0.9, 0.4, 1.3, 0.7, 0.1, 1.0, 0.5], [1.0, 0.2, 0.8, 0.3, 0.9, 1.2, 0.1, 0.6]])
    # keep spectra with a usable spread so float32 rounding of the input stays below tolerance
    spread = stack.std(axis=0)
    stack[:, spread < 0.05] = np.linspace(0.0, 1.0, 8)[:, None]
    base = _accumulate(stack.astype(np.float32), refs, "numba").maps()
    moved = _accumulate((a * stack + b).astype(np.float32), refs, "numba").maps()
    np.testing.assert_allclose(moved, base, atol=2e-5)


@pytest.mark.parametrize("block", [1, 3, 8])
def test_blocked_numba_fold_equals_numpy_reference_frame_by_frame(block):
    rng = np.random.default_rng(4)
    stack = rng.normal(1.0, 0.5, (11, 9, 300)).astype(np.float32)  # several fold tiles per row
    stack[2, 1, 2] = np.nan
    stack[6, 3, 299] = np.inf
    valid = np.ones(stack.shape, bool)
    valid[4, 5, 7] = False
    valid[9, 0, 0] = False
    refs = rng.normal(0.5, 0.3, (5, 11))
    blocked = PearsonAccumulator((9, 300), 5, backend="numba", block=block)
    reference = PearsonAccumulator((9, 300), 5, backend="numpy")
    staged = 0
    for j in range(11):
        blocked.update(stack[j], refs[:, j], valid[j])
        reference.update(stack[j], refs[:, j], valid[j])
        staged = (staged + 1) % block
        assert blocked.n == j + 1 and blocked.pending == staged
        if j % 4 == 1:  # reading the maps folds the staged frames first
            np.testing.assert_allclose(blocked.maps(), reference.maps(), atol=1e-6, equal_nan=True)
            assert blocked.pending == 0
            staged = 0
    np.testing.assert_allclose(blocked.mean(), reference.mean(), rtol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(blocked.valid, reference.valid)
    with np.errstate(invalid="ignore"):  # the inf pixel
        batch = pearson_maps(stack, refs, valid)
    np.testing.assert_allclose(blocked.maps(), batch, atol=1e-5, equal_nan=True)


def test_blocked_fold_is_exactly_the_frame_by_frame_update():
    rng = np.random.default_rng(5)
    stack = (2.0 + rng.uniform(-1e-3, 1e-3, (13, 6, 40))).astype(np.float32)
    refs = 1e3 + rng.normal(0.0, 1e-2, (5, 13))
    one = _accumulate_blocked(stack, refs, block=1)
    eight = _accumulate_blocked(stack, refs, block=8)
    np.testing.assert_array_equal(one.maps(), eight.maps())
    np.testing.assert_allclose(eight.maps(), _scipy_maps(stack, refs), atol=1e-5)


def _accumulate_blocked(stack, refs, block):
    acc = PearsonAccumulator(stack.shape[1:], refs.shape[0], backend="numba", block=block)
    for j in range(stack.shape[0]):
        acc.update(stack[j], refs[:, j])
    return acc


def test_staged_frames_are_counted_in_memory():
    acc = PearsonAccumulator((64, 32), 5, backend="numba", block=4)
    assert acc.nbytes == 64 * 32 * (8 * (5 + 2) + 1 + 4 * 4)
    with pytest.raises(ValueError, match="block must be >= 1"):
        PearsonAccumulator((4, 4), 5, backend="numba", block=0)
