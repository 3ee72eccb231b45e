"""The options of the post-scan classic XANES methods (:mod:`phasestream.jobs.methods`): which methods to run
and their parameters, checked (:meth:`MethodsOptions.validate`), from the command line, the worker's defaults or
a start document's ``phasestream: {methods: ...}`` block (:func:`methods_options_from_start`, where every value
comes from the network and is checked before use).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from phasestream import methods as m
from phasestream.contract.metadata import finite_number

__all__ = ["MAX_BACKGROUND_ORDER", "METHODS", "MethodsOptions", "methods_options_from_start"]

METHODS = ("normalize", "lcf", "edge50", "peak", "masks", "kmeans", "rum_tv", "rum_pnp")


@dataclass
class MethodsOptions:
    """Which methods to run and their parameters (energies in eV).

    Attributes
    ----------
    methods : names from ``METHODS``, run in the order of ``METHODS``
    root : key of the results container in Tiled
    references : reference set (path or registered name) overriding the run's; one that does not load fails
        the methods (never replaced by the run's own)
    pre_edge, post_edge : normalization windows (default :func:`~phasestream.methods.default_windows`)
    lcf_method : ``"lstsq"``, ``"nnls"`` or ``"fcls"``; lcf_input : ``"od"`` or ``"normalized"``
    lcf_sum_to_one : divide the LCF weights by their sum (the scale of the mixture goes to ``scale_lcf``)
    background_order : polynomial background of the LCF: 0 (default) a constant offset, which takes
        up the non-resonant absorption of OD input; None: none; at most ``MAX_BACKGROUND_ORDER`` (5)
    edge_window, peak_window : windows of the edge-50 and peak fits (default: around the steepest
        rise / the maximum of the mean normalized spectrum, +-15 eV)
    curve_fit, curve_order : ``"polynomial"`` / ``"spline"`` and the polynomial degree
    thickness_min, fit_error_max : thresholds of the ``masks`` method (None: not applied)
    n_clusters : k-means clusters
    kmeans_input : ``"normalized"`` (default: edge-normalized spectra, clusters follow shape) or ``"od"``
    kmeans_mask : ``"particle"`` (default: :func:`~phasestream.kernels.particle_mask` of the OD) or ``"all"``
    kmeans_remove_pc1 : remove the first principal component before clustering (MANTiS)
    rum_strength, rum_lam, rum_rho, rum_max_iter, denoiser : robust unmixing parameters
        (:func:`~phasestream.methods.robust_unmixing`)
    """

    methods: tuple[str, ...] = ("lcf",)
    root: str = "phasestream"
    references: str | None = None
    pre_edge: tuple[float, float] | None = None
    post_edge: tuple[float, float] | None = None
    lcf_method: str = "nnls"
    lcf_input: str = "od"
    lcf_sum_to_one: bool = True
    background_order: int | None = 0
    edge_window: tuple[float, float] | None = None
    peak_window: tuple[float, float] | None = None
    curve_fit: str = "polynomial"
    curve_order: int = 3
    thickness_min: float | None = None
    fit_error_max: float | None = None
    n_clusters: int = 3
    kmeans_input: str = "normalized"
    kmeans_mask: str = "particle"
    kmeans_remove_pc1: bool = False
    rum_strength: float | None = None
    rum_lam: float | None = None
    rum_rho: float | None = None
    rum_max_iter: int = 100
    denoiser: str = "auto"

    def validate(self) -> MethodsOptions:
        names = (self.methods,) if isinstance(self.methods, str) else tuple(self.methods)
        unknown = [n for n in names if n not in METHODS]
        if unknown or not names:
            raise ValueError(f"unknown methods {unknown or names}: choose from {METHODS}")
        self.methods = tuple(n for n in METHODS if n in names)
        if self.lcf_method not in m.FIT_METHODS:
            raise ValueError(f"lcf_method must be one of {m.FIT_METHODS}, got {self.lcf_method!r}")
        if self.lcf_input not in ("od", "normalized"):
            raise ValueError(f"lcf_input must be 'od' or 'normalized', got {self.lcf_input!r}")
        if self.kmeans_input not in ("od", "normalized") or self.kmeans_mask not in ("particle", "all"):
            raise ValueError(f"kmeans_input must be 'od' or 'normalized' and kmeans_mask 'particle' or 'all', "
                             f"got {self.kmeans_input!r}, {self.kmeans_mask!r}")
        if self.curve_fit not in m.CURVE_FITS:
            raise ValueError(f"curve_fit must be one of {m.CURVE_FITS}, got {self.curve_fit!r}")
        for name, (low, high) in _INTEGER_RANGES.items():
            value = getattr(self, name)
            if value is None and name == "background_order":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                allowed = "None or " if name == "background_order" else ""
                raise ValueError(f"{name} must be {allowed}an integer from {low} to {high}, got {value!r}")
        for name, positive in _REAL_OPTIONS.items():
            value = getattr(self, name)
            if value is not None:
                if not _finite_real(value) or (value <= 0 if positive else value < 0):
                    raise ValueError(f"{name} must be None or a finite number {'>' if positive else '>='} 0, "
                                     f"got {value!r}")
                setattr(self, name, float(value))
        if self.denoiser not in ("auto", *m.DENOISERS):
            raise ValueError(f"denoiser must be 'auto' or one of {m.DENOISERS}, got {self.denoiser!r}")
        for name in ("pre_edge", "post_edge", "edge_window", "peak_window"):
            value = getattr(self, name)
            if value is not None:
                if (not isinstance(value, list | tuple) or len(value) != 2
                        or not all(_finite_real(v) for v in value)
                        or not float(value[0]) < float(value[1])):
                    raise ValueError(f"{name} must be (low, high) eV with low < high, got {value!r}")
                setattr(self, name, (float(value[0]), float(value[1])))
        return self


#: (low, high) of the integer options; an LCF background above order 5 fits away the edge itself
MAX_BACKGROUND_ORDER = 5
_INTEGER_RANGES = {"background_order": (0, MAX_BACKGROUND_ORDER), "n_clusters": (1, 100), "rum_max_iter": (1, 10_000),
                   "curve_order": (1, 10)}
#: the real-valued options (None: not given) and whether they must be > 0 (else >= 0)
_REAL_OPTIONS = {"rum_strength": False, "rum_lam": False, "rum_rho": True, "thickness_min": False,
                 "fit_error_max": False}


def _finite_real(value: Any) -> bool:
    return finite_number(value) is not None


def methods_options_from_start(start_doc: Mapping[str, Any], base: MethodsOptions | None = None
                               ) -> MethodsOptions | None:
    """The methods a start document asks for, or None.

    ``phasestream: {methods: [lcf, rum_tv]}`` (names) or ``phasestream: {methods: {names: [...],
    <MethodsOptions field>: value, ...}}``; also accepts the ``phasestream`` block itself. Raises
    ValueError with what is wrong for a malformed request.
    """
    block = start_doc.get("phasestream", start_doc) if isinstance(start_doc, Mapping) else {}
    request = block.get("methods") if isinstance(block, Mapping) else None
    if not request:
        return None
    base = base or MethodsOptions()
    if isinstance(request, str):
        request = [request]
    if isinstance(request, list | tuple):
        return replace(base, methods=tuple(str(r) for r in request)).validate()
    if isinstance(request, Mapping):
        allowed = {f.name for f in fields(MethodsOptions)} - {"root", "methods"}
        unknown = set(request) - allowed - {"names"}
        if unknown:
            raise ValueError(f"phasestream.methods: unknown keys {sorted(unknown)} (allowed: names, {sorted(allowed)})")
        names = request.get("names") or base.methods
        names = (names,) if isinstance(names, str) else names
        if not isinstance(names, list | tuple):
            raise ValueError(f"phasestream.methods.names must be a list of method names, got {names!r}")
        return replace(base, methods=names, **{k: v for k, v in request.items() if k in allowed}).validate()
    raise ValueError(f"phasestream.methods must be a list of names or a mapping, got {request!r}")
