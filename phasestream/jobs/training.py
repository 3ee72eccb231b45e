"""Training sets for the GMVAE and the ``phasestream train gmvae`` job.

A training set is the particle-pixel OD spectra of many scans at one set of energies, with their
PCC labels and reliabilities (for the cluster-purity metric and, where PCC is confident, as the
labels of semi-supervised training) and where they came from:

* :func:`tiled_training_set`: results already in Tiled (``od``, ``mask``, ``phase``), found by
  state of charge or by run uid, read here or one Dask task per run (:func:`result_spectra`).

Simulated sets (:mod:`phasestream.sim.training`) have the same shape. :func:`train_artifact` trains
on a set and writes a versioned artifact (registry format).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phasestream.contract.metadata import recorded_energies, result_layout
from phasestream.jobs.cluster import dask_task
from phasestream.jobs.frames import PIXEL_SIZE_KEY, RawFrames, raw_frames
from phasestream.jobs.training_report import ValidationRun, training_report
from phasestream.models.domain import DOMAINS, to_domain
from phasestream.models.pairs import PERCENTILES, check_pair_range, prepare_pair, split_field
from phasestream.models.spatial import pcc_reliability

__all__ = ["DEFAULT_MIN_RELIABILITY", "DEFAULT_SUPERVISION_WEIGHT", "SUPERVISIONS", "PairSet", "TrainingSet",
           "ValidationRun", "analysed_labels", "check_indi_pairs", "result_spectra", "supervised_spectra",
           "tiled_indi_pairs", "tiled_training_set", "train_artifact", "train_indi_artifact"]

logger = logging.getLogger(__name__)

#: how a GMVAE is trained: ``none`` (unsupervised) or ``pcc`` (confident PCC labels supervise the mixture components)
SUPERVISIONS = ("none", "pcc")
#: ``pcc`` supervision: a spectrum's PCC label is trained on when its reliability (best minus second-best PCC)
#: is at least this, four times the 0.005 ambiguity gap (docs/models.md, "Semi-supervised training")
DEFAULT_MIN_RELIABILITY = 0.02
#: ``pcc`` supervision: weight of the cross-entropy (1.0 moved the mixture components too little in 40 epochs)
DEFAULT_SUPERVISION_WEIGHT = 5.0

@dataclass
class TrainingSet:
    """Spectra (N, E) at ``energies_eV``, PCC labels (N,), the reference phases and the provenance;
    ``validation``: a few whole runs for the training report (:mod:`phasestream.jobs.training_report`);
    ``reliability`` (N,): each label's PCC gap (best minus second best), None when not known."""

    spectra: np.ndarray
    labels: np.ndarray
    energies_eV: np.ndarray
    phases: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)
    validation: list[ValidationRun] = field(default_factory=list)
    reliability: np.ndarray | None = None


def analysed_labels(od: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The particle ``mask``, PCC ``phase`` and ``reliability`` maps (Y, X) of an OD stack (E, Y, X), as
    the live path computes them."""
    from phasestream.kernels.pearson import pearson_maps
    from phasestream.kernels.phases import assign_phases, particle_mask

    mask = particle_mask(od)
    phase, reliability, _ = assign_phases(pearson_maps(od, references), mask)
    return mask, phase, reliability


def supervised_spectra(data: TrainingSet, min_reliability: float = DEFAULT_MIN_RELIABILITY) -> np.ndarray:
    """(N,) bool: the spectra of ``data`` whose PCC label is confident enough to supervise the GMVAE
    (a phase, and a reliability of at least ``min_reliability``)."""
    if data.reliability is None:
        raise ValueError("this training set carries no PCC reliabilities: train with supervision 'none'")
    reliability = np.asarray(data.reliability, np.float64)
    return (np.asarray(data.labels) >= 0) & np.isfinite(reliability) & (reliability >= min_reliability)


@dask_task
def result_spectra(tiled_uri: str, run_uid: str, options: dict | None = None,
                   api_key: str | None = None) -> dict[str, Any]:
    """Training data of one run: the particle-pixel OD spectra of its result in Tiled, with PCC labels.

    A plain function of (tiled uri, run uid, options) like the post-scan jobs, so that
    :func:`tiled_training_set` can extract many runs on Dask workers, each reading Tiled itself.
    ``options``: ``root`` (default ``phasestream``); ``api_key``: sent to Tiled in a header.

    Returns
    -------
    ``{"run_uid", "energies_eV" (E,) as measured, "phases", "spectra" (N, E) float32, "labels" (N,) int16,
    "reliability" (N,) float32}``
    """
    from phasestream.store.tiled import connect

    return _node_spectra(_result_node(connect(tiled_uri, api_key=api_key), run_uid,
                                      (options or {}).get("root", "phasestream")), run_uid)


def _result_node(client, uid: str, root: str):
    try:
        return client[root][uid]
    except KeyError:
        raise KeyError(f"no phasestream result for run {uid} in Tiled under {root!r}") from None


def _node_spectra(node, uid: str) -> dict[str, Any]:
    md = node.metadata
    if "od" not in node:
        raise ValueError(f"result {uid} has no OD cube: reprocess it first (phasestream reprocess {uid})")
    _, phases, _, _ = result_layout(uid, md)
    n, energies = recorded_energies(uid, md)
    mask = node["mask"].read().astype(bool)
    x = node["od"][:n][:, mask].T
    keep = np.isfinite(x).all(axis=1)
    if "reliability" in node:
        reliability = node["reliability"].read()
    else:  # a result without the map: the gap of its PCC maps
        reliability = pcc_reliability(node["pcc"].read())
    return {"run_uid": uid, "energies_eV": np.asarray(energies, dtype=np.float64),
            "phases": phases, "spectra": x[keep].astype(np.float32),
            "labels": node["phase"].read()[mask][keep].astype(np.int16),
            "reliability": np.asarray(reliability)[mask][keep].astype(np.float32)}


def _spectra_on_dask(uids: Sequence[str], tiled_uri: str, root: str, scheduler: str | None, retries: int,
                     api_key: str | None) -> list[dict[str, Any]]:
    """:func:`result_spectra` of every run as one Dask task each; every failed run is named in one error."""
    from phasestream.jobs.cluster import dask_client, gather_all, submit_tasks
    from phasestream.store.tiled import separate_api_key

    uri, api_key = separate_api_key(tiled_uri, api_key)
    local = scheduler is not None and scheduler.lower() == "local"  # never the configured scheduler
    with dask_client("local" if local else scheduler) as dask:
        futures = submit_tasks(dask, result_spectra, [(uri, uid, {"root": root}, api_key) for uid in uids],
                               retries=retries, tag="spectra")
        return gather_all(futures, uids, ValueError, prefix="training data could not be read from ")


def tiled_training_set(
    client,
    *,
    state_of_charge: Sequence[float] = (),
    runs: Sequence[str] = (),
    tolerance: float = 0.05,
    energy_tolerance_eV: float = 0.05,
    root: str = "phasestream",
    tiled_uri: str | None = None,
    scheduler: str | None = None,
    retries: int = 2,
    api_key: str | None = None,
    n_validation: int = 2,
) -> TrainingSet:
    """Particle-pixel spectra of complete results in Tiled, by state of charge and/or run uid.

    The last ``n_validation`` runs are also read whole, as the validation runs of the training report.

    Every run named in ``runs`` must be ``complete`` (a result still running, partial or failed is refused
    with an error naming the run and its status). Every run must name the same phases as the first one:
    in another order, its labels (and validation maps) are remapped to the first run's order; other phases
    are refused with an error naming the run and both phase lists. Every run must have been measured
    at the same energies (within ``energy_tolerance_eV``) as the first one; runs that were not are
    refused with an error naming them.

    With ``scheduler`` (a Dask scheduler address, or ``"local"`` for a LocalCluster) each run's
    spectra are extracted by :func:`result_spectra` in its own Dask task (retried ``retries``
    times) that reads ``tiled_uri`` itself (with ``api_key`` in a header); the set equals the one
    extracted here.
    """
    from phasestream.store.catalog import find

    nodes = {}
    for soc in state_of_charge:
        nodes.update(find(client, state_of_charge=soc, tolerance=tolerance, status="complete", root=root))
    for uid in runs:
        nodes[uid] = _result_node(client, uid, root)
        status = nodes[uid].metadata.get("status")
        if status != "complete":
            raise ValueError(f"run {uid}: its result is {status!r}, not complete: only complete results are "
                             "training data (reprocess it, or leave it out of --runs)")
    if not nodes:
        raise ValueError(f"no complete results match state_of_charge={list(state_of_charge)} runs={list(runs)}")
    if scheduler:
        if not tiled_uri:
            raise ValueError("extracting training data on Dask needs tiled_uri: the workers read Tiled themselves")
        extracted = _spectra_on_dask(list(nodes), tiled_uri, root, scheduler, retries, api_key)
    else:
        extracted = [_node_spectra(node, uid) for uid, node in nodes.items()]
    energies, phases = extracted[0]["energies_eV"], extracted[0]["phases"]
    for run in extracted[1:]:
        run_energies = run["energies_eV"]
        if run_energies.shape != energies.shape or np.abs(run_energies - energies).max() > energy_tolerance_eV:
            raise ValueError(f"run {run['run_uid']} was measured at other energies ({run_energies.round(2).tolist()} "
                             f"eV) than the first run ({energies.round(2).tolist()} eV): train on one energy set at "
                             "a time")
    remaps = {run["run_uid"]: _phase_remap(phases, run["phases"], run["run_uid"]) for run in extracted}
    for run in extracted:
        if remaps[run["run_uid"]] is not None:
            run["labels"] = _remapped_labels(run["labels"], remaps[run["run_uid"]])
    order = np.argsort(energies)
    x = np.concatenate([run["spectra"] for run in extracted])[:, order]
    provenance = {"source": "tiled", "tiled": (tiled_uri or "").split("?")[0] or None,
                  "runs": [run["run_uid"] for run in extracted],
                  "query": {"state_of_charge": list(state_of_charge), "tolerance": tolerance, "root": root},
                  "n_spectra": len(x)}
    if scheduler:
        provenance["extracted_on"] = "dask"
    labels = np.concatenate([run["labels"] for run in extracted])
    reliability = np.concatenate([run["reliability"] for run in extracted])
    validation = [v for v in (_validation_run(nodes[uid], uid, order, remaps.get(uid))
                              for uid in list(nodes)[-n_validation:])
                  if v is not None] if n_validation else []
    return TrainingSet(x, labels, energies[order], phases, provenance, validation, reliability)


def _phase_remap(first: Sequence[str], phases: Sequence[str], uid: str) -> np.ndarray | None:
    """None when ``phases`` is ``first``; else the index in ``first`` of each of a run's phases (the same
    phases in another order); a ValueError naming the run and both lists when the phases differ."""
    first, phases = list(first), list(phases)
    if phases == first:
        return None
    if sorted(phases) != sorted(first) or len(set(phases)) != len(phases):
        raise ValueError(f"run {uid} names the phases {phases}, the first run {first}: train on runs analysed "
                         "against one set of references")
    return np.array([first.index(p) for p in phases])


def _remapped_labels(labels: np.ndarray, remap: np.ndarray) -> np.ndarray:
    """A run's phase labels in the first run's phase order; negative labels (no phase) stay."""
    labels = np.asarray(labels)
    return np.where(labels >= 0, remap[np.clip(labels, 0, len(remap) - 1)], labels).astype(labels.dtype)


def _validation_run(node, uid: str, order: np.ndarray, remap: np.ndarray | None = None) -> ValidationRun | None:
    """A run's maps for the training report, at the set's energies (its phases in the first run's order when
    ``remap`` is given); None when it lacks the reference values."""
    md = node.metadata
    values = md.get("reference_values")
    if values is None or "pcc" not in node or "ambiguous" not in node:
        logger.info("run %s: no reference values or PCC maps in its result; not a validation run", uid)
        return None
    n, _ = recorded_energies(uid, md)
    phase, pcc, values = node["phase"].read(), node["pcc"].read(), np.asarray(values, np.float64)[:, :n][:, order]
    if remap is not None:  # row k of the first run's order is the run's phase argsort(remap)[k]
        back = np.argsort(remap)
        phase, pcc, values = _remapped_labels(phase, remap), np.asarray(pcc)[back], values[back]
    return ValidationRun(uid, np.asarray(node["od"][:n], np.float64)[order], node["mask"].read().astype(bool),
                         phase, node["ambiguous"].read().astype(bool), pcc, values)


def train_artifact(
    data: TrainingSet,
    directory: str | Path,
    *,
    name: str,
    version: str,
    overwrite: bool = False,
    supervision: str = "none",
    min_reliability: float = DEFAULT_MIN_RELIABILITY,
    supervision_weight: float = DEFAULT_SUPERVISION_WEIGHT,
    **train_options: Any,
):
    """Train a GMVAE on ``data`` and save it as the artifact ``<directory>/<name>-<version>``.

    ``supervision``: ``none`` (unsupervised) or ``pcc``: the spectra whose PCC reliability is at least
    ``min_reliability`` (:func:`supervised_spectra`) train their PCC phase as their mixture component
    (cross-entropy weighted by ``supervision_weight``), the others as without labels; recorded in the
    manifest's ``training.supervision``. ``train_options`` go to
    :func:`phasestream.models.gmvae.train_gmvae`. The training report
    (per-phase purity, held-out refinement gain on ``data.validation``, warnings) is stored in the
    manifest as ``report`` and returned as ``result.report``. Returns ``(artifact, result)``.
    """
    from phasestream.models.gmvae import train_gmvae
    from phasestream.models.registry import save_artifact

    if supervision not in SUPERVISIONS:
        raise ValueError(f"supervision must be one of {SUPERVISIONS}, got {supervision!r}")
    supervised = supervised_spectra(data, min_reliability) if supervision == "pcc" else None
    if supervised is not None and not supervised.any():
        raise ValueError(f"no training spectrum has a PCC reliability of at least {min_reliability}: lower "
                         "--min-reliability or train with --supervision none")
    result = train_gmvae(data.spectra, labels=data.labels, supervised=supervised,
                         supervision_weight=supervision_weight, n_components=len(data.phases), **train_options)
    result.report = training_report(result.model, data.spectra, data.labels, data.phases, data.validation,
                                    seed=int(train_options.get("seed", 0)))
    training = {**data.provenance, "split": result.split, "validation_runs": [v.name for v in data.validation],
                "options": {k: v for k, v in train_options.items() if k != "progress"},
                "supervision": _supervision_record(data, supervision, supervised, min_reliability,
                                                   supervision_weight)}
    artifact = save_artifact(result.model, directory, name=name, version=version, kind="gmvae",
                             energies_eV=data.energies_eV, phases=data.phases, training=training,
                             metrics=result.metrics, extra={"report": result.report}, overwrite=overwrite)
    return artifact, result


def _supervision_record(data: TrainingSet, supervision: str, supervised: np.ndarray | None, min_reliability: float,
                        weight: float) -> dict[str, Any]:
    if supervised is None:
        return {"labels": "none"}
    per_phase = np.bincount(np.asarray(data.labels)[supervised], minlength=len(data.phases))
    return {"labels": supervision, "min_reliability": min_reliability, "weight": weight,
            "spectra": int(supervised.sum()), "fraction": round(float(supervised.mean()), 4),
            "per_phase": {p: int(n) for p, n in zip(data.phases, per_phase, strict=False)}}


# ---------------------------------------------------------------------------------------------- InDI


@dataclass
class PairSet:
    """Registered InDI training pairs: HQ images and LQ images upscaled to the same shapes, in one image
    ``domain`` (``{"image": "transmission" | "od" | "counts", "normalization": {...}}``, models/domain.py)."""

    hq: list[np.ndarray]
    lq_upscaled: list[np.ndarray]
    scale: int
    pixel_size: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)
    domain: dict[str, Any] = field(default_factory=dict)


def _pixel_sizes(lq: RawFrames, hq: RawFrames, scale: int, given: Sequence[float] | None) -> dict[str, Any]:
    if given is not None:
        if len(given) != 2 or min(given) <= 0:
            raise ValueError(f"--pixel-size takes two positive sizes in µm, LQ then HQ; got {list(given)}")
        sizes = {"lq": float(given[0]), "hq": float(given[1]), "unit": "um", "from": "--pixel-size"}
    else:
        sizes = {"lq": lq.pixel_size_um, "hq": hq.pixel_size_um, "unit": "um",
                 "from": lq.pixel_size_from or hq.pixel_size_from}
    if sizes["lq"] is not None and sizes["hq"] is not None and abs(sizes["lq"] / sizes["hq"] / scale - 1) > 0.1:
        raise ValueError(f"the LQ pixel ({sizes['lq']:g} µm) is not {scale} x the HQ pixel ({sizes['hq']:g} µm): "
                         f"InDI upscales LQ by {scale}; resample the scans or correct {PIXEL_SIZE_KEY}")
    return sizes


def _in_domain(frames: RawFrames, domain: str, i0: Sequence[float] | None) -> list[np.ndarray]:
    images = []
    for k, image in enumerate(frames.images):
        converted = to_domain(image, domain, None if i0 is None else float(i0[k]))
        if not np.isfinite(converted).all():  # OD of non-positive counts
            converted = np.where(np.isfinite(converted), converted, np.nanmedian(converted))
        images.append(converted)
    return images


def tiled_indi_pairs(client, lq_uid: str, hq_uid: str, *, scale: int = 2, tiled_uri: str | None = None,
                     domain: str = "od", open_beam: Sequence[float] | None = None,
                     pixel_size: Sequence[float] | None = None, raw: str = "") -> PairSet:
    """Pairs from two raw image runs in Tiled (a low- and a high-quality scan of the same field; one frame
    each, or frame i of one with frame i of the other), in ``domain``.

    Each scan is normalized by its own open beam (I0): ``open_beam`` (LQ, HQ) when given, else the run's
    I0 column or the estimate from each frame's background (:func:`phasestream.jobs.frames.raw_frames`);
    ``transmission`` is ``I / I0``, ``od`` ``-ln(I / I0)``; ``counts`` are the raw counts, divided by
    each scan's dose only when ``open_beam`` gives it. Each pair is then matched and registered
    (:func:`phasestream.models.pairs.prepare_pair`) and checked to lie on one intensity scale
    (:func:`~phasestream.models.pairs.check_pair_range`). Pixel sizes come from ``pixel_size`` (µm, LQ
    then HQ) or the start documents (``sample.pixel_size_um``). Every error is raised here, before
    TensorFlow is loaded.
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    if open_beam is not None and (len(open_beam) != 2 or min(open_beam) <= 0):
        raise ValueError(f"--open-beam takes two positive intensities (counts/px), LQ then HQ; got {list(open_beam)}")
    lq, hq = raw_frames(client, lq_uid, raw=raw), raw_frames(client, hq_uid, raw=raw)
    if len(lq.images) != len(hq.images):
        raise ValueError(f"LQ run {lq_uid} has {len(lq.images)} images and HQ run {hq_uid} has {len(hq.images)}: "
                         "pair them 1:1 (one frame each is a pair)")
    sizes = _pixel_sizes(lq, hq, scale, pixel_size)
    if domain == "counts" and open_beam is None:
        normalization: dict[str, Any] = {"mode": "none"}
        lq_i0 = hq_i0 = None
    else:
        if open_beam is not None:
            lq.i0, hq.i0 = np.full(len(lq.images), float(open_beam[0])), np.full(len(hq.images), float(open_beam[1]))
            lq.i0_from = hq.i0_from = "--open-beam"
        normalization = {"mode": "dose" if domain == "counts" else "open_beam", "lq": lq.normalization(),
                         "hq": hq.normalization()}
        lq_i0, hq_i0 = lq.i0, hq.i0
    pairs = []
    for k, (lo, hi) in enumerate(zip(_in_domain(lq, domain, lq_i0), _in_domain(hq, domain, hq_i0), strict=True)):
        hq_c, lq_c, info = prepare_pair(lo, hi, scale=scale)
        check_pair_range(hq_c, lq_c, what=f"pair {k} (LQ run {lq_uid}, HQ run {hq_uid}, {domain})")
        pairs.append((hq_c, lq_c, info))
    provenance = {"source": "tiled", "tiled": (tiled_uri or "").split("?")[0] or None, "lq_run": lq_uid,
                  "hq_run": hq_uid, "n_pairs": len(pairs), "registration": [p[2] for p in pairs]}
    return PairSet([p[0] for p in pairs], [p[1] for p in pairs], scale, sizes, provenance,
                   {"image": domain, "normalization": normalization})


def check_indi_pairs(data: PairSet, *, crop: int = 64) -> None:
    """Every data error of a training set, raised before TensorFlow is loaded: a declared domain, pairs of
    one shape each, a field large enough for training crops and a held-out validation band."""
    if (data.domain or {}).get("image") not in DOMAINS:
        raise ValueError(f"the training pairs must declare their image domain (one of {DOMAINS}), got {data.domain}")
    if not data.hq or len(data.hq) != len(data.lq_upscaled):
        raise ValueError(f"need HQ/LQ pairs of equal count (one pair is enough), got {len(data.hq)} HQ and "
                         f"{len(data.lq_upscaled)} LQ images")
    for k, (h, lqu) in enumerate(zip(data.hq, data.lq_upscaled, strict=True)):
        if np.shape(h) != np.shape(lqu):
            raise ValueError(f"pair {k}: HQ {np.shape(h)} and upscaled LQ {np.shape(lqu)} differ; use prepare_pair")
        split_field(np.shape(h), crop=crop)


def train_indi_artifact(data: PairSet, directory: str | Path, *, name: str, version: str, overwrite: bool = False,
                        **train_options: Any):
    """Train InDI on ``data`` and save the artifact ``<directory>/<name>-<version>``; ``(artifact, result)``.

    The data are checked first (:func:`check_indi_pairs`): a bad set fails before TensorFlow loads.
    """
    check_indi_pairs(data, crop=int(train_options.get("crop", 64)))
    from phasestream.models.indi import train_indi
    from phasestream.models.registry import save_artifact

    result = train_indi(data.hq, data.lq_upscaled, **train_options)
    training = {**data.provenance, "options": {k: v for k, v in train_options.items() if k != "progress"}}
    extra = {"scale": data.scale, "pixel_size": data.pixel_size, "steps": result.steps, "domain": data.domain,
             "demo": data.provenance.get("source") == "synthetic",
             "normalization": {"mode": "percentile", "percentiles": list(PERCENTILES), "of": "upscaled LQ image"}}
    artifact = save_artifact(result.model, directory, name=name, version=version, kind="indi", training=training,
                             metrics=result.metrics, extra=extra, overwrite=overwrite)
    return artifact, result


def train_denoise_artifact(stacks, provenance: dict, directory: str | Path, *, name: str, version: str,
                           overwrite: bool = False, **train_options: Any):
    """Train the blind-row denoiser on OD ``stacks`` (each (E, Y, X)) and save the artifact
    ``<directory>/<name>-<version>``; ``(artifact, result)``."""
    from phasestream.models.denoise import train_denoiser
    from phasestream.models.registry import save_artifact

    result = train_denoiser(stacks, **train_options)
    training = {**provenance, "options": {k: v for k, v in train_options.items() if k != "progress"}}
    extra = {"components": "pca-whitened", "mask": "blind scan line (rows above and below only)"}
    artifact = save_artifact(result.model, directory, name=name, version=version, kind="denoise",
                             training=training, metrics=result.metrics, extra=extra, overwrite=overwrite)
    return artifact, result
