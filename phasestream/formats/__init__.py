"""Facility STXM/TXM file readers: each turns a file into an :class:`ImportedStack`."""

from phasestream.formats.stack import FormatError, HDF5Source, ImportedStack, sha256_of

__all__ = ["FormatError", "HDF5Source", "ImportedStack", "sha256_of"]
