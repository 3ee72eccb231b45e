"""Backend choice for the kernels: ``PHASESTREAM_BACKEND=auto|numba|cupy|numpy``.

``auto`` uses CuPy when a GPU is usable, numba otherwise. All backends give the same numbers
within float32 tolerance; the NumPy implementation is the reference the others are tested
against.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator

import numpy as np

__all__ = [
    "BACKENDS",
    "array_module",
    "cupy_available",
    "kernel_threads",
    "limit_kernel_threads",
    "resolve_backend",
    "to_numpy",
]

BACKENDS = ("numpy", "numba", "cupy")
ENV_VAR = "PHASESTREAM_BACKEND"

logger = logging.getLogger(__name__)


@functools.cache
def cupy_available() -> bool:
    """True when CuPy imports and can run a kernel on a GPU."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False
        return float((cupy.arange(4, dtype=cupy.float32) * 2).sum().get()) == 12.0
    except Exception as exc:  # noqa: BLE001 - ImportError or any CUDA driver/runtime error means "no GPU"
        logger.debug("CuPy not usable: %s", exc)
        return False


def resolve_backend(name: str | None = None) -> str:
    """Resolve a backend name (``None`` reads ``PHASESTREAM_BACKEND``, default ``auto``).

    Raises
    ------
    ValueError
        for an unknown name.
    RuntimeError
        when ``cupy`` is asked for explicitly and no GPU is usable.
    """
    choice = (name or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if choice == "auto":
        return "cupy" if cupy_available() else "numba"
    if choice not in BACKENDS:
        raise ValueError(f"unknown backend {choice!r} (from {ENV_VAR} or argument); choose auto, {', '.join(BACKENDS)}")
    if choice == "cupy" and not cupy_available():
        raise RuntimeError(
            "backend 'cupy' requested but no usable GPU/CuPy: install the 'gpu' extra "
            "(pip install 'phasestream[gpu]') on a machine with an NVIDIA GPU, or set PHASESTREAM_BACKEND=numba"
        )
    return choice


def limit_kernel_threads(n: int | None) -> None:
    """Run the numba kernels called from this thread on at most ``n`` threads (None: numba's default).

    Thread-local, as ``numba.set_num_threads``. On cores shared with other busy processes a
    parallel kernel waits for its descheduled threads (10 ms and more per call, measured on 2
    cores), so a live worker that shares its cores is faster on one thread.
    """
    import numba

    most = numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(most if n is None else max(1, min(n, most)))


@contextlib.contextmanager
def kernel_threads(n: int | None) -> Iterator[None]:
    """:func:`limit_kernel_threads` for the duration of a ``with`` block, then the thread's previous setting.

    The live callback computes the final maps on every core: the stream is over, nothing else
    is waiting for the CPU, and the last image -> final result latency is what users see.
    """
    import numba

    before = numba.get_num_threads()
    limit_kernel_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def array_module(backend: str):
    """The array namespace of a backend (``cupy`` or ``numpy``)."""
    if backend == "cupy":
        import cupy

        return cupy
    return np


def to_numpy(array) -> np.ndarray:
    """A host NumPy array from a NumPy or CuPy array."""
    get = getattr(array, "get", None)
    return get() if callable(get) and not isinstance(array, np.ndarray) else np.asarray(array)
