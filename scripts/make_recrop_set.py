"""Write re-cropped copies of LFW's fold-10 images (tighter, looser, shifted framing) for the
robustness set: the same pairs, faces framed as other collections frame them.

    python scripts/make_recrop_set.py [--people ../shared/data/lfw/people.txt] [--fold 10]
        [--root ../shared/data/lfw/images_deepfunneled] --out /tmp/lfw_recrop

writes OUT/<variant>/<name>/<name>_NNNN.jpg for each variant of `mobilenet_embed.robustness.RECROPS`
(derived LFW images: keep them out of the repository). Evaluate a model on each variant with the
fold-10 pairs, its own preprocessing unchanged:

    mbembed eval --config configs/lfw.yaml --checkpoint runs/lfw --pairs-root /tmp/lfw_recrop/tight
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
    parser.add_argument("--out", required=True)
    parser.add_argument("--quality", type=int, default=95)
    args = parser.parse_args(argv)

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import numpy as np
    from PIL import Image

    from mobilenet_embed import atomic
    from mobilenet_embed.identification import lfw_people_fold
    from mobilenet_embed.robustness import RECROPS, recrop_image

    files = [p for paths in lfw_people_fold(args.people, args.fold).values() for p in paths]
    for rel in files:
        with Image.open(os.path.join(args.root, rel)) as im:
            image = np.asarray(im.convert("RGB"))
        for crop in RECROPS:
            dest = os.path.join(args.out, crop.name, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            atomic.atomic_write(dest, lambda tmp, c=crop: Image.fromarray(recrop_image(image, c)).save(
                tmp, format="JPEG", quality=args.quality))
    print(f"wrote {len(files)} images x {len(RECROPS)} variants "
          f"({', '.join(f'{c.name} {c.scale:g}' for c in RECROPS)}) under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
