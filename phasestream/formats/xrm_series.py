"""Zeiss / Xradia TXM-XANES acquisitions saved as one ``.xrm`` file per frame: a folder of sample frames and
reference (flat, sample-out) frames, one or several of each per energy, as SSRL 6-2c and APS 32-ID-C write
them (docs/formats.md, "Zeiss series").

Each file is read with :mod:`phasestream.formats.xrm`'s stream readers and must hold one image. Its name
(:mod:`phasestream.formats.xrm_names`) says whether it is a sample or a reference frame (the ``ref`` token),
which series (field of view) it belongs to, and, for the facility namings, its energy. The energy of a frame
is its ``ImageInfo/Energy`` when that is above 0, else the energy in its name (SSRL 6-2c writes 0 there);
where there are both, they must agree within :data:`NAME_ENERGY_TOLERANCE_EV`. Frames whose energies lie
within :data:`SAME_ENERGY_EV` of the lowest of them are one energy: its sample frames are averaged into the
image, its reference frames into the flat, each scaled to the sample frames' exposure when it was exposed
for another time (``ImageInfo/ExpTimes``). Every energy needs both, of the size of every other frame. A
sample frame the microscope already divided by a reference (``ImageInfo/OriginalDataRefCorrected``) is
refused; a frame's own ``ReferenceData/Image`` is not used.

Files are opened twice: once for their headers (count, size, energy), so that every check is made and the
stack's size bounded before anything is allocated, then for their pixels, one frame at a time. Only the files
of the chosen series and its references are opened; a file is opened only when it is a regular file inside
the folder (a link to a file elsewhere is refused, never followed).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np

from phasestream.formats.energies import check_energies, load_energies
from phasestream.formats.stack import FormatError, ImportedStack, check_stack_size
from phasestream.formats.tiff import natural_key
from phasestream.formats.xrm import XrmLayout, open_xrm
from phasestream.formats.xrm_names import NAMINGS, XrmName, has_tokens, parse_xrm_name

__all__ = ["NAME_ENERGY_TOLERANCE_EV", "SAME_ENERGY_EV", "read_xrm_series", "xrm_series_files"]

#: Largest difference (eV) between a frame's ``ImageInfo/Energy`` and the energy in its name: names are
#: written to 0.1 eV, the stream holds the monochromator's value (8353.032 eV in ``..._8353_0eV.xrm``).
NAME_ENERGY_TOLERANCE_EV = 0.25
#: Frames within this many eV of the lowest of them are one energy (XANES steps are 0.1 eV or more).
SAME_ENERGY_EV = 0.05


@dataclass(frozen=True)
class _Frame:
    """One file's header: its name read, its image layout, energy (eV) and where the energy came from."""

    path: Path
    name: XrmName
    layout: XrmLayout
    energy: float
    energy_source: str
    exposure_s: float | None
    pixel_size_um: float | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.layout.height, self.layout.width


def xrm_series_files(folder: str | Path, pattern: str | None = None) -> list[Path]:
    """The ``.xrm`` files of ``folder`` (any case of the suffix; not recursive, no hidden files), those whose
    names match the glob ``pattern`` when it is given, in natural name order. Nothing is opened."""
    folder = Path(folder)
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if not e.name.startswith(".") and e.name.lower().endswith(".xrm")]
    if pattern is not None:
        names = [n for n in names if fnmatchcase(n, pattern)]
    return [folder / n for n in sorted(names, key=natural_key)]


def _regular_file_inside(folder: Path, path: Path) -> None:
    """Refuse ``path`` unless it is, or links to, a regular file directly in ``folder`` (resolved)."""
    try:
        target = path.resolve(strict=True)
        mode = target.stat().st_mode
    except (OSError, RuntimeError) as error:  # a broken or looping link
        raise FormatError(path, f"cannot be resolved to a file ({error})") from None
    if target.parent != folder:
        raise FormatError(path, f"is a link to {target}, outside the folder {folder}: not followed")
    if not stat.S_ISREG(mode):
        raise FormatError(path, "is not a regular file")


_Named = list[tuple[Path, XrmName]]


def _choose(folder: Path, named: _Named, field: str | None) -> tuple[str, _Named, _Named]:
    """The series to read (``field``, or the only one), its sample files and its reference files."""
    namings = {}
    for path, name in named:
        namings.setdefault(name.naming, path.name)
    if len(namings) > 1:
        examples = "; ".join(f"{NAMINGS[k]}: {v}" for k, v in sorted(namings.items()))
        raise FormatError(folder, f"the .xrm files follow several namings ({examples}): pass a file-name glob "
                          "(pattern=) that keeps the files of one acquisition")
    labels = sorted({n.series for _, n in named if not n.reference}, key=natural_key)
    if not labels:
        raise FormatError(folder, f"no sample frames: all {len(named)} .xrm files are reference frames (a 'ref' "
                          "token in the name)")
    if field is not None:
        if next(iter(namings)) == "other":
            raise FormatError(folder, f"field={field!r}: the file names follow neither the SSRL 6-2c nor the APS "
                              "32-ID-C naming, so they name no field of view; pass a file-name glob (pattern=)")
        chosen = [field] if field in labels else [label for label in labels if has_tokens(label, field)]
        if len(chosen) != 1:
            problem = "names no field of view" if not chosen else f"names {len(chosen)} fields of view"
            raise FormatError(folder, f"field={field!r} {problem} among: {', '.join(chosen or labels)}")
    elif len(labels) > 1:
        raise FormatError(folder, f"{len(labels)} fields of view (series) in this folder: {', '.join(labels)}; "
                          "pass field= one of them (phasestream import --select field=...)")
    else:
        chosen = labels
    series = chosen[0]
    samples = [(p, n) for p, n in named if not n.reference and n.series == series]
    key = samples[0][1].key
    return series, samples, [(p, n) for p, n in named if n.reference and n.key == key]


def _frame_energy(path: Path, name: XrmName, stored: np.ndarray | None) -> tuple[float, str]:
    """The frame's energy (eV) and its source: ``ImageInfo/Energy`` above 0, else the name's."""
    if stored is not None and stored.size > 1:
        raise FormatError(path, f"ImageInfo/Energy holds {stored.size} values for one image")
    value = float(stored[0]) if stored is not None and stored.size else None
    if value is not None and not (np.isfinite(value) and value >= 0):
        raise FormatError(path, f"ImageInfo/Energy is {value} (a photon energy is a finite number of eV)")
    if value:
        if name.energy is not None and abs(value - name.energy) > NAME_ENERGY_TOLERANCE_EV:
            raise FormatError(path, f"ImageInfo/Energy {value:.3f} eV disagrees with the {name.energy:g} eV in the "
                              f"file name (over {NAME_ENERGY_TOLERANCE_EV} eV apart)")
        return value, "ImageInfo/Energy"
    if name.energy is None:
        state = "missing" if value is None else "0"
        raise FormatError(path, f"ImageInfo/Energy is {state} and the file name carries no energy")
    return name.energy, "file name"


def _positive(streams, name: str) -> float | None:
    values = streams.values(name, "<f4")
    if values is None or not values.size or not (np.isfinite(values[0]) and values[0] > 0):
        return None
    return float(values[0])


def _header(folder: Path, path: Path, name: XrmName) -> _Frame:
    _regular_file_inside(folder, path)
    with open_xrm(path) as streams:
        layout = streams.layout()
        if layout.count != 1:
            raise FormatError(path, f"holds {layout.count} images; a frame of a series holds one (a .txrm series "
                              "is read with format 'xrm')")
        streams.check_frame(0, layout)
        if not name.reference and streams.uint("ImageInfo/OriginalDataRefCorrected", required=False):
            raise FormatError(path, "ImageInfo/OriginalDataRefCorrected is set: the microscope already divided this "
                              "frame by a reference, and a series divides it by its reference frames")
        energy, source = _frame_energy(path, name, streams.values("ImageInfo/Energy", "<f4"))
        return _Frame(path, name, layout, energy, source, _positive(streams, "ImageInfo/ExpTimes"),
                      _positive(streams, "ImageInfo/PixelSize"))


def _pixels(folder: Path, frame: _Frame) -> np.ndarray:
    """The frame's image (float64), the file checked again to be the one whose header was read."""
    _regular_file_inside(folder, frame.path)
    with open_xrm(frame.path) as streams:
        layout = streams.layout()
        if layout != frame.layout:
            raise FormatError(frame.path, "changed while the series was read")
        return streams.frame(0, layout).astype(np.float64)


def _group(frames: list[_Frame]) -> list[tuple[list[_Frame], list[_Frame]]]:
    """(sample frames, reference frames) per energy, ascending; each frame list in natural name order."""
    ordered = sorted(frames, key=lambda f: (f.energy, f.name.reference, natural_key(f.path.name)))
    groups: list[list[_Frame]] = []
    for frame in ordered:
        if groups and frame.energy - groups[-1][0].energy <= SAME_ENERGY_EV:
            groups[-1].append(frame)
        else:
            groups.append([frame])
    result = []
    for group in groups:
        samples = [f for f in group if not f.name.reference]
        references = [f for f in group if f.name.reference]
        names = ", ".join(f.path.name for f in group[:3]) + (", ..." if len(group) > 3 else "")
        if not samples:
            raise FormatError(references[0].path, f"reference frames at {group[0].energy:.2f} eV, where no sample "
                              f"frame was recorded ({names})")
        if not references:
            raise FormatError(samples[0].path, f"no reference (sample-out) frame at {samples[0].energy:.2f} eV "
                              f"(sample frames: {names})")
        result.append((samples, references))
    return result


def _check_shapes(frames: list[_Frame]) -> None:
    first = frames[0]
    for frame in frames[1:]:
        if frame.shape != first.shape:
            what = "reference frame" if frame.name.reference else "frame"
            raise FormatError(frame.path, f"a {what} of {frame.shape[0]} x {frame.shape[1]} pixels at "
                              f"{frame.energy:.2f} eV; {first.path.name} has {first.shape[0]} x {first.shape[1]}: "
                              "the frames of a series have one size")


def _flat_scales(samples: list[_Frame], references: list[_Frame]) -> list[float]:
    """The factor each reference frame's counts are multiplied by before they are averaged into the flat: the
    sample frames' mean exposure over the frame's own, so that the flat holds what the open beam gives in the
    sample's exposure (SSRL 6-2c exposes its references 0.3 s, its sample frames 0.5 s: unscaled, the OD would be
    ``ln(0.5 / 0.3)`` too low at every energy). 1 for every frame when an exposure is missing, or when they agree
    to 0.1%. Counts taken as proportional to the exposure: a series has no dark frame to subtract first."""
    exposures = [f.exposure_s for f in (*samples, *references)]
    if any(t is None for t in exposures):
        return [1.0] * len(references)
    sample = float(np.mean([f.exposure_s for f in samples]))
    scales = [sample / f.exposure_s for f in references]
    return [1.0] * len(references) if all(abs(k - 1.0) <= 1e-3 for k in scales) else scales


def _short(value: float) -> float:
    return float(f"{value:.6g}")


def _metadata(series: str, naming: str, groups: list[tuple[list[_Frame], list[_Frame]]]) -> dict:
    frames = [f for samples, references in groups for f in (*samples, *references)]
    sources = sorted({f.energy_source for f in frames})
    meta: dict = {
        "naming": naming,
        "facility_naming": NAMINGS[naming],
        "field": series or None,
        "sample_frames": [len(s) for s, _ in groups],
        "reference_frames": [len(r) for _, r in groups],
        "energy_source": " and ".join(sources),
    }
    for key, which in (("exposure_s", 0), ("reference_exposure_s", 1)):
        times = [[f.exposure_s for f in group[which]] for group in groups]
        if all(t is not None for per in times for t in per):
            meta[key] = [_short(float(np.mean(per))) for per in times]
    sizes = [f.pixel_size_um for f in frames]
    if all(s is not None for s in sizes):
        if np.ptp(sizes) <= 1e-6 * max(sizes):
            meta["pixel_size_um"] = _short(sizes[0])
        else:
            meta["pixel_sizes_um"] = [_short(float(np.mean([f.pixel_size_um for f in s]))) for s, _ in groups]
    return meta


def read_xrm_series(
    path: str | Path,
    *,
    energies: Sequence[float] | np.ndarray | str | Path | None = None,
    field: str | None = None,
    pattern: str | None = None,
) -> ImportedStack:
    """Read a folder of single-frame Zeiss ``.xrm`` files as one TXM energy stack (see the module doc).

    Parameters
    ----------
    path : the folder
    energies : (E,) energies in eV or an energy file, replacing the frames' energies (same count, in the
        order of the frames' energies, ascending)
    field : the series to read when the folder holds several (fields of view, scan repetitions): its label
        (``fov03_xanessoc01``, ``rep01_<name>``) or ``_``-separated tokens that name only it (``fov03``)
    pattern : a glob the file names must match too (``rep01_*``): the files of one acquisition where the
        names follow no facility naming or several

    Returns
    -------
    ImportedStack, ``format="xrm-series"``, ``mode="txm"``: images (E, Y, X) float32, the mean of each
    energy's sample frames; flat (E, Y, X) float32, the mean of its reference frames; energies (E,) eV
    ascending; files: per energy its sample then its reference files, each in natural name order; metadata:
    the naming and field read, frames per energy, exposures (s) per energy, pixel size (um), and
    ``flat_scaled_to_sample_exposure`` (per energy) when the reference frames were exposed for another time
    than the sample frames: each reference frame's counts scaled by the sample's exposure over its own.

    Raises
    ------
    FormatError
        naming the file at fault (or the folder): no such folder, no sample frames, several namings or
        fields without a choice, a link out of the folder, a file that is not one readable image, energies
        that disagree with the name or are missing, an energy without reference or sample frames, frames of
        different sizes, a stack over the size bound.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FormatError(folder, "no such folder" if not folder.exists() else "not a folder (a single .xrm or "
                          ".txrm file is read with format 'xrm')")
    resolved = folder.resolve()
    files = xrm_series_files(folder, pattern)
    if not files:
        raise FormatError(folder, f"no .xrm files{f' matching {pattern!r}' if pattern else ''} in this folder")
    series, samples, references = _choose(folder, [(p, parse_xrm_name(p.name)) for p in files], field)
    frames = [_header(resolved, p, n) for p, n in (*samples, *references)]
    _check_shapes(frames)
    groups = _group(frames)
    height, width = frames[0].shape
    check_stack_size(folder, (2, len(groups), height, width), np.float32)  # images and flat
    values = check_energies(folder, [float(np.mean([f.energy for f in s])) for s, _ in groups])
    if energies is not None:
        values = load_energies(energies, folder)
        if values.size != len(groups):
            raise FormatError(folder, f"{len(groups)} energies in the files for {values.size} energies given")
    images = np.empty((len(groups), height, width), dtype=np.float32)
    flat = np.empty_like(images)
    scales = [_flat_scales(samples_, references_) for samples_, references_ in groups]
    for index, (group, scale) in enumerate(zip(groups, scales, strict=True)):
        for out, members, weights in ((images, group[0], [1.0] * len(group[0])), (flat, group[1], scale)):
            total = np.zeros((height, width), dtype=np.float64)
            for frame, weight in zip(members, weights, strict=True):
                total += weight * _pixels(resolved, frame)
            out[index] = total / len(members)
    read = tuple(f.path for samples_, references_ in groups for f in (*samples_, *references_))
    metadata = _metadata(series, frames[0].name.naming, groups)
    if any(weight != 1.0 for scale in scales for weight in scale):
        metadata["flat_scaled_to_sample_exposure"] = [_short(float(np.mean(scale))) for scale in scales]
    return ImportedStack(
        source=folder,
        format="xrm-series",
        energies=values,
        images=images,
        mode="txm",
        flat=flat,
        metadata=metadata,
        files=(*read, Path(energies)) if isinstance(energies, str | Path) else read,
    )
