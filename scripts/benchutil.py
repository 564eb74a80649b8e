"""What the benchmarks of scripts/bench.py share: writing the result as JSON, listing image files."""

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


def image_files(folder: str, limit: int) -> list:
    """The first `limit` JPEG / PNG files below `folder`, sorted by path; exits when it is missing."""
    if not os.path.isdir(folder):
        raise SystemExit(f"{folder}: image folder not found (LFW lives in ../shared/data/lfw)")
    return sorted(os.path.join(root, f) for root, _, files in os.walk(folder) for f in files
                  if f.lower().endswith((".jpg", ".jpeg", ".png")))[:limit]


def machine_info() -> dict:
    """CPUs, platform, Python / TensorFlow / Keras versions, GPUs and load: the JSON's "machine"."""
    import platform

    import keras
    import tensorflow as tf

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "tensorflow": tf.__version__, "keras": keras.__version__,
            "gpus": len(tf.config.list_physical_devices("GPU")),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
