"""Pearson correlation of every pixel's OD spectrum with K reference spectra, streaming.

Images arrive one energy at a time. :class:`PearsonAccumulator` keeps, per pixel, the running
mean and sum of squared deviations of the OD spectrum and its co-moment with each reference
(Welford's update generalized to co-moments, as in Pebay 2008 / Welford 1962), so the PCC
over the energies seen so far is available after every image without re-reading the stack
and without the cancellation of naive power sums (OD 2.0 +- 1e-3 stays exact to ~1e-7).

On the numba backend, frames are folded into the state in blocks: ``update`` stages the OD
frame (float32) and the fold runs the same per-frame recurrence over the whole block, reading
and writing the float64 state once per block instead of once per frame (at 2048 x 2048 the
state is 239 MB and its memory traffic, not arithmetic, bounds the update). The result equals
frame-by-frame updates exactly; every read of the state (``maps``, ``mean``, ``valid``) folds
the staged frames first.

The references' own running mean and squared deviations are scalars shared by all pixels:
a pixel that is masked at any energy (non-finite OD, zero counts) is dropped from the
correlation for the rest of the run (its maps are NaN), so every remaining pixel has seen
the same energies.
"""

from __future__ import annotations

import numpy as np

from phasestream.kernels.backend import array_module, resolve_backend, to_numpy

__all__ = ["DEFAULT_BLOCK", "PearsonAccumulator", "pearson_maps"]

#: frames staged before a fold on the numba backend (see PearsonAccumulator ``block``)
DEFAULT_BLOCK = 8


def pearson_maps(od_stack: np.ndarray, ref_values: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Batch NumPy PCC of each pixel spectrum with each reference (the reference implementation).

    Parameters
    ----------
    od_stack : (E, Y, X) OD
    ref_values : (K, E) reference values at the same energies
    valid : optional (E, Y, X) or (Y, X) bool; a pixel invalid at any energy gets NaN

    Returns
    -------
    (K, Y, X) float32 PCC; NaN for fewer than 2 energies, zero variance or masked pixels.
    Computed two-pass (centred) in float64.
    """
    x = np.asarray(od_stack, dtype=np.float64)
    r = np.asarray(ref_values, dtype=np.float64)
    if x.ndim != 3 or r.ndim != 2 or r.shape[1] != x.shape[0]:
        raise ValueError(f"od_stack (E,Y,X) {x.shape} and ref_values (K,E) {r.shape} do not match")
    ok = np.all(np.isfinite(x), axis=0)
    if valid is not None:
        v = np.asarray(valid, dtype=bool)
        ok &= v.all(axis=0) if v.ndim == 3 else v
    k, e = r.shape
    out = np.full((k, *x.shape[1:]), np.nan, dtype=np.float32)
    if e < 2:
        return out
    xc = x - x.mean(axis=0)
    rc = r - r.mean(axis=1, keepdims=True)
    sxx = np.einsum("eyx,eyx->yx", xc, xc)
    srr = np.einsum("ke,ke->k", rc, rc)
    sxr = np.einsum("ke,eyx->kyx", rc, xc)
    with np.errstate(invalid="ignore", divide="ignore"):
        pcc = sxr / np.sqrt(sxx[None] * srr[:, None, None])
    good = ok[None] & (sxx[None] > 0) & (srr[:, None, None] > 0)
    out[good] = np.clip(pcc[good], -1.0, 1.0)
    return out


class PearsonAccumulator:
    """Streaming per-pixel PCC of OD spectra with K references, updated once per energy image.

    Parameters
    ----------
    shape : (Y, X) image shape
    n_refs : K, the number of reference spectra
    backend : ``numpy``, ``numba``, ``cupy`` or ``auto`` (default ``PHASESTREAM_BACKEND``)
    block : frames staged per fold (numba backend; default :data:`DEFAULT_BLOCK`). 1 updates
        the state at every frame; the NumPy and CuPy backends always do.

    Memory
    ------
    Per pixel ``8 * (K + 2) + 1`` bytes: float64 mean, float64 sum of squared deviations,
    K float64 co-moments and one validity byte (57 bytes for K = 5; 239 MB for a 2048 x 2048
    frame), plus ``4 * block`` bytes of staged float32 frames on the numba backend (128 MB at
    2048 x 2048 with 8 frames). On the cupy backend the state lives in GPU memory.

    Examples
    --------
    >>> acc = PearsonAccumulator((Y, X), n_refs=5)
    >>> for image, energy in scan:
    ...     od, valid = optical_density(image, i0)
    ...     acc.update(od, refs.interpolate(energy)[:, 0], valid)
    >>> pcc = acc.maps()            # (5, Y, X) float32
    """

    def __init__(self, shape: tuple[int, int], n_refs: int, *, backend: str | None = None,
                 block: int | None = None):
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"shape must be (Y, X) with positive sizes, got {shape}")
        if n_refs < 1:
            raise ValueError(f"n_refs must be >= 1, got {n_refs}")
        self.shape = (int(shape[0]), int(shape[1]))
        self.n_refs = int(n_refs)
        self.backend = resolve_backend(backend)
        xp = array_module(self.backend)
        self._mean = xp.zeros(self.shape, dtype=np.float64)
        self._m2 = xp.zeros(self.shape, dtype=np.float64)
        self._comoment = xp.zeros((self.n_refs, *self.shape), dtype=np.float64)
        self._ok = xp.ones(self.shape, dtype=np.bool_)
        self._ref_mean = np.zeros(self.n_refs)
        self._ref_m2 = np.zeros(self.n_refs)
        self.n = 0
        if block is not None and block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.block = 1 if self.backend != "numba" else int(block or DEFAULT_BLOCK)
        # staged frames (numba): OD as float32, NaN where invalid, with their coefficients
        self._frames = np.empty((self.block, *self.shape), np.float32) if self.block > 1 else None
        self._frame_coef = np.zeros((self.block, self.n_refs))
        self._frame_inv_n = np.zeros(self.block)
        self._staged = 0

    @property
    def nbytes(self) -> int:
        """Bytes of per-pixel state, staged frames included."""
        staged = 0 if self._frames is None else self._frames.nbytes
        return int(self._mean.nbytes + self._m2.nbytes + self._comoment.nbytes + self._ok.nbytes + staged)

    @property
    def pending(self) -> int:
        """Frames staged but not yet folded into the state (numba backend)."""
        return self._staged

    def fold(self) -> None:
        """Fold the staged frames into the state now (reads of the state do this themselves)."""
        if self._staged:
            from phasestream.kernels import _numba

            _numba.pearson_fold(self._frames, self._staged, self._mean, self._m2, self._comoment, self._ok,
                                self._frame_coef, self._frame_inv_n)
            self._staged = 0

    @property
    def valid(self) -> np.ndarray:
        """(Y, X) bool: pixels valid at every energy so far (host array)."""
        self.fold()
        return to_numpy(self._ok).copy()

    def mean(self) -> np.ndarray:
        """(Y, X) float32 mean OD over the energies seen (host array); NaN where masked or none seen."""
        self.fold()
        xp = array_module(self.backend)
        out = xp.where(self._ok & (self.n > 0), self._mean, xp.nan).astype(xp.float32)
        return to_numpy(out)

    def update(self, od, ref_values, valid=None) -> None:
        """Add one energy image.

        Parameters
        ----------
        od : (Y, X) OD at this energy (cast to float32, as stored in results)
        ref_values : (K,) reference values at this energy
        valid : optional (Y, X) bool; pixels False here (or with non-finite OD) are dropped
            from the correlation for the rest of the run

        Raises
        ------
        ValueError
            when the image shape or the number of reference values does not match.
        """
        if tuple(od.shape) != self.shape:
            raise ValueError(f"OD image shape {tuple(od.shape)} does not match the run's image shape {self.shape}")
        r = np.asarray(ref_values, dtype=np.float64).reshape(-1)
        if r.size != self.n_refs:
            raise ValueError(f"got {r.size} reference values, expected {self.n_refs}")
        if not np.all(np.isfinite(r)):
            raise ValueError(f"reference values must be finite, got {r}")
        if valid is not None and tuple(valid.shape) != self.shape:
            raise ValueError(f"valid mask shape {tuple(valid.shape)} does not match {self.shape}")
        self.n += 1
        inv_n = 1.0 / self.n
        # Welford on the (pixel-independent) references: coef = r - mean_new, and the
        # pixel co-moment update is C += (x - mean_x_old) * (r - mean_r_new).
        dr = r - self._ref_mean
        self._ref_mean = self._ref_mean + dr * inv_n
        coef = r - self._ref_mean
        self._ref_m2 = self._ref_m2 + dr * coef
        if self._frames is not None:
            from phasestream.kernels import _numba

            slot = self._staged
            fv = None if valid is None else np.ascontiguousarray(to_numpy(valid), np.bool_)
            _numba.stage_frame(to_numpy(od), fv, self._frames[slot])
            self._frame_coef[slot] = coef
            self._frame_inv_n[slot] = inv_n
            self._staged += 1
            if self._staged == self.block:
                self.fold()
        elif self.backend == "numba":
            from phasestream.kernels import _numba

            od32 = np.ascontiguousarray(to_numpy(od), dtype=np.float32)
            fv = None if valid is None else np.ascontiguousarray(to_numpy(valid), np.bool_)
            _numba.pearson_update(od32, fv, self._mean, self._m2, self._comoment, self._ok, coef, inv_n)
        elif self.backend == "cupy":
            from phasestream.kernels import _cupy

            _cupy.pearson_update(od, valid, self._mean, self._m2, self._comoment, self._ok, coef, inv_n)
        else:
            self._update_numpy(np.asarray(od, dtype=np.float32), valid, coef, inv_n)

    def _update_numpy(self, od: np.ndarray, valid, coef: np.ndarray, inv_n: float) -> None:
        """NumPy reference of the per-pixel update."""
        x = od.astype(np.float64)
        ok = self._ok & np.isfinite(x)
        if valid is not None:
            ok &= np.asarray(valid, dtype=bool)
        self._ok = ok
        x = np.where(ok, x, 0.0)
        dx = np.where(ok, x - self._mean, 0.0)
        self._mean = self._mean + dx * inv_n
        self._m2 = self._m2 + dx * (x - self._mean)
        self._comoment = self._comoment + dx[None] * coef[:, None, None]

    def maps(self) -> np.ndarray:
        """(K, Y, X) float32 PCC over the energies seen so far (host array).

        NaN where undefined: fewer than 2 energies, zero variance of the pixel spectrum or of
        a reference, or a pixel masked at any energy. Values are clipped to [-1, 1] against
        rounding.
        """
        self.fold()
        if self.backend == "numba":
            from phasestream.kernels import _numba

            return _numba.pearson_maps(self._m2, self._comoment, self._ok, self._ref_m2, self.n)
        xp = array_module(self.backend)
        out = xp.full((self.n_refs, *self.shape), xp.nan, dtype=xp.float32)
        if self.n < 2:
            return to_numpy(out)
        ref_m2 = xp.asarray(self._ref_m2)[:, None, None]
        denom = xp.sqrt(self._m2[None] * ref_m2)
        good = self._ok[None] & (self._m2[None] > 0) & (ref_m2 > 0)
        pcc = self._comoment / xp.where(good, denom, 1.0)
        out[...] = xp.where(good, xp.clip(pcc, -1.0, 1.0), xp.nan)
        return to_numpy(out)
