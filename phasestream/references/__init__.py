"""Reference spectra: loading, interpolation onto scan energies, energy selection.

Formats (docs/contract.md, "Reference spectra"):

* CSV with header ``energy_eV,<phase 1>,<phase 2>,...``, one row per energy, values in OD or
  normalized absorption; optional sidecar ``<stem>.yaml`` with per-phase metadata, e.g.
  ``phases: {Na3.0: {na_content: 3.0}}``.
* Two-column whitespace files (energy, value; keV or eV, detected by magnitude), one phase
  each; several of them load as one set.
* A registered name (``"nvpf-synthetic"``), resolved by :func:`load_references`.

Text files are UTF-8 and at most :data:`DEFAULT_MAX_REFERENCE_BYTES`; only regular files are
read (no FIFOs or devices). Error messages name the file, line and column, never its content.

References named by a start document (``phasestream.references``) come from the network and
are loaded with :func:`load_document_references`: a registered name, or a file inside the
reference folders configured with ``serve --references-dir`` or ``PHASESTREAM_REFERENCES``
(:func:`reference_folders_from_env`). :func:`load_references` is for trusted callers (CLI,
tests, benchmarks) and opens any path it is given.
"""

from phasestream.references import files as _files
from phasestream.references import selection as _selection
from phasestream.references import spectra as _spectra
from phasestream.references.files import load_document_references, load_references, reference_folders_from_env
from phasestream.references.selection import (
    DEFAULT_DOSE,
    SELECTION_METHODS,
    Separation,
    edge_region,
    flat_energies,
    predicted_separation,
    select_energies,
)
from phasestream.references.spectra import (
    DEFAULT_MAX_REFERENCE_BYTES,
    MAX_NAME_LENGTH,
    MAX_PHASES,
    REFERENCE_FOLDERS_ENV,
    EnergyOutOfRangeError,
    ReferenceAccessError,
    ReferenceFormatError,
    ReferenceSet,
    discrimination_score,
    register_references,
    registered_references,
    write_references,
)

__all__ = [*_spectra.__all__, *_selection.__all__, *_files.__all__]
