"""Shared fixtures: the backends available on this machine."""

from __future__ import annotations

import pytest

from phasestream.kernels.backend import cupy_available


def _backend_params():
    gpu = pytest.mark.skipif(not cupy_available(), reason="no usable CuPy GPU on this machine")
    return ["numpy", "numba", pytest.param("cupy", marks=[pytest.mark.gpu, gpu])]


@pytest.fixture(params=_backend_params())
def backend(request) -> str:
    """Every kernel backend; cupy is skipped cleanly without a GPU."""
    return request.param
