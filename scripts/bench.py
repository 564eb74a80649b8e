"""Benchmarks, side by side in one run: `python scripts/bench.py NAME [options]`.

NAME is one of losses, data, train, eval, export, distribute, align, scale, heads, search; each lives
in scripts/bench_NAME.py with a
`main(argv) -> dict` that prints a table and writes JSON (default bench/NAME.json).
"""

from __future__ import annotations

import importlib
import os
import sys

NAMES = ("losses", "data", "train", "eval", "export", "distribute", "align", "scale", "heads", "search")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in NAMES:
        print(__doc__.strip())
        print("usage: python scripts/bench.py {" + ",".join(NAMES) + "} [options]  (NAME --help for options)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    module = importlib.import_module(f"bench_{argv[0]}")
    module.main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
