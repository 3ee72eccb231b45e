"""Helpers shared by the test modules (importable: tests/ is on pytest's pythonpath)."""

import numpy as np


def normalize(obj: object) -> object:
    """Documents as comparable values: tuples as lists, arrays and NumPy scalars with their dtype."""
    if isinstance(obj, dict):
        return {key: normalize(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [normalize(value) for value in obj]
    if isinstance(obj, np.ndarray):
        return ("ndarray", obj.dtype.str, obj.shape, obj.tobytes())
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, np.generic):
        return ("scalar", obj.dtype.str, obj.item())
    return obj
