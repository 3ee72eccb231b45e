"""Classic XANES analysis: flat-field, alignment, edge normalization, LCF, masks, edges, unmixing.

Functions on arrays (energies first: stacks are (E, Y, X)), no I/O; the post-scan job that runs
them on a run's result in Tiled is :mod:`phasestream.jobs.methods`.
"""

from phasestream.methods.alignment import TRANSFORMS, Alignment, align_stack, apply_alignment, register_pair
from phasestream.methods.edges import CURVE_FITS, edge50_map, fit_curves, peak_position_map
from phasestream.methods.lcf import FIT_METHODS, LCFResult, linear_combination_fit, polynomial_background
from phasestream.methods.masks import ClusterResult, combine_masks, kmeans_clusters, threshold_mask
from phasestream.methods.normalization import (
    EdgeNormalization,
    default_windows,
    edge_fit_coverage,
    find_edge_energy,
    normalize_by_references,
    normalize_edge,
)
from phasestream.methods.preprocessing import flat_field, minus_log, txm_optical_density
from phasestream.methods.unmixing import (
    DENOISERS,
    PRIORS,
    UnmixingResult,
    bm3d_available,
    noise_level,
    project_simplex,
    robust_unmixing,
    rum_objective,
)

__all__ = [
    "CURVE_FITS",
    "DENOISERS",
    "FIT_METHODS",
    "PRIORS",
    "TRANSFORMS",
    "Alignment",
    "ClusterResult",
    "EdgeNormalization",
    "LCFResult",
    "UnmixingResult",
    "align_stack",
    "apply_alignment",
    "bm3d_available",
    "combine_masks",
    "default_windows",
    "edge50_map",
    "edge_fit_coverage",
    "find_edge_energy",
    "fit_curves",
    "flat_field",
    "kmeans_clusters",
    "linear_combination_fit",
    "minus_log",
    "noise_level",
    "normalize_by_references",
    "normalize_edge",
    "peak_position_map",
    "polynomial_background",
    "project_simplex",
    "register_pair",
    "robust_unmixing",
    "rum_objective",
    "threshold_mask",
    "txm_optical_density",
]
