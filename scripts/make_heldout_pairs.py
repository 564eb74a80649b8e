"""Write a larger held-out verification set: every same pair of LFW's fold-10 people (capped per
person) plus as many different pairs, in 10 View 2 folds (names and numbers only, no images).

    python scripts/make_heldout_pairs.py [--people ../shared/data/lfw/people.txt] [--fold 10]
        [--root ../shared/data/lfw/images_deepfunneled] [--max-same 100] [--seed 0]
        [--out configs/heldout/lfw_fold10_pairs.txt]

configs/lfw*.yaml train on folds 1-9, so these people were never trained on. Evaluate with

    mbembed eval --config configs/lfw.yaml --checkpoint runs/lfw \\
        --pairs configs/heldout/lfw_fold10_pairs.txt --set 'eval.pairs_folds=null'
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", default="../shared/data/lfw/people.txt")
    parser.add_argument("--fold", type=int, default=10)
    parser.add_argument("--root", default="../shared/data/lfw/images_deepfunneled")
    parser.add_argument("--max-same", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="configs/heldout/lfw_fold10_pairs.txt")
    args = parser.parse_args(argv)

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mobilenet_embed.identification import lfw_people_fold
    from mobilenet_embed.pairs import exhaustive_pairs, write_pairs

    people = {name: [os.path.join(args.root, p) for p in paths]
              for name, paths in lfw_people_fold(args.people, args.fold).items()}
    pairs = exhaustive_pairs(people, max_same_per_identity=args.max_same, seed=args.seed)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    kind = write_pairs(pairs, args.out, args.root)
    same = sum(p.issame for p in pairs)
    print(f"wrote {args.out} ({kind} format): {len(pairs)} pairs, {same} same and {len(pairs) - same} "
          f"different, of {len(people)} people of fold {args.fold}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
