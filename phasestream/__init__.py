"""phasestream: streaming phase mapping for X-ray spectromicroscopy (STXM / TXM-XANES).

Energy scans run with Bluesky; each image becomes optical density and updates per-pixel
Pearson correlations with reference spectra, so phase maps grow while the scan runs.
"""

__version__ = "0.1.0"
