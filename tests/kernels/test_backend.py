"""Backend selection helpers: numba thread limits on the calling thread."""

import threading

import numba

from phasestream.kernels import kernel_threads, limit_kernel_threads


def test_kernel_threads_sets_and_restores_this_threads_limit():
    most = numba.config.NUMBA_NUM_THREADS
    limit_kernel_threads(1)
    try:
        assert numba.get_num_threads() == 1
        with kernel_threads(None):
            assert numba.get_num_threads() == most
        assert numba.get_num_threads() == 1
        with kernel_threads(10 * most):  # clipped to what numba has
            assert numba.get_num_threads() == most
        seen = []
        other = threading.Thread(target=lambda: seen.append(numba.get_num_threads()))
        other.start()
        other.join()
        assert seen == [most]  # the limit is this thread's only
    finally:
        limit_kernel_threads(None)
