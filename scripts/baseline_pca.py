"""Eigenfaces (PCA) baseline on the LFW split that configs/lfw.yaml trains and validates on.

PCA is fitted on the images of the people of folds 1-9 of `people.txt`; the pairs of fold 10 of
`pairs.txt` (600 pairs) are verified with squared L2 distances between whitened, L2-normalised
projections, by the same `verification_metrics` as `mbembed eval`. This is the floor a trained
network must clear (the LFW results page lists unsupervised eigenfaces at 60.02% on all 10 folds).

    python scripts/baseline_pca.py --lfw ../shared/data/lfw --out bench/baseline_pca.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from PIL import Image
from sklearn.decomposition import PCA

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mobilenet_embed.metrics import verification_metrics  # noqa: E402
from mobilenet_embed.pairs import read_pairs  # noqa: E402


def read_people_folds(path: str) -> list[list[tuple[str, int]]]:
    """LFW people.txt: number of folds, then per fold a count line and `name<TAB>images` lines."""
    with open(path, encoding="utf-8") as fh:
        lines = [line.strip() for line in fh if line.strip()]
    n_folds, pos, folds = int(lines[0]), 1, []
    for _ in range(n_folds):
        count = int(lines[pos])
        folds.append([(name, int(n)) for name, n in (line.split("\t") for line in lines[pos + 1:pos + 1 + count])])
        pos += 1 + count
    return folds


def load_grey(path: str, size: int, crop_fraction: float) -> np.ndarray:
    """Greyscale, central crop, resize: the classic eigenfaces input, flattened to a vector."""
    with Image.open(path) as img:
        img = img.convert("L")
        w, h = img.size
        cw, ch = round(w * crop_fraction), round(h * crop_fraction)
        left, top = (w - cw) // 2, (h - ch) // 2
        img = img.crop((left, top, left + cw, top + ch)).resize((size, size), Image.BILINEAR)
        return np.asarray(img, dtype=np.float32).ravel() / 255.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lfw", default="../shared/data/lfw")
    parser.add_argument("--train-folds", default="1-9", help="people.txt folds to fit PCA on")
    parser.add_argument("--test-fold", type=int, default=10, help="pairs.txt fold to verify")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--crop-fraction", type=float, default=0.5)
    parser.add_argument("--components", type=int, default=128)
    parser.add_argument("--max-train-images", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/baseline_pca.json")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    root = os.path.join(args.lfw, "images_deepfunneled")
    lo, hi = (int(x) for x in args.train_folds.split("-"))
    folds = read_people_folds(os.path.join(args.lfw, "people.txt"))
    people = [name for f in range(lo, hi + 1) for name, _ in folds[f - 1]]
    paths = sorted(os.path.join(root, name, fn) for name in people for fn in os.listdir(os.path.join(root, name)))
    rng = np.random.default_rng(args.seed)
    if len(paths) > args.max_train_images:
        paths = [paths[i] for i in sorted(rng.choice(len(paths), args.max_train_images, replace=False))]
    train = np.stack([load_grey(p, args.size, args.crop_fraction) for p in paths])
    pca = PCA(n_components=args.components, whiten=True, random_state=args.seed).fit(train)

    # One fold's 600 pairs, same and different interleaved so that each sub-fold is balanced.
    test = read_pairs(os.path.join(args.lfw, "pairs.txt"), root, folds=[args.test_fold])
    unique = sorted({p for pair in test for p in (pair.path_a, pair.path_b)})
    emb = pca.transform(np.stack([load_grey(p, args.size, args.crop_fraction) for p in unique]))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    row = {p: i for i, p in enumerate(unique)}
    a = emb[[row[p.path_a] for p in test]]
    b = emb[[row[p.path_b] for p in test]]
    distances = np.sum((a - b) ** 2, axis=1)
    metrics = verification_metrics(distances, np.array([p.issame for p in test]), n_folds=10, far_target=1e-3)

    result = {"method": "eigenfaces (PCA, whitened)", "train_people_folds": args.train_folds,
              "train_images": len(paths), "test_fold": args.test_fold, "test_pairs": len(test),
              "components": args.components, "size": args.size, "crop_fraction": args.crop_fraction,
              "accuracy": metrics["accuracy"], "accuracy_std": metrics["accuracy_std"],
              "val": metrics["val"], "far": metrics["far"], "auc": metrics["auc"], "eer": metrics["eer"],
              "seconds": round(time.perf_counter() - start, 1)}
    print(f"eigenfaces on LFW pairs fold {args.test_fold} ({len(test)} pairs), PCA fitted on "
          f"{len(paths)} images of people folds {args.train_folds}:")
    print(f"  accuracy {result['accuracy']:.4f} +- {result['accuracy_std']:.4f}  "
          f"VAL@FAR=1e-3 {result['val']:.4f}  AUC {result['auc']:.4f}  EER {result['eer']:.4f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
