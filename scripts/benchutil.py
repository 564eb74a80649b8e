"""What every benchmark of scripts/bench.py shares: writing its result as JSON."""

from __future__ import annotations

import json
import os


def write_result(path: str, result: dict) -> None:
    """Write `result` as JSON to `path` (creating its folder) and say where."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {path}")


def machine_info() -> dict:
    """CPUs, platform, Python / TensorFlow / Keras versions, GPUs and load: the JSON's "machine"."""
    import platform

    import keras
    import tensorflow as tf

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "tensorflow": tf.__version__, "keras": keras.__version__,
            "gpus": len(tf.config.list_physical_devices("GPU")),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
