"""Streaming kernels: pure functions on arrays (no I/O), with NumPy, numba and CuPy backends.

Backend choice: ``PHASESTREAM_BACKEND=auto|numba|cupy|numpy`` or the ``backend=`` argument.
"""

from phasestream.kernels.backend import (
    BACKENDS,
    cupy_available,
    kernel_threads,
    limit_kernel_threads,
    resolve_backend,
    to_numpy,
)
from phasestream.kernels.od import estimate_i0, optical_density, optical_density_reference
from phasestream.kernels.pearson import PearsonAccumulator, pearson_maps
from phasestream.kernels.phases import (
    DEFAULT_AMBIGUITY,
    PhaseFractions,
    assign_phases,
    particle_mask,
    phase_fractions,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_AMBIGUITY",
    "PearsonAccumulator",
    "PhaseFractions",
    "assign_phases",
    "cupy_available",
    "estimate_i0",
    "kernel_threads",
    "limit_kernel_threads",
    "optical_density",
    "optical_density_reference",
    "particle_mask",
    "pearson_maps",
    "phase_fractions",
    "resolve_backend",
    "to_numpy",
]
