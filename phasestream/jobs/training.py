"""Training sets for the GMVAE and the ``phasestream train gmvae`` job.

A training set is the particle-pixel OD spectra of many scans at one set of energies, with their
PCC labels (for the cluster-purity metric) and where they came from:

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

from phasestream.jobs.cluster import dask_task
from phasestream.jobs.training_report import ValidationRun, training_report

__all__ = ["PairSet", "TrainingSet", "ValidationRun", "analysed_labels", "result_spectra",
           "tiled_indi_pairs", "tiled_training_set", "train_artifact", "train_indi_artifact"]

logger = logging.getLogger(__name__)

@dataclass
class TrainingSet:
    """Spectra (N, E) at ``energies_eV``, PCC labels (N,), the reference phases and the provenance;
    ``validation``: a few whole runs for the training report (:mod:`phasestream.jobs.training_report`)."""

    spectra: np.ndarray
    labels: np.ndarray
    energies_eV: np.ndarray
    phases: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)
    validation: list[ValidationRun] = field(default_factory=list)


def analysed_labels(od: np.ndarray, references: np.ndarray):
    from phasestream.kernels.pearson import pearson_maps
    from phasestream.kernels.phases import assign_phases, particle_mask

    mask = particle_mask(od)
    phase, _, _ = assign_phases(pearson_maps(od, references), mask)
    return mask, phase


@dask_task
def result_spectra(tiled_uri: str, run_uid: str, options: dict | None = None,
                   api_key: str | None = None) -> dict[str, Any]:
    """Training data of one run: the particle-pixel OD spectra of its result in Tiled, with PCC labels.

    A plain function of (tiled uri, run uid, options) like the post-scan jobs, so that
    :func:`tiled_training_set` can extract many runs on Dask workers, each reading Tiled itself.
    ``options``: ``root`` (default ``phasestream``); ``api_key``: sent to Tiled in a header.

    Returns
    -------
    ``{"run_uid", "energies_eV" (E,) as measured, "phases", "spectra" (N, E) float32, "labels" (N,) int16}``
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
    n = int(md.get("n_energies_seen") or 0)
    mask = node["mask"].read().astype(bool)
    x = node["od"][:n][:, mask].T
    keep = np.isfinite(x).all(axis=1)
    return {"run_uid": uid, "energies_eV": np.asarray(md["energies_eV"][:n], dtype=np.float64),
            "phases": list(md["references"]["phases"]), "spectra": x[keep].astype(np.float32),
            "labels": node["phase"].read()[mask][keep].astype(np.int16)}


def _spectra_on_dask(uids: Sequence[str], tiled_uri: str, root: str, scheduler: str | None, retries: int,
                     api_key: str | None) -> list[dict[str, Any]]:
    """:func:`result_spectra` of every run as one Dask task each; every failed run is named in one error."""
    from phasestream.jobs.cluster import dask_client, gather_all, submit_tasks
    from phasestream.store.tiled import separate_api_key

    uri, api_key = separate_api_key(tiled_uri, api_key)
    with dask_client(None if scheduler in (None, "local") else scheduler) as dask:
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

    Every run must have been measured at the same energies (within ``energy_tolerance_eV``) as the
    first one; runs that were not are refused with an error naming them.

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
    order = np.argsort(energies)
    x = np.concatenate([run["spectra"] for run in extracted])[:, order]
    provenance = {"source": "tiled", "tiled": (tiled_uri or "").split("?")[0] or None,
                  "runs": [run["run_uid"] for run in extracted],
                  "query": {"state_of_charge": list(state_of_charge), "tolerance": tolerance, "root": root},
                  "n_spectra": len(x)}
    if scheduler:
        provenance["extracted_on"] = "dask"
    labels = np.concatenate([run["labels"] for run in extracted])
    validation = [v for v in (_validation_run(nodes[uid], uid, order) for uid in list(nodes)[-n_validation:])
                  if v is not None] if n_validation else []
    return TrainingSet(x, labels, energies[order], phases, provenance, validation)


def _validation_run(node, uid: str, order: np.ndarray) -> ValidationRun | None:
    """A run's maps for the training report, at the set's energies; None when it lacks the reference values."""
    md = node.metadata
    values = md.get("reference_values")
    if values is None or "pcc" not in node or "ambiguous" not in node:
        logger.info("run %s: no reference values or PCC maps in its result; not a validation run", uid)
        return None
    n = int(md.get("n_energies_seen") or 0)
    return ValidationRun(uid, np.asarray(node["od"][:n], np.float64)[order], node["mask"].read().astype(bool),
                         node["phase"].read(), node["ambiguous"].read().astype(bool), node["pcc"].read(),
                         np.asarray(values, np.float64)[:, :n][:, order])


def train_artifact(
    data: TrainingSet,
    directory: str | Path,
    *,
    name: str,
    version: str,
    overwrite: bool = False,
    **train_options: Any,
):
    """Train a GMVAE on ``data`` and save it as the artifact ``<directory>/<name>-<version>``.

    ``train_options`` go to :func:`phasestream.models.gmvae.train_gmvae`. The training report
    (per-phase purity, held-out refinement gain on ``data.validation``, warnings) is stored in the
    manifest as ``report`` and returned as ``result.report``. Returns ``(artifact, result)``.
    """
    from phasestream.models.gmvae import train_gmvae
    from phasestream.models.registry import save_artifact

    result = train_gmvae(data.spectra, labels=data.labels, n_components=len(data.phases), **train_options)
    result.report = training_report(result.model, data.spectra, data.labels, data.phases, data.validation,
                                    seed=int(train_options.get("seed", 0)))
    training = {**data.provenance, "split": result.split, "validation_runs": [v.name for v in data.validation],
                "options": {k: v for k, v in train_options.items() if k != "progress"}}
    artifact = save_artifact(result.model, directory, name=name, version=version, kind="gmvae",
                             energies_eV=data.energies_eV, phases=data.phases, training=training,
                             metrics=result.metrics, extra={"report": result.report}, overwrite=overwrite)
    return artifact, result


# ---------------------------------------------------------------------------------------------- InDI


@dataclass
class PairSet:
    """Registered InDI training pairs: HQ images and LQ images upscaled to the same shapes."""

    hq: list[np.ndarray]
    lq_upscaled: list[np.ndarray]
    scale: int
    pixel_size: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)


def _run_images(client, uid: str) -> tuple[np.ndarray, dict]:
    from phasestream.store.tiled import open_raw_run

    run = open_raw_run(client, uid)
    start = run.metadata["start"]
    key = (start.get("phasestream") or {}).get("image_key") or start.get("image_key")
    primary = run["primary"]
    if key is None:
        arrays = [k for k, v in primary.metadata.get("data_keys", {}).items() if len(v.get("shape", [])) == 2]
        if len(arrays) != 1:
            raise ValueError(f"run {uid}: name the image key in the start document (phasestream.image_key); "
                             f"2D data keys found: {arrays}")
        key = arrays[0]
    images = np.asarray(primary[key].read(), np.float32)
    if images.ndim == 2:
        images = images[None]
    return images, start


def tiled_indi_pairs(client, lq_uid: str, hq_uid: str, *, scale: int = 2, tiled_uri: str | None = None) -> PairSet:
    """Pairs from two raw image runs in Tiled (one LQ and one HQ scan of the same sample): frame i of
    the LQ run goes with frame i of the HQ run; each pair is matched and registered with
    :func:`phasestream.models.indi.prepare_pair` (imports TensorFlow)."""
    from phasestream.models.indi import prepare_pair

    lq, lq_start = _run_images(client, lq_uid)
    hq, hq_start = _run_images(client, hq_uid)
    if len(lq) != len(hq):
        raise ValueError(f"LQ run {lq_uid} has {len(lq)} images and HQ run {hq_uid} has {len(hq)}: pair them 1:1")
    pairs = [prepare_pair(lo, hi, scale=scale) for lo, hi in zip(lq, hq, strict=True)]
    provenance = {"source": "tiled", "tiled": (tiled_uri or "").split("?")[0] or None, "lq_run": lq_uid,
                  "hq_run": hq_uid, "n_pairs": len(pairs), "registration": [p[2] for p in pairs]}
    pixel = {"lq": lq_start.get("pixel_size"), "hq": hq_start.get("pixel_size"), "unit": lq_start.get("pixel_unit")}
    return PairSet([p[0] for p in pairs], [p[1] for p in pairs], scale, pixel, provenance)


def train_indi_artifact(data: PairSet, directory: str | Path, *, name: str, version: str, overwrite: bool = False,
                        **train_options: Any):
    """Train InDI on ``data`` and save the artifact ``<directory>/<name>-<version>``; ``(artifact, result)``."""
    from phasestream.models.indi import PERCENTILES, train_indi
    from phasestream.models.registry import save_artifact

    result = train_indi(data.hq, data.lq_upscaled, **train_options)
    training = {**data.provenance, "options": {k: v for k, v in train_options.items() if k != "progress"}}
    extra = {"scale": data.scale, "pixel_size": data.pixel_size, "steps": result.steps,
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
