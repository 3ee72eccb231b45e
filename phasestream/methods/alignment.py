"""Stack alignment: register every energy image of a XANES stack to a reference image.

PyXAS (Ge & Lee 2020, section 4) aligns the flat-field corrected images before the fit to undo
the image drift caused by the optics moving with energy. Here:

* ``"translation"``: sub-pixel phase correlation (Guizar-Sicairos et al. 2008, scikit-image
  :func:`~skimage.registration.phase_cross_correlation`);
* ``"rigid"`` / ``"affine"``: the translation first, then a dense optical flow (scikit-image
  :func:`~skimage.registration.optical_flow_ilk`) between the reference and the translated image, to
  which a Euclidean (rotation + translation) or affine transform is fitted by least squares
  (:class:`~skimage.transform.EuclideanTransform` / :class:`~skimage.transform.AffineTransform`) - an
  intensity-based alternative to StackReg (Thevenaz et al. 1998), which is not a dependency.

Images are registered to one ``reference`` image, or (``chain=True``) each to its neighbour on the
way from the reference, with the transforms composed, for stacks whose contrast changes strongly
across the edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.feature import structure_tensor, structure_tensor_eigenvalues
from skimage.filters import window
from skimage.registration import optical_flow_ilk, phase_cross_correlation
from skimage.transform import AffineTransform, EuclideanTransform, warp

__all__ = ["TRANSFORMS", "Alignment", "align_stack", "apply_alignment", "register_pair"]

TRANSFORMS = ("translation", "rigid", "affine")


@dataclass(frozen=True)
class Alignment:
    """An aligned stack and the transforms that aligned it.

    Attributes
    ----------
    aligned : (E, Y, X) float32, every image resampled onto the reference's frame
    shifts : (E, 2) float64, (dy, dx) pixels: the translation that registers image i to the
        reference (``scipy.ndimage.shift(stack[i], shifts[i])`` aligns it); 0 for the reference
    matrices : (E, 3, 3) float64, homogeneous inverse maps in (x = column, y = row) coordinates:
        aligned[i] at (x, y) takes stack[i] at ``matrices[i] @ (x, y, 1)`` (identity for the reference)
    transform : the transform family used
    reference : index of the reference image
    """

    aligned: np.ndarray
    shifts: np.ndarray
    matrices: np.ndarray
    transform: str
    reference: int


def _clean(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, np.float64)
    finite = np.isfinite(img)
    return img if finite.all() else np.where(finite, img, np.nanmean(img) if finite.any() else 0.0)


def _translation_matrix(shift: np.ndarray) -> np.ndarray:
    """Inverse map of a (dy, dx) shift: output (x, y) reads input (x - dx, y - dy)."""
    m = np.eye(3)
    m[0, 2], m[1, 2] = -shift[1], -shift[0]
    return m


def register_pair(
    reference: np.ndarray,
    moving: np.ndarray,
    *,
    transform: str = "translation",
    upsample_factor: int = 100,
    flow_radius: int = 7,
    flow_step: int = 4,
    flow_iterations: int = 10,
    taper: bool = False,
    min_structure: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """Transform that registers ``moving`` (Y, X) to ``reference`` (Y, X).

    Parameters
    ----------
    reference, moving : (Y, X) images; NaN is replaced by the mean
    transform : ``"translation"``, ``"rigid"`` or ``"affine"``
    upsample_factor : phase-correlation precision, 1 / upsample_factor pixel
    taper : multiply both images by a Hann window before the phase correlation
    flow_radius, flow_step, flow_iterations : optical-flow window radius (pixels), sampling step of
        the flow for the transform fit, and maximum number of refinements (rigid / affine)
    min_structure : the transform is fitted to the flow at points whose smaller structure-tensor
        eigenvalue exceeds this fraction of its maximum (flat regions carry no motion information)

    Returns
    -------
    shift : (2,) (dy, dx) pixels from phase correlation
    matrix : (3, 3) inverse map (x, y, 1) of the reference frame -> coordinates in ``moving``
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    ref, mov = _clean(reference), _clean(moving)
    if taper:  # a Hann window against the edge discontinuities of non-periodic images
        w = window("hann", ref.shape)
        shift, _, _ = phase_cross_correlation((ref - ref.mean()) * w, (mov - mov.mean()) * w,
                                              upsample_factor=upsample_factor, normalization=None)
    else:
        shift, _, _ = phase_cross_correlation(ref, mov, upsample_factor=upsample_factor, normalization=None)
    matrix = _translation_matrix(shift)
    if transform == "translation":
        return shift, matrix
    rows, cols = np.mgrid[0:ref.shape[0]:flow_step, 0:ref.shape[1]:flow_step]
    # the flow is 0 where the image is flat (no gradient), whatever the motion: fit the transform
    # only where the structure tensor is well conditioned (smaller eigenvalue well above zero)
    tensor = structure_tensor(ref, sigma=max(flow_radius / 2, 1.0), order="rc")
    corner = structure_tensor_eigenvalues(tensor)[1][rows, cols]
    keep = corner > min_structure * corner.max()
    if keep.sum() < 6:
        raise ValueError(f"the reference image has too little structure ({keep.sum()} points) for a {transform} fit")
    rows, cols = rows[keep], cols[keep]
    src = np.column_stack([cols.ravel(), rows.ravel()]).astype(np.float64)
    family = EuclideanTransform if transform == "rigid" else AffineTransform
    for _ in range(flow_iterations):  # ILK underestimates large motions: refine on the re-warped image
        warped = apply_alignment(mov, matrix, order=3)
        flow = optical_flow_ilk(ref, warped, radius=flow_radius)  # ref(r, c) ~ warped(r + fr, c + fc)
        dst = src + np.column_stack([flow[1][rows, cols].ravel(), flow[0][rows, cols].ravel()])
        model = family.from_estimate(src, dst)
        if not model:
            raise ValueError(f"could not fit a {transform} transform to the optical flow: {model}")
        matrix = matrix @ model.params
        if np.abs(model.params - np.eye(3)).max() < 1e-4:
            break
    return shift, matrix


def apply_alignment(image: np.ndarray, matrix: np.ndarray, *, order: int = 3) -> np.ndarray:
    """Resample ``image`` (Y, X) with the inverse map ``matrix``; edges repeat the nearest pixel (float32)."""
    img = _clean(image)
    if np.allclose(matrix[:2, :2], np.eye(2)) and np.allclose(matrix[2], [0, 0, 1]):
        out = ndimage.shift(img, (-matrix[1, 2], -matrix[0, 2]), order=order, mode="nearest")
    else:
        out = warp(img, AffineTransform(matrix=matrix), order=order, mode="edge", preserve_range=True)
    return out.astype(np.float32)


def align_stack(
    stack: np.ndarray,
    *,
    reference: int = 0,
    chain: bool = False,
    transform: str = "translation",
    roi: tuple[slice, slice] | None = None,
    upsample_factor: int = 100,
    order: int = 3,
) -> Alignment:
    """Align every image of ``stack`` (E, Y, X) to image ``reference``.

    Parameters
    ----------
    stack : (E, Y, X) images (flat-field corrected transmission or OD); NaN is replaced by the mean
    reference : index of the reference image (negative counts from the end)
    chain : register each image to its neighbour towards ``reference`` and compose the transforms,
        instead of registering every image to the reference directly
    transform : ``"translation"`` (phase correlation), ``"rigid"`` or ``"affine"``
    roi : (rows, cols) slices of the region used for registration (default the full image); the
        transforms are applied to the full images
    upsample_factor : phase-correlation precision, 1 / upsample_factor pixel
    order : spline order of the resampling

    Returns
    -------
    Alignment
    """
    data = np.asarray(stack)
    if data.ndim != 3:
        raise ValueError(f"stack must be (E, Y, X), got shape {data.shape}")
    n = data.shape[0]
    ref = reference % n if -n <= reference < n else None
    if ref is None:
        raise ValueError(f"reference {reference} is not an image index of a stack of {n}")
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    window = roi if roi is not None else (slice(None), slice(None))
    offset = np.eye(3)  # roi coordinates -> image coordinates
    offset[0, 2] = window[1].indices(data.shape[2])[0]
    offset[1, 2] = window[0].indices(data.shape[1])[0]
    shifts = np.zeros((n, 2))
    matrices = np.tile(np.eye(3), (n, 1, 1))
    for i in list(range(ref + 1, n)) + list(range(ref - 1, -1, -1)):
        toward = (i - 1 if i > ref else i + 1) if chain else ref
        shift, matrix = register_pair(data[toward][window], data[i][window], transform=transform,
                                      upsample_factor=upsample_factor)
        full = offset @ matrix @ np.linalg.inv(offset)
        # chained: reference frame -> frame of `toward` -> frame of i
        matrices[i] = matrices[toward] @ full if chain else full
        shifts[i] = shift + (shifts[toward] if chain else 0.0)
    aligned = np.stack([data[i].astype(np.float32) if i == ref else apply_alignment(data[i], matrices[i], order=order)
                        for i in range(n)])
    return Alignment(aligned, shifts, matrices, transform, ref)
