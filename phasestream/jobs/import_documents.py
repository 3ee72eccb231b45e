"""An imported energy stack as the documents of a Bluesky run, laid out as a live scan writes them.

:func:`checked_import` validates everything a file brings (sizes, dtypes, energies against the
references, I0 / flat / dark / monitor shapes, metadata) before a single document exists;
:func:`run_documents` then composes the run with event-model (``compose_run``): the start document
phasestream's worker reads (docs/contract.md, "Start document"), and the streams of
:func:`phasestream.sim.plans.energy_stack_scan`: ``primary`` (one event per energy: image, energy,
I0, and the file's flux monitor when it has one) and, for TXM, ``dark`` (one event, before the first
energy, when the file has a dark) and ``flat`` (one event per energy, just before that energy's image).
Event times follow that order,
so a replay of the stored run (reprocess) sees flats and darks before the images they correct.

Images either travel inside the events (TiledWriter stores them in Tiled) or, when they already
lie in an HDF5 dataset or in TIFF files (:mod:`phasestream.jobs.import_external`), stay there: the
``primary`` stream then carries one StreamResource pointing at them and one StreamDatum covering every
frame. Events come as event pages (one per stream and batch of images), which TiledWriter stores with
one table append per batch.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from event_model import StreamRange, compose_run

from phasestream.contract import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_NUM_POINTS,
    MAX_KEY_LENGTH,
    check_metadata,
)
from phasestream.formats import ImportedStack
from phasestream.jobs.import_external import ExternalImages, external_images
from phasestream.references import ReferenceSet

__all__ = [
    "ENERGY_KEY",
    "I0_KEY",
    "IMAGE_KEY",
    "MONITOR_KEY",
    "PLAN_NAME",
    "CheckedImport",
    "ImportRefusedError",
    "checked_import",
    "counts_dtype",
    "run_documents",
]

#: data keys of an imported run (those of the simulator's detector ``det``)
IMAGE_KEY, I0_KEY, ENERGY_KEY = "det_img", "det_i0", "energy"
#: data key of the file's flux monitor (NXstxm ``control``: a relative flux such as the ring current, recorded
#: with the images): kept with the raw data, never applied by the import (:class:`ImportedStack`'s ``monitor``)
MONITOR_KEY = "det_monitor"
PLAN_NAME = "import"
#: seconds between consecutive events of an imported run (their order is what matters)
EVENT_SPACING = 1e-3
_MAX_NAME = 256


class ImportRefusedError(ValueError):
    """A stack that cannot become a run; the message names the file and what is wrong. Nothing was written."""

    def __init__(self, source: str | Path, problem: str):
        self.source = str(source)
        super().__init__(f"{source}: {problem}")


@dataclass(frozen=True)
class CheckedImport:
    """A stack checked against the import's options, ready to compose: the start metadata, and where the
    images go (``external``: the file they lie in, else None: inside the events; ``copy_reason`` why not
    external)."""

    stack: ImportedStack
    metadata: dict[str, Any]
    sha256: str
    external: ExternalImages | None
    copy_reason: str = ""

    @functools.cached_property
    def image_dtype(self) -> np.dtype:
        """The one dtype of the image key in every stream (:func:`_frame_dtypes`), found once: finding it reads
        the images and flats, and the run's documents are made twice (written, then compared with the read-back)."""
        own = np.dtype(self.external.dtype) if self.external is not None else counts_dtype(self.stack.images)
        return np.result_type(own, *_frame_dtypes(self.stack))


def _plain(value: Any) -> Any:
    """File metadata as start-document values: JSON types, nested keys without ``.`` (the schema forbids it)."""
    if isinstance(value, Mapping):
        return {str(k).replace(".", "_"): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def _name(value: Any, what: str, source: Path) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > _MAX_NAME:
        raise ImportRefusedError(source, f"{what} must be a non-empty string of at most {_MAX_NAME} characters, "
                                 f"got {value!r:.60}")
    return value.strip()


def _soc(value: Any, source: Path) -> float:
    try:
        soc = float(value)
    except (TypeError, ValueError):
        soc = math.nan
    if not math.isfinite(soc):
        raise ImportRefusedError(source, f"state of charge must be a finite number, got {value!r:.60}")
    return soc


def _check_array(array: Any, what: str, shapes: tuple[tuple[int, ...], ...], source: Path) -> None:
    if np.dtype(array.dtype).kind not in "iuf":
        raise ImportRefusedError(source, f"{what} must be numbers (integer or float), got dtype {array.dtype}")
    if tuple(array.shape) not in shapes:
        raise ImportRefusedError(source, f"{what} has shape {tuple(array.shape)}; expected one of {list(shapes)}")


def _file_names(source: str | Path, files) -> list[str]:
    """The files read, as the start document names them: absolute paths, or, when ``source`` is a folder, the
    names of the files directly in it (a scan saved as one file per frame holds thousands: SSRL 6-2c's
    ``rep01_000351_ref_..._08354.0_eV_001of010.xrm``, 2000 of them with their folder were over the start
    document's 256 KiB)."""
    folder = Path(source).absolute() if Path(source).is_dir() else None
    names = []
    for path in (Path(p).absolute() for p in files):
        names.append(path.name if folder is not None and path.parent == folder else str(path))
    return names


def checked_import(stack: ImportedStack, *, references: ReferenceSet, reference_name: str,
                   sample: str | None = None, soc: float | None = None, external: bool = True,
                   sha256: str | None = None, max_num_points: int = DEFAULT_MAX_NUM_POINTS,
                   max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> CheckedImport:
    """Check ``stack`` before anything is written and build the run's start metadata.

    Parameters
    ----------
    stack : what a reader returned
    references : the reference spectra the run will be analysed against (loaded, trusted option);
        every energy of the stack must lie in their range
    reference_name : how the start document names them (a registered name or a path)
    sample, soc : sample name and state of charge; default the file's (``metadata["sample"]`` or
        ``metadata["sample_name"]``, ``metadata["state_of_charge"]``), else the file's stem and none
    external : keep images that lie in HDF5 there (StreamResource) instead of copying them
    sha256 : the SHA-256 of the stack's files (``stack.sha256()``) when the caller computed it; computed here
        when None

    Raises
    ------
    ImportRefusedError
        naming the file and what is wrong.
    """
    source = stack.source
    for path in (source, *stack.files):
        try:
            str(path).encode("utf-8")
        except UnicodeEncodeError:
            raise ImportRefusedError(source, f"the path {str(path)!r} is not valid UTF-8, which the run's documents "
                                     "and Tiled need: rename the file") from None
    images = stack.images
    n, ny, nx = (int(v) for v in images.shape)
    if n > max_num_points:
        raise ImportRefusedError(source, f"{n} energies, more than the {max_num_points} a run may have")
    if ny * nx > max_image_pixels or ny < 1 or nx < 1:
        raise ImportRefusedError(source, f"images of {ny} x {nx} pixels; 1 to {max_image_pixels} pixels allowed")
    _check_array(images, "images", ((n, ny, nx),), source)
    lo, hi = references.energy_range
    outside = [float(e) for e in stack.energies if not lo <= e <= hi]
    if outside:
        raise ImportRefusedError(source, f"{len(outside)} energies outside the range of references "
                                 f"{reference_name!r} ({lo:g}-{hi:g} eV), e.g. {outside[0]:g} eV; pass --references")
    if stack.mode == "txm":
        if stack.flat is None:
            raise ImportRefusedError(source, "a TXM stack needs flat-field (sample out) images")
        _check_array(stack.flat, "flat", ((n, ny, nx), (ny, nx)), source)
        if stack.dark is not None:
            _check_array(stack.dark, "dark", ((ny, nx),), source)
    elif stack.i0 is not None:
        _check_array(stack.i0, "i0", ((n,), (n, ny, nx)), source)
        i0 = np.asarray(stack.i0) if np.ndim(stack.i0) == 1 else None
        if i0 is not None and not (np.all(np.isfinite(i0)) and np.all(i0 > 0)):
            raise ImportRefusedError(source, "i0 must be positive, finite counts at every energy")
    if stack.monitor is not None:  # NaN where the file never wrote it (an aborted scan): kept as NaN
        _check_array(stack.monitor, "monitor", ((n,), (n, ny, nx)), source)
    file_md = check_metadata(_plain(dict(stack.metadata)), what=f"{source}: the file's metadata")
    named = [v for v in (file_md.get("sample"), file_md.get("sample_name")) if isinstance(v, str) and v.strip()]
    sample_name = _name(sample if sample is not None else [*named, Path(source).stem][0][:_MAX_NAME],
                        "the sample name", source)
    sample_md: dict[str, Any] = {"name": sample_name}
    chosen_soc = soc if soc is not None else file_md.get("state_of_charge")
    if chosen_soc is not None:
        sample_md["state_of_charge"] = _soc(chosen_soc, source)
    if not isinstance(reference_name, str) or not 0 < len(reference_name) <= MAX_KEY_LENGTH:
        raise ImportRefusedError(source, f"references {reference_name!r:.60} must be a name or a path")
    keep, copy_reason = external_images(stack) if external else (None, "")
    if keep is not None and (shared := np.result_type(np.dtype(keep.dtype), *_frame_dtypes(stack))) != keep.dtype:
        keep, copy_reason = None, (f"the flat or dark frames are {shared} and the images in the file {keep.dtype}, "
                                   "and Tiled's writer keeps one dtype per data key across a run's streams: the "
                                   f"images are copied as {shared}")
    sha256 = stack.sha256() if sha256 is None else sha256
    block = {"references": reference_name, "image_key": IMAGE_KEY, "energy_key": ENERGY_KEY, "mode": stack.mode}
    if stack.mode == "stxm" and stack.i0 is not None:
        block["i0_key"] = I0_KEY
    kept = {"monitor_key": MONITOR_KEY} if stack.monitor is not None else {}
    if stack.part:  # which of the file's stacks: part of the identity (sha256)
        kept["part"] = {str(k): str(v) for k, v in stack.part.items()}
    metadata = {
        "plan_name": PLAN_NAME,
        "detectors": ["det"],
        "motors": [ENERGY_KEY],
        "num_points": n,
        "num_intervals": n - 1,
        "energies": [float(e) for e in stack.energies],
        "hints": {"dimensions": [[[ENERGY_KEY], "primary"]]},
        "sample": sample_md,
        "phasestream": block,
        "import": {"format": stack.format, "files": _file_names(source, stack.files),
                   "sha256": sha256, "source": str(Path(source).absolute()), "metadata": file_md, **kept},
    }
    for key in ("dwell_ms", "beamline", "pixel_size_x_um", "pixel_size_y_um"):
        if file_md.get(key) is not None:
            metadata[key] = file_md[key]
    check_metadata(metadata, what=f"{source}: the start document", max_bytes=4 * 64 * 1024)
    return CheckedImport(stack, metadata, sha256, keep, copy_reason)


def counts_dtype(array: Any, block: int = 8) -> np.dtype:
    """``uint16`` for float images that hold whole counts from 0 to 65535 (a reader's float32 copy of a 16-bit
    detector's counts: stored as the detector counted them, half the bytes), else the array's own dtype."""
    dtype = np.dtype(array.dtype)
    if dtype.kind != "f":
        return dtype
    for start in range(0, len(array), block):
        part = np.asarray(array[start:start + block])
        if not (np.all(part >= 0) and np.all(part <= 65535) and np.array_equal(np.rint(part), part)):
            return dtype
    return np.dtype(np.uint16)


def _frame_dtypes(stack: ImportedStack) -> list[np.dtype]:
    """The dtypes a TXM stack's flat and dark need (:func:`counts_dtype`). They share the images' data key, and
    TiledWriter keeps one dtype per data key name across a run's streams (the last descriptor's): a float flat
    beside 16-bit images was stored as 16-bit, truncated. So the three are written in one dtype, the
    ``numpy.result_type`` of theirs."""
    if stack.mode != "txm":
        return []
    frames = [np.asarray(a) for a in (stack.flat, stack.dark) if a is not None]
    return [counts_dtype(a[None] if a.ndim == 2 else a) for a in frames]


def _key(array: Any, frame: bool, dtype: np.dtype | None = None) -> dict[str, Any]:
    dtype = np.dtype(array.dtype if dtype is None else dtype)
    shape = list(array.shape[1:]) if frame else []
    return {"source": "import", "dtype": "array" if shape else "number", "shape": shape,
            "dtype_numpy": dtype.str}


def run_documents(checked: CheckedImport, *, uid: str | None = None, t0: float | None = None,
                  page_size: int | None = None) -> tuple[str, Iterator[tuple[str, dict]]]:
    """``(run uid, documents)`` of the stack as a Bluesky run. Events come as event pages of at most
    ``page_size`` events per stream (every event of a stream in one page when None); the documents are made
    as they are consumed, so an image is read from the stack only when its page is made."""
    bundle = compose_run(uid=uid, time=t0 or time.time(), metadata=checked.metadata)
    n = len(checked.stack.energies)
    page = n if page_size is None else max(1, min(int(page_size), n))
    return bundle.start_doc["uid"], _documents(checked, bundle, page)


def _page(desc, data: dict[str, list], seq: range, times: list[float]) -> dict:
    return desc.compose_event_page(data=data, timestamps=dict.fromkeys(data, times), seq_num=list(seq), time=times,
                                   validate=False)


def _documents(checked: CheckedImport, bundle, page: int) -> Iterator[tuple[str, dict]]:
    stack = checked.stack
    external = checked.external
    start = bundle.start_doc
    t = start["time"]
    n = len(stack.energies)
    energies = [float(e) for e in stack.energies]
    txm = stack.mode == "txm"
    yield "start", start

    # dtype_numpy as TiledWriter's normalizer would add it (the import's writer skips the normalizer)
    energy_key = {"source": "import", "dtype": "number", "shape": [], "units": "eV", "dtype_numpy": "<f8"}
    image_dtype = checked.image_dtype  # one dtype for the key in every stream
    dark = None
    if txm:
        dark = None if stack.dark is None else np.asarray(stack.dark)
        if dark is not None:  # no dark image: no dark stream (the analysis then subtracts none)
            dark = dark.astype(image_dtype, copy=False)
            dark_desc = bundle.compose_descriptor(name="dark", data_keys={IMAGE_KEY: _key(dark[None], True)})
        flat = np.asarray(stack.flat).astype(image_dtype, copy=False)
        flat_desc = bundle.compose_descriptor(name="flat", data_keys={IMAGE_KEY: _key(flat[None] if flat.ndim == 2
                                                                                      else flat, True),
                                                                      ENERGY_KEY: energy_key})
        if dark is not None:
            yield "descriptor", dark_desc.descriptor_doc
        yield "descriptor", flat_desc.descriptor_doc
    primary_keys = {ENERGY_KEY: energy_key, IMAGE_KEY: _key(stack.images, True, image_dtype)}
    i0 = None if txm or stack.i0 is None else np.asarray(stack.i0, dtype=np.float64)
    if i0 is not None:
        primary_keys[I0_KEY] = _key(i0, i0.ndim == 3)
    monitor = None if stack.monitor is None else np.asarray(stack.monitor, dtype=np.float64)
    if monitor is not None:
        primary_keys[MONITOR_KEY] = _key(monitor, monitor.ndim == 3)
    resource = None
    if external is not None:
        primary_keys[IMAGE_KEY]["external"] = "STREAM:"
        resource = bundle.compose_stream_resource(mimetype=external.mimetype, uri=external.uri, data_key=IMAGE_KEY,
                                                  parameters=dict(external.parameters))
    primary = bundle.compose_descriptor(name="primary", data_keys=primary_keys,
                                        hints={"energy": {"fields": [ENERGY_KEY]}})
    yield "descriptor", primary.descriptor_doc
    if resource is not None:
        yield "stream_resource", resource.stream_resource_doc
    if dark is not None:
        yield "event_page", _page(dark_desc, {IMAGE_KEY: [dark]}, range(1, 2), [t + EVENT_SPACING])
    for lo in range(0, n, page):
        index = range(lo, min(lo + page, n))
        when = [t + EVENT_SPACING * (2 * i + 2) for i in index]  # each flat 1 ms before its image
        seq = range(index.start + 1, index.stop + 1)
        if txm:
            frames = [np.asarray(flat if flat.ndim == 2 else flat[i]) for i in index]
            yield "event_page", _page(flat_desc, {IMAGE_KEY: frames, ENERGY_KEY: [energies[i] for i in index]}, seq,
                                      when)
        data: dict[str, list] = {ENERGY_KEY: [energies[i] for i in index]}
        if external is None:
            data[IMAGE_KEY] = [np.asarray(stack.images[i]).astype(image_dtype, copy=False) for i in index]
        if i0 is not None:
            data[I0_KEY] = [float(i0[i]) if i0.ndim == 1 else i0[i] for i in index]
        if monitor is not None:
            data[MONITOR_KEY] = [float(monitor[i]) if monitor.ndim == 1 else monitor[i] for i in index]
        yield "event_page", _page(primary, data, seq, [w + EVENT_SPACING for w in when])
    if resource is not None:
        yield "stream_datum", resource.compose_stream_datum(
            indices=StreamRange(start=external.first_index, stop=external.first_index + n),
            seq_nums=StreamRange(start=1, stop=n + 1), descriptor=primary.descriptor_doc)
    yield "stop", bundle.compose_stop(exit_status="success", time=t + EVENT_SPACING * (2 * n + 2))
