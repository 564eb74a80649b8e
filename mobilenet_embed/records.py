"""What goes into the JSON and YAML records mbembed writes: values made JSON-safe, and versions.

`jsonable` is the one conversion of results for `json.dump`: NumPy arrays and scalars become
Python lists and numbers, tuples lists, dict keys strings, and NaN / infinity the strings
``"nan"`` / ``"inf"`` / ``"-inf"`` (JSON has no such numbers; `json.dump` would write invalid
JSON). `versions` is the one record of the software a run or an export was made with.
"""

from __future__ import annotations

import math
import platform
from typing import Any

import numpy as np


def jsonable(value: Any) -> Any:
    """`value` with NumPy arrays/scalars as Python lists/numbers and non-finite floats as strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def versions() -> dict:
    """``{mbembed, tensorflow, keras, numpy, python[, ai_edge_litert]}`` version strings."""
    import keras
    import tensorflow as tf

    from mobilenet_embed import __version__

    out = {"mbembed": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
           "numpy": np.__version__, "python": platform.python_version()}
    try:
        from importlib.metadata import version

        out["ai_edge_litert"] = version("ai-edge-litert")
    except Exception:  # noqa: BLE001 - informative only
        pass
    return out
