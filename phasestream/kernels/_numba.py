"""numba (CPU, parallel) implementations of the streaming kernels.

Each function here has a NumPy reference in ``od.py`` / ``pearson.py`` that the tests compare
it to. numba's default ``workqueue`` threading layer is not thread-safe, so parallel kernels
run under one lock (the live worker may call them from several threads).
"""

from __future__ import annotations

import functools
import threading

import numba
import numpy as np

_LOCK = threading.Lock()


@numba.njit(parallel=True, cache=True, fastmath=False)
def _od_kernel(image, ref, dark, od, valid):
    ny, nx = image.shape
    for y in numba.prange(ny):
        for x in range(nx):
            num = np.float64(image[y, x]) - dark[y, x]
            den = np.float64(ref[y, x]) - dark[y, x]
            # NaN compares False, so non-finite inputs fall through to the masked branch
            if num > 0.0 and den > 0.0 and num < np.inf and den < np.inf:
                od[y, x] = np.float32(-np.log(num / den))
                valid[y, x] = True
            else:
                od[y, x] = np.float32(np.nan)
                valid[y, x] = False


@numba.njit(parallel=True, cache=True, fastmath=False)
def _od_table_kernel(image, log_den, table, od, valid):
    ny, nx = image.shape
    for y in numba.prange(ny):
        for x in range(nx):
            lv = table[image[y, x]]
            if lv == lv:  # NaN marks counts - dark <= 0
                od[y, x] = np.float32(log_den - lv)
                valid[y, x] = True
            else:
                od[y, x] = np.float32(np.nan)
                valid[y, x] = False


@functools.lru_cache(maxsize=16)
def _log_table(nbits: int, dark: float) -> np.ndarray:
    """``log(count - dark)`` for every integer count of an ``nbits`` detector; NaN where not positive."""
    net = np.arange(2**nbits, dtype=np.float64) - dark
    with np.errstate(divide="ignore", invalid="ignore"):
        table = np.where(net > 0, np.log(net), np.nan)
    table.setflags(write=False)
    return table


def _as_2d(value, shape) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, dtype=np.float64), shape)


def optical_density(image: np.ndarray, ref, dark) -> tuple[np.ndarray, np.ndarray]:
    """OD of ``-ln((image - dark) / (ref - dark))``.

    uint8/uint16 images with scalar ``ref`` and ``dark`` (the usual STXM case) use a table of
    ``log(count - dark)`` over all possible counts instead of one logarithm per pixel; the
    table values are exact float64 logarithms, so the result equals the direct formula to
    float32 rounding.
    """
    od = np.empty(image.shape, dtype=np.float32)
    valid = np.empty(image.shape, dtype=np.bool_)
    if image.dtype in (np.uint8, np.uint16) and np.ndim(ref) == 0 and np.ndim(dark) == 0:
        den = float(ref) - float(dark)
        if den > 0 and np.isfinite(den):
            table = _log_table(8 * image.dtype.itemsize, float(dark))
            with _LOCK:
                _od_table_kernel(image, np.log(den), table, od, valid)
            return od, valid
    ref2 = ref if (isinstance(ref, np.ndarray) and ref.ndim == 2) else _as_2d(ref, image.shape)
    with _LOCK:
        _od_kernel(image, ref2, _as_2d(dark, image.shape), od, valid)
    return od, valid


@numba.njit(parallel=True, cache=True, fastmath=False)
def _pearson_update(od, frame_valid, has_valid, mean, m2, comoment, ok, coef, inv_n):
    ny, nx = od.shape
    k_refs = coef.shape[0]
    for y in numba.prange(ny):
        for x in range(nx):
            if not ok[y, x]:
                continue
            v = np.float64(od[y, x])
            if not (abs(v) < np.inf) or (has_valid and not frame_valid[y, x]):
                ok[y, x] = False
                continue
            dx = v - mean[y, x]
            mean[y, x] += dx * inv_n
            m2[y, x] += dx * (v - mean[y, x])
            for k in range(k_refs):
                comoment[k, y, x] += dx * coef[k]


_NO_MASK = np.ones((1, 1), dtype=np.bool_)


def pearson_update(od, frame_valid, mean, m2, comoment, ok, coef, inv_n) -> None:
    """In-place Welford/co-moment update; ``frame_valid`` may be None (finite OD is valid)."""
    has_valid = frame_valid is not None
    with _LOCK:
        _pearson_update(od, frame_valid if has_valid else _NO_MASK, has_valid, mean, m2, comoment, ok, coef, inv_n)


@numba.njit(parallel=True, cache=True, fastmath=False)
def _stage_frame(od, frame_valid, has_valid, out):
    ny, nx = od.shape
    nan = np.float32(np.nan)
    for y in numba.prange(ny):
        src = od[y]
        dst = out[y]
        if has_valid:
            ok = frame_valid[y].view(np.uint8)
            for x in range(nx):  # a select, not a branch: vectorized
                v = np.float32(src[x])
                dst[x] = v if ok[x] else nan
        else:
            for x in range(nx):
                dst[x] = np.float32(src[x])


def stage_frame(od, frame_valid, out) -> None:
    """Copy one OD frame into a block buffer slot ``out`` as float32, NaN where ``frame_valid`` is False."""
    has_valid = frame_valid is not None
    with _LOCK:
        _stage_frame(od, frame_valid if has_valid else _NO_MASK, has_valid, out)


# pixels per tile of the block fold: the tile's state (7 float64 per pixel for K = 5) stays in
# L1/L2 while every frame of the block is folded into it
_FOLD_TILE = 256


@numba.njit(parallel=True, cache=True, fastmath=False)
def _pearson_fold(frames, n_frames, mean, m2, comoment, ok, coef, inv_n):
    ny, nx = mean.shape
    k_refs = coef.shape[1]
    n_tiles = (nx + _FOLD_TILE - 1) // _FOLD_TILE
    for t in numba.prange(ny * n_tiles):
        y = t // n_tiles
        x0 = (t % n_tiles) * _FOLD_TILE
        n = min(x0 + _FOLD_TILE, nx) - x0
        # contiguous 1D views and branch-free updates let LLVM vectorize the row loops
        dxs = np.empty(n)
        mrow = mean[y, x0 : x0 + n]
        m2row = m2[y, x0 : x0 + n]
        okrow = ok[y, x0 : x0 + n].view(np.uint8)
        for b in range(n_frames):
            w = inv_n[b]
            f = frames[b, y, x0 : x0 + n]
            for x in range(n):
                v = np.float64(f[x])
                good = okrow[x] & (abs(v) < np.inf)
                okrow[x] = good
                # a pixel invalid now or before gets dx = 0: its state stays as it was
                mo = mrow[x]
                vv = v if good else mo
                dx = vv - mo
                mn = mo + dx * w
                mrow[x] = mn
                m2row[x] += dx * (vv - mn)
                dxs[x] = dx
            for k in range(k_refs):
                c = coef[b, k]
                crow = comoment[k, y, x0 : x0 + n]
                for x in range(n):
                    crow[x] += dxs[x] * c


def pearson_fold(frames, n_frames: int, mean, m2, comoment, ok, coef, inv_n) -> None:
    """Fold the first ``n_frames`` staged frames (B, Y, X) into the Welford state, frame by frame.

    Per pixel this is exactly ``n_frames`` successive :func:`pearson_update` calls (same
    arithmetic, same order; NaN marks an invalid pixel), but the state is read and written once
    per block instead of once per frame, which is what bounds the update at large frames.
    """
    with _LOCK:
        _pearson_fold(frames, n_frames, mean, m2, comoment, ok, coef, inv_n)


@numba.njit(parallel=True, cache=True, fastmath=False)
def _pearson_maps(m2, comoment, ok, ref_m2, n, out):
    k_refs, ny, nx = comoment.shape
    for y in numba.prange(ny):
        for x in range(nx):
            v = m2[y, x]
            usable = n >= 2 and ok[y, x] and v > 0.0
            for k in range(k_refs):
                if usable and ref_m2[k] > 0.0:
                    r = comoment[k, y, x] / np.sqrt(v * ref_m2[k])
                    out[k, y, x] = np.float32(min(1.0, max(-1.0, r)))
                else:
                    out[k, y, x] = np.float32(np.nan)


def pearson_maps(m2, comoment, ok, ref_m2, n: int) -> np.ndarray:
    """(K, Y, X) float32 PCC from the accumulator state (see ``PearsonAccumulator.maps``)."""
    out = np.empty(comoment.shape, dtype=np.float32)
    with _LOCK:
        _pearson_maps(m2, comoment, ok, np.ascontiguousarray(ref_m2, dtype=np.float64), n, out)
    return out


@numba.njit(parallel=True, cache=True, fastmath=False)
def _assign(pcc, inside, ambiguity, phase, reliability, ambiguous):
    k_refs, ny, nx = pcc.shape
    for y in numba.prange(ny):
        for x in range(nx):
            best, second, best_k = -np.inf, -np.inf, -1
            for k in range(k_refs):
                v = pcc[k, y, x]
                if v == v:  # NaN never wins
                    if v > best:
                        second, best, best_k = best, v, k
                    elif v > second:
                        second = v
            if inside[y, x] and best_k >= 0:
                phase[y, x] = best_k
                if second > -np.inf:
                    rel = np.float32(best - second)
                    reliability[y, x] = rel
                    ambiguous[y, x] = rel < ambiguity
                else:
                    reliability[y, x] = np.float32(np.nan)
                    ambiguous[y, x] = False
            else:
                phase[y, x] = -1
                reliability[y, x] = np.float32(np.nan)
                ambiguous[y, x] = False


def assign_phases(pcc: np.ndarray, inside: np.ndarray, ambiguity: float):
    """phase (int16), reliability (float32), ambiguous (bool); see ``phases.assign_phases``."""
    shape = pcc.shape[1:]
    phase = np.empty(shape, np.int16)
    reliability = np.empty(shape, np.float32)
    ambiguous = np.empty(shape, np.bool_)
    with _LOCK:
        _assign(np.ascontiguousarray(pcc, dtype=np.float32), np.ascontiguousarray(inside, dtype=np.bool_),
                float(ambiguity), phase, reliability, ambiguous)
    return phase, reliability, ambiguous


@numba.njit(parallel=True, cache=True, fastmath=False)
def _guided_sums(guide, values, radius, skip_row, out):
    n_guide, ny, nx = guide.shape
    n_values = values.shape[0]
    r2 = radius * radius
    for y in numba.prange(ny):
        for x in range(nx):
            for c in range(n_values):
                out[c, y, x] = 0.0
            for dy in range(-radius, radius + 1):
                yy = y + dy
                if yy < 0 or yy >= ny or (skip_row and dy == 0):
                    continue
                for dx in range(-radius, radius + 1):
                    xx = x + dx
                    if xx < 0 or xx >= nx or dy * dy + dx * dx > r2:
                        continue
                    d2 = 0.0
                    for g in range(n_guide):
                        t = guide[g, y, x] - guide[g, yy, xx]
                        d2 += t * t
                    w = np.exp(-0.5 * d2)
                    for c in range(n_values):
                        out[c, y, x] += w * values[c, yy, xx]


def guided_sums(guide: np.ndarray, values: np.ndarray, radius: int, skip_row: bool) -> np.ndarray:
    """(C, Y, X) guide-weighted sums over a disc; see ``guided.guided_sums``."""
    out = np.empty(values.shape, np.float64)
    with _LOCK:
        _guided_sums(np.ascontiguousarray(guide, dtype=np.float64), np.ascontiguousarray(values, dtype=np.float64),
                     int(radius), bool(skip_row), out)
    return out
