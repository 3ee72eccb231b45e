"""Model artifacts and the registry that finds them.

An artifact is a folder holding the saved Keras model (``model.keras``) and ``manifest.json``::

    {
      "format": "phasestream-model/1",
      "name": "gmvae-nvpf-synthetic", "kind": "gmvae" | "indi" | "denoise", "version": "1.0.0",
      "sha256": "<sha256 of the weights: every weight array's dtype, shape and bytes, in order>",
      "files": {"model.keras": "<sha256 of the file>"},
      "energies_eV": [...], "phases": [...],
      "normalization": {"mode": ..., "mean": [...], "scale": [...]},
      "config": {... the network's constructor arguments ...},
      "training": {"source": "synthetic", "seed": 0, ...} or {"source": "tiled", "runs": [...], "query": ...},
      "metrics": {...}, "created": "<ISO 8601 UTC>", "software": {...}
    }

The registry lists artifacts from the packaged ``pretrained`` folder and from the user folder
``PHASESTREAM_MODELS`` (user artifacts with the same name and version win). Listing reads only
manifests; :meth:`ModelRegistry.load` checks the file hash before deserializing anything and the
weights hash after, and refuses an artifact whose manifest and network disagree.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MANIFEST", "MODEL_FILE", "PRETRAINED_DIR", "Artifact", "ArtifactError", "ModelNotFoundError",
           "ModelRegistry", "save_artifact", "weights_sha256"]

logger = logging.getLogger(__name__)

FORMAT = "phasestream-model/1"
MANIFEST = "manifest.json"
MODEL_FILE = "model.keras"
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
KINDS = ("gmvae", "indi", "denoise")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REQUIRED = ("format", "name", "kind", "version", "sha256", "files", "created")
MAX_MANIFEST_BYTES = 1 << 20
"""A larger manifest.json is refused unread (a real one is a few kB)."""


class ArtifactError(ValueError):
    """An artifact is corrupted, incomplete or does not match its manifest."""


class ModelNotFoundError(KeyError):
    """No artifact of that name (and version) is registered."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0]) if self.args else ""


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(weights: Iterable[np.ndarray]) -> str:
    """sha256 over the weight arrays in order (dtype, shape and little-endian bytes of each)."""
    digest = hashlib.sha256()
    for w in weights:
        a = np.ascontiguousarray(np.asarray(w))
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def _read_manifest(manifest_path: Path) -> Any:
    """The parsed ``manifest.json``: only a regular file (a FIFO or device would block or never end) of at
    most :data:`MAX_MANIFEST_BYTES`; every failure is an :class:`ArtifactError` saying what is wrong."""
    try:
        fd = os.open(manifest_path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise ArtifactError(f"{manifest_path.parent} is not a model artifact: {MANIFEST} is missing") from None
    except OSError as exc:
        raise ArtifactError(f"{manifest_path} cannot be read: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ArtifactError(f"{manifest_path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ArtifactError(f"{manifest_path} cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{manifest_path} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise ArtifactError(f"{manifest_path} is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ArtifactError(f"{manifest_path} is not valid JSON: {exc}") from None


def _is_hex_hash(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


#: the manifest fields whose type is checked: (accepts the value, what it must be); None is accepted
#: (as absent) for every field but sha256 and created
_FIELD_TYPES = {
    "sha256": (_is_hex_hash, "a sha256 (64 hex digits)"),
    "created": (lambda v: isinstance(v, str), "a string"),
    "energies_eV": (lambda v: isinstance(v, list) and all(map(_is_number, v)), "a list of finite numbers"),
    "phases": (lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v), "a list of strings"),
    "training": (lambda v: isinstance(v, dict), "a map"),
    "metrics": (lambda v: isinstance(v, dict), "a map"),
    "domain": (lambda v: isinstance(v, dict), "a map"),
    "steps": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "scale": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
}


def _version_key(version: str) -> tuple:
    parts = re.split(r"[.+-]", version)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


@dataclass(frozen=True)
class Artifact:
    """A model artifact on disk: its folder and parsed manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def sha256(self) -> str:
        return self.manifest["sha256"]

    @property
    def energies(self) -> np.ndarray:
        return np.asarray(self.manifest.get("energies_eV", []), dtype=np.float64)

    @property
    def phases(self) -> list[str]:
        return list(self.manifest.get("phases", []))

    def field_problems(self) -> dict[str, str]:
        """``{field: what it must be}`` for each manifest field of the wrong type (empty for a sound manifest)."""
        m = self.manifest
        problems = {key: f"must be {what}, got {type(m[key]).__name__}" for key, (ok, what) in _FIELD_TYPES.items()
                    if key in m and not (m[key] is None and key not in _REQUIRED) and not ok(m[key])}
        bad = sorted(name for name, digest in m["files"].items() if not _is_hex_hash(digest))
        if bad:
            problems["files"] = f"must be a map of file names to sha256s (64 hex digits); not so for {bad}"
        return problems

    def summary(self) -> dict[str, Any]:
        """The manifest without bulky fields: what ``list`` replies carry. A field of the wrong type is left
        out (None, or empty) and named in ``problems`` (``{field: what it must be}``), as :meth:`load` refuses it."""
        problems = self.field_problems()
        m = {k: v for k, v in self.manifest.items() if k not in problems}
        training = m.get("training") or {}
        out = {"name": m["name"], "version": m["version"], "kind": m["kind"], "sha256": m.get("sha256"),
               "energies_eV": m.get("energies_eV", []), "phases": m.get("phases", []),
               "training": {k: v for k, v in training.items() if k in ("source", "seed", "runs", "query",
                                                                       "n_spectra")},
               "metrics": m.get("metrics", {}), "created": m.get("created"), "path": str(self.path),
               **{k: m[k] for k in ("domain", "steps", "scale", "pixel_size") if k in m}}
        if problems:
            out["problems"] = problems
        return out

    @classmethod
    def read(cls, path: str | os.PathLike) -> Artifact:
        """Parse and check the manifest of the artifact folder ``path`` (no model is loaded)."""
        path = Path(path)
        manifest_path = path / MANIFEST
        manifest = _read_manifest(manifest_path)
        if not isinstance(manifest, dict):
            raise ArtifactError(f"{manifest_path} must hold a JSON object")
        missing = [k for k in _REQUIRED if k not in manifest]
        if missing:
            raise ArtifactError(f"{manifest_path} lacks {missing}")
        if manifest["format"] != FORMAT:
            raise ArtifactError(f"{manifest_path}: format {manifest['format']!r} is not {FORMAT!r}")
        if manifest["kind"] not in KINDS:
            raise ArtifactError(f"{manifest_path}: kind {manifest['kind']!r} is not one of {KINDS}")
        for key in ("name", "version"):
            if not isinstance(manifest[key], str) or not _NAME.match(manifest[key]):
                raise ArtifactError(f"{manifest_path}: {key} {manifest[key]!r} is not a plain name")
        if not isinstance(manifest["files"], dict) or MODEL_FILE not in manifest["files"]:
            raise ArtifactError(f"{manifest_path}: files must list {MODEL_FILE} with its sha256")
        return cls(path, manifest)

    def check_fields(self) -> None:
        """Raise :class:`ArtifactError` naming each manifest field of the wrong type."""
        problems = self.field_problems()
        if problems:
            raise ArtifactError(f"artifact {self.name} {self.version}: "
                                + "; ".join(f"manifest field {k} {v}" for k, v in problems.items()))

    def verify_files(self) -> None:
        """Check every listed file against its sha256 (before anything is deserialized)."""
        self.check_fields()
        for name, expected in self.manifest["files"].items():
            file = self.path / name
            if Path(name).name != name or not file.is_file():
                raise ArtifactError(f"artifact {self.name} {self.version}: file {name} is missing in {self.path}")
            actual = _file_sha256(file)
            if actual != expected:
                raise ArtifactError(f"artifact {self.name} {self.version}: {name} is corrupted or was replaced "
                                    f"(sha256 {actual[:12]}..., manifest says {expected[:12]}...)")

    def load(self):
        """The Keras model of this artifact, checked against the manifest (imports TensorFlow)."""
        self.verify_files()
        import keras

        # importing the modules registers their Keras classes
        from phasestream.models.denoise import BlindRowNet  # noqa: F401
        from phasestream.models.gmvae import GMVAE  # noqa: F401
        from phasestream.models.indi import InDINet  # noqa: F401

        try:
            model = keras.saving.load_model(self.path / MODEL_FILE, compile=False, safe_mode=True)
        except Exception as exc:  # Keras raises many types for a bad archive
            raise ArtifactError(f"artifact {self.name} {self.version}: cannot load {MODEL_FILE}: {exc}") from exc
        actual = weights_sha256(model.get_weights())
        if actual != self.sha256:
            raise ArtifactError(f"artifact {self.name} {self.version}: weights sha256 {actual[:12]}... does not "
                                f"match the manifest's {self.sha256[:12]}...")
        energies = self.manifest.get("energies_eV")
        n_in = getattr(model, "n_energies", None)
        if self.kind == "gmvae" and (energies is None or n_in != len(energies)):
            raise ArtifactError(f"artifact {self.name} {self.version}: the network takes {n_in} energies but the "
                                f"manifest lists {None if energies is None else len(energies)}")
        return model


def _software() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("phasestream", "keras", "tensorflow-cpu", "tensorflow", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def save_artifact(
    model,
    directory: str | os.PathLike,
    *,
    name: str,
    version: str,
    kind: str,
    energies_eV: Sequence[float] | None = None,
    phases: Sequence[str] | None = None,
    training: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Artifact:
    """Write ``model`` as the artifact ``<directory>/<name>-<version>`` and return it.

    The model is saved without optimizer state (a fresh copy from its config carries the weights),
    so an artifact holds only what inference needs. ``extra`` adds kind-specific manifest fields
    (InDI: ``scale``, ``pixel_size``, ``steps``, ``normalization``).
    """
    import keras

    for key, value in (("name", name), ("version", version)):
        if not _NAME.match(value):
            raise ValueError(f"{key} {value!r} must be letters, digits, '.', '_' or '-'")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    target = Path(directory) / f"{name}-{version}"
    if target.exists() and not overwrite:
        raise FileExistsError(f"artifact {target} exists: choose another version or pass overwrite=True")
    clean = type(model).from_config(model.get_config())
    if hasattr(clean, "build_for_inference"):
        clean.build_for_inference()
    clean.set_weights(model.get_weights())
    Path(directory).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=directory))
    try:
        keras.saving.save_model(clean, staging / MODEL_FILE)
        config = clean.get_config()
        manifest = {
            "format": FORMAT, "name": name, "kind": kind, "version": version,
            "sha256": weights_sha256(clean.get_weights()),
            "files": {MODEL_FILE: _file_sha256(staging / MODEL_FILE)},
            "energies_eV": [float(e) for e in energies_eV] if energies_eV is not None else None,
            "phases": list(phases) if phases is not None else None,
            "normalization": config.get("normalization"),
            "config": {k: v for k, v in config.items() if k not in ("name", "trainable", "dtype")},
            "training": dict(training or {}), "metrics": dict(metrics or {}),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "software": _software(),
            **dict(extra or {}),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        staging.chmod(0o755)  # mkdtemp made it private
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved artifact %s", target)
    return Artifact.read(target)


class ModelRegistry:
    """Artifacts found in ``folders`` (default: the packaged pretrained folder, then ``PHASESTREAM_MODELS``).

    Later folders win for the same name and version. A folder that fails its manifest check is
    skipped with a warning when listing and reported by :meth:`problems`.
    """

    def __init__(self, folders: Sequence[str | os.PathLike] | None = None):
        if folders is None:
            folders = [PRETRAINED_DIR]
            user = os.environ.get("PHASESTREAM_MODELS")
            if user:
                folders += [Path(p) for p in user.split(os.pathsep) if p]
        self.folders = [Path(f) for f in folders]
        self._problems: dict[str, str] = {}

    def artifacts(self) -> list[Artifact]:
        """Every valid artifact, sorted by name then version."""
        found: dict[tuple[str, str], Artifact] = {}
        self._problems = {}
        for folder in self.folders:
            if not folder.is_dir():
                continue
            try:
                paths = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError as exc:  # e.g. a folder this user may not read
                self._problems[str(folder)] = f"cannot be listed: {exc.strerror or exc}"
                logger.warning("skipping the model folder %s: %s", folder, self._problems[str(folder)])
                continue
            for path in paths:
                try:
                    art = Artifact.read(path)
                except (ArtifactError, OSError, RecursionError) as exc:  # read() means to raise only the first
                    self._problems[str(path)] = str(exc)
                    logger.warning("skipping %s: %s", path, exc)
                    continue
                found[(art.name, art.version)] = art
        return sorted(found.values(), key=lambda a: (a.name, _version_key(a.version)))

    def problems(self) -> dict[str, str]:
        """Folders skipped by the last listing, with the reason."""
        self.artifacts()
        return dict(self._problems)

    def get(self, name: str, version: str | None = None) -> Artifact:
        """The artifact ``name`` at ``version`` (default: the highest version)."""
        matches = [a for a in self.artifacts() if a.name == name]
        if version is not None:
            matches = [a for a in matches if a.version == version]
        if not matches:
            known = sorted({f"{a.name} {a.version}" for a in self.artifacts()})
            what = f"{name} {version}" if version else name
            raise ModelNotFoundError(f"no model artifact {what!r}; registered: {known or 'none'} "
                                     f"(folders: {[str(f) for f in self.folders]})")
        return matches[-1]

    def load(self, name: str, version: str | None = None):
        """``(artifact, model)`` for ``name``/``version``, checked (see :meth:`Artifact.load`)."""
        art = self.get(name, version)
        return art, art.load()
