"""Evaluate trained runs on every held-out set of the LFW recipes, side by side, in one table.

    python scripts/recipe_table.py RUN [RUN ...] [--recrop /tmp/lfw_recrop] [--align RUN ...]
        [--out results/recipes/table.json]

Sets (all of people never trained on: configs/lfw*.yaml train on folds 1-9 of people.txt):
  fold10   the 600 pairs of fold 10 of LFW's pairs.txt (the config's eval section);
  heldout  configs/heldout/lfw_fold10_pairs.txt: 3,940 pairs of the fold-10 people (every same
           pair, at most 100 a person, and as many different pairs): standard error ~0.6 points;
  tight, loose, shift  the fold-10 pairs on re-cropped copies of the images
           (scripts/make_recrop_set.py --out RECROP; skipped when --recrop is not given).
Each run is evaluated with its own run config (`mbembed eval --config RUN/config.yaml --checkpoint
RUN`: its best checkpoint, chosen on fold 10 during training, so its fold-10 figure is optimistic;
``--final``: the run's last checkpoint instead, chosen by nothing);
runs named in --align are evaluated with `--align` on raw photos (--raw-root for fold10 and
heldout), each aligned on the fly. The accuracy
is the 10-fold LFW accuracy (mean +- std over folds). MBEMBED overrides the command; by default
it is `mbembed` on PATH, else the one beside this Python (a virtual environment not activated).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys

HELDOUT = "configs/heldout/lfw_fold10_pairs.txt"
RECROPS = ("tight", "loose", "shift")


def _sets(recrop: str | None, root: list[str]) -> list[tuple[str, list[str]]]:
    sets = [("fold10", root), ("heldout", root + ["--pairs", HELDOUT, "--set", "eval.pairs_folds=null"])]
    if recrop:
        sets += [(name, ["--pairs-root", os.path.join(recrop, name)]) for name in RECROPS]
    return sets


def last_checkpoint(run: str) -> str:
    """The run's latest checkpoint, as its index names it (`checkpoints.latest_checkpoint`)."""
    from mobilenet_embed.checkpoints import latest_checkpoint

    found = latest_checkpoint(os.path.join(run, "checkpoints"))
    if found is None:
        sys.exit(f"{run}: no checkpoint")
    return found.path


def mbembed_command(environ: dict) -> list[str]:
    """The `mbembed` command: $MBEMBED, else `mbembed` on PATH, else the one beside this Python."""
    if environ.get("MBEMBED"):
        return shlex.split(environ["MBEMBED"])
    found = shutil.which("mbembed") or shutil.which("mbembed", path=os.path.dirname(sys.executable))
    if found is None:
        sys.exit("mbembed: not on PATH nor beside " + sys.executable + ": install the package or set MBEMBED")
    return [found]


def _evaluate(mbembed: list[str], run: str, checkpoint: str, extra: list[str], out: str) -> dict:
    cmd = mbembed + ["eval", "--config", os.path.join(run, "config.yaml"), "--checkpoint", checkpoint,
                     "--out", out] + extra
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        sys.exit(f"{cmd[0]}: cannot run ({exc.strerror}): install the package or set MBEMBED")
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as fh:
        return json.load(fh)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*")
    parser.add_argument("--recrop", default=None, help="folder written by scripts/make_recrop_set.py")
    parser.add_argument("--align", nargs="*", default=[], help="runs to evaluate with --align, on raw photos")
    parser.add_argument("--raw-root", default="../shared/data/lfw/images_deepfunneled",
                        help="the raw photos of fold10/heldout for --align runs")
    parser.add_argument("--final", action="store_true",
                        help="evaluate each run's last checkpoint, not its best (chosen on fold 10)")
    parser.add_argument("--out", default="results/recipes/table.json")
    args = parser.parse_args(argv)
    mbembed = mbembed_command(dict(os.environ))
    table: dict = {}
    for run in args.runs + args.align:
        aligned = run in args.align
        extra = ["--align"] if aligned else []
        checkpoint = last_checkpoint(run) if args.final else run
        for name, set_args in _sets(args.recrop, ["--pairs-root", args.raw_root] if aligned else []):
            out = os.path.join(run, "eval_sets" + ("_final" if args.final else ""), name)
            m = _evaluate(mbembed, run, checkpoint, set_args + extra, out)
            table.setdefault(run, {})[name] = {k: m.get(k) for k in ("accuracy", "accuracy_std", "auc", "eer")}
            table[run][name]["pairs"] = m["n_pairs"]
    if not table:
        parser.error("give at least one run (positional or after --align)")
    names = [n for n, _ in _sets(args.recrop, [])]
    print("\n| run | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
    for run, row in table.items():
        cells = [f"{row[n]['accuracy']:.3f} +- {row[n]['accuracy_std']:.3f}" for n in names]
        print(f"| {run}{' (--align)' if run in args.align else ''} | " + " | ".join(cells) + " |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(table, fh, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
