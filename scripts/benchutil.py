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
