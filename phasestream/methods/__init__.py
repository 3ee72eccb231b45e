"""Classic XANES analysis: flat-field, alignment, edge normalization, LCF, unmixing."""
