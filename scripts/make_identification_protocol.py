"""Write the LFW fold-10 identification protocol (names and relative paths only, no images).

    python scripts/make_identification_protocol.py [--people ../shared/data/lfw/people.txt] [--fold 10]
        [--gallery-per-identity 1] [--seed 0] [--out configs/identification/lfw_fold10]

People of fold `--fold` of LFW's people.txt (people never trained on by configs/lfw.yaml, which
trains on folds 1-9) with more than `--gallery-per-identity` images: that many images drawn
(seeded) into gallery.txt, the others into probes.txt; everyone else (the single-image people
for 1): distractors.txt. Evaluate with

    mbembed eval --config configs/lfw.yaml --checkpoint runs/lfw --protocol identification \\
        --id-protocol configs/identification/lfw_fold10
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", default="../shared/data/lfw/people.txt")
    parser.add_argument("--fold", type=int, default=10)
    parser.add_argument("--gallery-per-identity", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="configs/identification/lfw_fold10")
    args = parser.parse_args(argv)

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mobilenet_embed.identification import lfw_people_fold, make_protocol, write_protocol

    people = lfw_people_fold(args.people, args.fold)
    protocol = make_protocol(people, args.gallery_per_identity, seed=args.seed)
    header = (f"LFW identification protocol: fold {args.fold} of people.txt, {args.gallery_per_identity} gallery "
              f"image(s) per identity, seed {args.seed}\n"
              f"made by: python scripts/make_identification_protocol.py --fold {args.fold} "
              f"--gallery-per-identity {args.gallery_per_identity} --seed {args.seed}\n"
              "format: identity<TAB>path relative to the image root (images_deepfunneled)")
    for path in write_protocol(protocol, args.out, header=header):
        print(f"wrote {path}")
    print(f"gallery {len(protocol.gallery)} images of {len(protocol.identities())} identities, "
          f"probes {len(protocol.probes)}, distractors {len(protocol.distractors)} "
          f"({len({n for n, _ in protocol.distractors})} identities)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
